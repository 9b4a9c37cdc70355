#!/usr/bin/env bash
# A real model's greedy continuations on the GPU against the CPU backend's,
# on the GPU machine. Files over 64 MiB can't travel there in one piece, so
# the model goes over in pieces:
#
#   here:   tl quantize --allow-requantize --token-embedding-type q4_0 \
#             --output-tensor-type q4_0 gemma-3-270m-q4_k_m.gguf G.gguf Q4_0
#           (the Gemma 3 270M test model, ~/.cache/tensorlogic/models, as
#           150 MiB of Q4_0), split -b 50M G.gguf .rmodel/p (plus the tl
#           binary in .rmodel/tl); carry the pieces over consecutive calls
#   there:  bash scripts/gpu_real_model.sh [.rmodel]
#
# Each prompt is continued greedily for N tokens (default 48) with
# `tl generate --temp 0` on each device; the script prints, per prompt,
# whether the texts are equal and where they first differ, then the count.
# Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
D=${1:-.rmodel}
BIN=${TL_BIN:-$D/tl}
N=${N:-48}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_real_model: SKIPPED: no NVIDIA GPU on this machine"
  exit 0
fi
M=/tmp/real-model.gguf
cat "$D"/p?? > "$M" || { echo "gpu_real_model: pieces missing in $D"; exit 1; }
ls -l "$M"; sha256sum "$M" | cut -c1-16
prompts=(
  "The capital of France is"
  "def fibonacci(n):"
  "Once upon a time, in a small village,"
  "The three primary colors are"
  "Water boils at a temperature of"
  "import numpy as np"
  "The quick brown fox"
  "In 1969, the first humans"
  "To make a cup of tea, first"
  "The largest planet in the solar system is"
  "SELECT name FROM users WHERE"
  "Photosynthesis is the process by which"
)
eq=0; total=0
for p in "${prompts[@]}"; do
  total=$((total + 1))
  c=$(timeout 120 "$BIN" generate -m "$M" -p "$p" -n "$N" --temp 0 --device cpu 2>/dev/null)
  g=$(TL_CUDA_TIMEOUT=30 timeout 120 "$BIN" generate -m "$M" -p "$p" -n "$N" --temp 0 --device cuda 2>/dev/null)
  if [ "$c" = "$g" ]; then
    eq=$((eq + 1)); echo "equal   | $p | $(printf '%s' "$g" | tr '\n' ' ' | cut -c1-90)"
  else
    i=0; while [ "${c:$i:1}" = "${g:$i:1}" ] && [ $i -lt ${#c} ]; do i=$((i + 1)); done
    echo "differs | $p | first difference at character $i"
    echo "   cpu: $(printf '%s' "$c" | tr '\n' ' ' | cut -c1-120)"
    echo "   gpu: $(printf '%s' "$g" | tr '\n' ' ' | cut -c1-120)"
  fi
done
echo "greedy continuations equal on $eq of $total prompts ($N tokens each)"
# The same model written in the language (examples/gemma3_generate.tl, or
# $TL_PROGRAM): on `--device cuda` its linear and attention calls run on
# the GPU. Token ids and speed on each device.
P=${TL_PROGRAM:-examples/gemma3_generate.tl}
if [ -f "$P" ]; then
  for d in cpu cuda; do
    TL_CUDA_TIMEOUT=30 timeout 300 "$BIN" --device $d run "$P" "$M" "The three primary colors are" "$N" >/tmp/prog-$d.txt 2>&1
    echo "program on $d: exit $? | $(grep -E '^prompt:' /tmp/prog-$d.txt)"
    grep -E 'error' /tmp/prog-$d.txt | head -3
  done
  if [ "$(grep '^ids:' /tmp/prog-cpu.txt)" = "$(grep '^ids:' /tmp/prog-cuda.txt)" ]; then
    echo "program: token ids equal on both devices"
  else
    echo "program: token ids differ"; grep '^ids:' /tmp/prog-cpu.txt /tmp/prog-cuda.txt | cut -c1-300
  fi
fi
