#!/usr/bin/env bash
# scripts/cluster.sh N [tl serve flags...]
#
# Starts N `tl serve` replicas of one model on consecutive ports and
# vllm-router (installed from PyPI by scripts/setup_router.sh) in front of
# them with cache-aware routing, waits until everything is healthy, prints
# the endpoints, then runs until Ctrl-C or SIGTERM, which stops the router
# and drains every replica (SIGTERM: streams in flight finish). Extra
# arguments go to every `tl serve`. docs/DEPLOY.md explains the setup.
#
# Environment (defaults in brackets):
#   TL_MODEL      model file [~/.cache/tensorlogic/models/qwen2.5-coder-0.5b-instruct-q4.gguf]
#   TL_BIN        the tl binary [target/release/tl, built if missing]
#   HOST          address everything listens on [127.0.0.1]
#   ROUTER_PORT   the router's port, the one clients use [8100]
#   BASE_PORT     first replica's port; replica i listens on BASE_PORT+i [8101]
#   POLICY        vllm-router policy: cache_aware, round_robin, power_of_two, … [cache_aware]
#   TL_THREADS    threads per replica [cores / N, at least 1]
#   METRICS_PORT  the router's own Prometheus port [ROUTER_PORT+1000]
#   LOG_DIR       logs and pid files [target/cluster]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-}"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/cluster.sh N [tl serve flags...]" >&2; exit 2; }
shift
models="${XDG_CACHE_HOME:-$HOME/.cache}/tensorlogic/models"
model="${TL_MODEL:-$models/qwen2.5-coder-0.5b-instruct-q4.gguf}"
tl="${TL_BIN:-target/release/tl}"
host="${HOST:-127.0.0.1}"
rport="${ROUTER_PORT:-8100}"
base="${BASE_PORT:-8101}"
policy="${POLICY:-cache_aware}"
cores=$(nproc 2>/dev/null || echo 1)
threads="${TL_THREADS:-$(( cores / n > 0 ? cores / n : 1 ))}"
mport="${METRICS_PORT:-$((rport + 1000))}"
logs="${LOG_DIR:-target/cluster}"

[ -f "$model" ] || { echo "cluster: model $model not found (python3 scripts/fetch_models.py all)" >&2; exit 1; }
if [ ! -x "$tl" ]; then
  echo "cluster: building $tl" >&2
  cargo build --release --locked -p tl-cli >&2
fi
router=$(bash scripts/setup_router.sh)
mkdir -p "$logs"

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo "cluster: stopping (replicas drain their requests in flight)" >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'cleanup; exit 0' INT TERM

urls=()
for ((i = 0; i < n; i++)); do
  port=$((base + i))
  "$tl" serve -m "$model" --host "$host" --port "$port" -t "$threads" "$@" \
    >"$logs/replica-$port.log" 2>&1 &
  pids+=($!)
  echo "$!" > "$logs/replica-$port.pid"
  urls+=("http://$host:$port")
done

wait_healthy() {
  local url=$1 what=$2 deadline=$((SECONDS + 300))
  until curl -fs -o /dev/null "$url/health"; do
    if ((SECONDS > deadline)); then echo "cluster: $what at $url not healthy after 300 s" >&2; exit 1; fi
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "cluster: process $p exited; see $logs/" >&2; exit 1; }
    done
    sleep 0.5
  done
}
for u in "${urls[@]}"; do wait_healthy "$u" replica; done

"$router" --host "$host" --port "$rport" --worker-urls "${urls[@]}" --policy "$policy" \
  --prometheus-host "$host" --prometheus-port "$mport" \
  --health-check-interval-secs 2 --health-failure-threshold 2 --health-success-threshold 1 \
  --health-check-timeout-secs 2 --worker-startup-check-interval 1 --cb-timeout-duration-secs 3 \
  --retry-max-retries 8 --retry-initial-backoff-ms 100 --retry-max-backoff-ms 1000 \
  >"$logs/router.log" 2>&1 &
pids+=($!)
echo "$!" > "$logs/router.pid"
wait_healthy "http://$host:$rport" router

echo "cluster: $n replicas (${urls[*]}, $threads threads each) behind vllm-router ($policy)"
echo "cluster: OpenAI base URL http://$host:$rport/v1; router metrics http://$host:$mport/metrics; logs in $logs/"
# Runs until a signal, or until some process exits on its own.
wait -n "${pids[@]}" || true
echo "cluster: a process exited; see $logs/" >&2
exit 1
