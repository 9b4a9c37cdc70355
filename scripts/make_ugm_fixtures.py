#!/usr/bin/env python3
"""Golden ids for the Unigram tokenizer (`tokenizer.ggml.model = t5`), from
llama.cpp.

Trains a small SentencePiece Unigram model (the `sentencepiece` package,
T5's layout: <pad> 0, </s> 1, <unk> 2, two user-defined symbols, the
nmt_nfkc normalization rules compiled into its precompiled charsmap) on
this repository's documentation, writes it as vocabulary-only GGUFs the
way llama.cpp's converter writes T5 tokenizers (tokens, scores, types,
precompiled_charsmap, add_space_prefix, remove_extra_whitespaces) in three
variants (charsmap + merged spaces; no charsmap, spaces kept; no space
prefix), tokenizes a corpus with llama.cpp, and stores vocabulary and ids in
crates/tl-tokenizer/tests/fixtures/ugm_tokenizer.json.
tests/ugm_parity.rs rebuilds the same metadata and must produce the same ids.
(SentencePiece trains on several threads, so a rerun may learn a slightly
different vocabulary; the fixture carries its own, so any run's is valid.)

    ~/.cache/tensorlogic/venv/bin/pip install sentencepiece protobuf
    ~/.cache/tensorlogic/venv/bin/python scripts/make_ugm_fixtures.py
"""
import base64
import json
import os
import pathlib
import sys
import tempfile

import gguf
import llama_cpp
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_tokenizer_fixtures import CORPUS, MODEL_DIR, MODELS, random_corpus, tokenize  # noqa: E402
from make_pretok_fixtures import copy_fields  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-tokenizer/tests/fixtures/ugm_tokenizer.json"

VARIANTS = [
    {"name": "charsmap", "charsmap": True, "add_space_prefix": True, "remove_extra_whitespaces": True},
    {"name": "plain", "charsmap": False, "add_space_prefix": True, "remove_extra_whitespaces": False},
    {"name": "no_prefix", "charsmap": True, "add_space_prefix": False, "remove_extra_whitespaces": False},
]

EXTRA = [
    "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\n here",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ﬁ ligatures ① ㌔",
    "<extra_id_0> sentinel <extra_id_0>inside<sep_tok>x",
    "</s> <pad> <unk> as text", "emoji 😀🚀 and 漢字 and ελληνικά",
    "zzzzqqqq xylophone", "a" * 50,
]


def train(d: str) -> model_pb2.ModelProto:
    text = []
    for f in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    corpus = os.path.join(d, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(text[:4000]))
    prefix = os.path.join(d, "ugm")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=600, model_type="unigram",
        normalization_rule_name="nmt_nfkc", character_coverage=0.995,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        user_defined_symbols=["<extra_id_0>", "<sep_tok>"], minloglevel=2)
    m = model_pb2.ModelProto()
    m.ParseFromString(open(prefix + ".model", "rb").read())
    return m


def write_gguf(src: gguf.GGUFReader, m, v, path: str):
    arch = src.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    copy_fields(src, w, lambda name: name.startswith("tokenizer."))
    w.add_tokenizer_model("t5")
    w.add_token_list([p.piece for p in m.pieces])
    w.add_token_scores([p.score for p in m.pieces])
    w.add_token_types([int(p.type) for p in m.pieces])
    w.add_add_space_prefix(v["add_space_prefix"])
    w.add_remove_extra_whitespaces(v["remove_extra_whitespaces"])
    if v["charsmap"]:
        w.add_key_value("tokenizer.ggml.precompiled_charsmap",
                        list(m.normalizer_spec.precompiled_charsmap),
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    src = gguf.GGUFReader(str(MODEL_DIR / MODELS["qwen"]))
    texts = [t for _, t in CORPUS] + EXTRA + random_corpus(30, seed=11)
    with tempfile.TemporaryDirectory() as d:
        m = train(d)
        fx = {
            "reference": f"llama-cpp-python {llama_cpp.__version__}, sentencepiece {spm.__version__}",
            "tokens": [p.piece for p in m.pieces],
            "scores": [p.score for p in m.pieces],
            "types": [int(p.type) for p in m.pieces],
            "charsmap": base64.b64encode(m.normalizer_spec.precompiled_charsmap).decode(),
            "texts": texts,
            "variants": [],
        }
        for v in VARIANTS:
            path = os.path.join(d, f"{v['name']}.gguf")
            write_gguf(src, m, v, path)
            llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            special = [tokenize(vocab, t.encode("utf-8"), True, False) for t in texts]
            parsed = [tokenize(vocab, t.encode("utf-8"), False, True) for t in texts]
            fx["variants"].append(dict(v, special=special, parsed=parsed))
            print(f"{v['name']}: {sum(map(len, special))} ids")
            del llm
    OUT.write_text(json.dumps(fx, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
