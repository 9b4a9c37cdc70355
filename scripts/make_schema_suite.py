#!/usr/bin/env python3
"""Writes tests/e2e/schemas.json: a fixed suite of JSON schemas (seeded, so
the file is reproducible) for the structured-output end-to-end test, plus
schemas using features the engine must refuse with a clear 400.

Features covered, in combination: object properties with required and
optional fields, additionalProperties false, nested objects (to depth 3),
arrays with minItems/maxItems and uniqueItems-free items, string enums,
const, strings with minLength/maxLength and patterns, integers and numbers
with minimum/maximum/exclusive bounds, booleans, null, anyOf/oneOf unions,
$defs with $ref, and the date/time/date-time/uuid formats. Every string and
array is bounded so that a complete answer fits in the test's token limit.

  python3 scripts/make_schema_suite.py          # rewrites the file
"""
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "e2e", "schemas.json")
WORDS = ["name", "city", "color", "size", "kind", "label", "code", "title", "tag", "mode",
         "owner", "status", "level", "note", "unit", "shape"]


def scalar(rng, depth):
    k = rng.randrange(11)
    if k == 0:
        return {"type": "string", "maxLength": rng.choice([5, 10, 20])}
    if k == 1:
        return {"type": "string", "minLength": 1, "maxLength": 12}
    if k == 2:
        return {"enum": rng.sample(["red", "green", "blue", "cyan", "black", "white"], 3)}
    if k == 3:
        lo = rng.randrange(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([1, 9, 100, 5000])}
    if k == 4:
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
    if k == 5:
        return {"type": "boolean"}
    if k == 6:
        return {"type": "string", "pattern": rng.choice(
            ["^[A-Z]{2}[0-9]{3}$", "^[a-z]+(-[a-z]+)?$", "^[0-9]{4}-[0-9]{2}$"]), "maxLength": 12}
    if k == 7:
        return {"type": "string", "format": rng.choice(["date", "time", "date-time", "uuid"])}
    if k == 8:
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                          {"type": "string", "maxLength": 8}]}
    if k == 9:
        return {"const": rng.choice(["v1", 7, True])}
    return {"type": ["string", "null"], "maxLength": 8}


def value(rng, depth):
    r = rng.random()
    if depth < 3 and r < 0.25:
        return obj(rng, depth + 1)
    if depth < 3 and r < 0.45:
        return {"type": "array", "items": value(rng, depth + 1),
                "minItems": rng.choice([0, 1]), "maxItems": rng.choice([2, 3, 4])}
    return scalar(rng, depth)


def obj(rng, depth):
    keys = rng.sample(WORDS, rng.randrange(1, 5 if depth == 0 else 4))
    props = {k: value(rng, depth) for k in keys}
    req = [k for k in keys if rng.random() < 0.75] or keys[:1]
    o = {"type": "object", "properties": props, "required": req}
    if rng.random() < 0.8:
        o["additionalProperties"] = False
    return o


def suite():
    rng = random.Random(20261206)
    out = []
    for i in range(100):
        s = obj(rng, 0)
        s["additionalProperties"] = False
        if i % 10 == 0:
            # $defs and $ref.
            s = {"$defs": {"item": obj(rng, 2)}, "type": "object",
                 "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"},
                                          "maxItems": 3},
                                "first": {"$ref": "#/$defs/item"}},
                 "required": ["items", "first"], "additionalProperties": False}
        if i % 10 == 5:
            s = {"oneOf": [obj(rng, 2), {"type": "object", "properties": {
                "error": {"type": "string", "maxLength": 20}}, "required": ["error"],
                "additionalProperties": False}]}
        out.append(s)
    refused = [
        {"type": "object", "if": {"type": "object"}, "then": {"required": ["a"]}},
        {"type": "string", "format": "made-up"},
        {"type": "object", "dependentRequired": {"a": ["b"]}},
        {"type": "object", "properties": {"a": {"$ref": "http://example.com/x.json"}}},
    ]
    return {"schemas": out, "refused": refused}


if __name__ == "__main__":
    with open(OUT, "w") as f:
        json.dump(suite(), f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(OUT)
