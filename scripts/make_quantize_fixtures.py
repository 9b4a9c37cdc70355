#!/usr/bin/env python3
"""Write the fixtures of `tl quantize`: what llama.cpp's quantizer writes.

The reference is llama.cpp's `llama_model_quantize` (src/llama-quant.cpp of
the llama.cpp that llama-cpp-python 0.3.36 vendors), called through
llama-cpp-python. For each case this script quantizes an input file with it
and records the SHA-256 of every output tensor's bytes, each tensor's type,
and the SHA-256 of the whole output file. The Rust test
`crates/tl-cli/tests/quantize.rs` runs `tl quantize` on the same inputs and
compares, without Python.

Inputs:
  - synthetic F32/F16 models of several architectures, written by `tl synth`
    with fixed seeds (their SHA-256 is recorded too, so a change of `tl synth`
    shows as such rather than as a quantizer difference);
  - the two real test models (already quantized), requantized
    (`--allow-requantize`).

Every file type `tl quantize` offers is run on every synthetic model, plus the
flags `--pure`, `--leave-output-tensor`, `--output-tensor-type` and
`--token-embedding-type` on one of them. That model is also split into three
parts (tl-gguf's `split` example, gguf-split's layout) and quantized from its
first part for the file types in SPLIT_FTYPES: llama.cpp must write the very
file it writes for the whole input (the script stops otherwise), and the
fixture lists those types under `split_input_ftypes` for the Rust test to
run `tl quantize` on the parts.

Run with the reference environment (llama-cpp-python built as
../shared/MODELS.md says, plus `gguf`):
  ~/.cache/tensorlogic/venv/bin/python scripts/make_quantize_fixtures.py \
      --tl target/release/tl
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from gguf import GGUFReader

from llama_quantize_ref import FTYPES, reference_quantize, reference_version, sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "tl-cli", "tests", "fixtures", "quantize.json")
MODEL_DIR = os.environ.get("TL_MODEL_DIR", os.path.expanduser("~/.cache/tensorlogic/models"))

# `tl synth` arguments of the synthetic inputs. Eight layers make the
# layer-position rules pick different layers; 8 query heads over 2 KV heads
# (GQA 4) and over 8 (GQA 1) take both branches of the attn_v rules; a width
# of 384 is not a whole number of 256-value super-blocks (the fallbacks);
# gemma3 ties its embeddings; mixtral has 8 experts; phi3 fuses QKV.
SYNTH = {
    "qwen2_f32": ["--arch", "qwen2", "--layers", "8", "--d-model", "256", "--heads", "8",
                  "--kv-heads", "2", "--head-dim", "32", "--ffn", "512",
                  "--weight-type", "F32", "--output-type", "F32", "--seed", "11"],
    "llama_f16": ["--arch", "llama", "--layers", "8", "--d-model", "384", "--heads", "6",
                  "--kv-heads", "6", "--head-dim", "64", "--ffn", "768",
                  "--weight-type", "F16", "--output-type", "F16", "--seed", "12"],
    "gemma3_f32": ["--arch", "gemma3", "--layers", "6", "--d-model", "256", "--heads", "4",
                   "--kv-heads", "1", "--head-dim", "64", "--ffn", "512",
                   "--weight-type", "F32", "--output-type", "F32", "--seed", "13"],
    "mixtral_f16": ["--arch", "mixtral", "--layers", "4", "--d-model", "256", "--heads", "4",
                    "--kv-heads", "2", "--head-dim", "64", "--ffn", "256", "--experts", "8",
                    "--weight-type", "F16", "--output-type", "F16", "--seed", "14"],
    "phi3_f16": ["--arch", "phi3", "--layers", "4", "--d-model", "256", "--heads", "4",
                 "--kv-heads", "4", "--head-dim", "64", "--ffn", "512",
                 "--weight-type", "F16", "--output-type", "F16", "--seed", "15"],
    # gpt-oss writes its experts in MXFP4 whatever the weight type: every
    # file type requantizes them (as llama-quantize with --allow-requantize).
    "gpt_oss_f16": ["--arch", "gpt-oss", "--layers", "2", "--d-model", "256", "--heads", "8",
                    "--kv-heads", "2", "--head-dim", "64", "--ffn", "128", "--experts", "4",
                    "--weight-type", "F16", "--output-type", "F16", "--seed", "16"],
}

# Flag variants, run on qwen2_f32.
VARIANTS = [
    ("Q4_K_M", ["--pure"]),
    ("Q4_K_M", ["--leave-output-tensor"]),
    ("Q3_K_M", ["--output-tensor-type", "Q5_K", "--token-embedding-type", "Q8_0"]),
    ("Q5_K_S", ["--token-embedding-type", "F16"]),
    # --tensor-type: a manual type skips the mix rules (and their layer
    # counters: blk.0.attn_v taken out shifts the attn_v choices of Q4_K_M);
    # the first matching pattern wins; IQ4_XS on 256-wide rows.
    ("Q4_K_M", ["--tensor-type", "blk\\.0\\.attn_v=Q8_0",
                "--tensor-type", "ffn_(up|gate)=iq4_nl", "--tensor-type", "ffn_up=Q5_0"]),
    ("IQ4_XS", ["--tensor-type", "attn_[qk]=IQ4_XS", "--tensor-type", "blk\\.[67]\\.=Q6_K"]),
]

# File types run again on the qwen2_f32 input split into three parts.
SPLIT_FTYPES = ["Q4_K_M", "TQ1_0", "IQ4_XS"]

# Requantized real models: (model file, file types).
MODELS = [
    ("qwen2.5-coder-0.5b-instruct-q4.gguf", ["Q4_K_M", "Q8_0", "Q3_K_M", "IQ4_XS"]),
    ("gemma-3-270m-q4_k_m.gguf", ["Q4_K_M", "Q6_K"]),
]


def tensors_of(path):
    """name -> [type name, the first 16 hex digits of the SHA-256 of its bytes]."""
    r = GGUFReader(path)
    out = {}
    with open(path, "rb") as f:
        for t in r.tensors:
            f.seek(t.data_offset)
            out[t.name] = [t.tensor_type.name,
                           hashlib.sha256(f.read(int(t.n_bytes))).hexdigest()[:16]]
    return out


def case(inp, ftype, flags, tmp):
    out = os.path.join(tmp, "out.gguf")
    reference_quantize(inp, out, ftype, flags)
    c = {"ftype": ftype, "flags": flags, "file_sha256": sha256_file(out), "tensors": tensors_of(out)}
    os.remove(out)
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tl", default=os.path.join(ROOT, "target", "release", "tl"))
    ap.add_argument("--split", default=os.path.join(ROOT, "target", "release", "examples", "split"),
                    help="tl-gguf's split example (cargo build --release -p tl-gguf --example split)")
    args = ap.parse_args()
    fixtures = {"reference": reference_version(),
                "synth": [], "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, synth_args in SYNTH.items():
            inp = os.path.join(tmp, name + ".gguf")
            subprocess.run([args.tl, "synth", *synth_args, "-o", inp], check=True,
                           stdout=subprocess.DEVNULL)
            entry = {"name": name, "synth_args": synth_args, "input_sha256": sha256_file(inp),
                     "cases": []}
            # Inputs with quantized tensors (gpt-oss's MXFP4 experts) need
            # --allow-requantize.
            base = ["--allow-requantize"] if name.startswith("gpt_oss") else []
            for ftype in FTYPES:
                entry["cases"].append(case(inp, ftype, base, tmp))
            if name == "qwen2_f32":
                for ftype, flags in VARIANTS:
                    entry["cases"].append(case(inp, ftype, flags, tmp))
                prefix = os.path.join(tmp, name + "-split")
                subprocess.run([args.split, inp, prefix, "3"], check=True,
                               stdout=subprocess.DEVNULL)
                first = prefix + "-00001-of-00003.gguf"
                for ftype in SPLIT_FTYPES:
                    whole = next(c for c in entry["cases"] if c["ftype"] == ftype and c["flags"] == base)
                    if case(first, ftype, base, tmp)["file_sha256"] != whole["file_sha256"]:
                        sys.exit(f"llama.cpp quantizes the split {name} to another file ({ftype})")
                entry["split_input_ftypes"] = SPLIT_FTYPES
                for i in range(3):
                    os.remove(f"{prefix}-{i + 1:05d}-of-00003.gguf")
            fixtures["synth"].append(entry)
            print(f"{name}: {len(entry['cases'])} cases", file=sys.stderr)
        for model, ftypes in MODELS:
            inp = os.path.join(MODEL_DIR, model)
            entry = {"model": model, "cases": []}
            for ftype in ftypes:
                entry["cases"].append(case(inp, ftype, ["--allow-requantize"], tmp))
            fixtures["models"].append(entry)
            print(f"{model}: {len(entry['cases'])} cases", file=sys.stderr)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(fixtures, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
