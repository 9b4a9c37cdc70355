#!/usr/bin/env bash
# Decode speed of a model written in TensorLogic (`tl run
# examples/qwen2_generate.tl`) against the native engine (`tl generate`):
# same model, prompt, token count and threads, runs interleaved (the order
# rotates each repetition, so a change of load reaches every side), then
# per side the median and range, and the median of the per-repetition
# ratios (each ratio from runs seconds apart, so less scattered by load).
#
#   scripts/bench_lang.sh [MODEL] [N_TOKENS] [THREADS] [RUNS]
#   EXAMPLE=examples/gemma3_generate.tl PROMPT="…" scripts/bench_lang.sh MODEL
#   TL_BASE=/path/to/older/tl scripts/bench_lang.sh   # also the program on another binary
set -euo pipefail
MODEL=${1:-$HOME/.cache/tensorlogic/models/qwen2.5-coder-0.5b-instruct-q4.gguf}
N=${2:-128}
T=${3:-2}
RUNS=${4:-5}
TL=${TL:-target/release/tl}
TL_BASE=${TL_BASE:-}
EXAMPLE=${EXAMPLE:-examples/qwen2_generate.tl}
PROMPT=${PROMPT:-"Write a Python function that checks whether a number is prime, with a docstring."}
lang=(); native=(); base=(); ratio=(); ratio_base=()
run_lang() {
  "$1" run -t "$T" "$EXAMPLE" "$MODEL" "$PROMPT" "$N" \
    | sed -n 's/.*tokens, \([0-9.]*\) tok\/s$/\1/p'
}
run_native() {
  "$TL" generate -t "$T" -m "$MODEL" -p "$PROMPT" -n "$N" --temp 0 2>&1 >/dev/null \
    | sed -n 's/.*decode: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p'
}
sides=(lang native)
[ -n "$TL_BASE" ] && sides+=(base)
for r in $(seq "$RUNS"); do
  n=${#sides[@]}
  for i in $(seq 0 $((n - 1))); do
    side=${sides[$(((i + r) % n))]}
    case $side in
      lang) l=$(run_lang "$TL") ;;
      native) v=$(run_native) ;;
      base) b=$(run_lang "$TL_BASE") ;;
    esac
  done
  lang+=("$l"); native+=("$v")
  ratio+=("$(awk -v a="$l" -v b="$v" 'BEGIN {printf "%.3f", a / b}')")
  if [ -n "$TL_BASE" ]; then
    base+=("$b")
    ratio_base+=("$(awk -v a="$b" -v b="$v" 'BEGIN {printf "%.3f", a / b}')")
  fi
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { printf '%s\n' "$@" | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }
summary() { printf '%s -> median %.2f (%s)' "$(printf '%.2f ' "$@")" "$(median "$@")" "$(range "$@")"; }
echo "tl run ($(basename "$EXAMPLE")): $(summary "${lang[@]}") tok/s"
[ -n "$TL_BASE" ] && echo "tl run, $TL_BASE: $(summary "${base[@]}") tok/s"
echo "tl generate: $(summary "${native[@]}") tok/s"
best() { printf '%s\n' "$@" | sort -g | tail -1; }
awk -v a="$(median "${lang[@]}")" -v b="$(median "${native[@]}")" \
  'BEGIN {printf "ratio of medians: %.2f\n", a / b}'
awk -v a="$(best "${lang[@]}")" -v b="$(best "${native[@]}")" \
  'BEGIN {printf "ratio of the fastest runs: %.2f\n", a / b}'
echo "per-repetition ratio: $(summary "${ratio[@]}")"
if [ -n "$TL_BASE" ]; then
  echo "per-repetition ratio, $TL_BASE: $(summary "${ratio_base[@]}")"
  awk -v a="$(best "${base[@]}")" -v b="$(best "${native[@]}")" \
    'BEGIN {printf "ratio of the fastest runs, %s: %.2f\n", "'"$TL_BASE"'", a / b}'
fi
exit 0
