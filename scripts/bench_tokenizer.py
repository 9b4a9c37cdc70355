#!/usr/bin/env python3
"""Encode throughput of tl's tokenizer against llama.cpp's, on ~1 MB of English.

The text is generated deterministically (seeded word sampler with sentence and
paragraph structure, some numbers and punctuation), so every run and machine
sees the same bytes. Both tokenizers encode it with add_special=False,
parse_special=False; the ids are compared, then the best of N runs is timed.

    ~/.cache/tensorlogic/llama-venv/bin/python scripts/bench_tokenizer.py [--repeats 5] [--mb 1]

Needs the reference venv (MODELS.md) for llama_cpp, and the models from
scripts/fetch_models.py. Builds the `encode_bench` example in release mode.
"""
import argparse
import json
import os
import pathlib
import random
import subprocess
import tempfile
import time

import llama_cpp

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL_DIR = pathlib.Path(
    os.environ.get("TL_MODEL_DIR")
    or pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "tensorlogic/models"
)
MODELS = ["qwen2.5-coder-0.5b-instruct-q4.gguf", "gemma-3-270m-q4_k_m.gguf"]

WORDS = """the of and to in a is that for it as was with be by on not he i this are or his from at which
but have an they you were her she there been one all we their has would when if so no will more
can said who what about some them into than time only could new these two may first then do any
like my now over such our man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good very
make world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three himself
few house use during without again place american around however home small found thought went say
part once general high upon school every does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet government
system better set told nothing night end why called didn't eyes find going look asked later point knew
city next program business give group toward young days let room president side social given present
several order national possible rather second face per among form important often things looking early
white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members mind country area others done turned
although open god service certain kind problem began different door thus help sense means whole matter
perhaps itself york it's times law human line above name example action company hands local show whether
five history gave today either act feet across taken past quite anything seen having death week
experience body word half really field am car words already themselves i'm information tell together
college shall money period held keep sure probably free seems political real behind cannot miss
""".split()


def make_text(n_bytes: int, seed: int = 1234) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        para = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 24))]
            if rng.random() < 0.15:
                words.insert(rng.randrange(len(words)), str(rng.randint(1, 100000)))
            if rng.random() < 0.2:
                i = rng.randrange(len(words))
                words[i] = words[i] + ","
            s = " ".join(words)
            para.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ";"]))
        p = " ".join(para) + "\n\n"
        out.append(p)
        size += len(p.encode())
    return "".join(out)[:n_bytes].rsplit(" ", 1)[0] + "\n"


def llama_encode(vocab, data: bytes):
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, False, False)
    assert n >= 0
    return buf, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mb", type=float, default=1.0)
    args = ap.parse_args()

    text = make_text(int(args.mb * 1_000_000))
    data = text.encode()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tl-tokenizer", "--example", "encode_bench"],
                   cwd=ROOT, check=True)
    exe = ROOT / "target/release/examples/encode_bench"
    with tempfile.TemporaryDirectory() as tmp:
        txt = pathlib.Path(tmp) / "bench.txt"
        txt.write_text(text)
        print(f"text: {len(data)} bytes of generated English, best of {args.repeats} runs, one thread")
        print(f"{'model':40} {'llama.cpp MB/s':>15} {'tl MB/s':>10} {'tl/llama':>9}  tokens  ids equal")
        for model in MODELS:
            path = MODEL_DIR / model
            llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                buf, n = llama_encode(vocab, data)
                best = min(best, time.perf_counter() - t)
            ref_ids = list(buf[:n])
            ids_out = pathlib.Path(tmp) / "ids.txt"
            r = subprocess.run([str(exe), str(path), str(txt), str(args.repeats), str(ids_out)],
                               check=True, capture_output=True, text=True)
            tl = json.loads(r.stdout)
            tl_ids = [int(x) for x in ids_out.read_text().split()]
            ref_mbs = len(data) / 1e6 / best
            print(f"{model:40} {ref_mbs:15.2f} {tl['mb_per_s']:10.2f} {tl['mb_per_s'] / ref_mbs:8.2f}x"
                  f"  {n:6d}  {'yes' if tl_ids == ref_ids else 'NO'}")


if __name__ == "__main__":
    main()
