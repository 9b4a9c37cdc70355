#!/usr/bin/env bash
# GPU correctness and benchmarks, run on a machine with an NVIDIA GPU.
#
#   bash scripts/gpu_check.sh test    # CUDA kernels and forward against the CPU backend
#   bash scripts/gpu_check.sh bench   # tl bench --device cuda beside llama.cpp CUDA
#   bash scripts/gpu_check.sh all
#   bash scripts/gpu_check.sh prepare # only synthesize the models and build llama.cpp
#                                     # (start it detached with setsid; bench waits for it)
#   bash scripts/gpu_check.sh serve   # tl serve against llama-server under load on one
#                                     # fresh machine (mixed prompt lengths, 1-128
#                                     # streams; JSON and an SVG plot to $OUT), the
#                                     # GPU tests while llama.cpp builds
#   bash scripts/gpu_check.sh kv      # KV cache types (tg per type, batch 1 and 64,
#                                     # at depth) and the depth sweep beside
#                                     # llama-bench -d, after the GPU tests
#   bash scripts/gpu_check.sh attn    # decode at depth beside llama-bench -d, and
#                                     # device sampling at batch 1-64, after the tests
#   bash scripts/gpu_check.sh prefill # prefill at 512, 2048 and 8192 tokens, the
#                                     # tensor-core attention off and on (TL_CUDA_FA),
#                                     # beside llama-bench, and the stage profiles,
#                                     # after the tests (run with TL_CUDA_FA=1)
#   bash scripts/gpu_check.sh batch   # batched decode (tl bench --batch, staged and direct
#                                     # tensor-core products, and off; PROFILE=1: stage
#                                     # profiles at batch 64) beside llama-batched-bench,
#                                     # and device sampling, 0.5B and 1.5B, after the tests
#   bash scripts/gpu_check.sh mmqs    # staged (default) vs direct (TL_CUDA_MMQS=0) tensor-core products: tests, batched
#                                     # decode, prefill, llama-batched-bench (bounded)
#   bash scripts/gpu_check.sh pending # what the 2026-12-08 stop left for a card: the
#                                     # tests (grammar masks in the sampling kernel,
#                                     # grouped MoE prompts), MoE prefill grouped vs
#                                     # per pair beside llama-bench, tl serve at 64
#                                     # streams (emitter thread), structured output at
#                                     # 1 and 16 clients (needs .gpu/qwen-tokenizer.gguf)
#   bash scripts/gpu_check.sh session # everything a fresh GPU machine can do in one
#                                     # call of under 10 minutes: prepare in the
#                                     # background, the tests with stage dumps and a
#                                     # per-kernel deadline, then tl and llama.cpp
#                                     # benchmarks with the stage profile; logs to $OUT
#
# Binaries: TL_BIN (default .gpu/tl) and TL_CUDA_TEST (default .gpu/cuda_test, the
# tl-model `cuda` integration test built with `cargo test --release -p tl-model
# --test cuda --no-run`). Both are built on any machine (cudarc loads CUDA at run
# time) and carried over; scripts/gpu_prepare.sh builds and strips them.
# Models: full-size random-weight files of the Qwen2.5 0.5B and 1.5B shapes are
# synthesized into $W (default /tmp/tlgpu) once and reused.
# llama.cpp CUDA: built from LLAMA_SRC (default .gpu/llama.cpp-src.tar.xz) by
# .gpu/build-llamacpp-cuda.sh into /tmp/llamacpp when present.
# Without a GPU the script says so and exits 0 (CI never has one).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
BIN=${TL_BIN:-.gpu/tl}
TEST=${TL_CUDA_TEST:-.gpu/cuda_test}
ETEST=${TL_CUDA_ENGINE_TEST:-.gpu/cuda_engine_test}
LTEST=${TL_CUDA_LANG_TEST:-.gpu/cuda_lang_test}
W=${W:-/tmp/tlgpu}
mkdir -p "$W"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: SKIPPED: no NVIDIA GPU on this machine"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export TL_CUDA_CACHE=$W/kernel-cache
status=0
# `all`: synthesis and the llama.cpp build run in the background while the
# tests use the GPU; the benchmarks wait for them.
if [ "$mode" = all ] && [ ! -f "$W/prepare.done" ]; then
  touch "$W/prepare.running"
  setsid bash "$0" prepare >"$W/prepare.log" 2>&1 &
fi

# The CUDA tests (tl-model's `cuda`, then tl-engine's `cuda_engine`), logs
# to $OUT, their figures and results printed; $1 and $2 are time limits.
gpu_tests() {
  if [ -n "${SKIP_TESTS:-}" ]; then echo "tests: skipped (SKIP_TESTS)"; return; fi
  TL_CUDA_TIMEOUT=10 timeout "$1" "$TEST" --test-threads=1 --nocapture >"$OUT/test.log" 2>&1
  echo "tests: exit $? (t=${SECONDS}s)"
  grep -E 'diff|test result|FAILED|panicked|failed' "$OUT/test.log" | grep -v stages | cut -c1-200
  if [ -x "$ETEST" ]; then
    TL_CUDA_TIMEOUT=10 timeout "$2" "$ETEST" --test-threads=1 --nocapture >"$OUT/engine-test.log" 2>&1
    echo "engine tests: exit $? (t=${SECONDS}s)"
    grep -E 'requests equal|out of memory:|test result|FAILED|panicked|differs' "$OUT/engine-test.log" | cut -c1-300
  fi
  if [ -x "$LTEST" ]; then
    TL_CUDA_TIMEOUT=10 timeout 120 "$LTEST" --test-threads=1 --nocapture >"$OUT/lang-test.log" 2>&1
    echo "language tests: exit $? (t=${SECONDS}s)"
    grep -E '^(linear|step) |test result|FAILED|panicked' "$OUT/lang-test.log" | cut -c1-200
  fi
}

# tl serve --device cuda, then llama-server -np 64 -cb -fa (when built and
# before second $5), under the load sweep $2 on model $1; JSON and a plot
# to $OUT. $3 and $4 are the two runs' time limits.
load_sweep() {
  local m=$1 L=$2 f=$W/$1.gguf LS=/tmp/llamacpp/build/bin/llama-server
  echo "== $m: tl serve --device cuda (max batch 64), mixed prompts t=${SECONDS}s"
  TL_DEVICE=cuda timeout "$3" python3 scripts/loadtest.py --model "$f" --tl "$BIN" $L >"$OUT/load-tl-$m.json" 2>"$W/load-tl.err"; tail -3 "$W/load-tl.err"
  python3 -c 'import json,sys
for r in json.load(open(sys.argv[1]))["results"]: print(r)' "$OUT/load-tl-$m.json" | cut -c1-420
  if [ -x "$LS" ] && [ $SECONDS -lt "$5" ]; then
    echo "== $m: llama-server -np 64 -cb -fa, mixed prompts t=${SECONDS}s"
    LD_LIBRARY_PATH=/tmp/llamacpp/build/bin timeout "$4" python3 scripts/loadtest.py --model "$f" --llama-server "$LS" $L \
      >"$OUT/load-llama-$m.json" 2>"$W/load-llama.err"
    python3 -c 'import json,sys
for r in json.load(open(sys.argv[1]))["results"]: print(r)' "$OUT/load-llama-$m.json" | cut -c1-330
    tail -3 "$W/load-llama.err"
    python3 scripts/plot_load.py "tl serve (cuda)=$OUT/load-tl-$m.json" "llama-server=$OUT/load-llama-$m.json" \
      -o "$OUT/load-$m.svg" --title "$m on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), mixed prompts, 128 tokens out"
  fi
}

if [ "$mode" = serve ]; then
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-q05_q8_0}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  gpu_tests 200 150
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 330 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"; tail -2 "$OUT/prepare.log"
  L="--sweep ${SWEEP:-1,16,64,128} --requests 3 --max-tokens 128 --max-batch 64 --workload mixed --duration ${DURATION:-40} --json"
  for m in $SM; do
    [ -s "$W/$m.gguf" ] || { echo "$m: not synthesized"; continue; }
    load_sweep "$m" "$L" 200 140 480
  done
  for l in target/loadtest-server-*.log; do echo "-- $l"; grep -iE 'error|warn|KV cache|fit|device' "$l" | head -5 | cut -c1-250; done; ls "$OUT"
  echo "serve done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = kv ]; then
  # KV cache types and long context on one fresh machine: the tests while
  # the 0.5B file is synthesized and llama.cpp builds, then tg128 per cache
  # type (batch 1 at depth 512 and 16k, batch 64) and the depth sweep
  # beside llama-bench -d (f16 and q8_0 caches).
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  MODELS=q05_q8_0 setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  gpu_tests 240 120
  while [ ! -s "$W/q05_q8_0.gguf" ] && [ $SECONDS -lt 300 ]; do sleep 2; done
  f=$W/q05_q8_0.gguf
  for t in f16 q8_0 q4_0 fp8; do
    echo "== kv $t: tg128 batch 1 at depth 512 and 16384; batch 64 t=${SECONDS}s"
    TL_CUDA_TIMEOUT=30 timeout 60 "$BIN" --device cuda --kv-type $t bench -m "$f" -p 0 -n 128 -r 2 -d 512,16384 2>&1 | grep -E 'tg128|rror'
    TL_CUDA_TIMEOUT=30 timeout 40 "$BIN" --device cuda --kv-type $t bench -m "$f" -p 0 -n 128 -r 1 --batch 64 2>&1 | grep -E 'tg128|rror'
  done
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 380 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"; tail -2 "$OUT/prepare.log"
  D=${DEPTHS:-512,4096,16384,32768}
  echo "== tl f16: tg128 at depth $D t=${SECONDS}s"
  TL_CUDA_TIMEOUT=30 timeout 120 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 -d "$D" 2>&1 | grep -E 'tg128|rror'
  LB=/tmp/llamacpp/build/bin
  if [ -x "$LB/llama-bench" ]; then
    echo "== llama-bench -d $D (f16 cache, then q8_0 and q4_0 at 512,16384) t=${SECONDS}s"
    LD_LIBRARY_PATH=$LB timeout 120 "$LB/llama-bench" -m "$f" -p 0 -n 128 -d "$D" -ngl 99 -fa 1 -r 2 2>&1 | grep -E '^\|' | tail -n +3
    for t in q8_0 q4_0; do
      LD_LIBRARY_PATH=$LB timeout 60 "$LB/llama-bench" -m "$f" -p 0 -n 128 -d 512,16384 -ngl 99 -fa 1 -r 2 -ctk $t -ctv $t 2>&1 | grep -E '^\|' | tail -n +3
    done
  fi
  echo "== decode with sampling on the device (temperature 1, top-p 0.9), f16 cache t=${SECONDS}s"
  TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 --batch 1,64 --temp 1 --top-p 0.9 2>&1 | grep -E 'tg128|rror'
  echo "kv done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = attn ]; then
  # Decode attention at depth on one fresh machine: the tests while the
  # files are synthesized and llama.cpp builds, then tg128 at each depth
  # beside llama-bench -d (the 0.5B shape over DEPTHS, the 1.5B one at 512
  # and 32,000), then device sampling against greedy at batch 1-64.
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-q05_q8_0 q15_q4_k}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  gpu_tests 240 120
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 360 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"; tail -2 "$OUT/prepare.log"
  LB=/tmp/llamacpp/build/bin
  [ -z "${SKIP_LLAMA:-}" ] && [ -x "$LB/llama-bench" ] || LB=
  for m in $SM; do
    f=$W/$m.gguf
    [ -s "$f" ] || { echo "$m: not synthesized"; continue; }
    D=${DEPTHS:-512,4096,16384,32768}
    [ "$m" = q05_q8_0 ] || D=512,32000
    echo "== $m: tl tg128 at depth $D t=${SECONDS}s"
    TL_CUDA_TIMEOUT=30 timeout 100 "$BIN" --device cuda bench -m "$f" -p 512 -n 128 -r 2 -d "$D" 2>&1 | grep -E 'pp512|tg128|rror'
    if [ -n "$LB" ]; then
      echo "== $m: llama-bench -d $D t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 100 "$LB/llama-bench" -m "$f" -p 512 -n 128 -d "$D" -ngl 99 -fa 1 -r 2 2>&1 | grep -E '^\|' | tail -n +3
    fi
  done
  f=$W/q05_q8_0.gguf
  if [ -s "$f" ]; then
    echo "== q05_q8_0: greedy, then sampled (temperature 1, top-p 0.9), batch 1,16,64 t=${SECONDS}s"
    TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 --batch 1,16,64 2>&1 | grep -E 'tg128|rror'
    TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 --batch 1,16,64 --temp 1 --top-p 0.9 2>&1 | grep -E 'tg128|rror'
    echo "-- sampled, a block per 4,096 logits at every batch (TL_CUDA_SAMPLE_BLOCKS=100000)"
    TL_CUDA_SAMPLE_BLOCKS=100000 TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 --batch 1,16,64 --temp 1 --top-p 0.9 2>&1 | grep -E 'tg128|rror'
  fi
  echo "attn done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = prefill ]; then
  # Prefill at growing prompt lengths on one fresh machine: the tests while
  # the files are synthesized and llama.cpp builds, then per model tl's
  # pp at each length beside llama-bench's (-fa 1), and the stage profile
  # of the longest (how much of prefill is attention).
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-q05_q8_0 q15_q4_k}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  # The tests with the tensor-core prefill attention on (TL_CUDA_FA=1).
  TL_CUDA_FA=${TL_CUDA_FA:-1} gpu_tests 240 120
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 360 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"; tail -2 "$OUT/prepare.log"
  LB=/tmp/llamacpp/build/bin
  [ -z "${SKIP_LLAMA:-}" ] && [ -x "$LB/llama-bench" ] || LB=
  P=${PROMPTS:-512,2048,8192}
  for m in $SM; do
    f=$W/$m.gguf
    [ -s "$f" ] || { echo "$m: not synthesized"; continue; }
    for fa in 0 1; do
      echo "== $m: tl pp at $P, TL_CUDA_FA=$fa t=${SECONDS}s"
      for p in ${P//,/ }; do
        TL_CUDA_FA=$fa TL_CUDA_TIMEOUT=30 timeout 60 "$BIN" --device cuda bench -m "$f" -p "$p" -n 0 -r 2 2>&1 | grep -E "pp$p|rror"
      done
    done
    if [ -n "$LB" ]; then
      echo "== $m: llama-bench -p $P t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 100 "$LB/llama-bench" -m "$f" -p "$P" -n 0 -ngl 99 -fa 1 -r 2 2>&1 | grep -E '^\|' | tail -n +3
    fi
    last=${P##*,}
    echo "== $m: stage profile of pp$last t=${SECONDS}s"
    for fa in 0 1; do
      TL_CUDA_FA=$fa TL_CUDA_PROFILE=1 TL_CUDA_TIMEOUT=30 timeout 60 "$BIN" --device cuda bench -m "$f" -p "$last" -n 0 -r 1 2>&1 | grep -iE 'attention|matmul|total|pp' | head -8
    done
  done
  echo "prefill done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = batch ]; then
  # Batched decode on one fresh machine: the tests while the 0.5B and 1.5B
  # files are synthesized and llama.cpp builds, then per model tl bench
  # --batch (tensor-core products for 9-64 rows, and with them off:
  # TL_CUDA_MMQ_MIN=65) beside llama-batched-bench, and decode with
  # sampling on the device.
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-q05_q8_0 q15_q4_k}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  gpu_tests 240 120
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 380 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"; tail -2 "$OUT/prepare.log"
  LB=/tmp/llamacpp/build/bin
  [ -x "$LB/llama-batched-bench" ] || LB=
  B=${BATCHES:-1,8,16,32,64,128}
  for m in $SM; do
    f=$W/$m.gguf
    [ -s "$f" ] || { echo "$m: not synthesized"; continue; }
    echo "== $m: tl bench --batch $B t=${SECONDS}s"
    TL_CUDA_TIMEOUT=10 timeout 90 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 1 --batch "$B" 2>&1 | grep -E 'tg128|rror'
    echo "-- direct tensor-core products (TL_CUDA_MMQS=0), batch $B"
    TL_CUDA_MMQS=0 TL_CUDA_TIMEOUT=10 timeout 90 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 1 --batch "$B" 2>&1 | grep -E 'tg128|rror'
    echo "-- 8-row GEMVs only (TL_CUDA_MMQ_MIN=65), batch 16,64"
    TL_CUDA_MMQ_MIN=65 TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 1 --batch 16,64 2>&1 | grep -E 'tg128|rror'
    if [ -n "${PREFILL:-}" ]; then
      for s in 0 1; do
        echo "-- prefill, staged tensor-core products for prompts TL_CUDA_MMQS_PREFILL=$s"
        P=${PROMPTS:-512,2048,8192}
        for p in ${P//,/ }; do
          TL_CUDA_MMQS=1 TL_CUDA_MMQS_PREFILL=$s TL_CUDA_TIMEOUT=30 timeout 60 "$BIN" --device cuda bench -m "$f" -p "$p" -n 0 -r 2 2>&1 | grep -E "pp$p|rror"
        done
      done
    fi
    if [ -n "${PROFILE:-}" ]; then
      for s in 1 0; do
        echo "-- stage profile, batch 64, TL_CUDA_MMQS=$s"
        TL_CUDA_MMQS=$s TL_CUDA_PROFILE=1 TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 32 -r 1 --batch 64 2>&1 | grep -E '^\|' | tail -n +3 | head -14
      done
    fi
    if [ -n "$LB" ]; then
      echo "== $m: llama-batched-bench -npl $B t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 120 "$LB/llama-batched-bench" -m "$f" -ngl 99 -fa 1 -npp 128 -ntg 128 \
        -npl "$B" -c 40000 2>&1 | grep -E '^\|' | tail -n +3
    fi
    echo "== $m: sampling on the device (temperature 1, top-p 0.9), batch 1,64 t=${SECONDS}s"
    TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 --batch 1,64 --temp 1 --top-p 0.9 2>&1 | grep -E 'tg128|rror'
  done
  echo "batch done t=${SECONDS}s"
  # With SERVE_MODEL, a short tl serve / llama-server load sweep of that
  # model follows (mixed prompts; SWEEP, DURATION), JSON and a plot to $OUT.
  if [ -n "${SERVE_MODEL:-}" ] && [ -s "$W/$SERVE_MODEL.gguf" ]; then
    L="--sweep ${SWEEP:-1,16,64} --requests 3 --max-tokens 128 --max-batch 64 --workload mixed --duration ${DURATION:-20} --json"
    load_sweep "$SERVE_MODEL" "$L" 120 120 100000
    echo "serve done t=${SECONDS}s"
  fi
  exit 0
fi

if [ "$mode" = mmqs ]; then
  # The staged tensor-core products on one fresh machine, every step
  # bounded: the tests (default, and prompts on the staged kernels) while
  # the files are synthesized and llama.cpp builds, then per model batched
  # decode with the staged and the direct kernels, prefill with and without
  # the staged prompt products, and llama-batched-bench, as time allows.
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-q15_q4_k q05_q8_0}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  if [ -z "${SKIP_TESTS:-}" ]; then
    TL_CUDA_MMQS=1 TL_CUDA_TIMEOUT=10 timeout 200 "$TEST" --test-threads=1 --nocapture >"$OUT/test.log" 2>&1
    echo "tests: exit $? (t=${SECONDS}s)"
    grep -E 'diff|test result|FAILED|panicked|failed' "$OUT/test.log" | grep -v stages | cut -c1-160 | head -40
    TL_CUDA_MMQS=1 TL_CUDA_MMQS_PREFILL=1 TL_CUDA_TIMEOUT=10 timeout 100 "$TEST" --test-threads=1 --nocapture cuda_matches_cpu_on_every >"$OUT/test-prefill.log" 2>&1
    echo "tests, staged prompt products: exit $? (t=${SECONDS}s)"
    grep -E 'diff|test result|FAILED|panicked|failed' "$OUT/test-prefill.log" | grep -v stages | cut -c1-160 | head -30
    TL_CUDA_MMQS=1 TL_CUDA_TIMEOUT=10 timeout 150 "$ETEST" --test-threads=1 --nocapture >"$OUT/engine-test.log" 2>&1
    echo "engine tests: exit $? (t=${SECONDS}s)"
    grep -E 'requests equal|out of memory:|test result|FAILED|panicked|differs' "$OUT/engine-test.log" | cut -c1-200
    TL_CUDA_MMQS=1 TL_CUDA_TIMEOUT=10 timeout 60 "$LTEST" --test-threads=1 --nocapture >"$OUT/lang-test.log" 2>&1
    echo "language tests: exit $? (t=${SECONDS}s)"
    grep -E 'test result|FAILED|panicked' "$OUT/lang-test.log"
  fi
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt ${WAIT_UNTIL:-330} ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"
  LB=/tmp/llamacpp/build/bin
  [ -x "$LB/llama-batched-bench" ] || LB=
  B=${BATCHES:-1,8,16,32,64,128}
  END=${END_AT:-560}
  for m in $SM; do
    f=$W/$m.gguf
    [ -s "$f" ] || { echo "$m: not synthesized"; continue; }
    for s in 1 0; do
      [ $SECONDS -lt $((END - 40)) ] || break
      echo "== $m: tl bench --batch $B, TL_CUDA_MMQS=$s t=${SECONDS}s"
      TL_CUDA_MMQS=$s TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 1 --batch "$B" 2>&1 | grep -E 'tg128|rror'
    done
    for s in 0 1; do
      [ $SECONDS -lt $((END - 40)) ] || break
      echo "== $m: prefill, TL_CUDA_MMQS_PREFILL=$s t=${SECONDS}s"
      for p in 512 2048; do
        TL_CUDA_MMQS=1 TL_CUDA_MMQS_PREFILL=$s TL_CUDA_TIMEOUT=30 timeout 30 "$BIN" --device cuda bench -m "$f" -p $p -n 0 -r 2 2>&1 | grep -E "pp$p|rror"
      done
    done
    if [ -n "$LB" ] && [ $SECONDS -lt $((END - 90)) ]; then
      echo "== $m: llama-batched-bench -npl $B t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 80 "$LB/llama-batched-bench" -m "$f" -ngl 99 -fa 1 -npp 128 -ntg 128 \
        -npl "$B" -c 40000 2>&1 | grep -E '^\|' | tail -n +3
    fi
  done
  echo "mmqs done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = pending ]; then
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-moe_q4_k q15_q4_k q05_tok}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  gpu_tests 240 150
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 400 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"; tail -2 "$OUT/prepare.log"
  LB=/tmp/llamacpp/build/bin
  f=$W/moe_q4_k.gguf
  if [ -s "$f" ]; then
    for g in 0 1; do
      echo "== MoE: tl bench -p 512 -n 128, TL_CUDA_MOE_GROUPED=$g t=${SECONDS}s"
      TL_CUDA_MOE_GROUPED=$g TL_CUDA_TIMEOUT=20 timeout 90 "$BIN" --device cuda bench -m "$f" -p 512 -n 128 -r 2 2>&1 | grep -E '^\||rror' | grep -v -- '---'
    done
    if [ -x "$LB/llama-bench" ]; then
      echo "== MoE: llama-bench t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 90 "$LB/llama-bench" -m "$f" -p 512 -n 128 -ngl 99 -fa 1 -r 2 2>&1 | grep -E '^\|' | tail -2
    fi
  fi
  f=$W/q15_q4_k.gguf
  if [ -s "$f" ]; then
    echo "== q15_q4_k: tl serve --device cuda (emitter thread), 1 and 64 streams t=${SECONDS}s"
    TL_DEVICE=cuda TL_CUDA_TIMEOUT=10 timeout 120 python3 scripts/loadtest.py --model "$f" --tl "$BIN" \
      --sweep 1,64 --requests 2 --max-tokens 128 --max-batch 64 --workload mixed --duration 30 2>&1 | tail -4 | cut -c1-400
  fi
  f=$W/q05_tok.gguf
  if [ -s "$f" ]; then
    echo "== q05_tok: structured output on the GPU, 1 and 16 clients t=${SECONDS}s"
    timeout 200 python3 scripts/bench_structured.py --tl "$BIN" --model "$f" --clients 1,16 \
      --mask-threads 8,1 --max-tokens 64 --server-arg=--device=cuda 2>&1 | tail -14 | cut -c1-300
  fi
  echo "pending done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = session ]; then
  # One cold machine, one call: every step bounded so the logs come back.
  # The tests run while the models are synthesized and llama.cpp builds;
  # the benchmarks wait for both, so no build competes with them.
  OUT=${OUT:-$W/out}; mkdir -p "$OUT" target
  SM="${MODELS:-q05_q8_0 q15_q4_k q05_q4_0}"
  MODELS="$SM" setsid bash "$0" prepare >"$OUT/prepare.log" 2>&1 &
  sleep 1
  TL_DUMP_TENSORS=$W/dump gpu_tests 200 120
  while [ -f "$W/prepare.running" ] && [ $SECONDS -lt 400 ]; do sleep 2; done
  echo "prepared (t=${SECONDS}s)"
  LB=/tmp/llamacpp/build/bin
  [ -z "${SKIP_LLAMA:-}" ] && [ -x "$LB/llama-bench" ] || LB=
  for m in $SM; do
    f=$W/$m.gguf
    [ -s "$f" ] || { echo "$m: not synthesized"; continue; }
    echo "== $m: tl (cuda) t=${SECONDS}s"
    TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 512 -n 128 -r 5 2>&1 | grep -E '^(\||device)' | grep -v -- '---'
    echo "-- without programmatic dependent launch (TL_CUDA_PDL=0)"
    TL_CUDA_PDL=0 TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 3 2>&1 | grep -E 'tg128'
    if [ -n "$LB" ]; then
      echo "== $m: llama.cpp CUDA t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 60 "$LB/llama-bench" -m "$f" -p 512 -n 128 -ngl 99 -fa 1 -r 5 2>&1 | grep -E '^\|' | tail -2
    fi
  done
  m=${SM%% *}; f=$W/$m.gguf
  if [ -s "$f" ] && [ -n "${DEPTHS:-512,4096,16384,32768}" ] && [ $SECONDS -lt 400 ]; then
    D=${DEPTHS:-512,4096,16384,32768}
    echo "== $m: long context, tg128 at depth $D, tl t=${SECONDS}s"
    TL_CUDA_TIMEOUT=30 timeout 150 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 -d "$D" 2>&1 | grep -E 'tg128|rror'
    if [ -n "$LB" ]; then
      echo "== $m: long context, llama.cpp t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 150 "$LB/llama-bench" -m "$f" -p 0 -n 128 -d "$D" -ngl 99 -fa 1 -r 2 2>&1 | grep -E '^\|' | tail -n +3
    fi
  fi
  if [ -s "$f" ] && [ $SECONDS -lt 430 ]; then
    echo "== $m: decode with sampling on the device (temperature 1, top-p 0.9) t=${SECONDS}s"
    TL_CUDA_TIMEOUT=10 timeout 60 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 2 --batch 1,64 --temp 1 --top-p 0.9 2>&1 | grep -E 'tg128|rror'
  fi
  if [ -s "$f" ] && [ $SECONDS -lt 450 ]; then
    echo "-- stage profile, decode ($m)"
    TL_CUDA_PROFILE=1 TL_CUDA_TIMEOUT=10 timeout 40 "$BIN" --device cuda bench -m "$f" -p 0 -n 64 -r 1 2>&1 | grep -E '^\|' | tail -n +3 | head -16
    echo "== $m: batched decode, tl t=${SECONDS}s"
    TL_CUDA_TIMEOUT=10 timeout 90 "$BIN" --device cuda bench -m "$f" -p 0 -n 128 -r 1 --batch 1,8,32,64 2>&1 | grep -E 'tg128'
    if [ -n "$LB" ]; then
      echo "== $m: batched decode, llama-batched-bench t=${SECONDS}s"
      LD_LIBRARY_PATH=$LB timeout 90 "$LB/llama-batched-bench" -m "$f" -ngl 99 -fa 1 -npp 128 -ntg 128 \
        -npl 1,8,32,64 -c 20000 2>&1 | grep -E '^\|' | tail -4
    fi
  fi
  if [ -s "$f" ] && [ $SECONDS -lt 480 ] && command -v python3 >/dev/null; then
    echo "== $m: tl serve --device cuda under load t=${SECONDS}s"
    TL_DEVICE=cuda TL_CUDA_TIMEOUT=10 timeout 100 python3 scripts/loadtest.py --model "$f" --tl "$BIN" \
      --sweep 1,16,64 --requests 2 --max-tokens 64 --max-batch 64 --duration 30 2>&1 | tail -8 | cut -c1-400
    echo "-- the same at temperature 0.8, top-p 0.95 (picks on the device) t=${SECONDS}s"
    TL_DEVICE=cuda TL_CUDA_TIMEOUT=10 timeout 60 python3 scripts/loadtest.py --model "$f" --tl "$BIN" \
      --sweep 64 --requests 2 --max-tokens 64 --max-batch 64 --duration 30 --temperature 0.8 --top-p 0.95 2>&1 | tail -3 | cut -c1-400
  fi
  echo "session done t=${SECONDS}s"
  exit 0
fi

if [ "$mode" = test ] || [ "$mode" = all ]; then
  echo "== CUDA against CPU (synthetic models, every architecture and weight type)"
  "$TEST" --test-threads=1 --nocapture 2>&1 | grep -vE '^(running|$)' || status=1
  echo "== the engine on the GPU (batching, prefix cache, preemption)"
  "$ETEST" --test-threads=1 --nocapture 2>&1 | grep -vE '^(running|$)' || status=1
fi

synth() { # name args...
  local out=$W/$1.gguf; shift
  [ -s "$out" ] && return 0
  "$BIN" synth -o "$out.tmp" "$@" >/dev/null && mv "$out.tmp" "$out" || { echo "synth $out failed"; status=1; }
}
QWEN05="--arch qwen2 --layers 24 --d-model 896 --heads 14 --kv-heads 2 --head-dim 64 --ffn 4864 --extra-vocab 151677 --context 40960"
# Which benchmark models (MODELS="q05_q8_0" for a quick run); SKIP_LLAMA=1
# skips building llama.cpp.
MODELS=${MODELS:-q05_q8_0 q05_q4_0 q15_q4_k}
QWEN15="--arch qwen2 --layers 28 --d-model 1536 --heads 12 --kv-heads 2 --head-dim 128 --ffn 8960 --extra-vocab 151677 --context 32768"

if [ "$mode" = prepare ]; then touch "$W/prepare.running"; fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  while [ -f "$W/prepare.running" ]; do sleep 2; done
fi
if [ "$mode" = bench ] || [ "$mode" = prepare ]; then
  for m in $MODELS; do
    case $m in
      q05_q8_0) synth q05_q8_0 $QWEN05 --weight-type Q8_0 --output-type Q8_0 & ;;
      q05_q4_0) synth q05_q4_0 $QWEN05 --weight-type Q4_0 --output-type Q8_0 & ;;
      q15_q4_k) synth q15_q4_k $QWEN15 --weight-type Q4_K --output-type Q6_K & ;;
      # Scaled-down Qwen3-MoE (docs/BENCHMARKS.md's MoE rows).
      moe_q4_k) synth moe_q4_k --arch qwen3moe --layers 8 --d-model 2048 --heads 32 --kv-heads 4 \
        --head-dim 128 --ffn 768 --experts 64 --experts-used 8 --extra-vocab 151677 --context 8192 \
        --weight-type Q4_K --output-type Q6_K & ;;
      # The 0.5B shape with the real Qwen2.5 tokenizer (grammar masks over
      # the real vocabulary).
      q05_tok) [ -f .gpu/qwen-tokenizer.gguf ] && synth q05_tok $QWEN05 --weight-type Q8_0 \
        --output-type Q8_0 --tokenizer-from .gpu/qwen-tokenizer.gguf & ;;
    esac
  done
  if [ -z "${SKIP_LLAMA:-}" ] && [ -f .gpu/build-llamacpp-cuda.sh ]; then
    bash .gpu/build-llamacpp-cuda.sh /tmp/llamacpp >"$W/llamacpp-build.log" 2>&1 &
  fi
  wait
  rm -f "$W/prepare.running"
  touch "$W/prepare.done"
  tail -1 "$W/llamacpp-build.log" 2>/dev/null
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  LB=/tmp/llamacpp/build/bin
  for m in $MODELS; do
    f=$W/$m.gguf
    echo "== $m: tl (cuda)"
    "$BIN" --device cuda bench -m "$f" -p 512 -n 128 -r ${REPS:-5} --batch ${BATCH:-1} 2>&1 | grep -vE '^\s*$' || status=1
    if [ -n "${PROFILE:-}" ]; then
      echo "== $m: tl stage profile, decode (batch 1) and prefill (512)"
      TL_CUDA_PROFILE=1 "$BIN" --device cuda bench -m "$f" -p 0 -n 64 -r 1 2>&1 | grep -E '^\|' | tail -n +3
      TL_CUDA_PROFILE=1 "$BIN" --device cuda bench -m "$f" -p 512 -n 0 -r 1 2>&1 | grep -E '^\|' | tail -n +3
    fi
    if [ -x "$LB/llama-bench" ]; then
      echo "== $m: llama.cpp CUDA"
      LD_LIBRARY_PATH=$LB "$LB/llama-bench" -m "$f" -p 512 -n 128 -ngl 99 -fa 1 -r ${REPS:-5} 2>&1 | grep -E '^\|' || status=1
    fi
  done
fi
exit $status
