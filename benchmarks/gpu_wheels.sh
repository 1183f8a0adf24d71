#!/usr/bin/env bash
# Builds .whl/ (gitignored): the Python packages that the GPU machine's image lacks, or has in untested versions,
# as wheels for its Python 3.12 on x86-64. Run it here, where PyPI is reachable, before a GPU session; the device
# tool then carries the folder (carry=[".whl"]) and benchmarks/gpu_check.sh installs it there with pip --no-index.
#
#   bash benchmarks/gpu_wheels.sh
#
# The image has torch, transformers, huggingface_hub, safetensors, numpy, pillow, filelock, pytest (and
# pytest-xdist) already (.library/device/KINDS.md); it lacks diffusers (a test and benchmark dependency), platformdirs
# and pydantic (which typer 0.29 needs). typer, click and rich are carried in the versions the suite is tested with
# here, since the image's versions are not known. Versions are pinned, one of each: two versions of a package in
# the folder stop the whole install. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  diffusers==0.42.1
  platformdirs==4.14.9
  typer==0.29.2
  click==8.5.1
  rich==15.0.0
  annotated-doc==0.0.7
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
)

rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls -l .whl
du -sh .whl
