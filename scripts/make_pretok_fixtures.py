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

    ~/.cache/tensorlogic/llama-venv/bin/python scripts/make_pretok_fixtures.py
"""
import json
import os
import pathlib
import sys
import tempfile

import gguf
import llama_cpp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_tokenizer_fixtures import CORPUS, MODEL_DIR, MODELS, random_corpus, tokenize  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-tokenizer/tests/fixtures/pretok.json"

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


def main():
    src = gguf.GGUFReader(str(MODEL_DIR / MODELS["qwen"]))
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


if __name__ == "__main__":
    main()
