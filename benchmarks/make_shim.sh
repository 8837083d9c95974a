#!/usr/bin/env bash
# make_shim.sh REPO DIR: build DIR/vllm_int4kv, a package whose files are symlinks to REPO/vllm_int4kv/*
# and whose `kernels` subpackage is REPO/kernels, as setup.py's package_dir maps them. Put DIR first on
# PYTHONPATH where the package cannot be pip-installed (the GPU machine).
set -euo pipefail
REPO=$(cd "$1" && pwd)
DIR=$2
mkdir -p "$DIR/vllm_int4kv"
for f in "$REPO"/vllm_int4kv/*; do
  case "$(basename "$f")" in __pycache__|kernels) continue ;; esac
  ln -sfn "$f" "$DIR/vllm_int4kv/$(basename "$f")"
done
ln -sfn "$REPO/kernels" "$DIR/vllm_int4kv/kernels"
