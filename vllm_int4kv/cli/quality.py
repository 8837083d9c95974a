"""``vllm-int4kv quality``: its options; the run itself is ``vllm_int4kv.quality.runner``."""
from __future__ import annotations

from ..policy.layout import VLLM_DTYPE_NAMES
from ..quality import runner
from .args import above, at_least, count_list, counts_or_none, input_file, input_folder, output_folder


def add_parser(parser) -> None:
    parser.add_argument("model", help="Hugging Face model folder (or a name in the local HF cache)")
    parser.add_argument("--policies", nargs="+", default=["k16v16,k8v4,k4v4,auto"],
                        help="VLLM_INT4KV_POLICY values, separated by commas or spaces: policies, per-layer "
                             "maps (k4v4-rot;0-2,8:k8v4; quote the ';' for the shell) or JSON map files; "
                             "k16v16 (the reference) is added first if missing. POLICY@skip=I:J keeps layers "
                             "I and J unquantized (--kv-cache-dtype-skip-layers). vllm:DTYPE runs vLLM's own "
                             "attention with --kv-cache-dtype DTYPE instead (e.g. vllm:auto, vllm:fp8)")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (empty: none)")
    parser.add_argument("--include-path", help="folder of lm-eval task YAMLs (lm-eval --include_path)")
    parser.add_argument("--limit", type=above(0), help="lm-eval limit: documents per task (< 1: a fraction)")
    parser.add_argument("--corpus", type=input_file, required=True, help="plain-text file for perplexity and agreement")
    parser.add_argument("--chunk-tokens", type=at_least(2), default=512, help="perplexity chunk length")
    parser.add_argument("--ppl-chunks", type=at_least(0), default=8, help="number of perplexity chunks")
    parser.add_argument("--long-prompts", type=at_least(0), default=1, help="long prompts for agreement/KL")
    parser.add_argument("--long-tokens", type=at_least(2), default=2048, help="length of each long prompt")
    parser.add_argument("--gen-lengths", type=count_list, default="64,512,1536",
                        help="prompt lengths (tokens) for the greedy-continuation comparison (at least one)")
    parser.add_argument("--gen-tokens", type=at_least(1), default=32, help="greedy tokens per continuation")
    parser.add_argument("--passkey-lengths", type=counts_or_none, default="1024,2048,4096,8192",
                        help="pass-key retrieval prompts of these lengths (tokens; a key hidden at 10, 50 and "
                             "90 %% depth of each; none: no such check), those longer than the model's context "
                             "left out")
    parser.add_argument("--genres", type=input_folder, default=None,
                        help="folder of held-out genre text (scripts/prepare_data.py writes "
                             "artifacts/data/genres): perplexity per genre")
    parser.add_argument("--genre-chunks", type=at_least(1), default=4,
                        help="--chunk-tokens chunks scored per genre")
    parser.add_argument("--top-k", type=at_least(1), default=40, help="prompt_logprobs requested per position")
    parser.add_argument("--kl-top-k", type=at_least(1), default=20, help="reference tokens kept apart in the KL")
    parser.add_argument("--bos", choices=("auto", "never"), default="auto",
                        help="auto: prepend the tokenizer's BOS token to every prompt if it has one")
    parser.add_argument("--dtype", default="float32", choices=VLLM_DTYPE_NAMES,
                        help="model dtype (float32 on CPU: deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=above(0), default=3600, help="seconds per policy before giving up")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a policy's earlier run in --out if it scored the same prompts with the "
                             "same engine settings (its lm-eval results are kept as they were)")
    parser.add_argument("--notes", type=input_file, help="Markdown file appended to the report's discussion")
    parser.add_argument("--out", type=output_folder, required=True, help="output folder")
    parser.set_defaults(run=runner.run)
