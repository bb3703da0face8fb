#!/usr/bin/env bash
# The JAX backend on a CUDA GPU, offline, in one go (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Expects python3 with jax (CUDA), numpy, ml_dtypes, torch, transformers and
# cake's other pure-Python needs already installed (pyzmq and gguf are not used
# here); installs cake itself into a scratch folder without the network.
set -u
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
site=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . \
  || { echo "cake did not install"; exit 1; }
export PYTHONPATH="$site"
# run from a copy holding no cake/ folder, so that the installed cake is the one imported
work=$(mktemp -d)
cp -r tests benchmarks "$work"/
cd "$work" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
status=0
timeout 120 python3 benchmarks/gpu_check.py check || status=1
for m in llama-1b llama-8b; do
  timeout 120 python3 benchmarks/gpu_check.py speed --model "$m" --json "$out/speed.jsonl" || status=1
  timeout 80 python3 benchmarks/gpu_check.py hf --model "$m" --json "$out/speed.jsonl" || status=1
done
# the JAX backend's own tests, on the GPU this time
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_jax_backend.py || status=1
exit $status
