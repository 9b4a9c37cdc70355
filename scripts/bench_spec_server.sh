#!/bin/bash
# Server speculation against plain decoding, interleaved: one `tl serve
# --spec draft` and requests that opt in or out (`"speculative": true|false`),
# on/off/off/on per round and client count, so that a load that moves
# under the runs hits both alike. Prints one JSON line per run (with the
# load average at its start); take medians per (clients, on|off).
#
#   scripts/bench_spec_server.sh TARGET.gguf DRAFT.gguf [ROUNDS] [extra serve args...]
#
# e.g. scripts/bench_spec_server.sh 1.5B.gguf 0.5B.gguf 2 --spec-k 15 --draft-p-min 0.75
set -euo pipefail
TARGET=$1 DRAFT=$2 ROUNDS=${3:-2}
shift 3 || shift $#
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TL=${TL:-$ROOT/target/release/tl}
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TL" serve -m "$TARGET" --port "$PORT" -t 2 --max-batch 16 --max-queue 256 \
    --spec draft --draft-model "$DRAFT" --spec-max-batch 64 "$@" \
    > "$ROOT/target/bench-spec-server-$PORT.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    sleep 1
done
# A counter of the server's /metrics (0 when absent).
metric() {
    curl -sf "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m {print $2; f=1} END {if (!f) print 0}'
}
for round in $(seq "$ROUNDS"); do
    for clients in 1 4; do
        for spec in on off off on; do
            load=$(cut -d' ' -f1 /proc/loadavg)
            d0=$(metric tl_spec_draft_microseconds_total) s0=$(metric tl_engine_step_microseconds_total)
            r=$(python3 "$ROOT/scripts/loadtest.py" --url "http://127.0.0.1:$PORT" --clients "$clients" \
                --requests 2 --max-tokens 96 --workload code-gen --speculative "$spec" --json \
                | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(json.dumps({k: r[k] for k in ("tok_per_s","tokens","wall_s","errors","spec_drafted","spec_accepted","kv_blocks_used_after")}))')
            d1=$(metric tl_spec_draft_microseconds_total) s1=$(metric tl_engine_step_microseconds_total)
            share=$(python3 -c "print(round(($d1 - $d0) / max(1, $s1 - $s0), 3))")
            echo "{\"round\": $round, \"clients\": $clients, \"spec\": \"$spec\", \"load\": $load, \"draft_share\": $share, \"run\": $r}"
        done
    done
done
