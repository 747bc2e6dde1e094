#!/usr/bin/env bash
# Every check that needs a GPU, in one run of about 6-8 minutes on one H100/H200, from the repository root:
#
#     bash benchmarks/device_check.sh [OUT_DIR]
#
# 1. the CUDA tests: zero host-device synchronizations between checkpoints (torch.cuda.set_sync_debug_mode
#    "error"), the Triton gradient pass and sample estimators against the torch code, the probe on CUDA;
# 2. the overhead figure of docs/performance.md: GPT-2 124M, bf16 autocast, fused AdamW, 8 x 1024;
# 3. device memory (torch.cuda.max_memory_allocated over a step) and the tensor-count scaling on the GPU;
# 4. the Triton kernels' registers, spills and load widths (benchmarks/kernel_report.py, the same figures as on a
#    CPU-only machine: they come from the compiler, so this only pins them next to the GPU's results).
#
# Needs torch with CUDA, Triton, numpy, scipy, pytest and hypothesis (what the GPU image holds); heavytail is
# taken from this checkout (PYTHONPATH), nothing is installed. Everything printed also goes to OUT_DIR/log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device_check_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
rm -f "$out/failed"
step() {
    echo "=== $* ($(date -u +%H:%M:%S))"
    "$@" || { echo "$*" >> "$out/failed"; echo "=== FAILED: $*"; }
}
{
    step nvidia-smi -L
    step python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
    step python3 -m pytest -q -p no:cacheprovider tests/test_no_sync.py tests/estimators/test_triton_pass.py \
        tests/estimators/test_triton_samples.py tests/test_probe.py
    step python3 benchmarks/overhead.py --device cuda --model gpt2-small --steps 100 --every 100 --rounds 3
    step python3 benchmarks/memory.py --device cuda
    step python3 benchmarks/scaling.py --device cuda --steps 5 --checkpoints 1
    step python3 benchmarks/kernel_report.py --arch 90
    echo "=== done ($(date -u +%H:%M:%S)); failed: $(cat "$out/failed" 2>/dev/null | wc -l)"
} 2>&1 | tee "$out/log"
[ ! -s "$out/failed" ]
