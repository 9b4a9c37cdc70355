#!/usr/bin/env bash
# Installs vllm-router (pinned, from PyPI) into a venv under
# ${XDG_CACHE_HOME:-~/.cache}/tensorlogic/router-venv, idempotently, and
# prints the path of its `vllm-router` launcher. Fails loudly (non-zero exit
# and the reason on stderr) when it cannot be installed.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/tensorlogic"
venv="$cache/router-venv"
reqs="vllm-router==0.1.17"
stamp="$venv/.tl-reqs"
if [ ! -x "$venv/bin/vllm-router" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$reqs" ]; then
  echo "setup_router: installing $reqs into $venv" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv" >&2 || { echo "setup_router: python3 -m venv failed" >&2; exit 1; }
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $reqs >&2 || {
    echo "setup_router: 'pip install $reqs' failed (PyPI unreachable, or no wheel for this platform?)" >&2
    exit 1
  }
  echo "$reqs" > "$stamp"
fi
"$venv/bin/vllm-router" --help >/dev/null 2>&1 || {
  echo "setup_router: $venv/bin/vllm-router is installed but does not run" >&2
  exit 1
}
echo "$venv/bin/vllm-router"
