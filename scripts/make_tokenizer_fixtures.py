#!/usr/bin/env python3
"""Golden tokenizer and chat-template fixtures from llama.cpp (llama-cpp-python).

Writes crates/tl-tokenizer/tests/fixtures/{qwen,gemma}_tokenizer.json and
chat_templates.json. Needs the reference venv (see shared MODELS.md) and the
models from scripts/fetch_models.py:

    ~/.cache/tensorlogic/llama-venv/bin/python scripts/make_tokenizer_fixtures.py
"""
import ctypes
import json
import os
import pathlib

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-tokenizer/tests/fixtures"
MODEL_DIR = pathlib.Path(
    os.environ.get("TL_MODEL_DIR")
    or pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "tensorlogic/models"
)
MODELS = {
    "qwen": "qwen2.5-coder-0.5b-instruct-q4.gguf",
    "gemma": "gemma-3-270m-q4_k_m.gguf",
}

CORPUS = [
    ("empty", ""),
    ("single_space", " "),
    ("english", "The quick brown fox jumps over the lazy dog. It's a test, isn't it? "
                "We'll see: they're here, you've won, I'd go, I'm done."),
    ("prose", "It was the best of times, it was the worst of times, it was the age of wisdom, "
              "it was the age of foolishness...\n\nCall me Ishmael. Some years ago - never mind how long "
              "precisely - having little or no money in my purse, I thought I would sail about a little."),
    ("code_python", "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
                    "class Foo(object):\n\tdef bar(self):\n\t\treturn {'a': [1, 2, 3]}\n"),
    ("code_rust", "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n"
                  "    println!(\"{:?}\", v); // done\n}\n"),
    ("code_deep_indent", "if a:\n        if b:\n                if c:\n                        pass\n"),
    ("cjk", "日本語のテキストと中文文本，还有한국어 텍스트。東京タワーは333メートルです。"),
    ("emoji", "I love 🦀 and 🐍! 😀😃😄🎉"),
    ("emoji_zwj", "Family: 👨‍👩‍👧‍👦, astronaut: 🧑‍🚀, flags: 🇯🇵🇺🇸, skin: 👍🏽, heart: ❤️"),
    ("spaces", "a  b   c    d     e" + " " * 17 + "f"),
    ("tabs", "\tx\t\ty\t\t\tz\t"),
    ("newlines", "line1\nline2\n\nline3\n\n\n"),
    ("crlf", "one\r\ntwo\r\n\r\nthree\r"),
    ("whitespace_mixed", "  \t \n \r\n\t\t  x  \n\n  "),
    ("leading_trailing", "   hello   "),
    ("digits", "1 12 123 1234 12345 123456 1234567 3.14159 2^64 = 18446744073709551616"),
    ("long_number", "9" * 120 + " " + "31415926535897932384626433832795028841971693993751"),
    ("accents", "café naïve résumé Zürich São Paulo façade Ærøskøbing"),
    ("combining", "cafe\u0301 n\u0303 a\u0308\u0301 Z\u0363 \u1e9b\u0323"),
    ("special_chatml", "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"),
    ("special_gemma", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
    ("special_bos", "<bos>text<eos> and <s></s> <unk> <pad>"),
    ("special_adjacent", "<|endoftext|><|endoftext|>x<|im_end|>"),
    ("special_partial", "<|im_start <start_of_turn <|im_end| <bo s>"),
    ("special_unknown", "<|not_a_token|> <unused0> <|fim_prefix|>x<|fim_suffix|>"),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3 + " " + "a" * 300),
    ("contractions_upper", "DON'T WE'LL THEY'RE I'VE SHE'S IT'D can't"),
    ("apostrophes", "'s 't 're 've 'm 'll 'd ' x' ''"),
    ("punctuation", "Hello!!! What??? ... --- ((())) [[]] {{}} ~~~ ```"),
    ("url_email", "https://example.com/path?q=1&x=y#frag user@example.org"),
    ("mixed_scripts", "Привет мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดี"),
    ("unicode_whitespace", "a\u00a0b\u3000c\u2003d\u200be\u2028f\u0085g"),
    ("control_chars", "a\u0000b\u0007c\u001fd\u007fe"),
    ("json", '{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": "b"}}'),
    ("markdown", "# Title\n\n* item one\n* item two\n\n```python\nprint('hi')\n```\n"),
    ("html", "<div class=\"x\"><p>Hello &amp; welcome</p><br/></div>"),
    ("html_spaces", "<p> </p> <b>  </b>\n<i> text </i>"),
    ("literal_lower_one_eighth_block", "x\u2581y \u2581\u2581z>\u2581</a>"),
    ("rare_unicode", "\U0001F9D1\u200D\U0001F680 \u2603 \u2122 \u00BD \u2460 \U0001D400 \uFFFD \U000E0041"),
]


POOLS = [
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    ["the", "The", " and", "ing", "tion", "'s", "'T", "'ll", "'RE", "n't", "I'm", "http://", "foo_bar", "camelCase"],
    list("0123456789"), ["1234567", "3.14", "1e10", "2024-01-01"],
    list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\u200b", "\u2581"],
    list("中文日本語한국어テキスト漢字"), list("абвгдеёжзПривет"), list("αβγδεΩ"), list("مرحباשלום"), list("नमस्ते"),
    ["😀", "🦀", "👍🏽", "👨\u200d👩\u200d👧", "❤\ufe0f", "🇯🇵", "\U0001F9D1\u200d\U0001F680"],
    ["e\u0301", "n\u0303", "\u0308", "\u0323\u0307", "é", "ñ", "ü", "ß", "ﬁ", "Å"],
    ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
     "<unk>", "<pad>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|im_start", "<start_of", "<unused5>"],
    ["\x00", "\x07", "\x1b", "\x7f", "\ufffd", "\U0010FFFD", "\ue000", "\u2028", "\u0085"],
]


def random_corpus(n: int, seed: int):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            pool = rng.choice(POOLS)
            parts.append(rng.choice(pool) * (1 if rng.random() < 0.9 else rng.randint(2, 6)))
        out.append("".join(parts))
    return out


def tokenize(vocab, data: bytes, add_special: bool, parse_special: bool):
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    assert n >= 0, n
    return list(buf[:n])


def detokenize(vocab, ids, remove_special: bool, unparse_special: bool) -> str:
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    out = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), out, size, remove_special, unparse_special)
    assert n >= 0, n
    return out.raw[:n].decode("utf-8")


def piece(vocab, tok: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, tok, buf, 256, 0, special)
    assert n >= 0, n
    return buf.raw[:n]


def token_fixture(key: str):
    llm = llama_cpp.Llama(str(MODEL_DIR / MODELS[key]), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    def opt(t):
        return None if t < 0 else t
    fx = {
        "model": MODELS[key],
        "reference": f"llama-cpp-python {llama_cpp.__version__}",
        "n_vocab": n_vocab,
        "bos": opt(llama_cpp.llama_vocab_bos(vocab)),
        "eos": opt(llama_cpp.llama_vocab_eos(vocab)),
        "eot": opt(llama_cpp.llama_vocab_eot(vocab)),
        "pad": opt(llama_cpp.llama_vocab_pad(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        "control": [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, t)][:400],
        "entries": [],
    }
    for name, text in CORPUS:
        data = text.encode("utf-8")
        ids = tokenize(vocab, data, True, False)
        ids_special = tokenize(vocab, data, True, True)
        ids_raw = tokenize(vocab, data, False, False)
        fx["entries"].append({
            "name": name,
            "text": text,
            "ids": ids,
            "ids_parse_special": ids_special,
            "ids_no_add_special": ids_raw,
            "pieces_hex": [piece(vocab, t, True).hex() for t in ids_special],
            "detok": detokenize(vocab, ids, False, False),
            "detok_remove_special": detokenize(vocab, ids, True, False),
            "detok_parse_special_unparse": detokenize(vocab, ids_special, False, True),
            "detok_parse_special": detokenize(vocab, ids_special, False, False),
        })
    fx["random"] = []
    for text in random_corpus(150, seed=7):
        data = text.encode("utf-8")
        fx["random"].append({
            "text": text,
            "ids": tokenize(vocab, data, True, False),
            "ids_parse_special": tokenize(vocab, data, True, True),
        })
    return llm, fx


CONVERSATIONS = [
    ("user_only", [{"role": "user", "content": "Hello!"}], True, None),
    ("system_user", [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "What is 2+2?"}], True, None),
    ("multi_turn", [{"role": "system", "content": "  Be helpful.  "},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Write a haiku about 🦀 and \"quotes\".\n"}], True, None),
    ("multi_turn_no_gen", [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": " spaces around "}], False, None),
    ("unicode", [{"role": "user", "content": "日本語で答えて。café\tñ"}], True, None),
]

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}},
                       "required": ["city"]},
    },
}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
    {"role": "tool", "content": "{\"temp\": 21.5}"},
    {"role": "tool", "content": "sunny"},
]


def gemma_reference(messages, add_ass):
    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        r, c = m["role"].encode(), m["content"].encode()
        keep += [r, c]
        arr[i].role = r
        arr[i].content = c
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(b"gemma", arr, len(messages), add_ass, buf, size)
    assert 0 <= n < size, n
    return buf.raw[:n].decode()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    chat = {"reference": f"llama-cpp-python {llama_cpp.__version__}", "qwen": [], "gemma": []}
    for key in MODELS:
        llm, fx = token_fixture(key)
        random_entries = fx.pop("random")
        (OUT / f"{key}_tokenizer.json").write_text(json.dumps(fx, ensure_ascii=False, indent=1) + "\n")
        (OUT / f"{key}_random.json").write_text(
            json.dumps({"model": fx["model"], "entries": random_entries}, ensure_ascii=False) + "\n")
        print(f"{key}: {len(fx['entries'])} corpus entries")
        if key == "qwen":
            md = llm.metadata
            eos = llm._model.token_get_text(llm.token_eos())
            bos = llm._model.token_get_text(llm.token_bos())
            for name, msgs, gen, tools in CONVERSATIONS + [("tools", TOOL_CONVERSATION, True, TOOLS)]:
                fmt = Jinja2ChatFormatter(md["tokenizer.chat_template"], eos_token=eos, bos_token=bos,
                                          add_generation_prompt=gen)
                prompt = fmt(messages=msgs, tools=tools).prompt
                chat["qwen"].append({"name": name, "messages": msgs, "add_generation_prompt": gen,
                                     "tools": tools, "expected": prompt})
        else:
            # No template in the file: llama.cpp's built-in gemma format.
            for name, msgs, gen, _ in CONVERSATIONS:
                chat["gemma"].append({"name": name, "messages": msgs, "add_generation_prompt": gen,
                                      "tools": None, "expected": gemma_reference(msgs, gen)})
    (OUT / "chat_templates.json").write_text(json.dumps(chat, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
