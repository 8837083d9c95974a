"""``vllm-int4kv`` command line: one subcommand per module, each with ``add_parser`` and ``run``."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module inside this package, one-line help). Only the chosen subcommand's module is
# imported, so `vllm-int4kv plan` does not pay for torch/transformers imports it never uses.
SUBCOMMANDS = {
    "plan": ("plan", "KV capacity and decode traffic per policy for a model and a memory budget"),
    "calibrate": ("calibrate", "measure a model's K/V sensitivity and choose its policy (auto)"),
    "layers": ("layers", "which layers carry a policy's error; what --kv-cache-dtype-skip-layers should keep"),
    "quality": ("quality", "perplexity, agreement, KL and lm-eval per policy through vLLM, as a report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="vllm-int4kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(f"{__package__}.{module_name}").add_parser(subparser)
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
