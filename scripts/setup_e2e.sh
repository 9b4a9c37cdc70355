#!/usr/bin/env bash
# Installs what the end-to-end tests need, idempotently: a Python venv with
# the openai client, pytest and selenium (pinned) under
# ${XDG_CACHE_HOME:-~/.cache}/tensorlogic/e2e-venv, and Debian's chromium
# and chromium-driver plus curl. Prints the venv's python. Fails loudly.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/tensorlogic"
venv="$cache/e2e-venv"
reqs="openai==3.57.0 pytest==9.2.0 selenium==4.51.0 jsonschema==4.23.0"
stamp="$venv/.tl-reqs"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$reqs" ]; then
  echo "setup_e2e: creating $venv ($reqs)" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $reqs >&2
  echo "$reqs" > "$stamp"
fi
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup_e2e: installing ${missing[*]}" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
for c in chromium chromedriver curl; do
  command -v "$c" >/dev/null || { echo "setup_e2e: $c is still missing" >&2; exit 1; }
done
echo "$venv/bin/python"
