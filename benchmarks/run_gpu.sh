#!/usr/bin/env bash
# Everything a GPU machine should run, in one command (the machine may be held briefly):
#   bash benchmarks/run_gpu.sh OUT_DIR
# Installs gradstats into the machine's python3 (torch and triton already there; no network
# needed), runs the whole test suite on CUDA, then every benchmark (the comparison table, the
# monitor's overhead and the pytest-benchmark suite), writing logs and results into OUT_DIR.
# Copy the results files into benchmarks/results/ afterwards and commit them.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/environment.txt"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$out/tests-cuda.log"
tests_status=${PIPESTATUS[0]}
python3 -m benchmarks.run --out "$out" 2>&1 | tee "$out/benchmarks-run.log"
python3 -m benchmarks.monitor_overhead --out "$out" 2>&1 | tee "$out/monitor-overhead.log"
python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/pytest-benchmark-cuda.json" 2>&1 | tail -40 | tee "$out/pytest-benchmark.log"
echo "tests exit status: $tests_status" | tee -a "$out/environment.txt"
exit "$tests_status"
