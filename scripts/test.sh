#!/usr/bin/env bash
# Runs every test: the workspace's Rust tests, then the end-to-end tests of
# `tl serve` (openai client, curl, headless Chromium, three replicas behind
# vllm-router) on the real model.
# The tests need the real models (fetched once into
# ~/.cache/tensorlogic/models, sha256-verified) and the e2e tools
# (scripts/setup_e2e.sh, scripts/setup_router.sh); anything missing is a
# failure, never a skip.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_models.py all >/dev/null
py=$(bash scripts/setup_e2e.sh)
# vllm-router for the replica/router tests (tests/e2e/test_router.py);
# an install failure stops here with the reason.
TL_ROUTER=$(bash scripts/setup_router.sh)
export TL_ROUTER
cargo test --workspace --release --locked "$@"
# The GPU tests pass without a GPU by skipping; say so where it shows.
echo "test.sh: GPU tests (tl-model --test cuda):"
cargo test --release --locked -p tl-model --test cuda -- --nocapture 2>&1 | grep -E 'SKIPPED|max rel diff|greedy agreement|test result' || true
cargo build --release --locked -p tl-cli
echo "test.sh: end-to-end tests of tl serve"
(cd tests/e2e && "$py" -m pytest -q -p no:cacheprovider)
