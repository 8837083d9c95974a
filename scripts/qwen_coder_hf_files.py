"""config.json and the tokenizer files of the Hugging Face folder, from the GGUF metadata (for
``prepare_qwen_coder.py``): ``build_config`` (Qwen2ForCausalLM), ``build_tokenizer`` (byte-level BPE over
the GGUF vocabulary and merges, NFC, Qwen2's split) and ``write_tokenizer_files`` (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja).
"""
from __future__ import annotations

from pathlib import Path

from bpe_reference import CONTROL, NORMAL, UNUSED, USER_DEFINED
from gguf_to_hf import write_json

# Qwen2's pre-tokenizer split (Hugging Face spelling); bpe_reference spells it llama.cpp's way
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


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
