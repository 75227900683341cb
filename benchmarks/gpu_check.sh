#!/usr/bin/env bash
# One prepared GPU check (one H100/H200, Python 3.12 with torch + triton, no network):
# installs the wheels carried in .whl/ (megatron-core 0.16.1, its pure-python
# dependencies, archer-mcore itself) into a private directory, then runs, side by side
# in one run, the fused-kernel benchmarks (benchmarks/kernel_bench.py) and a policy train
# step on a Qwen3-0.6B-shaped model at sequence 4096 with the torch path and each
# kernel path (benchmarks/gpu_check.py), and the first-GPU-run checks of issue 21
# (benchmarks/gpu_first_run.py: the default group's device rule with NCCL, the fused
# head's autotune count, CUDA IPC handles by device UUID as SGLang 0.5.23 expects, and
# TE FP8 parameters in the HF export, reported as skipped where TE is absent, and the
# logits path's peak memory per kernel path beside the planner's figure). Results:
# $OUT (default benchmarks/results/gpu_check/): kernels.md, gpu_check.md,
# gpu_check.json, gpu_first_run.md/.json, env.txt.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, < 10 min (parts capped)
#   benchmarks/gpu_check.sh --smoke    # tiny, on CPU with the Triton interpreter (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
OUT="benchmarks/results/gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="${ARCHER_SITE:-/tmp/archer_site}"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# Fail here, with the reason, if something the check needs is missing.
"$PY" -c "import torch, triton, megatron.core, archer_mcore.kernels, archer_mcore.actor.policy" \
  || { echo "gpu_check: a package is missing (see benchmarks/RESULTS.md for the wheels)" >&2; exit 3; }

{
  date -u
  "$PY" -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', m.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  "$PY" benchmarks/kernel_bench.py --smoke | tee "$OUT/kernels.md"
  "$PY" benchmarks/gpu_check.py --smoke --out "$OUT" | tee "$OUT/gpu_check.md"
  "$PY" benchmarks/gpu_first_run.py --smoke --json "$OUT/gpu_first_run.json" \
    | tee "$OUT/gpu_first_run.md"
else
  # Each part has its own time cap, and one failing does not stop the other.
  status=0
  # The policy train step first: Qwen3-0.6B shape, 4 x 4096 tokens, every kernel path.
  timeout 240 "$PY" benchmarks/gpu_check.py --seq 4096 --rows 4 --repeat 3 --out "$OUT" \
    | tee "$OUT/gpu_check.md" || { echo "gpu_check.py failed or timed out" >&2; status=1; }
  # Kernels: Qwen3-0.6B's hidden size (1024) and a 32B-class one (5120), 16k/32k tokens.
  timeout 210 "$PY" benchmarks/kernel_bench.py --tokens 16384 32768 --hidden 1024 5120 \
    | tee "$OUT/kernels.md" || { echo "kernel_bench.py failed or timed out" >&2; status=1; }
  # Issue 21: NCCL default group vs host-side collectives; autotune count, 20 micro-batches;
  # a CUDA IPC handle made with the device UUID opened by a second process; TE FP8 export;
  # the logits path's peak memory vs the planner (1.5B head, 8192 tokens).
  timeout 120 "$PY" benchmarks/gpu_first_run.py --json "$OUT/gpu_first_run.json" \
    | tee "$OUT/gpu_first_run.md" || { echo "gpu_first_run.py failed or timed out" >&2; status=1; }
  echo "gpu_check: results in $OUT"
  exit "$status"
fi
echo "gpu_check: results in $OUT"
