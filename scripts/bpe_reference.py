"""A slow, obvious byte-level BPE encoder: the reference a converted ``tokenizer.json`` is checked against.

It reads nothing but what a GGUF file stores (the token list, the token types, the ranked merges)
plus the split pattern the file's ``tokenizer.ggml.pre`` names, and encodes the way GPT-2-style
byte-level BPE is defined:

1. cut the text at added tokens (GGUF token types CONTROL and USER_DEFINED), longest match first;
   they become one id each and are not normalized;
2. normalize the rest (NFC for Qwen2) and split it with the pre-tokenizer regex;
3. spell each piece's UTF-8 bytes in the 256-character byte alphabet;
4. merge adjacent symbols, always the pair with the lowest merge rank, until no ranked pair is left.

Nothing here comes from the ``tokenizers`` library, so a wrong regex engine feature, a lost
normalizer or a mis-ranked merge in the converted tokenizer shows up as a different id sequence.
"""
from __future__ import annotations

import unicodedata

import regex

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Qwen2's split rule, spelled the way llama.cpp spells it for `tokenizer.ggml.pre = qwen2`
# (case-insensitive contractions written out); the converted tokenizer uses the Hugging Face
# spelling, so the two spellings check each other.
QWEN2_SPLIT_LLAMA_CPP = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, ...) get the characters U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return table


class ReferenceBPE:
    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str],
                 split_pattern: str, normalization: str | None = "NFC"):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        added = sorted((t for t, ty in zip(tokens, token_types) if ty in (CONTROL, USER_DEFINED)),
                       key=len, reverse=True)
        self.added_re = regex.compile("|".join(regex.escape(t) for t in added)) if added else None
        self.split_re = regex.compile(split_pattern)
        self.normalization = normalization
        self.alphabet = byte_alphabet()
        self._cache: dict[str, list[int]] = {}

    def merge(self, word: str) -> list[str]:
        """BPE on one pre-token spelled in the byte alphabet."""
        symbols = list(word)
        while len(symbols) > 1:
            ranked = [(self.rank[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in self.rank]
            if not ranked:
                break
            _, i = min(ranked)
            first, second = symbols[i], symbols[i + 1]
            merged, j = [], 0
            while j < len(symbols):  # every occurrence of the pair, left to right
                if j + 1 < len(symbols) and symbols[j] == first and symbols[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            symbols = merged
        return symbols

    def _encode_plain(self, text: str) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        out = []
        for piece in self.split_re.findall(text):
            word = "".join(self.alphabet[b] for b in piece.encode("utf-8"))
            if word not in self._cache:
                self._cache[word] = [self.ids[s] for s in self.merge(word)]
            out += self._cache[word]
        return out

    def encode(self, text: str) -> list[int]:
        out, pos = [], 0
        for m in (self.added_re.finditer(text) if self.added_re else ()):
            out += self._encode_plain(text[pos:m.start()])
            out.append(self.ids[m.group()])
            pos = m.end()
        return out + self._encode_plain(text[pos:])
