#!/usr/bin/env python3
"""llama.cpp's WordPiece ids and pooled embeddings, for tl's embedding models.

Two fixtures:

1. crates/tl-tokenizer/tests/fixtures/wpm_tokenizer.json: a WordPiece
   vocabulary (pieces stored as llama.cpp's GGUF stores them: word-initial
   ones with the "▁" prefix, continuations bare) written three times with
   gguf-py as vocab-only `bert` files (no normalizer keys: llama.cpp's
   defaults, lowercase and accent stripping; cased; lowercase without accent
   stripping), and llama.cpp's
   ids for a corpus under each, with and without special tokens added and
   parsed. tests/wpm_parity.rs rebuilds the same metadata and compares.

2. crates/tl-model/tests/fixtures/embed_synth.json: `tl synth --arch bert`
   and `--arch nomic-bert` models (deterministic from their seeds) loaded
   in llama.cpp with `embedding=True`; for several inputs the token ids
   llama.cpp feeds, the pooled embedding (with pooling none: the token
   vectors, one after another) (raw and L2-normalised, as
   llama.cpp's embedding example prints them) and, as the float-noise
   floor, how far llama.cpp's own vectors move between its attention
   kernels (flash attention on vs off) and batchings (all inputs in one
   batch vs one by one). tests/embed_vs_llama.rs compares tl's vectors.

    cargo build --release -p tl-cli
    ~/.cache/tensorlogic/venv/bin/python scripts/make_embed_fixtures.py

`tl` is taken from $CARGO_TARGET_DIR/release (default target/release).
"""
import json
import os
import pathlib
import subprocess
import tempfile

import gguf
import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOK_OUT = ROOT / "crates/tl-tokenizer/tests/fixtures/wpm_tokenizer.json"
EMB_OUT = ROOT / "crates/tl-model/tests/fixtures/embed_synth.json"
TL = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/tl"

B = "\u2581"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_TYPES = [3, 2, 3, 3, 3]


def wpm_vocab():
    toks = list(SPECIAL)
    def add(t):
        if t not in toks:
            toks.append(t)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        add(B + c)
        add(c)
    for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        add(B + c)
        add(c)
    for c in ".,!?'\"-:;()[]{}<>/@#$%^&*+=_~`|\\":
        add(B + c)
    for c in "中文日本語东京的是テキストé":
        add(B + c)
        add(c)
    for w in ["the", "quick", "brown", "fox", "jump", "over", "lazy", "dog", "hello", "world",
              "test", "token", "embed", "un", "cafe", "café", "naive", "naïve", "resume", "résumé",
              "is", "a", "an", "of", "and", "to", "in", "it", "we", "model", "text", "zurich",
              "zürich", "Hello", "World", "The", "Paris", "sao", "são", "paulo", "façade", "facade",
              "hello.", "e\u0301"]:
        add(B + w)
    for w in ["s", "ed", "ing", "ly", "er", "est", "izer", "ding", "believ", "able", "tion",
              "ment", "ness", "ful", "less", "ize", "ise", "ted", "ab", "abc", "xyz"]:
        add(w)
    types = SPECIAL_TYPES + [1] * (len(toks) - len(SPECIAL))
    return toks, types


# llama.cpp lowercases and strips accents unless the file says otherwise.
VARIANTS = [
    {"name": "default", "lowercase": None, "strip_accents": None},
    {"name": "cased", "lowercase": False, "strip_accents": None},
    {"name": "lower_keep_accents", "lowercase": True, "strip_accents": False},
]

CORPUS = [
    "",
    " ",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "hello, world! (testing) tokenizers: embedding; unbelievable",
    "HELLO WoRlD",
    "café naïve résumé Zürich São Paulo façade",
    "cafe\u0301 e\u0301 n\u0303 A\u0308",
    "日本語のテキストと中文文本，东京是",
    "a\tb\nc  d\r\ne",
    "x\u0000y\u0007z\ufffdw",
    "qqq zzzz abcxyz abab",
    "[CLS] hello [SEP] world [MASK] [PAD] [UNK]",
    "[CLS][SEP]x",
    "1 12 123 3.14 2^64 = 18446744073709551616",
    "e-mail: a@b.com / $5 + 10% ~ `code` | back\\slash",
    "😀 emoji 🦀 and symbols ©®™ ½",
    "x" * 300,
]


def write_vocab_gguf(path, toks, types, v):
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tokenizer_model("bert")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_pad_token_id(0)
    w.add_unk_token_id(1)
    w.add_bos_token_id(2)
    w.add_sep_token_id(3)
    w.add_mask_token_id(4)
    if v["lowercase"] is not None:
        w.add_bool("tokenizer.ggml.normalizer.lowercase", v["lowercase"])
    if v["strip_accents"] is not None:
        w.add_bool("tokenizer.ggml.normalizer.strip_accents", v["strip_accents"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tokenizer_fixture(d):
    toks, types = wpm_vocab()
    fx = {"reference": f"llama-cpp-python {llama_cpp.__version__}", "tokens": toks,
          "token_types": types, "corpus": CORPUS, "variants": []}
    for v in VARIANTS:
        path = pathlib.Path(d) / f"wpm-{v['name']}.gguf"
        write_vocab_gguf(path, toks, types, v)
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        ids = []
        for text in CORPUS:
            b = text.encode()
            ids.append({
                "special": llm.tokenize(b, add_bos=True, special=False),
                "parse": llm.tokenize(b, add_bos=False, special=True),
            })
        del llm
        fx["variants"].append(dict(v, ids=ids))
        print(f"wpm {v['name']}: {sum(len(x['special']) for x in ids)} ids")
    TOK_OUT.write_text(json.dumps(fx, ensure_ascii=False, indent=None) + "\n")
    print(f"wrote {TOK_OUT}")


SHAPE = {"layers": 2, "d_model": 128, "heads": 4, "kv_heads": 4, "head_dim": 32, "ffn": 256,
         "extra_vocab": 40, "context": 128}
CASES = [
    {"arch": "bert", "weight_type": "Q8_0", "pooling": "mean", "seed": 41, "qk_scale": 4.0},
    {"arch": "bert", "weight_type": "F16", "pooling": "cls", "seed": 42, "qk_scale": 4.0},
    {"arch": "nomic-bert", "weight_type": "Q8_0", "pooling": "mean", "seed": 43, "qk_scale": 4.0},
    {"arch": "nomic-bert", "weight_type": "F16", "pooling": "last", "seed": 44, "qk_scale": 4.0},
    {"arch": "nomic-bert", "weight_type": "Q8_0", "pooling": "none", "seed": 45, "qk_scale": 4.0},
]
INPUTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé: unbelievable tokenizers, embedding text!",
    "东京 is the capital of 日本 and paris of france " * 3,
    "a",
]


def embeddings(path, flash, one_by_one, normalize):
    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=128, n_batch=128, n_ubatch=128,
                          flash_attn=flash, n_threads=2, verbose=False)
    if llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        # One vector per token, flattened per input. One input per call:
        # llama-cpp-python 0.3.36 reads token vectors of later sequences at
        # the wrong offset when several share a batch.
        out = [np.array(llm.embed(t, normalize=normalize)).ravel() for t in INPUTS]
        del llm
        toks = None
        return out, toks
    if one_by_one:
        out = [llm.embed(t, normalize=normalize) for t in INPUTS]
    else:
        out = llm.embed(INPUTS, normalize=normalize)
    toks = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in INPUTS]
    del llm
    return list(np.array(out, dtype=np.float64)), toks


def tokens(path):
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode(), add_bos=True, special=False) for t in INPUTS]


def embed_fixture(d):
    fx = {"reference": f"llama-cpp-python {llama_cpp.__version__}", "inputs": INPUTS, "cases": []}
    for case in CASES:
        c = dict(SHAPE, **case)
        path = pathlib.Path(d) / f"{c['arch']}-{c['seed']}.gguf"
        args = [str(TL), "synth", "-o", str(path)]
        for k, v in c.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        subprocess.run(args, check=True, capture_output=True)
        raw, _ = embeddings(path, False, False, False)
        toks = tokens(path)
        norm, _ = embeddings(path, False, False, True)
        alts = [embeddings(path, True, False, False)[0], embeddings(path, False, True, False)[0]]
        self_max = max(float(np.abs(r - a).max()) for alt in alts for r, a in zip(raw, alt))
        self_cos = min(float((r @ a) / np.linalg.norm(r) / np.linalg.norm(a))
                       for alt in alts for r, a in zip(raw, alt))
        c["tokens"] = toks
        c["self_max_abs"] = self_max
        c["self_min_cos"] = self_cos
        c["raw"] = [[round(float(x), 7) for x in row] for row in raw]
        c["normalized"] = [[round(float(x), 7) for x in row] for row in norm]
        fx["cases"].append(c)
        print(f"{c['arch']} {c['weight_type']} {c['pooling']}: |x| max {max(np.abs(r).max() for r in raw):.3f}, "
              f"llama.cpp self max diff {self_max:.2e}, min cos {self_cos:.9f}")
    EMB_OUT.write_text(json.dumps(fx, ensure_ascii=False) + "\n")
    print(f"wrote {EMB_OUT}")


def main():
    with tempfile.TemporaryDirectory() as d:
        tokenizer_fixture(d)
        embed_fixture(d)


if __name__ == "__main__":
    main()
