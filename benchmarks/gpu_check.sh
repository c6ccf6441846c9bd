#!/usr/bin/env bash
# The GPU check: install the working tree (no network), show the devices, run the kernel
# tests, then benchmarks/kernels_gpu.py (compiled correctness, timings against XLA's own
# ops, MFU of a ~1B Llama step), benchmarks/inference.py --gpu (serving against HF
# generate) and benchmarks/offload.py --gpu (ZeRO-Offload device bytes and step time).
# Everything goes to stdout and, when $OUT is set, to $OUT/gpu_log.txt. At
# most ~10 minutes in all (each stage under `timeout`).
#
#   bash benchmarks/gpu_check.sh
#
# Exit status: 0 when every stage exited 0, else 1 (each stage's status is printed last).
set -uo pipefail

cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_log.txt") 2>&1
fi

declare -a SUMMARY=()
stage() {   # stage NAME SECONDS CMD...: run CMD under a time limit, record its status
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $* ==="
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] && echo "!!! $name timed out after ${limit}s"
    SUMMARY+=("$name: rc=$rc, $((SECONDS - t0))s")
}

echo "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?') ==="
git status --short 2>/dev/null | head -20

# No network on the GPU machine: no dependencies, no build isolation.
stage "install" 30 python3 -m pip install --no-deps --no-build-isolation -e .

stage "devices" 30 bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv; python3 -c "import jax; print(\"jax\", jax.__version__, jax.default_backend(), jax.devices())"'

# The kernel tests pass interpret=True themselves and tests/conftest.py defaults
# JAX_PLATFORMS to cpu, so they run as on CPU CI (interpret mode, plus the CUDA lowering
# checks); the compiled, on-GPU correctness checks are part 1 of kernels_gpu.py.
stage "kernel tests" 100 env ZEROJAX_KERNEL_TESTS_COMPILED=1 python3 -m pytest \
    tests/test_flash_attention.py tests/test_kernel_norms.py tests/test_fused_cross_entropy.py -q -x

stage "kernels_gpu.py" 300 python3 benchmarks/kernels_gpu.py --budget 250

# Serving: the paged-attention step on the GPU (the Pallas kernel through the selector)
# against HF generate on cuda, one quick pass: batch 1 decode and 16 mixed requests.
stage "inference.py" 150 python3 benchmarks/inference.py --gpu --quick --only batch1,mixed

# Offload: a model whose fp32 AdamW state does not fit beside its params, plain vs the
# optimizer state in pinned host memory (streamed to the device layer by layer).
stage "offload.py" 150 env XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=100 python3 benchmarks/offload.py --gpu

echo
echo "=== summary ==="
status=0
for line in "${SUMMARY[@]}"; do
    echo "$line"
    case "$line" in *"rc=0,"*) ;; *) status=1 ;; esac
done
exit "$status"
