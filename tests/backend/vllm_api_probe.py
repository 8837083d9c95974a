"""Does the plugin fit another vLLM's API? Run with the Python of an environment that holds that vLLM's
package (``scripts/api_env.sh VERSION`` makes one): ``python vllm_api_probe.py REPO MODEL``. Prints one
JSON object; ``test_vllm_versions.py`` reads it. Nothing here starts an engine or needs a GPU.

Checked: the plugin registers over vLLM's CUSTOM slot (and, from 0.33, our ``--kv-cache-dtype int4kv``);
the backend, builder and impl implement every abstract method and accept every argument vLLM's base
classes declare; ``--attention-backend CUSTOM --kv-cache-dtype NAME`` parses into an engine config; and
the page size vLLM computes from our spec is right at 16- and 64-token blocks.
"""
import dataclasses
import inspect
import json
import os
import sys

REPO, MODEL = sys.argv[1], sys.argv[2]
sys.path.insert(0, REPO)
os.environ.setdefault("VLLM_INT4KV_POLICY", "k4v4")
out = {}

import torch  # noqa: E402
import vllm  # noqa: E402

out["vllm"] = vllm.__version__
from vllm.v1.attention import backend as base  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from vllm_int4kv import plugin  # noqa: E402
from vllm_int4kv.backend import compat, engine  # noqa: E402

plugin.register()
out["custom_path"] = AttentionBackendEnum.CUSTOM.get_path()
from vllm_int4kv.backend.attention_backend import Int4KVBackend, Int4KVImpl, Int4KVMetadataBuilder  # noqa: E402

pairs = ((Int4KVBackend, base.AttentionBackend), (Int4KVImpl, base.AttentionImpl),
         (Int4KVMetadataBuilder, base.AttentionMetadataBuilder))
out["abstract"] = [ours.__name__ for ours, _ in pairs if inspect.isabstract(ours)]


def missing_parameters(ours, theirs) -> list[str]:
    """Parameters vLLM's base method declares that our override would refuse."""
    try:
        mine, base_sig = inspect.signature(ours), inspect.signature(theirs)
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in mine.parameters.values()):
        return []
    return [name for name in base_sig.parameters if name not in mine.parameters and name not in ("args", "kwargs")]


mismatches = {}
for ours, theirs in pairs:
    for name in vars(ours):
        if (name.startswith("__") and name != "__init__") or not callable(getattr(theirs, name, None)):
            continue
        missing = missing_parameters(getattr(ours, name), getattr(theirs, name))
        if missing:
            mismatches[f"{ours.__name__}.{name}"] = missing
out["signature_mismatches"] = mismatches

from vllm.config import cache as cache_config  # noqa: E402

out["int4kv_registered"] = compat.OWN_CACHE_DTYPE in getattr(cache_config, "KV_CACHE_DTYPES", [])
out["cache_dtypes"] = list(compat.cache_dtypes())

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

import vllm.triton_utils.importing as triton_importing  # noqa: E402

# vLLM 0.34 refuses x86 CPUs without triton-cpu at config time; nothing here launches a kernel
triton_importing.HAS_TRITON = True
import vllm.triton_utils  # noqa: E402

vllm.triton_utils.HAS_TRITON = True
out["configs"] = {}
for dtype in out["cache_dtypes"]:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", MODEL, "--attention-backend", "CUSTOM", "--kv-cache-dtype", dtype,
                              "--dtype", "float16"])
    try:
        config = EngineArgs.from_cli_args(args).create_engine_config()
        out["configs"][dtype] = {"cache_dtype": config.cache_config.cache_dtype,
                                 "backend": str(config.attention_config.backend)}
    except Exception as exc:  # noqa: BLE001 - reported, the test says which
        out["configs"][dtype] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode  # noqa: E402

engine._vllm_config = config
out["pages"] = {}
for block_size in (16, 64):
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                             kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD)
    custom = Int4KVBackend.customize_spec(spec)
    out["pages"][str(block_size)] = {"state_content_bytes": custom.state_content_bytes,
                                     "page_size_bytes": custom.page_size_bytes,
                                     "fields": [f.name for f in dataclasses.fields(custom)][:3]}
out["default_block_size"] = vllm.config.CacheConfig.DEFAULT_BLOCK_SIZE
print(json.dumps(out))
