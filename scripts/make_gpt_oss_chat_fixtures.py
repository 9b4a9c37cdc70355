#!/usr/bin/env python3
"""gpt-oss's chat template (the harmony format) rendered by Jinja2.

Renders conversations with the template llama.cpp ships for gpt-oss
(models/templates/openai-gpt-oss-120b.jinja, the model's own) the way HF
transformers sets Jinja2 up (sandboxed, trim_blocks and lstrip_blocks,
`tojson` with ensure_ascii off, `raise_exception`, `strftime_now`), and
stores the template and every rendering in
crates/tl-tokenizer/tests/fixtures/gpt_oss_chat.json. The Rust test
(tests/gpt_oss_chat.rs) renders the same conversations with tl's minijinja
setup. `strftime_now` returns the fixed date DATE here; the test puts the
same date in place of the day it runs on.

    ~/.cache/tensorlogic/venv/bin/python scripts/make_gpt_oss_chat_fixtures.py \\
        PATH/TO/llama.cpp/models/templates/openai-gpt-oss-120b.jinja
"""
import json
import pathlib
import sys

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/tl-tokenizer/tests/fixtures/gpt_oss_chat.json"
DATE = "2026-01-01"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}

CASES = [
    {"name": "system and user", "add_generation_prompt": True, "tools": None, "extra": {},
     "messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What is 2+2?"}]},
    {"name": "multi-turn, high effort", "add_generation_prompt": True, "tools": None,
     "extra": {"reasoning_effort": "high"},
     "messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Name a prime — and é, 日本."}]},
    {"name": "thinking of the last turn", "add_generation_prompt": False, "tools": None,
     "extra": {},
     "messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "thinking": "Simple sum."}]},
    {"name": "tools and a call", "add_generation_prompt": True, "tools": [WEATHER],
     "extra": {"model_identity": "You are a weather bot."},
     "messages": [{"role": "developer", "content": "Answer in one line."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "",
                   "tool_calls": [{"type": "function",
                                   "function": {"name": "get_weather",
                                                "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"}]},
]


def main() -> int:
    src = pathlib.Path(sys.argv[1]).read_text()
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: DATE
    tmpl = env.from_string(src)
    out = {"source": "llama.cpp models/templates/openai-gpt-oss-120b.jinja", "date": DATE,
           "template": src, "cases": []}
    for c in CASES:
        ctx = dict(c["extra"])
        ctx.update(messages=c["messages"], add_generation_prompt=c["add_generation_prompt"],
                   tools=c["tools"], bos_token="<|startoftext|>", eos_token="<|return|>")
        out["cases"].append(dict(c, expected=tmpl.render(**ctx)))
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({len(out['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
