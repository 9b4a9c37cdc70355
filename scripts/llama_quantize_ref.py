"""llama.cpp's quantizer as the reference for `tl quantize`, shared by
make_quantize_fixtures.py and quant_quality.py: llama-cpp-python's
`llama_model_quantize` (the llama.cpp that llama-cpp-python 0.3.36 vendors),
driven with llama-quantize's flags, and a file hash.

llama_cpp is imported on first use, so scripts that only render results run
without the reference environment.
"""
import ctypes
import hashlib

# llama_ftype numbers (llama.h) of the file types `tl quantize` writes.
FTYPES = {
    "F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8,
    "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30, "IQ3_S": 26, "IQ3_M": 27, "MXFP4_MOE": 38,
    "TQ1_0": 36, "TQ2_0": 37,
}
# The file types whose mixes need an importance matrix (IQ3_XXS, IQ2_*,
# IQ1_* tensors), run only with one.
FTYPES_IMATRIX = {
    "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_XS": 22, "IQ2_XXS": 19, "IQ2_XS": 20,
    "IQ2_S": 28, "IQ2_M": 29, "IQ1_S": 24, "IQ1_M": 31,
}
# ggml_type numbers for the type flags.
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20,
              "IQ4_XS": 23, "BF16": 30, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18,
              "IQ1_S": 19, "IQ3_S": 21, "IQ2_S": 22, "IQ1_M": 29, "TQ1_0": 34, "TQ2_0": 35}

GGML_TYPE_COUNT = 43


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reference_quantize(inp, out, ftype, flags=()):
    """llama_model_quantize(inp -> out) for a file type name and
    llama-quantize-style flags; exits on failure."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = FTYPES[ftype]
    overrides = []
    it = iter(flags)
    for f in it:
        if f == "--pure":
            p.pure = True
        elif f == "--leave-output-tensor":
            p.quantize_output_tensor = False
        elif f == "--allow-requantize":
            p.allow_requantize = True
        elif f == "--output-tensor-type":
            p.output_tensor_type = GGML_TYPES[next(it)]
        elif f == "--token-embedding-type":
            p.token_embedding_type = GGML_TYPES[next(it)]
        elif f == "--tensor-type":
            # llama-quantize's parse_tensor_type: the pattern is lower-cased.
            pat, ty = next(it).split("=", 1)
            overrides.append((pat.lower().encode(), GGML_TYPES[ty.upper()]))
        else:
            raise SystemExit(f"unknown flag {f}")
    if overrides:
        # llama-quantize's array: the patterns, then a terminator.
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pat, ty) in enumerate(overrides):
            arr[i].pattern = pat
            arr[i].type = ty
        arr[len(overrides)].pattern = None
        arr[len(overrides)].type = GGML_TYPE_COUNT
        p.tt_overrides = arr
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({inp}, {ftype}, {list(flags)}) failed: {rc}")


def reference_version():
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__} llama_model_quantize"
