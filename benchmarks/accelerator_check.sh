#!/usr/bin/env bash
# The GPU check: one short script run on a machine with an NVIDIA GPU.
#
#   bash benchmarks/accelerator_check.sh OUTDIR
#
# Run from the repository root where JAX sees the GPU and PyTorch is a CUDA build
# (`pip install -e .[gpu,bench]`).
# It needs no data download: the default run reads scikit-learn's bundled digits.
#   1. what is there: nvidia-smi, JAX's devices, PyTorch's CUDA device;
#   2. `benchmarks.bench_vs_torch --torch-device cuda`: the full-network and LightCL
#      steps of JAX and PyTorch on the GPU, alternated (ms, ratio, GFLOP/s);
#   3. the default run end to end (`python -m experiments.run`, its workdir under
#      OUTDIR) under `/usr/bin/time -v` where it exists: wall time, TIL/CIL.
# Everything goes to OUTDIR (check.log, bench.json, run/results.json, run_time.txt).
# Exits non-zero at the first failure; about 4 minutes on an H200 (most of it compiling).
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/accelerator_check.sh OUTDIR" >&2
    exit 2
fi
out=$1
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

check() {
echo "== devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$python" - <<'EOF'
import jax, torch
print("jax", jax.__version__, jax.default_backend(), jax.devices())
print("torch", torch.__version__, "cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
if jax.default_backend() == "cpu":
    raise SystemExit("JAX sees no accelerator: this check is for a GPU machine")
EOF

echo "== steps, JAX and PyTorch on the GPU"
"$python" -m benchmarks.bench_vs_torch --torch-device cuda --json "$out/bench.json"

echo "== the default run, end to end"
timer=()
if [[ -x /usr/bin/time ]]; then timer=(/usr/bin/time -v -o "$out/run_time.txt"); fi
start=$(date +%s.%N)
"${timer[@]}" "$python" -m experiments.run --no-progress --workdir "$out/run" --overwrite
end=$(date +%s.%N)
"$python" -c "print(f'default run: {float($end) - float($start):.1f} s wall')"
}

check 2>&1 | tee "$out/check.log"
