#!/usr/bin/env python3
"""Golden ids for every pre-tokenizer regex set, from llama.cpp.

For one `tokenizer.ggml.pre` name per distinct behaviour (regex set,
ignore_merges, add_bos, default BOS), writes a vocabulary-only GGUF that is
the Qwen2.5-Coder model's byte-level BPE vocabulary and merges with that
name, tokenizes a corpus with llama.cpp, and stores the ids in
crates/tl-tokenizer/tests/fixtures/pretok.json. The Rust test
(tests/pretok_sets.rs) puts the same name into the same metadata and must
produce the same ids. Names llama.cpp rejects (its loader throws) are
recorded too, so the test can check tl refuses them as well.

Needs the reference venv (MODELS.md) with the `gguf` package and the models
from scripts/fetch_models.py:

    ~/.cache/tensorlogic/llama-venv/bin/python scripts/make_pretok_fixtures.py [--raw-only]

The names whose BPE runs on raw UTF-8 (Gemma 4's SPM-style BPE, Sarvam,
jina-v2-zh's `whitespace` model) need an SPM-style vocabulary; for them a
second fixture, pretok_raw.json, uses one derived from Qwen's by
`raw_vocab` (tests/pretok_sets.rs repeats the derivation) and holds the
decoded bytes too. `--raw-only` writes just that one.
"""
import ctypes
import json
import os
import pathlib
import sys
import tempfile

import gguf
import llama_cpp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_tokenizer_fixtures import (  # noqa: E402
    CORPUS, MODEL_DIR, MODELS, random_corpus, tokenize,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-tokenizer/tests/fixtures/pretok.json"
OUT_RAW = ROOT / "crates/tl-tokenizer/tests/fixtures/pretok_raw.json"

# The names whose BPE runs on raw UTF-8 (llama.cpp `byte_encode = false`):
# (tokenizer.ggml.model, tokenizer.ggml.pre, spaces written as U+2581).
# They need an SPM-style vocabulary; raw_vocab() derives one from Qwen's.
RAW = [
    ("gemma4", "gemma4", True),
    ("gpt2", "granite-embed-multi-311m", True),
    ("gpt2", "sarvam-moe", True),
    ("whitespace", "whitespace", False),
]

# One name per distinct behaviour in llama.cpp's loader (llama-vocab.cpp).
NAMES = [
    "default", "gpt-2", "llama3", "dbrx", "qwen2", "stablelm2", "glm4", "chatglm-bpe",
    "falcon", "starcoder", "smollm", "deepseek-llm", "deepseek-coder", "deepseek-v3",
    "spark2_5", "youtu", "jais-2", "poro-chat", "viking", "tekken", "chameleon",
    "gpt-4o", "granite-embed-multi-97m", "superbpe", "bailingmoe", "seed-coder",
    "ufakzeka", "laguna", "exaone-moe", "minicpm5", "qwen35", "kimi-k2", "tiny_aya", "afmoe",
]

EXTRA = [
    ("korean_greek", "한국어 텍스트 ㄱㄴㄷ ㅏㅑ Ελληνικά ΐΰ ᾶῆ Ωmega ﬀ ＡＢＣ ａｂｃ"),
    ("fullwidth_punct", "你好！（测试）：；“引号”‘单’—破折号…省略、顿号。ㄅㄆㄇ"),
    ("digits_groups", "1 12 123 1234 12345 123456 1234567 12345678 x1234y 00001"),
    ("camel", "CamelCaseWord XMLHttpRequest iPhone HTTPServer ÉcoleNormale ПриветМир"),
    ("chameleon_special", "<sentinel:12> IMGIMGABCZ IMGIMGZ a\t\tb    c  d"),
    ("many_spaces", "a" + " " * 600 + "b" + " " * 40 + "\n" + " " * 9 + "c"),
    ("turkish", "İstanbul'da Ankara'ya gittim; ÇĞÖŞÜ çğöşü"),
    ("marks", "a\u0301b\u0300\u0302 c \u0301x"),
    ("slashes", "path/to/file\r\n/usr/bin/ x// y///\n"),
    ("han_mixed", "中文English混合テキストabc's 漢字ひらがな한글 \U00020000\U00020001x !中 é\u0301中 'LL"),
]


def copy_fields(src: gguf.GGUFReader, w: gguf.GGUFWriter, skip):
    """Every metadata field of `src` but the header ones, the architecture
    and those `skip(name)` is true for, into `w`."""
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or skip(name):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)


def write_vocab_gguf(src: gguf.GGUFReader, pre: str, path: str):
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    copy_fields(src, w, lambda name: name == "tokenizer.ggml.pre")
    w.add_key_value("tokenizer.ggml.pre", pre, gguf.GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gpt2_decoder():
    """GPT-2's byte-to-character table, inverted: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def raw_vocab(src: gguf.GGUFReader, escape: bool):
    """Qwen's byte-level vocabulary rewritten as an SPM-style one (the rules
    tests/pretok_sets.rs repeats): a normal token's text is its bytes as
    UTF-8 (spaces as U+2581 when `escape`), or `<unusedI>` typed unused when
    the bytes are not UTF-8 or the text is taken; the 256 `<0xXX>` byte
    tokens are appended; a merge is kept when both sides are UTF-8."""
    dec = gpt2_decoder()

    def raw(t):
        try:
            s = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
        return s.replace(" ", "\u2581") if escape else s

    tokens = src.fields["tokenizer.ggml.tokens"].contents()
    types = src.fields["tokenizer.ggml.token_type"].contents()
    used = {t for t, ty in zip(tokens, types) if ty != 1}
    out_t, out_ty = [], []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == 1:
            r = raw(t)
            if r is None or r in used:
                r, ty = f"<unused{i}>", 5
            used.add(r)
            t = r
        out_t.append(t)
        out_ty.append(ty)
    for b in range(256):
        t = f"<0x{b:02X}>"
        assert t not in used, t
        out_t.append(t)
        out_ty.append(6)
    merges = []
    for m in src.fields["tokenizer.ggml.merges"].contents():
        p = m.find(" ", 1)
        a, b = raw(m[:p]), raw(m[p + 1:])
        if a is not None and b is not None:
            merges.append(f"{a} {b}")
    return out_t, out_ty, merges


def write_raw_gguf(src: gguf.GGUFReader, model: str, pre: str, escape: bool, path: str):
    tokens, types, merges = raw_vocab(src, escape)
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    replaced = {"tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    copy_fields(src, w, lambda name: name in replaced)
    w.add_key_value("tokenizer.ggml.model", model, gguf.GGUFValueType.STRING)
    w.add_key_value("tokenizer.ggml.pre", pre, gguf.GGUFValueType.STRING)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def detokenize_bytes(vocab, ids) -> bytes:
    """llama.cpp's detokenize (no special handling), as bytes: the
    `whitespace` model's raw UTF-8 texts go through GPT-2's byte decoding
    there and need not come back as UTF-8."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    out = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), out, size, False, False)
    assert n >= 0, n
    return out.raw[:n]


def raw_main(src: gguf.GGUFReader, texts):
    fx = {
        "reference": f"llama-cpp-python {llama_cpp.__version__}",
        "vocab_from": MODELS["qwen"],
        "texts": texts,
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as d:
        for model, pre, escape in RAW:
            path = os.path.join(d, f"{pre}.gguf")
            write_raw_gguf(src, model, pre, escape, path)
            llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            ids, decoded = [], []
            for t in texts:
                x = tokenize(vocab, t.encode("utf-8"), True, False)
                ids.append(x)
                decoded.append(detokenize_bytes(vocab, x).hex())
            fx["cases"].append({"model": model, "pre": pre, "escape": escape,
                                "ids": ids, "decoded_hex": decoded})
            print(f"{model}/{pre}: {sum(map(len, ids))} ids")
            del llm
    OUT_RAW.write_text(json.dumps(fx, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT_RAW} ({OUT_RAW.stat().st_size} bytes)")


def main():
    src = gguf.GGUFReader(str(MODEL_DIR / MODELS["qwen"]))
    if "--raw-only" in sys.argv:
        texts = [t for _, t in CORPUS] + [t for _, t in EXTRA] + random_corpus(40, seed=7)
        raw_main(src, texts)
        return
    texts = [t for _, t in CORPUS] + [t for _, t in EXTRA] + random_corpus(40, seed=7)
    fx = {
        "reference": f"llama-cpp-python {llama_cpp.__version__}",
        "vocab_from": MODELS["qwen"],
        "texts": texts,
        "names": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for name in NAMES:
            path = os.path.join(d, f"{name}.gguf")
            write_vocab_gguf(src, name, path)
            try:
                llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            except Exception as e:  # llama.cpp refused the name
                fx["names"][name] = {"error": str(e)}
                print(f"{name}: llama.cpp refuses it ({e})")
                continue
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            ids = []
            for t in texts:
                data = t.encode("utf-8")
                ids.append(tokenize(vocab, data, True, False))
            fx["names"][name] = {"ids": ids}
            print(f"{name}: {sum(map(len, ids))} ids")
            del llm
    OUT.write_text(json.dumps(fx, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    raw_main(src, texts)


if __name__ == "__main__":
    main()
