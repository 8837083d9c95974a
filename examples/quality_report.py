"""Make a KV-cache quality report with ``vllm-int4kv quality``.

    python examples/quality_report.py --tiny                       # ~3 min: tiny local model, no data needed
    python examples/quality_report.py artifacts/smollm2-135m-instruct   # the report in docs/quality/

The second form is the recipe of the committed SmolLM2 report (data from scripts/prepare_data.py and
scripts/prepare_smollm2.py): k16v16 / k8v4 / k4v4 / auto with two BIG-bench tasks, then the K4V4
variants (rotation, key channel groups, layers kept unquantized) and vLLM's own attention (unquantized and fp8 cache) on the same
prompts without lm-eval, merged into one report (``--reuse`` keeps the first four runs). Progress lines go to stdout; engine logs to OUT/runs/<policy>/.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_int4kv.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
TASKS = "bb_cause_and_effect_one_sentence,bb_physical_intuition"
K4V4_VARIANTS = "k4v4-rot,k4v4-g16,k4v4-g32,k4v4-g16-rot"
VLLM_CACHES = "vllm:auto,vllm:fp8"  # vLLM's own attention: unquantized, and its fp8 cache (CPU supports these)
# k4v4 with layers kept unquantized: the boundary layers, then the 4 and 8 layers `vllm-int4kv layers`
# ranks worst on SmolLM2 (benchmarks/results-cpu/layers-smollm2-k4v4.md)
SKIP_VARIANTS = "k4v4@skip=0:29,k4v4@skip=1:10:13:19,k4v4@skip=1:2:10:11:12:13:16:19"


def tiny_report(out: Path) -> int:
    """The tiny random Llama, a two-document task and the license texts as corpus."""
    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="int4kv-quality-"))
    model = build_tiny_llama(work / "tiny")
    (work / "tasks").mkdir()
    docs = [{"prompt": "The license is", "choices": ["free", "closed"], "gold": 0},
            {"prompt": "You may copy the", "choices": ["software", "sky"], "gold": 0}]
    (work / "tasks" / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (work / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: \"{work / 'tasks' / 'tiny_mc.jsonl'}\"\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: prompt\ndoc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="replace") for p in sorted(Path("/usr/share/common-licenses")
                                                                               .glob("*")) if p.is_file())
                      or " ".join(f"clause {i} says {i * 7}" for i in range(6000)))
    return cli(["quality", str(model), "--policies", "k16v16,k8v4,k4v4", "--tasks", "tiny_mc",
                "--include-path", str(work / "tasks"), "--corpus", str(corpus), "--ppl-chunks", "2",
                "--chunk-tokens", "128", "--long-tokens", "600", "--gen-lengths", "16,300",
                "--gen-tokens", "8", "--out", str(out)])


def model_report(model: str, out: Path, notes: str | None) -> int:
    common = [model, "--corpus", str(ROOT / "artifacts/data/sotu_2010_2021.txt"), "--ppl-chunks", "4",
              "--chunk-tokens", "512", "--long-prompts", "1", "--long-tokens", "2048",
              "--gen-lengths", "64,1024", "--gen-tokens", "16", "--out", str(out)]
    first = cli(["quality", *common, "--policies", "k16v16,k8v4,k4v4,auto", "--tasks", TASKS,
                 "--include-path", str(ROOT / "artifacts/tasks"), "--limit", "20"])
    extra = ["--notes", notes] if notes else []
    second = cli(["quality", *common, "--reuse", "--policies",
                  f"k16v16,k8v4,k4v4,auto,{K4V4_VARIANTS},{SKIP_VARIANTS},{VLLM_CACHES}", "--tasks", "", *extra])
    return first or second


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="HF model folder (omit with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random local model")
    parser.add_argument("--out", default=None, help="output folder (default artifacts/quality/<model>)")
    parser.add_argument("--notes", help="Markdown appended to the report's discussion")
    args = parser.parse_args()
    if not args.tiny and not args.model:
        parser.error("give a model folder, or --tiny")
    name = "tiny" if args.tiny else Path(args.model).name
    out = Path(args.out or ROOT / "artifacts" / "quality" / name)
    sys.exit(tiny_report(out) if args.tiny else model_report(args.model, out, args.notes))
