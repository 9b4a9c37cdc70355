#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model if absent, build
# the release binary, and generate text with it.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(python3 scripts/fetch_models.py qwen)
cargo build --release --locked -p tl-cli
./target/release/tl generate -m "$model" --chat -n 64 \
  -p "${1:-Write a Python function that checks whether a string is a palindrome.}"
