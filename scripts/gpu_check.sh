#!/usr/bin/env bash
# GPU check of the fused log-prob + entropy kernels: the kernel tests on CUDA, then the GPU
# benchmarks (Triton vs eager vs torch.compile vs Liger, forward + backward, bf16), then a short
# table of ratios against eager torch measured in the same run.
#
#   bash scripts/gpu_check.sh             # all issue shapes, about 5 minutes on one H100
#   QUICK=1 bash scripts/gpu_check.sh     # N = 4096 shapes only, about 2 minutes
#
# Logs and the pytest-benchmark JSON go to $OUT (if set, e.g. by a remote runner) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
LOG_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOG_DIR"

python - <<'PY' || exit 2
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: scripts/gpu_check.sh needs a GPU"
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
      f"triton {triton.__version__}")
PY

status=0
echo "== kernel tests (CUDA; TRITON_INTERPRET unset)"
env -u TRITON_INTERPRET timeout 300 python -m pytest tests/test_kernels_*.py tests/test_logprobs.py \
    -q -p no:cacheprovider 2>&1 | tee "$LOG_DIR/tests.log" | tail -n 25 || status=1

echo "== GPU benchmarks"
env -u TRITON_INTERPRET FASTARCHER_BENCH_QUICK="${QUICK:-0}" timeout 540 \
    python -m pytest benchmarks/bench_kernels.py --benchmark-only -k gpu -q -p no:cacheprovider \
    --benchmark-columns=median,rounds --benchmark-json="$LOG_DIR/bench_gpu.json" \
    > "$LOG_DIR/bench.log" 2>&1 || status=1
tail -n 3 "$LOG_DIR/bench.log"

echo "== ratios vs eager torch (speedup and mem ratio = eager / provider; > 1 is better)"
grep -E '^(group|gpu )' "$LOG_DIR/bench.log" || echo "(no ratio table: see $LOG_DIR/bench.log)"
echo "targets at V = 152064: triton >= 1.5x faster and >= 4x less peak memory than eager"
exit $status
