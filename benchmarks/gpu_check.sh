#!/usr/bin/env bash
# The prepared GPU check (issues 16 and 18): one command on the device machine, everything it finds as JSON in $OUT.
#
#   here, once:        bash benchmarks/gpu_wheels.sh             (builds .whl/, the wheels the GPU image lacks)
#   on the GPU:        run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   rehearsal here:    CPU_REHEARSAL=1 PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit and all within BUDGET_S (default 540 s, inside one 10-minute command):
#   1. wheels: .whl/*.whl installed with pip --no-index into /tmp/vqdiff-site (first on PYTHONPATH); the working
#      tree itself is on PYTHONPATH, and `vqdiff` on PATH runs `python -m vqdiff_cli` from it
#   2. env.json: GPU, driver, versions
#   3. gpu-tests.json: the CUDA tests (pytest -m gpu: tests/test_gpu.py)
#   4. bench.json: vqdiff bench --vs-diffusers on the full ITHQ architecture with random weights: 100, 25 and 10
#      steps with guidance, batch 1 and 16, vqdiff in float16 and bfloat16, diffusers in float16; phases, end to end,
#      speed-ups, peak memory (weights + a cold run's peak, CUDA-graph pools included); saved after each batch size
#   5. repro.json: benchmarks/gpu_repro.py, what a re-run reproduces at full size (run to run, --same-batch, alone)
#   6. suite.json: the rest of the test suite (pytest -m "not gpu"; on the CPU as CI runs it: tests/conftest.py)
#   summary.json: each step's exit status and time; gpu_check.log: everything printed.
# A step that fails or runs out of time is recorded and the next one runs.
#
# CPU_REHEARSAL=1 runs the same steps here with the CUDA parts swapped for tiny CPU runs: the wheels install into a
# scratch folder (not used: they are for Python 3.12), the CUDA tests run on the CPU (VQDIFF_GPU_TESTS_DEVICE=cpu,
# GPU-only checks skipped), bench and repro use a tiny random architecture on the CPU, and the suite is only
# collected. It checks that the script and its steps run, nothing about a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REHEARSAL=${CPU_REHEARSAL:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/out/gpu-check}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NO_COLOR=1
START=$(date +%s)
STEPS=$(mktemp)
SCRATCH=$(mktemp -d)

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less if the budget is nearly spent)
step() {
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$(($(remaining) - 5))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, the budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 0 >>"$STEPS"
    return
  fi
  echo "== $name (at most ${limit} s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(($(date +%s) - t0)) "$limit" >>"$STEPS"
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s"
}

# junit XML -> JSON: counts, and every failure or error with its message
junit_json() {
  "$PY" - "$1" "$2" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not src.is_file():
    dst.write_text(json.dumps({"error": "no junit report (the run was killed or did not start)"}) + "\n")
    raise SystemExit
cases = []
for case in ET.parse(src).getroot().iter("testcase"):
    status, message = "passed", ""
    for kind in ("failure", "error", "skipped"):
        found = case.find(kind)
        if found is not None:
            status, message = kind, (found.get("message") or "") + "\n" + (found.text or "")
            break
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                  "seconds": float(case.get("time") or 0), "message": message.strip()[:4000]})
counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
dst.write_text(json.dumps({"counts": counts, "not_passed": [c for c in cases if c["status"] != "passed"],
                           "passed": [c["test"] for c in cases if c["status"] == "passed"]}, indent=2) + "\n")
print(counts)
EOF
}

# -- 1. wheels ----------------------------------------------------------------------------------------------------
SITE=/tmp/vqdiff-site
if ls .whl/*.whl >/dev/null 2>&1; then
  PIP=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
  if [ "$REHEARSAL" = 1 ]; then  # the GPU machine's Python, whatever this one is: checks the set installs there
    SITE=$SCRATCH/site
    PIP+=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64)
  fi
  step wheels 60 "$PY" "${PIP[@]}" --target "$SITE" .whl/*.whl
else
  echo "== wheels: no .whl/ folder (bash benchmarks/gpu_wheels.sh builds it); using what is installed"
fi
if [ "$REHEARSAL" = 1 ]; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
# `vqdiff` (tests start it as a command) is the working tree's, not an installed copy
mkdir -p "$SCRATCH/bin"
printf '#!/bin/sh\nexec "%s" -m vqdiff_cli "$@"\n' "$(command -v "$PY")" >"$SCRATCH/bin/vqdiff"
chmod +x "$SCRATCH/bin/vqdiff"
export PATH="$SCRATCH/bin:$PATH"

# -- 2. the machine -----------------------------------------------------------------------------------------------
cat >"$SCRATCH/env.py" <<'EOF'
import json, platform, subprocess, sys
from importlib.metadata import PackageNotFoundError, version
import torch
def ver(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "packages": {n: ver(n) for n in ("diffusers", "transformers", "huggingface_hub", "typer", "click", "rich",
                                        "safetensors", "numpy", "pillow", "platformdirs", "pydantic", "pytest",
                                        "pytest-xdist", "triton")}}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory,
                   "multiprocessors": p.multi_processor_count, "bf16": torch.cuda.is_bf16_supported()}
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    info["nvidia_smi"] = f"not available: {e}"
try:
    info["vqdiff_command"] = subprocess.run(["vqdiff", "--version"], capture_output=True, text=True,
                                            timeout=60).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    info["vqdiff_command"] = f"failed: {e}"
try:
    import vqdiff_cli
    info["vqdiff"] = vqdiff_cli.__version__
    info["vqdiff_from"] = vqdiff_cli.__file__
except Exception as e:
    info["vqdiff"] = f"import failed: {e!r}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
step env 60 "$PY" "$SCRATCH/env.py" "$OUT/env.json"

# -- 3. the CUDA tests --------------------------------------------------------------------------------------------
if [ "$REHEARSAL" = 1 ]; then export VQDIFF_GPU_TESTS_DEVICE=cpu; fi
step gpu-tests 170 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rfEs --junitxml="$SCRATCH/gpu.xml"
junit_json "$SCRATCH/gpu.xml" "$OUT/gpu-tests.json"
unset VQDIFF_GPU_TESTS_DEVICE

# -- 4. the bench -------------------------------------------------------------------------------------------------
if [ "$REHEARSAL" = 1 ]; then
  # a tiny random architecture (as tests/test_bench.py builds one), on the CPU
  "$PY" - "$SCRATCH/arch" <<'EOF'
import json, shutil, sys
from importlib import resources
from pathlib import Path
folder = Path(sys.argv[1])
shutil.copytree(str(resources.files("vqdiff_cli") / "configs" / "ithq"), folder)
small = {"transformer.json": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 4,
                              "cross_attention_dim": 32},
         "vqvae.json": {"block_out_channels": [32, 32, 32, 32], "latent_channels": 8},
         "text_encoder.json": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 37, "vocab_size": 1000},
         "learned_classifier_free_sampling_embeddings.json": {"hidden_size": 32}}
for name, changes in small.items():
    config = json.loads((folder / name).read_text())
    config.update(changes)
    (folder / name).write_text(json.dumps(config))
EOF
  BENCH=(--config "$SCRATCH/arch" --device cpu --dtype float32 --diffusers-dtype float32 --batch 1,2 --steps 3,2
         --repeats 1 --warmup 0)
  REPRO=(--config "$SCRATCH/arch" --device cpu --dtype float32 --batch 3 --position 1 --steps 3)
else
  BENCH=(--device cuda --dtype float16,bfloat16 --diffusers-dtype float16 --batch 1,16 --steps 100,25,10
         --repeats 2 --warmup 1)
  REPRO=(--device cuda --dtype float16 --batch 4 --position 2 --steps 10)
fi
step bench 300 "$PY" -m vqdiff_cli bench --vs-diffusers "${BENCH[@]}" -o "$OUT/bench.json" --overwrite

# -- 5. what a re-run reproduces ----------------------------------------------------------------------------------
step repro 75 "$PY" benchmarks/gpu_repro.py "${REPRO[@]}" --out "$OUT/repro.json"

# -- 6. the rest of the suite -------------------------------------------------------------------------------------
SUITE=(-q -m "not gpu" -p no:cacheprovider -rfE --junitxml="$SCRATCH/suite.xml")
if "$PY" -c "import xdist" 2>/dev/null; then SUITE+=(-n 8 --dist loadfile); fi
if [ "$REHEARSAL" = 1 ]; then SUITE=(-q -m "not gpu" -p no:cacheprovider --collect-only); fi
step suite 240 "$PY" -m pytest "${SUITE[@]}"
if [ "$REHEARSAL" = 1 ]; then
  echo '{"rehearsal": "collected only"}' >"$OUT/suite.json"
else
  junit_json "$SCRATCH/suite.xml" "$OUT/suite.json"
fi

# -- summary ------------------------------------------------------------------------------------------------------
"$PY" - "$STEPS" "$OUT/summary.json" "$REHEARSAL" "$(($(date +%s) - START))" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": n, "exit": rc, "seconds": int(s), "limit_s": int(lim),
          "timed_out": rc in ("124", "137")} for n, rc, s, lim in rows]
summary = {"rehearsal": sys.argv[3] == "1", "seconds": int(sys.argv[4]), "steps": steps}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
rm -rf "$SCRATCH" "$STEPS"
