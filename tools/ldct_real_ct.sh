#!/usr/bin/env bash
# Real-CT table of ldct_denoise.py (docs/ldct_denoise.md, "Real CT"): one command from public CT to the table.
# Data: four 512x512 CT slices of four patients in pydicom-data, and TotalSegmentator 2.18.0's DICOM series
# tests/reference_files/example_ct_dicom (its sdist: pip download --no-deps --no-binary :all:
# totalsegmentator==2.18.0). The NIfTI cases reserved by issue 13 are never read.
#   bash tools/ldct_real_ct.sh TOTALSEG_EXAMPLE_CT_DICOM RUN_DIR [MAX_STEPS] [SAMPLES]
# Env: PYTHON (default python), THREADS per process (default 1), LONGER (default empty: skipped): longer
# budgets, e.g. LONGER="6000 12000", for which the stage-0 x0 model and the U-Net are resumed side by side
# from the previous budget (on copies, RUN/budget_N) and scored on the same slices.
# The two diffusion runs (eps, x0), stages 2, 4-8 (x0) and the U-Net regression train in nine parallel
# processes (identical to what `ablate` would train one after the other), then `ablate` finds them finished
# and scores every row on the held-out patients: RUN/table (stage 0 eps and x0), RUN/stages (stages 0-8, x0).
set -euo pipefail
SERIES=${1:?usage: ldct_real_ct.sh TOTALSEG_EXAMPLE_CT_DICOM RUN_DIR [MAX_STEPS] [SAMPLES]}
RUN=${2:?usage: ldct_real_ct.sh TOTALSEG_EXAMPLE_CT_DICOM RUN_DIR [MAX_STEPS] [SAMPLES]}
STEPS=${3:-3000}
SAMPLES=${4:-4}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${THREADS:-1}
cd "$(dirname "$0")/.."
LDCT="$PY ldct_denoise.py"
COMMON=(--preset small --device cpu --max-steps "$STEPS")

# one folder per patient: the split is by patient (simulate reads PatientID)
"$PY" - "$SERIES" "$RUN/real_ct" <<'PYEOF'
import shutil
import sys
from pathlib import Path

from pydicom.data import get_testdata_file

series, out = Path(sys.argv[1]), Path(sys.argv[2])
names = {"cq500": "693_UNCR.dcm", "jxd": "J2K_pixelrep_mismatch.dcm", "neck": "bad_sequence.dcm",
         "pancreas": "explicit_VR-UN.dcm"}
for folder, name in names.items():
    (out / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2(get_testdata_file(name), out / folder / name)
if not (out / "totalseg").exists():
    shutil.copytree(series, out / "totalseg")
print(f"{out}: {len(names)} pydicom-data slices + {len(list((out / 'totalseg').iterdir()))} files of {series}")
PYEOF

# held out: the patients of the neck slice and of PANCREAS_0001 (never trained on)
$LDCT simulate --input "$RUN/real_ct" --output "$RUN/pairs" --preset small --doses 0.25 \
  --set 'data.val_patients=[PANCREAS_0001,b2cbe507f250]'
$LDCT train --data "$RUN/pairs" --out "$RUN/table/stage0_eps" --set diffusion.parameterization=eps \
  "${COMMON[@]}" > "$RUN/train_eps.log" 2>&1 &
EPS=$!
$LDCT train --data "$RUN/pairs" --out "$RUN/table/stage0_x0" --set diffusion.parameterization=x0 \
  "${COMMON[@]}" > "$RUN/train_x0.log" 2>&1 &
X0=$!
$LDCT baseline --kind unet --data "$RUN/pairs" --out "$RUN/table/unet" --max-slices 3 \
  "${COMMON[@]}" > "$RUN/train_unet.log" 2>&1 &
UNET=$!
# seed 000's upgrades on the same pairs and budget (x0, the small preset): stage 2 (edges + composite loss),
# stage 4 (+ cross-attention, ICR head), stage 5 (+ bridge training), stage 6 (+ PatchGAN), stage 7
# (+ augmentations) and stage 8 (+ masked pre-training first); stage 3 lies between 2 and 4
PIDS=("$EPS" "$X0" "$UNET")
for stage in 2 4 5 6 7 8; do
  $LDCT train --data "$RUN/pairs" --out "$RUN/stages/stage$stage" --stage $stage \
    "${COMMON[@]}" > "$RUN/train_stage$stage.log" 2>&1 &
  PIDS+=($!)
done
for pid in "${PIDS[@]}"; do
  wait "$pid" || { echo "a training failed: see $RUN/train_*.log" >&2; exit 1; }
done
$LDCT ablate --data "$RUN/pairs" --out "$RUN/table" --stages 0 --parameterizations eps,x0 \
  --samples "$SAMPLES" --steps 50 --max-slices 3 --time-size 0 "${COMMON[@]}"
# the budget table's first row: the x0 model, the U-Net and the two models' mean (an ensemble)
$LDCT evaluate --checkpoint "$RUN/table/stage0_x0/checkpoint.pt" --unet "$RUN/table/unet/unet.pt" \
  --data "$RUN/pairs" --out "$RUN/table/x0_eval" --steps 50 --max-slices 3 --device cpu
# the stages table: stage 0 x0 and the U-Net are the runs above (copied, so ablate finds them finished)
[ -d "$RUN/stages/stage0" ] || cp -r "$RUN/table/stage0_x0" "$RUN/stages/stage0"
[ -d "$RUN/stages/unet" ] || cp -r "$RUN/table/unet" "$RUN/stages/unet"
$LDCT ablate --data "$RUN/pairs" --out "$RUN/stages" --stages 0,2,4,5,6,7,8 --samples "$SAMPLES" --steps 50 \
  --max-slices 3 --time-size 0 "${COMMON[@]}"

# longer budgets: each resumes copies of the previous budget's two runs (the lr is constant and a resume
# restores the data order and RNG states, so this continues the same training) and scores them on the same
# held-out slices (the diffusion with DDIM-50, the U-Net and the two models' mean in one table)
previous=$RUN/table
for steps in ${LONGER:-}; do
  out=$RUN/budget_$steps
  mkdir -p "$out"
  [ -d "$out/stage0_x0" ] || cp -r "$previous/stage0_x0" "$out/stage0_x0"
  [ -d "$out/unet" ] || cp -r "$previous/unet" "$out/unet"
  $LDCT train --data "$RUN/pairs" --out "$out/stage0_x0" --resume "$out/stage0_x0/checkpoint.pt" \
    --preset small --device cpu --max-steps "$steps" > "$out/train_x0.log" 2>&1 &
  X0=$!
  $LDCT baseline --kind unet --data "$RUN/pairs" --out "$out/unet" --resume "$out/unet/unet.pt" \
    --max-slices 3 --preset small --device cpu --max-steps "$steps" > "$out/train_unet.log" 2>&1 &
  UNET=$!
  wait $X0 && wait $UNET || { echo "a training failed: see $out/train_*.log" >&2; exit 1; }
  $LDCT evaluate --checkpoint "$out/stage0_x0/checkpoint.pt" --unet "$out/unet/unet.pt" --data "$RUN/pairs" \
    --out "$out/x0_eval" --steps 50 --max-slices 3 --device cpu
  previous=$out
done
