"""vLLM's Triton attention kernels on a machine without vLLM: stage their source here, load it there.

Why: the lent GPU machine has torch and Triton but no vLLM and no network, so the same-run baseline
against vLLM's own kernels (bf16, fp8, int4_per_token_head) would be "not measured". Those kernels are
plain Triton in a handful of Python files. ``--stage`` copies these files, unchanged, from the vLLM
installed on this machine into an ignored folder (it travels to the GPU machine with the device tool's
``carry``); ``install`` then makes them importable under their own module names, with small stand-ins
for the few vLLM modules they import (environment flags, logger, platform queries, the quant-mode enum,
whose values are recorded at staging time).

    python benchmarks/vllm_kernels.py --stage            # -> artifacts/vllm_kernels (git-ignored)
    .venv-vllm-0.34/bin/python benchmarks/vllm_kernels.py --stage   # the current vLLM's (scripts/api_env.sh)

What differs from a real vLLM: no ``vllm._C``, so the INT4 mode rotates queries with vLLM's Triton or
torch fallback instead of its CUDA Hadamard kernel (a small share of a decode step); and no batch
invariance mode. Everything else is vLLM's code as shipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import types
from enum import IntEnum
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "artifacts" / "vllm_kernels"
FILES = ("v1/attention/ops/triton_unified_attention.py", "v1/attention/ops/triton_attention_helpers.py",
         "v1/attention/ops/int4_per_token_head.py", "v1/attention/ops/triton_reshape_and_cache_flash.py",
         "utils/math_utils.py")
MANIFEST = "staged.json"


def staged_dir() -> Path:
    return Path(os.environ.get("VLLM_INT4KV_VLLM_KERNELS", DEFAULT_DIR))


def stage(dest: Path) -> dict:
    """Copy the kernel files from the installed vLLM into ``dest/vllm/...``; record version and enum."""
    import vllm
    from vllm.v1.kv_cache_interface import KVQuantMode

    src = Path(vllm.__file__).parent
    for rel in FILES:
        (dest / "vllm" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / "vllm" / rel)
    manifest = {"vllm_version": vllm.__version__, "files": list(FILES),
                "kv_quant_mode": {m.name: int(m) for m in KVQuantMode}}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


class _Platform:
    """The platform queries the kernels make, answered from torch."""

    @staticmethod
    def fp8_dtype():
        import torch
        return torch.float8_e4m3fn

    @staticmethod
    def _capability() -> int:
        import torch
        if not torch.cuda.is_available():
            return 0
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor

    def is_device_capability_family(self, capability: int) -> bool:
        return self._capability() // 10 == capability // 10

    def has_device_capability(self, capability: int) -> bool:
        return self._capability() >= capability

    def is_cuda(self) -> bool:
        import torch
        return torch.cuda.is_available() and torch.version.hip is None

    def is_rocm(self) -> bool:
        return False

    def is_xpu(self) -> bool:
        return False


def _is_quantized_kv_cache(name: str) -> bool:
    return name.startswith(("fp8", "nvfp4")) or name.endswith("per_token_head")


def install(src: Path | None = None) -> str:
    """Make the staged kernels importable as ``vllm.v1.attention.ops.*``; returns a description.

    Refuses when a real ``vllm`` is already imported (its modules must not be mixed with these).
    """
    src = Path(src or staged_dir())
    manifest_path = src / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"no staged vLLM kernels in {src}: run `python benchmarks/vllm_kernels.py "
                                "--stage` on a machine with vLLM, and carry that folder")
    missing = [rel for rel in FILES if not (src / "vllm" / rel).exists()]
    if missing:
        raise FileNotFoundError(f"staged vLLM kernels in {src} lack {', '.join(missing)} (staged by an older "
                                "version of this script): run `python benchmarks/vllm_kernels.py --stage` again")
    if "vllm" in sys.modules and not getattr(sys.modules["vllm"], "_int4kv_staged", False):
        raise RuntimeError("a real vllm is already imported; use it instead of the staged kernels")
    manifest = json.loads(manifest_path.read_text())
    import triton
    import triton.language as tl

    root = src / "vllm"
    for package in ("vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.ops", "vllm.utils"):
        path = root.joinpath(*package.split(".")[1:])
        _module(package, __path__=[str(path)], _int4kv_staged=True)
    _module("vllm.envs", VLLM_BATCH_INVARIANT=False)
    _module("vllm.logger", init_logger=logging.getLogger)
    _module("vllm.platforms", current_platform=_Platform())
    _module("vllm.triton_utils", triton=triton, tl=tl)
    # (vLLM 0.33 and later import is_quantized_kv_cache from here, 0.32 from vllm.utils.torch_utils)
    _module("vllm.v1.kv_cache_interface", KVQuantMode=IntEnum("KVQuantMode", manifest["kv_quant_mode"]),
            is_quantized_kv_cache=_is_quantized_kv_cache)
    # the cache-write file's imports: the fp8 range, and which cache dtypes are quantized
    import torch

    fp8 = torch.finfo(torch.float8_e4m3fn)
    _module("vllm.model_executor.layers.quantization.utils.quant_utils", FP8_DTYPE=torch.float8_e4m3fn,
            get_fp8_min_max=lambda: (fp8.min, fp8.max))
    _module("vllm.utils.torch_utils", is_quantized_kv_cache=_is_quantized_kv_cache)
    return f"vLLM {manifest['vllm_version']} Triton kernels staged from its installed package (no vllm._C)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", action="store_true", help="copy the kernels from the installed vLLM")
    ap.add_argument("--dir", type=Path, default=None, help=f"default: {DEFAULT_DIR}")
    args = ap.parse_args()
    if not args.stage:
        ap.error("nothing to do: pass --stage")
    dest = args.dir or staged_dir()
    manifest = stage(dest)
    print(f"staged vLLM {manifest['vllm_version']} kernels ({len(FILES)} files) in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
