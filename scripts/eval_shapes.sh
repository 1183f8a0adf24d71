#!/usr/bin/env bash
# Measure one checkpoint of a scripts/train_shapes.sh run while it trains:
#
#   bash scripts/eval_shapes.sh STEP [RUN_DIR] [-- vqdiff eval options]     (default RUN_DIR: runs/shapes)
#
# Copies checkpoint STEP into RUN_DIR/eval-STEP, resumes it there for zero steps (which exports its EMA weights as a
# pipeline folder), then prints how much the network reads its captions (benchmarks/text_usage.py) and the prompt
# accuracy on held-out captions (vqdiff eval, 32 images unless options say otherwise; GAIN_ONLY=1 skips it).
set -euo pipefail
STEP=$1; shift
RUN=runs/shapes
if [ $# -gt 0 ] && [ "$1" != "--" ]; then RUN=$1; shift; fi
[ "${1:-}" = "--" ] && shift
NAME=$(printf "step-%08d" "$STEP")
OUT="$RUN/eval-$STEP"
if [ ! -f "$OUT/model_index.json" ]; then
  rm -rf "$OUT" && mkdir -p "$OUT/checkpoints"
  cp -r "$RUN/transformer/checkpoints/$NAME" "$OUT/checkpoints/"
  cp "$RUN/transformer/train_config.json" "$RUN/transformer/train_log.jsonl" "$OUT/"
  [ -d "$RUN/transformer/cache" ] && ln -s "$(realpath "$RUN/transformer/cache")" "$OUT/cache"
  # the export resumes the run's own settings: its seed comes from its train_config.json
  SEED=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["loop"]["seed"])' "$OUT/train_config.json")
  if ! SEED="$SEED" TF_OUT="$OUT" TF_STEPS="$STEP" bash "$(dirname "$0")/train_shapes.sh" "$RUN" >"$OUT/export.log" 2>&1
  then
    tail -n 3 "$OUT/export.log" >&2
    echo "eval_shapes.sh: exporting $NAME failed (log: $OUT/export.log)" >&2
    exit 1
  fi
fi
python "$(dirname "$0")/../benchmarks/text_usage.py" "$OUT" "$RUN/data" --timesteps 99,95
[ -n "${GAIN_ONLY:-}" ] || vqdiff eval --model "$OUT" -n 32 -b 16 "$@"
