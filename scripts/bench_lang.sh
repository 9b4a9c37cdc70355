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
#
#   CPU_TIME=1 scripts/bench_lang.sh [MODEL] [N_TOKENS] 1 [RUNS]
# instead measures processor time (user + system, one thread): each side
# generates N_TOKENS and N_TOKENS / 8 tokens, and the difference divided by
# the extra tokens is its decode cost per token (loading and prefill cancel
# out). On a machine shared with other work this scatters far less than
# wall-clock speed, which counts the time other processes held the cores.
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
if [ "${CPU_TIME:-}" = 1 ]; then
  cpu() { /usr/bin/time -f '%U %S' "$@" 2>&1 >/dev/null | tail -1 | awk '{print $1 + $2}'; }
  short=$((N / 8))
  per_tok() { # BIN, then `lang` or `native`
    local a b
    if [ "$2" = lang ]; then
      a=$(cpu "$1" run -t 1 "$EXAMPLE" "$MODEL" "$PROMPT" "$N")
      b=$(cpu "$1" run -t 1 "$EXAMPLE" "$MODEL" "$PROMPT" "$short")
    else
      a=$(cpu "$1" generate -t 1 -m "$MODEL" -p "$PROMPT" -n "$N" --temp 0)
      b=$(cpu "$1" generate -t 1 -m "$MODEL" -p "$PROMPT" -n "$short" --temp 0)
    fi
    awk -v a="$a" -v b="$b" -v n=$((N - short)) 'BEGIN {printf "%.3f", (a - b) / n * 1000}'
  }
  cl=(); cn=(); cb=()
  for _ in $(seq "$RUNS"); do
    cl+=("$(per_tok "$TL" lang)"); cn+=("$(per_tok "$TL" native)")
    [ -n "$TL_BASE" ] && cb+=("$(per_tok "$TL_BASE" lang)")
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  range() { printf '%s\n' "$@" | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }
  echo "processor ms per decoded token, one thread ($((N - short)) tokens):"
  echo "tl run ($(basename "$EXAMPLE")): ${cl[*]} -> median $(median "${cl[@]}") ($(range "${cl[@]}"))"
  [ -n "$TL_BASE" ] && echo "tl run, $TL_BASE: ${cb[*]} -> median $(median "${cb[@]}") ($(range "${cb[@]}"))"
  echo "tl generate: ${cn[*]} -> median $(median "${cn[@]}") ($(range "${cn[@]}"))"
  awk -v a="$(median "${cl[@]}")" -v b="$(median "${cn[@]}")" \
    'BEGIN {printf "speed ratio (native cost / program cost): %.2f\n", b / a}'
  [ -n "$TL_BASE" ] && awk -v a="$(median "${cb[@]}")" -v b="$(median "${cn[@]}")" \
    'BEGIN {printf "speed ratio, base binary: %.2f\n", b / a}'
  exit 0
fi
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
