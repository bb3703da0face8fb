#!/usr/bin/env bash
# The JAX backend on a CUDA GPU, offline, in one go (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--smoke] [OUT_DIR]
#
# Expects python3 ($PYTHON) with jax (CUDA), numpy, ml_dtypes, torch,
# transformers and cake's other pure-Python needs already installed (pyzmq is
# not used here); installs cake itself into a scratch folder without the
# network. gguf (pure Python, which cake.weights imports) is taken from there
# too, or where it is missing from $GGUF_DIR or a carried
# .venv/lib/python3*/site-packages/gguf.
#
# The parts run in order of what they tell us, each under its own timeout and
# all within GPU_CHECK_BUDGET_S seconds (480: a rerun fits in a 15-minute
# lease); a part that would start past the budget is skipped, one running into
# it is stopped, and both are reported, not failed. About 7 minutes on an H100
# (an estimate; see benchmarks/README.md).
#
# --smoke: every part with tiny shapes and few steps on whatever JAX device is
# there (tests/test_jax_backend.py excepted: CI runs it on the CPU): a check of
# this script, under 2 minutes on a 2-core CPU.
set -u
smoke=
[ "${1:-}" = --smoke ] && { smoke=--smoke; shift; }
out=${1:-${OUT:-/tmp/gpu-check}}
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu_check.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
site=$(mktemp -d)
"$py" -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . \
  || { echo "cake did not install"; exit 1; }
if ! "$py" -c "import gguf" 2>/dev/null; then
  for g in ${GGUF_DIR:-} .venv/lib/python3*/site-packages/gguf; do
    [ -f "$g/__init__.py" ] && { cp -r "$g" "$site"/ && echo "gguf from $g"; break; }
  done
fi
export PYTHONPATH="$site"
# run from a copy holding no cake/ folder, so that the installed cake is the one imported
work=$(mktemp -d)
cp -r tests benchmarks "$work"/
cd "$work" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  || true
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
status=0

part() {  # part NAME TIMEOUT_S COMMAND...
  local name=$1 want=$2 left t rc
  shift 2
  left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "[$(date +%T) ${SECONDS}s] SKIP $name: under 30 s of the ${budget}s budget left"
    return
  fi
  t=$((want < left ? want : left))
  echo "[$(date +%T) ${SECONDS}s] == $name (timeout ${t}s)"
  timeout -k 10 "$t" "$@"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ] && [ "$t" -lt "$want" ]; then
    echo "[$(date +%T) ${SECONDS}s] CUT $name at the ${budget}s budget"
  elif [ $rc -ne 0 ]; then
    echo "[$(date +%T) ${SECONDS}s] FAIL $name (exit $rc)"
    status=1
  fi
}

gc=(benchmarks/gpu_check.py)
sj=(--json "$out/speed.jsonl" $smoke)
if [ -z "$smoke" ]; then
  # the JAX backend's own tests on the GPU (and the engine's overlap, on by
  # default there; each program's scratch against a layer's widened bytes,
  # XLA's decode with its data edge), beside the two checks: none of the
  # three times anything, and all end before the timings start
  echo "[$(date +%T) ${SECONDS}s] == pytest tests/test_jax_backend.py tests/test_engine_overlap.py tests/test_jax_memory.py (in the background)"
  CAKE_CACHE_DIR="$work/cache-tests" timeout -k 10 150 "$py" -m pytest -q -x -p no:cacheprovider \
    tests/test_jax_backend.py tests/test_engine_overlap.py tests/test_jax_memory.py \
    >"$work/pytest.out" 2>&1 &
  tests=$!
fi
part check 150 "$py" "${gc[@]}" check $smoke
part check-packed 90 "$py" "${gc[@]}" check-packed $smoke
part draw 60 "$py" "${gc[@]}" draw "${sj[@]}"
if [ -z "$smoke" ]; then
  wait "$tests"
  rc=$?
  sed "s/^/[pytest] /" "$work/pytest.out" | tail -n 40
  [ $rc -eq 0 ] || { echo "[$(date +%T) ${SECONDS}s] FAIL pytest (exit $rc)"; status=1; }
fi
# the target first: an 8B model in int8 / int4 blocks at >= 70 % of the bound
part speed-8b-q8-q4 180 "$py" "${gc[@]}" speed --model llama-8b --weights Q8_0,Q4_0 \
  --hlo "$out/decode-hlo.txt" "${sj[@]}"
part speed-1b 150 "$py" "${gc[@]}" speed --model llama-1b \
  --weights bfloat16,Q8_0,Q4_0 "${sj[@]}"
part speed-8b-bf16 120 "$py" "${gc[@]}" speed --model llama-8b "${sj[@]}"
part speed-8b-q4k 90 "$py" "${gc[@]}" speed --model llama-8b --weights Q4_K \
  --hlo "$out/decode-hlo.txt" "${sj[@]}"
# the anchor last: HF transformers does not change with cake (2026-11-27's
# figures are in benchmarks/results/)
for m in llama-1b llama-8b; do
  part "hf-$m" 80 "$py" "${gc[@]}" hf --model "$m" "${sj[@]}"
done
echo "[$(date +%T) ${SECONDS}s] done, exit $status"
exit $status
