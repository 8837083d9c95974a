#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (CPU: kernels under the
# Triton interpreter, the real vLLM CPU engine for the backend tests). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
