#!/usr/bin/env bash
# Issue 26's GPU run as one device call (one H100 or H200, about 7 minutes): python -m bench.gpu on Show-o2 1.5B
# (random weights, bf16, 432x432), every variant compiled as the workers compile it, the official-style loops in
# the same process, then the workers' own path (bench/device/workers.yaml). The JSON lands in $OUT (else
# bench/results/). What the device lacks (pydantic and its needs, pyyaml) travels as wheels in .whl/: see
# docs/performance.md, "GPU throughput". Smoke run on a CPU: DEVICE=cpu MODEL=tiny bench/device/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
device=${DEVICE:-cuda}
args=(--model "${MODEL:-1.5b}" --device "$device" --compile --out "${OUT:-bench/results}")
if [ "$device" = cpu ]; then  # a smoke run: a few steps, small batches, the workers on the CPU in float32
  sed -e 's/device: cuda/device: cpu/' -e 's/dtype: bfloat16/dtype: float32/' bench/device/workers.yaml \
    > /tmp/bench-workers-cpu.yaml
  sed -i "s#\.\./\.\./#$PWD/#g" /tmp/bench-workers-cpu.yaml
  args+=(--steps 3 --t2i-batches 1 2 --vqa-batches 1 2 --repeats 1 --worker-spec /tmp/bench-workers-cpu.yaml)
else
  args+=(--t2i-batches 1 8 16 --vqa-batches 1 16 64 --worker-spec bench/device/workers.yaml)
fi
timeout 450 python3 -m bench.gpu "${args[@]}"
