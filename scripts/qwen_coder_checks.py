"""The checks of ``prepare_qwen_coder.py``: the prepared folder's tokenizer, model and (optionally) vLLM.

* ``check_tokenizer`` / ``verify_tokenizer``: the folder's tokenizer, as transformers loads it, against
  ``bpe_reference`` (a pure-Python BPE over the GGUF's own vocabulary and merges) on ``PROBE_TEXTS``, a
  rendered chat prompt and the evaluation corpus;
* ``check_model``: the folder loaded with plain transformers in fp32: the tokenizer check, greedy
  completion and chat answers (``COMPLETION_*`` / ``CHAT_*``), perplexity in ``PPL_RANGE``;
* ``check_vllm``: vLLM's CPU engine gives transformers' prompt ids and greedy tokens.

Each raises RuntimeError when something is off and returns what it found, for ``prepared.json``.
"""
from __future__ import annotations

import os
import time
import unicodedata
from pathlib import Path

from bpe_reference import QWEN2_SPLIT_LLAMA_CPP, ReferenceBPE
from gguf_to_hf import gguf_metadata, perplexity

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


# the log line of prepare_qwen_coder.py (which imports it from here)
def _log(msg: str) -> None:
    print(f"[prepare_qwen_coder] {msg}", flush=True)


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
