#!/usr/bin/env bash
# scripts/api_env.sh VERSION: an environment holding vLLM VERSION's Python package (e.g. 0.34.0), for the
# API-conformance tests of the plugin against vLLM versions other than the CPU build's 0.32
# (tests/backend/test_vllm_versions.py). CPU only: vLLM's wheel is installed without its dependencies (its
# compiled GPU extensions are never loaded) beside the local CPU torch 2.13.0 wheel, plus the pure-Python
# packages its config, engine-argument, platform and attention-backend modules import, at the versions the
# wheel pins. Made in .venv-vllm-MAJOR.MINOR (about 2 GB, 1-5 minutes; the wheel is cached in
# artifacts/downloads). Nothing here starts an engine.
set -euo pipefail
VERSION=${1:?usage: scripts/api_env.sh VERSION (e.g. 0.34.0)}
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0}
MM=$(echo "$VERSION" | cut -d. -f1,2)
DIR=${DIR:-.venv-vllm-$MM}
WHEELS=${VLLM_WHEEL_DIR:-artifacts/downloads}
PY=${PYTHON:-python3}
t0=$(date +%s)
rm -rf "$DIR"
"$PY" -m venv "$DIR"
PIP="$DIR/bin/pip --disable-pip-version-check -q"
PIPI="$PIP install --no-compile"
# 1. torch (pip finds the local wheels of 2.13.0+cpu and 2.14.1 by itself)
$PIPI "torch==$TORCH"
# 2. the vLLM wheel, without its dependencies (reuse a downloaded wheel if there is one)
whl=$(ls "$WHEELS"/vllm-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  mkdir -p "$WHEELS"; $PIP download --no-deps "vllm==$VERSION" -d "$WHEELS"
  whl=$(ls "$WHEELS"/vllm-"$VERSION"-*.whl | head -1)
fi
$PIPI --no-deps "$whl"
# 3. constraints = the vLLM wheel's own pins (minus torch and GPU-only packages)
CONS="$DIR/vllm-constraints.txt"
"$DIR/bin/python" - "$CONS" <<'PY'
import sys
from importlib.metadata import distribution
skip = ("torch", "torchaudio", "torchvision", "torchcodec", "flashinfer", "nvidia", "tilelang",
        "quack", "tokenspeed", "humming", "pynvvideocodec", "fastsafetensors",
        "instanttensor", "nvtx", "numba")
out = []
for r in distribution("vllm").requires or []:
    if "extra ==" in r:
        continue
    name = r.split(";")[0].strip()
    base = name.replace("[", " ").replace("<", " ").replace(">", " ").replace("=", " ").replace("!", " ").replace("~", " ").split()[0].lower()
    if base.startswith(skip):
        continue
    out.append(r.replace("[standard]", "").replace("[image]", ""))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
# 4. the pure-Python dependencies that vllm.config, vllm.engine.arg_utils, vllm.platforms,
#    vllm.v1.attention.*, vllm.v1.kv_cache_interface, vllm.v1.core.kv_cache_utils and
#    vllm.model_executor.layers.attention import (found by tools/probe_imports.py)
$PIPI -c "$CONS" packaging huggingface_hub numpy psutil pydantic regex pyzmq requests \
  transformers tokenizers safetensors aiohttp pillow cbor2 pybase64 cachetools msgspec cloudpickle \
  py-cpuinfo prometheus_client einops pyyaml llguidance uvloop \
  oss-harmony openai fastapi partial-json-parser
# xgrammar is imported by the structured-output code that kv_cache_utils pulls in; its own
# dependencies would add triton (~0.5 GB) and more, which the imports do not need
$PIPI --no-deps -c "$CONS" xgrammar
$PIPI -c "$CONS" "apache-tvm-ffi==0.1.11"
# smoke test: the modules the plugin's API tests import
"$DIR/bin/python" -W ignore -c "
import vllm.config, vllm.engine.arg_utils, vllm.platforms, vllm.v1.attention.backend
import vllm.v1.attention.backends.registry, vllm.v1.kv_cache_interface, vllm.v1.core.kv_cache_utils
import vllm.model_executor.layers.attention, vllm.model_executor.models.utils
import vllm.distributed.parallel_state, vllm.config.model
print('api_env: imports ok, vllm', vllm.__version__)" 2>&1 | grep -v -i warn
t1=$(date +%s)
echo "api_env: vllm $VERSION + torch $TORCH in $DIR: $((t1 - t0)) s, $(du -sh "$DIR" | cut -f1)"
