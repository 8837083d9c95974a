"""Checks beyond the perplexity corpus: retrieval of a pass key hidden deep in long filler text, and
perplexity per genre on held-out text the calibration never saw (pure Python; the tokenizer is passed in).

Pass key: a five-digit key is stated once at a given depth (a fraction of the context) inside filler
sentences, and asked for at the end; a policy gets it right when its greedy answer contains the key.
Run on the unquantized reference too: a small model may miss keys at long context by itself.
"""
from __future__ import annotations

import random
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEPTHS = (0.1, 0.5, 0.9)
ANSWER_TOKENS = 8


def passkey_prompts(tokenizer, lengths: list[int], depths=DEPTHS, seed: int = 0) -> list[dict]:
    """``{"ids", "key", "length", "depth"}`` per (length, depth): prompts of about ``length`` tokens."""
    rng = random.Random(seed)
    filler = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    items = []
    for length in lengths:
        for depth in depths:
            key = rng.randint(10000, 99999)
            needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                               add_special_tokens=False)["input_ids"]
            head = bos + tokenizer(INTRO, add_special_tokens=False)["input_ids"]
            tail = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
            room = length - len(head) - len(needle) - len(tail)
            if room < len(filler):
                raise ValueError(f"pass-key prompts of {length} tokens leave no room for filler")
            hay = (filler * (room // len(filler) + 1))[:room]
            cut = int(depth * room)
            items.append({"ids": head + hay[:cut] + needle + hay[cut:] + tail, "key": str(key),
                          "length": length, "depth": depth})
    return items


def passkey_accuracy(tokenizer, items: list[dict], answers: list[list[int]]) -> dict:
    """Accuracy overall and per length and depth: the key appears in the decoded greedy answer."""
    hits = [item["key"] in tokenizer.decode(answer) for item, answer in zip(items, answers, strict=True)]

    def rate(keep) -> float:
        chosen = [hit for item, hit in zip(items, hits) if keep(item)]
        return sum(chosen) / len(chosen)

    return {"accuracy": sum(hits) / len(hits),
            "by_length": {str(n): rate(lambda i, n=n: i["length"] == n) for n in sorted({i["length"] for i in items})},
            "by_depth": {str(d): rate(lambda i, d=d: i["depth"] == d) for d in sorted({i["depth"] for i in items})},
            "hits": hits}


def genre_chunks(tokenizer, folder: str | Path, chunks: int, size: int, bos: list[int]) -> dict[str, list]:
    """The first ``chunks`` whole ``size``-token chunks of each ``<genre>.txt`` held-out file in ``folder``
    (``scripts/prepare_data.py`` writes them to artifacts/data/genres), genres with fewer tokens left out.
    Files in the calibration format are read section by section, the text of each joined with blank lines."""
    from ..policy.corpus import dialogue_messages, parse_genre_text

    out = {}
    for path in sorted(Path(folder).glob("*.txt")):
        header, sections = parse_genre_text(path.read_text(encoding="utf-8"))
        dialogue = any("chat template" in line for line in header)
        texts = []
        for _, text in sections:
            if dialogue:  # as the model would see it: through its chat template, where it has one
                messages = dialogue_messages(text)
                text = (tokenizer.apply_chat_template(messages, tokenize=False)
                        if getattr(tokenizer, "chat_template", None)
                        else "\n\n".join(f"{m['role']}: {m['content']}" for m in messages))
            texts.append(text)
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        body = size - len(bos)
        found = [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)][:chunks]
        if found:
            out[path.stem] = found
    if not out:
        raise ValueError(f"{folder}: no <genre>.txt file with a whole chunk of {size} tokens "
                         "(run scripts/prepare_data.py)")
    return out
