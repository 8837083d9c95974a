#!/usr/bin/env bash
# The demo command: set up .venv if needed, then serve the embedded tiny model with our backend,
# send a completion and a chat request, print the answers and the capacity gain, shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/demo.py "$@"
