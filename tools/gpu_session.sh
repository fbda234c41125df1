#!/usr/bin/env bash
# One short session on a borrowed GPU machine, run from the checkout's root: the acceptance check
# (`sffn bench --gpu-check`: kernels against float64, training, host syncs, speed), then the kernel and
# precision tests on CUDA. Everything lands in $OUT (default ./gpu_session): session.log, gpu_check.json,
# gpu_check.md, tests.log. Each step has its own time limit, so a slow one cannot cost the steps after it.
#
#   OUT=/some/dir CHECK_S=360 TESTS_S=120 bash tools/gpu_session.sh
#
# Needs torch with CUDA, triton, lightning and the other dependencies already installed. Without an install of
# sffn-lab (a fresh machine reached with no package index), the checkout's own `sffn_lab/` is used with
# `kernels/` and `experiments/` linked in where the wheel puts them (the links stay in the checkout).
set -u
OUT=${OUT:-gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sffn-triton-cache}
exec > >(tee "$OUT/session.log") 2>&1

if ! python3 -c "import sffn_lab.kernels" 2>/dev/null; then
    ln -sfn ../kernels sffn_lab/kernels
    ln -sfn ../experiments sffn_lab/experiments
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "lightning", "torchmetrics", "typer", "rich", "scipy", "yaml", "matplotlib", "tokenizers",
             "sentencepiece", "tiktoken", "tensorboard", "safetensors", "hypothesis", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError as exc:
        print(f"  {name} MISSING ({exc})")
EOF

echo "== sffn bench --gpu-check"
start=$SECONDS
timeout "${CHECK_S:-360}" python3 -m sffn_lab bench --gpu-check --out "$OUT"
echo "gpu check exit $? after $((SECONDS - start)) s"

echo "== kernel and precision tests on CUDA"
start=$SECONDS
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_precision.py \
    > "$OUT/tests.log" 2>&1
echo "tests exit $? after $((SECONDS - start)) s"
tail -n 30 "$OUT/tests.log"
