#!/usr/bin/env bash
# Decode speed of a model written in TensorLogic (`tl run
# examples/qwen2_generate.tl`) against the native engine (`tl generate`):
# same model, prompt, token count and threads, runs alternated, medians.
#
#   scripts/bench_lang.sh [MODEL] [N_TOKENS] [THREADS] [RUNS]
#   EXAMPLE=examples/gemma3_generate.tl PROMPT="…" scripts/bench_lang.sh MODEL
set -euo pipefail
MODEL=${1:-$HOME/.cache/tensorlogic/models/qwen2.5-coder-0.5b-instruct-q4.gguf}
N=${2:-128}
T=${3:-2}
RUNS=${4:-5}
TL=${TL:-target/release/tl}
EXAMPLE=${EXAMPLE:-examples/qwen2_generate.tl}
PROMPT=${PROMPT:-"Write a Python function that checks whether a number is prime, with a docstring."}
lang=(); native=()
for _ in $(seq "$RUNS"); do
  lang+=("$("$TL" run -t "$T" "$EXAMPLE" "$MODEL" "$PROMPT" "$N" \
    | sed -n 's/.*tokens, \([0-9.]*\) tok\/s$/\1/p')")
  native+=("$("$TL" generate -t "$T" -m "$MODEL" -p "$PROMPT" -n "$N" --temp 0 2>&1 >/dev/null \
    | sed -n 's/.*decode: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ml=$(median "${lang[@]}"); mn=$(median "${native[@]}")
echo "tl run ($(basename "$EXAMPLE")): ${lang[*]} -> median $ml tok/s"
echo "tl generate:                ${native[*]} -> median $mn tok/s"
awk -v a="$ml" -v b="$mn" 'BEGIN {printf "ratio: %.2f\n", a / b}'
