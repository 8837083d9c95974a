"""Quality metrics of a KV policy against the unquantized reference, from vLLM prompt logprobs.

Pure numpy; no engine. A scored run is a ``TopK`` record: for every scored prompt position (one row),
the log-probability of the actual next token and the ``K`` most likely next tokens with their
log-probabilities, as vLLM returns them for ``prompt_logprobs=K``.

KL divergence. vLLM returns top-K lists, not full distributions (a full 49k-entry row per position
through Python objects is too slow, and scoring chosen ids needs the V2 model runner, which the CPU build
cannot run). So the KL is measured on a partition of the vocabulary: the reference's top-``k`` tokens
(``k`` <= ``K``) as ``k`` separate outcomes, plus one bucket for every other token:

    KL_k(P || Q) = sum_{t in top_k(P)} p_t log(p_t / q_t) + p_rest log(p_rest / q_rest)

By the data-processing inequality this is a lower bound on the full-vocabulary KL (merging outcomes
can only lose divergence). The quantized run's ``q_t`` are read from its own top-``K`` list; a
reference token missing from it is given ``min(q_K, mass outside q's top-K / #missing)`` (``q_K``: the
K-th probability, an upper bound on any unlisted token), and the count of such lookups is reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Context-length buckets for the per-position breakdown: (lo, hi] tokens of context (a BOS counts).
POSITION_EDGES = (0, 128, 512, 1024, 2048, 4096, 8192, 1 << 30)


@dataclass
class TopK:
    """Scored rows of a run, concatenated over its prompts (rows in the same order in every run)."""

    target: np.ndarray  # [N] float32: log p(actual next token)
    ids: np.ndarray  # [N, K] int64: top-K token ids, most likely first
    logprobs: np.ndarray  # [N, K] float32
    position: np.ndarray  # [N] int32: tokens of context before the predicted token
    sequence: np.ndarray  # [N] int32: which prompt the row belongs to

    def save(self, path) -> None:
        np.savez_compressed(path, target=self.target, ids=self.ids, logprobs=self.logprobs,
                            position=self.position, sequence=self.sequence)

    @classmethod
    def load(cls, path) -> TopK:
        with np.load(path) as data:
            return cls(**{name: data[name] for name in ("target", "ids", "logprobs", "position",
                                                        "sequence")})

    @classmethod
    def concat(cls, parts: list[TopK]) -> TopK:
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("target", "ids", "logprobs", "position", "sequence")))


def from_flat_logprobs(flat, first_row: int, k: int, sequence: int) -> TopK:
    """Rows ``first_row..`` of one prompt's vLLM ``FlatLogprobs`` (``flat_logprobs=True``).

    vLLM lays each position out as ``[actual token, top-1, ..., top-K]`` (position 0 is empty).
    """
    rows = range(first_row, len(flat.start_indices))
    starts = np.asarray([flat.start_indices[i] for i in rows])
    widths = np.asarray([flat.end_indices[i] for i in rows]) - starts
    if (widths != k + 1).any():
        raise ValueError(f"expected {k + 1} logprobs per prompt position (actual token + top-{k}), got "
                         f"{sorted(set(widths.tolist()))}: was the request made with prompt_logprobs={k}?")
    ids_all = np.asarray(flat.token_ids, dtype=np.int64)
    lps_all = np.asarray(flat.logprobs, dtype=np.float32)
    columns = starts[:, None] + 1 + np.arange(k)[None, :]
    return TopK(target=lps_all[starts], ids=ids_all[columns], logprobs=lps_all[columns],
                position=np.asarray(rows, dtype=np.int32),
                sequence=np.full(len(starts), sequence, dtype=np.int32))


def perplexity(target_logprobs: np.ndarray) -> float:
    """exp(mean negative log-likelihood) over the scored tokens."""
    return float(np.exp(-np.mean(target_logprobs.astype(np.float64))))


def chunk_nll(target_logprobs: np.ndarray, sequence: np.ndarray) -> list[float]:
    """Mean negative log-likelihood of each prompt's scored tokens, in prompt order."""
    nll = -target_logprobs.astype(np.float64)
    return [float(nll[sequence == s].mean()) for s in np.unique(sequence)]


def change_standard_error(ref_nll: list[float], run_nll: list[float]) -> float | None:
    """Standard error of a perplexity change measured on the same chunks, from the spread of the paired
    per-chunk NLL differences (delta method; None below two chunks). Chunks of one text are treated as
    independent samples of it."""
    d = np.asarray(run_nll, dtype=np.float64) - np.asarray(ref_nll, dtype=np.float64)
    if len(d) < 2:
        return None
    return float(np.exp(d.mean()) * d.std(ddof=1) / np.sqrt(len(d)))


def bucket_kl(ref: TopK, run: TopK, k: int) -> tuple[np.ndarray, int]:
    """Per-row ``KL_k(P_ref || Q_run)`` (nats; see the module docstring) and the number of reference
    tokens that had to be bounded because they were missing from the run's top-K list."""
    p = np.exp(ref.logprobs[:, :k].astype(np.float64))  # [N, k]
    q_all = np.exp(run.logprobs.astype(np.float64))  # [N, K]
    match = ref.ids[:, :k, None] == run.ids[:, None, :]  # [N, k, K]
    found = match.any(axis=2)
    q = np.where(found, (match * q_all[:, None, :]).sum(axis=2), 0.0)
    missing = ~found
    outside = np.clip(1.0 - q_all.sum(axis=1), 0.0, 1.0)  # mass outside the run's top-K
    n_missing = missing.sum(axis=1)
    fill = np.minimum(q_all[:, -1], outside / np.maximum(n_missing, 1))
    q = np.where(missing, fill[:, None], q)
    tiny = 1e-30
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(axis=1), tiny, 1.0)
    kl = (p * (np.log(np.maximum(p, tiny)) - np.log(np.maximum(q, tiny)))).sum(axis=1)
    kl += np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, tiny)) - np.log(q_rest)), 0.0)
    return np.maximum(kl, 0.0), int(missing.sum())


def top1_agreement(ref: TopK, run: TopK) -> np.ndarray:
    """Per row: does the run's most likely next token equal the reference's?"""
    return ref.ids[:, 0] == run.ids[:, 0]


def _check_aligned(ref: TopK, run: TopK) -> None:
    if ref.ids.shape[0] != run.ids.shape[0] or not np.array_equal(ref.position, run.position):
        raise ValueError("the two runs scored different prompts; compare runs of the same settings")


def compare_logprobs(ref: TopK, run: TopK, k: int, ppl_rows: np.ndarray) -> dict:
    """Agreement, KL and perplexity delta of ``run`` against ``ref``, overall and by context length.

    ``ppl_rows`` selects the rows of the perplexity chunks (the rest are the long prompts).
    """
    _check_aligned(ref, run)
    kl, n_missing = bucket_kl(ref, run, k)
    agree = top1_agreement(ref, run)
    by_position = []
    for lo, hi in zip(POSITION_EDGES[:-1], POSITION_EDGES[1:]):
        rows = (ref.position > lo) & (ref.position <= hi)
        if rows.any():
            by_position.append({"positions": [lo + 1, int(min(hi, ref.position.max()))],
                                "rows": int(rows.sum()), "top1_agreement": float(agree[rows].mean()),
                                "mean_kl": float(kl[rows].mean())})
    return {
        "rows": int(len(kl)), "kl_top_k": k, "kl_missing_lookups": n_missing,
        "top1_agreement": float(agree.mean()), "mean_kl": float(kl.mean()),
        "p99_kl": float(np.quantile(kl, 0.99)), "max_kl": float(kl.max()),
        "mean_abs_target_logprob_delta": float(np.abs(ref.target - run.target).mean()),
        "ppl_ratio": perplexity(run.target[ppl_rows]) / perplexity(ref.target[ppl_rows]),
        "by_position": by_position,
    }


def generation_agreement(ref: list[list[int]], run: list[list[int]]) -> dict:
    """Greedy continuations against the reference's: position-wise token match rate, and how far the
    two agree before the first differing token (as a fraction of the reference's length)."""
    if len(ref) != len(run):
        raise ValueError(f"{len(ref)} reference continuations but {len(run)} to compare")
    matched = total = 0
    prefix_fractions = []
    for a, b in zip(ref, run):
        n = max(len(a), len(b))
        same = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
        matched += sum(same)
        total += n
        first_diff = same.index(False) if False in same else n
        prefix_fractions.append(first_diff / n if n else 1.0)
    return {"continuations": len(ref), "token_match_rate": matched / total if total else 1.0,
            "identical": sum(f == 1.0 for f in prefix_fractions),
            "mean_prefix_fraction": float(np.mean(prefix_fractions)) if prefix_fractions else 1.0}


def choice_agreement(ref: dict[int, int], run: dict[int, int]) -> float | None:
    """Fraction of multiple-choice documents where the run picked the reference's answer."""
    common = ref.keys() & run.keys()
    return sum(ref[d] == run[d] for d in common) / len(common) if common else None
