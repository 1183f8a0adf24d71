#!/usr/bin/env bash
# Retrain the built-in `shapes` model from nothing, with the exact commands that made the shipped weights.
#
#   bash scripts/train_shapes.sh [RUN_DIR]        (default: runs/shapes; rerun the same command to resume)
#
# Stages: draw the data, train the VQ-VAE, train the transformer (with a small text encoder from scratch), then
# write the fp16 pipeline folder into vqdiff_cli/weights/shapes and the logs into benchmarks/results/shapes.
# Every stage checkpoints and resumes: an interrupted run continues where it stopped. On a GPU pass DEVICE=cuda.
# The shipped run took about 22 min (VQ-VAE) + about 85 min (transformer) on a shared 2-core CPU (see BENCHMARKS.md).
set -euo pipefail
RUN=${1:-runs/shapes}
DEVICE=${DEVICE:-cpu}
VQ_STEPS=${VQ_STEPS:-4000}
TF_STEPS=${TF_STEPS:-2000}
mkdir -p "$RUN"
resume() { [ -d "$1/checkpoints" ] && ls "$1/checkpoints" | grep -q step- && echo --resume || true; }

[ -f "$RUN/data/metadata.jsonl" ] || vqdiff dataset shapes "$RUN/data" --count 20000 --resolution 32 --seed 0

vqdiff train vqvae "$RUN/data" -o "$RUN/vqvae" $(resume "$RUN/vqvae") \
  --resolution 32 --downsample 2 --codebook-size 128 --embed-dim 16 --channels 32 --layers-per-block 1 \
  --norm-groups 4 --no-disc --batch-size 32 --lr 5e-4 --steps "$VQ_STEPS" \
  --validate-every 250 --checkpoint-every 250 --log-every 25 --seed 0 --device "$DEVICE"

vqdiff train transformer "$RUN/data" -o "$RUN/transformer" $(resume "$RUN/transformer") \
  --vqvae "$RUN/vqvae" --train-text-encoder --timesteps 100 \
  --layers 4 --width 192 --heads 6 --text-layers 2 --text-width 128 \
  --aux-weight 0.05 --caption-dropout 0.1 --batch-size 32 --lr 4.5e-4 --warmup 200 --ema 0.995 \
  --steps "$TF_STEPS" --checkpoint-every 250 --keep 2 --log-every 25 --seed 0 --device "$DEVICE" \
  --validation-prompt "a large red circle in the center on a blue background" --validate-every 1000

python scripts/ship_shapes.py "$RUN"
