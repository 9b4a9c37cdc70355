#!/usr/bin/env bash
# Runs every test of the workspace. The tests need the real models of
# docs (fetched once into ~/.cache/tensorlogic/models, sha256-verified);
# a missing model is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_models.py all >/dev/null
cargo test --workspace --release --locked "$@"
