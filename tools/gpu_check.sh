#!/usr/bin/env bash
# GPU check (issue 15): everything this repository claims about CUDA, in one unattended run on a machine
# with an NVIDIA GPU, a CUDA toolkit (nvcc) and the environment's prerequisites (README "Quickstart"):
#
#   1. build    the patched tree with its CUDA ops (tools/build.py, FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST set
#               to this GPU only unless given), then run a CUDA op of detectron2 (nms_rotated) and of
#               AdelaiDet (ml_nms, which has no CPU version);
#   2. demo     `python -m demo --quick` with MODEL.DEVICE cuda;
#   3. fake_quant  bench/fake_quant.py --device cuda, eager rows and compiled LSQ, binary and LQ-Net rows;
#   4. qat_step    bench/qat_step.py --device cuda: float and LSQ w4a4, eager and compiled, 512 px, batch 8;
#
# then one report, output/gpu_check/report.md (printed at the end): each stage's status and time, and the
# tables. Meant to take under 8 minutes on one H200 with 16 cores (not run yet); each stage has a time
# limit, a stage that fails or times out is reported and the next one still runs; the exit status is 0
# only when every stage passed. Without a GPU it exits at once with status 3 and says why.
#
# Environment: MQ_VENV (default .venv), GPU_CHECK_OUT (default output/gpu_check), TORCH_CUDA_ARCH_LIST,
# GPU_CHECK_QAT_ARGS (default "--sizes 512 --batches 8 --iters 20 --rounds 1").
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${GPU_CHECK_OUT:-output/gpu_check}
VENV=${MQ_VENV:-.venv}
PY="$VENV/bin/python"
QAT_ARGS=${GPU_CHECK_QAT_ARGS:---sizes 512 --batches 8 --iters 20 --rounds 1}

no_gpu() {
    echo "gpu_check: $1. This check needs an NVIDIA GPU with CUDA; nothing was run." >&2
    echo "gpu_check: the README's GPU numbers stay 'not measured' until it runs on such a machine." >&2
    exit 3
}
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "no nvidia-smi on PATH (no NVIDIA driver here)"
GPUS=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null) || no_gpu "nvidia-smi finds no GPU"
[ -n "$GPUS" ] || no_gpu "nvidia-smi lists no GPU"
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
if [ ! -x "$NVCC" ]; then
    echo "gpu_check: no nvcc (CUDA toolkit) on PATH or in \$CUDA_HOME: the CUDA ops cannot be built" >&2
    exit 4
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU's architecture only: a build for all takes far longer
    TORCH_CUDA_ARCH_LIST=$(echo "$GPUS" | head -n1 | awk -F', *' '{print $2}')
fi
export TORCH_CUDA_ARCH_LIST FORCE_CUDA=1

mkdir -p "$OUT"
STAGES=()
FAILED=0
started_all=$(date +%s)

# stage NAME LIMIT_SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.log, record status.
stage() {
    local name=$1 limit=$2
    shift 2
    local start status
    start=$(date +%s)
    echo "gpu_check: $name (limit ${limit} s, log $OUT/$name.log)"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    local seconds=$(($(date +%s) - start)) result=ok
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        result="timed out after ${limit} s"
    elif [ "$status" -ne 0 ]; then
        result="FAILED (exit $status, see $OUT/$name.log)"
    fi
    [ "$result" = ok ] || FAILED=1
    STAGES+=("| $name | $result | $seconds |")
    echo "gpu_check: $name: $result ($seconds s)"
    [ "$result" = ok ] || tail -n 25 "$OUT/$name.log" >&2
}

stage build 480 bash -c "python3 tools/build.py --venv '$VENV' && '$PY' - <<'EOF'
import torch
assert torch.cuda.is_available(), 'torch sees no CUDA device'
from detectron2 import _C as d2
from detectron2.layers import nms_rotated
from adet import _C as adet
boxes = torch.tensor([[5.0, 5, 10, 10, 0], [5.5, 5, 10, 10, 0], [40, 40, 10, 10, 30]], device='cuda')
scores = torch.tensor([0.9, 0.8, 0.7], device='cuda')
assert nms_rotated(boxes, scores, 0.5).tolist() == [0, 2]
corners = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [40, 40, 50, 50]], device='cuda')
keep = adet.ml_nms(corners, scores, torch.zeros(3, device='cuda'), 0.5)
assert sorted(keep.tolist()) == [0, 2], keep
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| detectron2 _C', d2.get_cuda_version(),
      '| AdelaiDet _C', adet.get_cuda_version() if hasattr(adet, 'get_cuda_version') else 'built with CUDA',
      '|', torch.cuda.get_device_name())
EOF"

stage demo 300 "$PY" - "$OUT/demo" <<'EOF'
import dataclasses
import sys

import demo.__main__ as app  # first: it sets the thread defaults before torch is imported
from demo import plan

# --quick runs on the CPU by design (Mode.device); the same runs on the GPU.
plan.MODES["quick"] = dataclasses.replace(plan.MODES["quick"], device="cuda")
sys.exit(app.main(["--quick", "--output-dir", sys.argv[1]]))
EOF

stage fake_quant 240 "$PY" bench/fake_quant.py --device cuda --compile --compile-methods lsq binary lqnet --markdown

# shellcheck disable=SC2086  # QAT_ARGS is a list of arguments
stage qat_step 600 "$PY" bench/qat_step.py --device cuda $QAT_ARGS

total=$(($(date +%s) - started_all))
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "$(echo "$GPUS" | head -n1) ($(echo "$GPUS" | wc -l) GPU(s)), $(nproc) CPU cores, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; $total s in all."
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---:|"
    printf '%s\n' "${STAGES[@]}"
    echo
    echo "## build: CUDA ops"
    echo
    tail -n 1 "$OUT/build.log"
    echo
    echo "## fake-quant, eager vs compiled (bench/fake_quant.py --device cuda)"
    echo
    grep -E '^(\||Forward|LSQ target|Every quantizer)' "$OUT/fake_quant.log" || echo "(no table: see $OUT/fake_quant.log)"
    echo
    echo "## QAT step, eager vs compiled (bench/qat_step.py --device cuda $QAT_ARGS)"
    echo
    grep -E '^(\||RetinaNet|Targets|- )' "$OUT/qat_step.log" || echo "(no table: see $OUT/qat_step.log)"
    echo
    echo "## quick demo on the GPU (numbers mean nothing: a smoke run)"
    echo
    cat "$OUT/demo/results.md" 2>/dev/null || echo "(no results: see $OUT/demo.log)"
} >"$OUT/report.md"
cat "$OUT/report.md"
exit "$FAILED"
