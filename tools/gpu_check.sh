#!/usr/bin/env bash
# One command to check every implementation on one NVIDIA GPU and benchmark it:
#
#   bash tools/gpu_check.sh            # from the repo root or anywhere
#
# 1. Environment: uses the active virtualenv if one is active; otherwise creates
#    .venv-gpu-check and installs this repo with its test extras and jax[cuda12]
#    at the jax version the repo resolves to (pip packages only, no system CUDA).
# 2. Detects the GPU (nvidia-smi and jax.default_backend()). Without one it says
#    so, runs what a CPU can (a few interpreter tests and a tiny benchmark, to
#    check the pipeline), and exits 0.
# 3. On a GPU: the device test subset (every implementation against the
#    references on the real device: the XLA path, the Triton kernels, the Mosaic
#    GPU kernels in bf16, f16 and float32 (TF32) on sm_90+), then bench_ops.py at the paper's shape
#    (b4 h32 d=e=128 bf16, seq 1K..64K; mosaic_gpu, triton and cuDNN flash
#    attention as the softmax anchor; the XLA path to 16K) and at b1 h8, writing
#    JSON and markdown tables under runs/gpu_check/ (GPU_CHECK_OUT overrides).
#    cuDNN's flash attention is `jax.nn.dot_product_attention(..., is_causal=True,
#    implementation="cudnn")` on [B, T, H, D], at the same shapes as the lightning impls.
#    Then, where torch is importable, benchmarks/bench_torch.py times the PyTorch kernels
#    of the same op at the same shapes: flash-linear-attention's chunk_simple_gla
#    (package fla-core) and the official lightning_attn Triton kernel (lightning-attn).
#    Wheels in .whl/ are installed first (pip install --no-index --no-deps), for a
#    machine without network access; fetch them where pip works with
#      pip download --no-deps --only-binary=:all: -d .whl fla-core lightning-attn
#    (and their pure-Python requirements that the machine lacks, e.g. einops).
#    Every step has a time limit, to finish in under 10 minutes on an H100-class
#    GPU.
# 4. Prints the line to record in lightning_jax/api.py (MOSAIC_GPU_VALIDATED)
#    when the device tests passed on a Hopper-class GPU. Exit status: 0 when
#    every step passed (or there is no GPU), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
mkdir -p "$OUT"
status=0
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

# --- 1. environment -------------------------------------------------------------------
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  say "using the active environment $VIRTUAL_ENV (nothing installed)"
else
  say "creating .venv-gpu-check"
  python3 -m venv .venv-gpu-check && . .venv-gpu-check/bin/activate || exit 1
  python -m pip install -q --upgrade pip || exit 1
  python -m pip install -q -e ".[test]" || exit 1
  if command -v nvidia-smi > /dev/null 2>&1; then
    jax_version=$(python -c "import jax; print(jax.__version__)")
    python -m pip install -q "jax[cuda12]==${jax_version}" || exit 1
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- 2. the device ----------------------------------------------------------------------
backend=$(python -c "import jax; print(jax.default_backend())" 2> /dev/null)
if [[ "$backend" != "gpu" ]] || ! nvidia-smi -L > /dev/null 2>&1; then
  say "no NVIDIA GPU found (jax backend: ${backend:-none}; nvidia-smi: $(command -v nvidia-smi || echo missing))."
  say "running what a CPU can: Mosaic GPU interpreter smoke tests and a tiny benchmark"
  python -m pytest -q -p no:cacheprovider tests/test_mosaic_gpu.py \
    -k "seq_one or defaults_return or auto_ or argument_errors or tiling" || status=1
  python benchmarks/bench_ops.py --impls=xla --min_seq=1024 --max_seq=2048 --reps=1 \
    --matmul_size=256 --plot=false --ceiling=false --out="$OUT/bench_cpu_smoke.json" > "$OUT/bench_cpu_smoke.txt" 2>&1 \
    || status=1
  say "CPU part done (status $status); the device tests and GPU benchmarks need an NVIDIA GPU: skipped."
  exit $status
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$OUT/device.csv"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.csv"

# --- 3. device tests, then benchmarks --------------------------------------------------
say "device tests: every implementation against the references"
# On a GPU backend the Triton class runs the real kernels (interpret=None means False).
timeout 150 python -m pytest -q -p no:cacheprovider \
  tests/test_xla.py tests/test_pallas.py::TestTritonInterpret \
  "tests/test_mosaic_gpu.py::test_device_matches_reference" \
  "tests/test_mosaic_gpu.py::test_device_float32_matches_reference" 2>&1 | tee "$OUT/tests.txt"
tests_status=${PIPESTATUS[0]}
[[ $tests_status -eq 0 ]] || status=1

bench() {  # name, timeout seconds, then bench_ops flags
  local name=$1 limit=$2
  shift 2
  say "bench $name"
  timeout "$limit" python benchmarks/bench_ops.py --dim=128 --dtype=bfloat16 --reps=3 \
    --matmul_size=8192 --markdown --plot=false --ceiling=false \
    --out="$OUT/bench_$name.json" "$@" 2>&1 | tee "$OUT/bench_$name.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
}
# Every step has a time limit, so the whole check stays under 8 minutes on an
# H100-class GPU; a step that runs out is reported as failed and the rest go on.
kernels=mosaic_gpu,triton,cudnn
bench b4h32 110 --batch=4 --heads=32 --min_seq=1024 --max_seq=65536 --impls=$kernels
bench b4h32_xla 40 --batch=4 --heads=32 --min_seq=1024 --max_seq=16384 --impls=xla
bench b1h8 110 --batch=1 --heads=8 --min_seq=1024 --max_seq=65536 --impls=$kernels
bench b1h8_xla 40 --batch=1 --heads=8 --min_seq=1024 --max_seq=16384 --impls=xla

# The PyTorch kernels of the same op, at the same shapes (b4 h32 and b1 h8, d = e = 128).
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  say "installing the wheels in .whl/ into $site"
  python -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$site" || status=1
fi
if python -c "import torch, triton; assert torch.cuda.is_available()" > /dev/null 2>&1; then
  for shape in "4 32" "1 8"; do
    set -- $shape
    say "bench torch b$1h$2: fla chunk_simple_gla, lightning_attn"
    timeout 120 python benchmarks/bench_torch.py --batch="$1" --heads="$2" --dim=128 \
      --dtype=bfloat16 --reps=3 --min_seq=1024 --max_seq=65536 \
      --out="$OUT/bench_torch_b$1h$2.json" 2>&1 | tee "$OUT/bench_torch_b$1h$2.txt"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  done
else
  say "torch with CUDA and triton not importable: the PyTorch kernels are not timed"
fi

# --- 4. the record ----------------------------------------------------------------------
capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
if [[ $tests_status -eq 0 ]] && python -c "import sys; sys.exit(float('$capability') < 9.0)"; then
  say "device tests passed on a compute capability $capability GPU. To make impl='auto' pick"
  say "mosaic_gpu on sm_90+, set in lightning_jax/api.py:"
  python -c "import datetime, jax; d = jax.devices()[0]; print('MOSAIC_GPU_VALIDATED = ' + repr({'device': d.device_kind, 'date': datetime.date.today().isoformat(), 'jax': jax.__version__}))"
fi
say "done (status $status); results in $OUT"
exit $status
