#!/usr/bin/env bash
# Real-CT check of ct_throughplane_sr.py (docs/ct_throughplane_sr.md, "Real CT"): one command from a CT series
# to the evaluation tables. The series is cut into three slabs across the patient's left-right axis (train /
# val / test: one patient, so "held out" means other voxels of the same scan, never seen in training), the
# models train on the train slab with the `small` preset, and `evaluate` thins the test slab to 3 mm.
#   bash tools/ctsr_real_ct.sh DICOM_SERIES_FOLDER RUN_DIR [UNET_STEPS] [VAE_STEPS] [LDM_STEPS]
# Env: PYTHON (default python), THREADS (default 1). Takes ~1 h on 2 CPU cores with the default steps.
set -euo pipefail
SERIES=${1:?usage: ctsr_real_ct.sh DICOM_SERIES_FOLDER RUN_DIR [UNET_STEPS] [VAE_STEPS] [LDM_STEPS]}
RUN=${2:?usage: ctsr_real_ct.sh DICOM_SERIES_FOLDER RUN_DIR [UNET_STEPS] [VAE_STEPS] [LDM_STEPS]}
UNET_STEPS=${3:-3000}
VAE_STEPS=${4:-1000}
LDM_STEPS=${5:-1000}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${THREADS:-1}
cd "$(dirname "$0")/.."
SR="$PY ct_throughplane_sr.py"
COMMON=(--preset small --device cpu)

"$PY" - "$SERIES" "$RUN/data" <<'PYEOF'
import sys
from pathlib import Path

from common import nifti_io

series, out = Path(sys.argv[1]), Path(sys.argv[2])
vol = nifti_io.read_volume(series, "CT")
n = vol.hu.shape[2]
cuts = {"train": (0, int(n * 0.45)), "val": (int(n * 0.45), int(n * 0.55)), "test": (int(n * 0.55), n)}
out.mkdir(parents=True, exist_ok=True)
for name, (i0, i1) in cuts.items():
    affine = vol.affine.copy()
    affine[:3, 3] += affine[:3, 0] * i0  # the slab's first column keeps its patient position
    nifti_io.write_nifti(out / f"{name}.nii.gz", nifti_io.Volume(vol.hu[:, :, i0:i1], affine, {}))
    (out / f"{name}.txt").write_text(f"{name}.nii.gz\n")
    print(f"{name}: columns {i0}-{i1 - 1} of {n}, shape {vol.hu[:, :, i0:i1].shape}")
PYEOF

$SR train --model unet3d --data "$RUN/data" --out "$RUN/unet3d" --max-steps "$UNET_STEPS" "${COMMON[@]}"
$SR train --model vae --data "$RUN/data" --out "$RUN/vae" --max-steps "$VAE_STEPS" "${COMMON[@]}"
$SR train --model ldm --vae "$RUN/vae/best.pt" --data "$RUN/data" --out "$RUN/ldm" --max-steps "$LDM_STEPS" \
    "${COMMON[@]}"
for axis in j k; do  # j, i: in-plane axes (0.98 mm) thinned to 3 mm; k: the scan's own 2 mm slice axis
    $SR evaluate --input "$RUN/data/test.nii.gz" --thin-axis "$axis" --unet "$RUN/unet3d/best.pt" \
        --ldm "$RUN/ldm/best.pt" --out "$RUN/eval_$axis" "${COMMON[@]}"
done
