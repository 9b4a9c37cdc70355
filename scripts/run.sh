#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model if absent, build
# the release binary, and run it on the model.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(python3 scripts/fetch_models.py qwen)
cargo build --release --locked -p tl-cli
./target/release/tl inspect "$model"
