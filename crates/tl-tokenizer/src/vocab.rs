//! The vocabulary as read from GGUF metadata: token texts, scores, attributes,
//! special ids and the per-model switches. Ported from llama.cpp
//! `src/llama-vocab.cpp` (`llama_vocab::impl::load`), including its
//! text-based fix-ups of special tokens, because those change how text is
//! split and rendered.

use rustc_hash::FxHashMap;
use tl_gguf::{Array, Metadata};

use crate::error::{Result, TokenizerError};
use crate::pretok_regex::RegexSet;
use crate::TokenId;

/// Per-token attributes, bit for bit llama.cpp's `llama_token_attr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TokenAttr(pub u32);

impl TokenAttr {
    pub const UNDEFINED: TokenAttr = TokenAttr(0);
    pub const UNKNOWN: TokenAttr = TokenAttr(1 << 0);
    pub const UNUSED: TokenAttr = TokenAttr(1 << 1);
    pub const NORMAL: TokenAttr = TokenAttr(1 << 2);
    pub const CONTROL: TokenAttr = TokenAttr(1 << 3);
    pub const USER_DEFINED: TokenAttr = TokenAttr(1 << 4);
    pub const BYTE: TokenAttr = TokenAttr(1 << 5);
    pub const NORMALIZED: TokenAttr = TokenAttr(1 << 6);
    pub const LSTRIP: TokenAttr = TokenAttr(1 << 7);
    pub const RSTRIP: TokenAttr = TokenAttr(1 << 8);
    pub const SINGLE_WORD: TokenAttr = TokenAttr(1 << 9);

    /// Whether any bit of `other` is set.
    pub fn has(self, other: TokenAttr) -> bool {
        self.0 & other.0 != 0
    }

    fn with(self, other: TokenAttr) -> TokenAttr {
        TokenAttr(self.0 | other.0)
    }

    /// From a GGUF `tokenizer.ggml.token_type` value (llama.cpp `llama_token_type`).
    fn from_gguf_type(t: i64) -> TokenAttr {
        match t {
            1 => TokenAttr::NORMAL,
            2 => TokenAttr::UNKNOWN,
            3 => TokenAttr::CONTROL,
            4 => TokenAttr::USER_DEFINED,
            5 => TokenAttr::UNUSED,
            6 => TokenAttr::BYTE,
            _ => TokenAttr::UNDEFINED,
        }
    }
}

/// Which tokenization algorithm the vocabulary uses (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// `llama`: SentencePiece-style merges by score with byte fallback.
    Spm,
    /// `gpt2`: byte-level BPE merges by rank after a regex-like pre-split.
    Bpe,
    /// `bert`: WordPiece, the longest vocabulary piece first (BERT-family
    /// embedding models).
    Wpm,
    /// `t5`: Unigram, the best segmentation by token scores after
    /// SentencePiece's normalization.
    Ugm,
}

/// How BPE text is split into words before merging (`tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp `LLAMA_VOCAB_PRE_TYPE_DEFAULT`: four regexes in sequence.
    Default,
    /// GPT-2's regex.
    Gpt2,
    /// Llama 3's regex (digits in groups of up to three).
    Llama3,
    /// Qwen 2's regex (digits one by one).
    Qwen2,
    /// Qwen 3.5's: Qwen 2's with combining marks in letter runs.
    Qwen35,
    /// Kimi K2's: Han runs apart from the other letters.
    KimiK2,
    /// A set of expressions run through the general regex path.
    Regex(RegexSet),
}

/// What a `tokenizer.ggml.pre` name sets, as llama.cpp's vocabulary loader
/// sets it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PreInfo {
    pub pre: PreTokenizer,
    pub clean_spaces: bool,
    pub ignore_merges: bool,
    /// `Some` where the name forces BOS on or off by default.
    pub add_bos: Option<bool>,
    /// The model's default BOS id is cleared (ChatGLM/GLM-4).
    pub no_bos: bool,
    /// Words are merged as GPT-2 byte-encoded text (false: raw UTF-8, with
    /// `<0xXX>` byte tokens as the fallback).
    pub byte_encode: bool,
    /// Spaces become U+2581 before splitting, and back when decoding.
    pub escape_whitespaces: bool,
    /// BOS is added even where `tokenizer.ggml.add_bos_token` is false.
    pub force_bos: bool,
}

/// The names whose BPE runs on raw UTF-8 rather than GPT-2's byte encoding
/// (llama.cpp's `byte_encode = false`): (name, set, escape_whitespaces,
/// clean_spaces, BOS always added — llama.cpp's Gemma 4 override of
/// `add_bos_token`).
const PRE_RAW: &[(&str, RegexSet, bool, bool, bool)] = &[
    ("gemma4", RegexSet::Gemma4, true, true, true),
    (
        "granite-embed-multi-311m",
        RegexSet::Gemma4,
        true,
        true,
        true,
    ),
    ("sarvam-moe", RegexSet::Gemma4, true, false, false),
    ("whitespace", RegexSet::Whitespace, false, true, false),
];

/// (name, type, clean_spaces, ignore_merges, add_bos, no default BOS).
type PreEntry = (&'static str, PreTokenizer, bool, bool, Option<bool>, bool);

/// Every `tokenizer.ggml.pre` name llama.cpp accepts that tl runs, with its
/// type and switches.
#[rustfmt::skip]
const PRE_NAMES: &[PreEntry] = {
    use PreTokenizer::*;
    use RegexSet as R;
    &[
        ("default", Default, true, false, None, false),
        ("minicpm5", Regex(R::Minicpm5), true, true, None, false),
        ("llama3", Llama3, true, true, Some(true), false),
        ("llama-v3", Llama3, true, true, Some(true), false),
        ("llama-bpe", Llama3, true, true, Some(true), false),
        ("falcon3", Llama3, true, true, Some(true), false),
        ("falcon-h1", Llama3, true, true, Some(true), false),
        ("pixtral", Llama3, true, true, Some(true), false),
        ("midm-2.0", Llama3, true, true, Some(true), false),
        ("lfm2", Llama3, true, true, Some(true), false),
        ("jina-v5-nano", Llama3, true, true, Some(true), false),
        ("deepseek-llm", Regex(R::DeepseekLlm), false, false, None, false),
        ("deepseek-coder", Regex(R::DeepseekCoder), false, false, None, false),
        ("deepseek-v3", Regex(R::Deepseek3), false, false, None, false),
        ("spark2_5", Regex(R::Spark25), false, false, None, false),
        ("youtu", Regex(R::Youtu), false, true, None, false),
        ("falcon", Regex(R::Falcon), true, false, None, false),
        ("mpt", Gpt2, true, false, None, false),
        ("starcoder", Regex(R::Starcoder), true, false, None, false),
        ("gpt-2", Gpt2, true, false, None, false),
        ("phi-2", Gpt2, true, false, None, false),
        ("jina-es", Gpt2, true, false, None, false),
        ("jina-de", Gpt2, true, false, None, false),
        ("gigachat", Gpt2, true, false, None, false),
        ("jina-v2-es", Gpt2, true, false, None, false),
        ("jina-v2-de", Gpt2, true, false, None, false),
        ("a.x-4.0", Gpt2, true, false, None, false),
        ("mellum", Gpt2, true, false, None, false),
        ("modern-bert", Gpt2, true, false, None, false),
        ("jais-2", Regex(R::Jais2), true, false, None, false),
        ("roberta-bpe", Gpt2, true, false, None, false),
        // llama.cpp sets `add_sep` for these, which only its reranking
        // prompt reads; tokenizing is GPT-2's.
        ("jina-v1-en", Gpt2, true, false, None, false),
        ("jina-v2-code", Gpt2, true, false, None, false),
        ("refact", Regex(R::Starcoder), true, false, None, false),
        ("command-r", Regex(R::Starcoder), false, false, None, false),
        ("qwen2", Qwen2, false, false, None, false),
        ("qwen35", Qwen35, false, false, None, false),
        ("kimi-k2", KimiK2, false, false, None, false),
        ("deepseek-r1-qwen", Qwen2, false, false, None, false),
        ("kormo", Qwen2, false, false, None, false),
        ("f2llmv2", Qwen2, false, false, None, false),
        ("stablelm2", Qwen2, true, false, None, false),
        ("olmo", Gpt2, true, false, None, false),
        ("dbrx", Llama3, true, false, None, false),
        ("smaug-bpe", Llama3, true, false, None, false),
        ("poro-chat", Regex(R::Poro), false, false, None, false),
        ("chatglm-bpe", Llama3, true, false, None, true),
        ("glm4", Llama3, true, true, None, true),
        ("glm5", Llama3, true, true, None, true),
        ("viking", Regex(R::Viking), false, false, None, false),
        ("jais", Gpt2, true, false, None, false),
        ("tekken", Regex(R::Tekken), false, true, Some(true), false),
        ("smollm", Regex(R::Starcoder), false, false, None, false),
        ("codeshell", Regex(R::Starcoder), true, false, None, false),
        ("bloom", Regex(R::Poro), true, false, None, false),
        ("gpt3-finnish", Regex(R::Poro), true, false, None, false),
        ("exaone", Regex(R::Starcoder), true, false, None, false),
        ("exaone4", Gpt2, true, false, None, false),
        ("exaone-moe", Regex(R::ExaoneMoe), true, false, None, false),
        ("chameleon", Regex(R::Chameleon), false, false, Some(true), false),
        ("minerva-7b", Regex(R::Starcoder), true, false, None, false),
        ("megrez", Qwen2, true, false, None, false),
        ("gpt-4o", Regex(R::Gpt4o), false, false, None, false),
        ("llama4", Regex(R::Gpt4o), false, false, None, false),
        ("kanana2", Regex(R::Gpt4o), false, false, None, false),
        ("talkie", Regex(R::Gpt4o), false, false, None, false),
        ("granite-embed-multi-97m", Regex(R::GraniteEmbMulti), false, true, None, false),
        ("superbpe", Regex(R::Superbpe), false, false, None, false),
        ("trillion", Gpt2, false, false, None, false),
        ("granite-docling", Gpt2, false, false, None, false),
        ("bailingmoe", Regex(R::Bailingmoe), false, false, None, false),
        ("bailingmoe2", Regex(R::Bailingmoe), false, false, None, false),
        ("llada-moe", Regex(R::Bailingmoe), false, false, None, false),
        ("seed-coder", Regex(R::SeedCoder), false, false, None, false),
        ("hunyuan", Qwen2, false, false, None, false),
        ("hunyuan-dense", Regex(R::Deepseek3), false, false, None, false),
        ("hy_v4", Regex(R::Deepseek3), false, false, None, false),
        ("joyai-llm", Regex(R::Deepseek3), false, false, None, false),
        ("ufakzeka", Regex(R::Ufakzeka), false, false, None, false),
        ("grok-2", Qwen2, false, false, None, false),
        ("laguna", Regex(R::Laguna), false, false, None, false),
        ("minimax-m2", Regex(R::Gpt4o), false, false, None, false),
        ("solar-open", Qwen2, false, false, None, false),
        ("mellum2", Regex(R::Starcoder), true, false, None, false),
        ("tiny_aya", Regex(R::TinyAya), false, false, None, false),
        ("cohere2moe", Regex(R::TinyAya), false, false, None, false),
        ("afmoe", Regex(R::Afmoe), false, false, None, false),
    ]
};

/// Names llama.cpp accepts that tl does not run yet, with what is missing.
const PRE_UNSUPPORTED: &[(&str, &str)] = &[];

impl PreTokenizer {
    /// Every name tl runs (for error messages and docs).
    pub fn known_names() -> Vec<&'static str> {
        PRE_NAMES
            .iter()
            .map(|e| e.0)
            .chain(PRE_RAW.iter().map(|e| e.0))
            .collect()
    }

    /// Names llama.cpp knows that tl does not run yet, with the reason.
    pub fn unsupported_names() -> &'static [(&'static str, &'static str)] {
        PRE_UNSUPPORTED
    }

    /// The llama.cpp name → type table. An empty name falls back to
    /// `default`, as in llama.cpp (the caller warns).
    pub(crate) fn from_name(name: &str) -> Result<PreInfo> {
        let name = if name.is_empty() { "default" } else { name };
        if let Some(&(_, pre, clean_spaces, ignore_merges, add_bos, no_bos)) =
            PRE_NAMES.iter().find(|e| e.0 == name)
        {
            if let PreTokenizer::Regex(set) = pre {
                crate::pretok_regex::compiled(set).map_err(|e| bad(KEY_PRE, e))?;
            }
            return Ok(PreInfo {
                pre,
                clean_spaces,
                ignore_merges,
                add_bos,
                no_bos,
                byte_encode: true,
                escape_whitespaces: false,
                force_bos: false,
            });
        }
        if let Some(&(_, set, escape_whitespaces, clean_spaces, force_bos)) =
            PRE_RAW.iter().find(|e| e.0 == name)
        {
            crate::pretok_regex::compiled(set).map_err(|e| bad(KEY_PRE, e))?;
            return Ok(PreInfo {
                pre: PreTokenizer::Regex(set),
                clean_spaces,
                ignore_merges: false,
                add_bos: None,
                no_bos: false,
                byte_encode: false,
                escape_whitespaces,
                force_bos,
            });
        }
        if let Some((_, why)) = PRE_UNSUPPORTED.iter().find(|e| e.0 == name) {
            return Err(bad(
                KEY_PRE,
                format!("pre-tokenizer '{name}' is not supported by tl yet: {why}"),
            ));
        }
        Err(TokenizerError::UnknownPreTokenizer(name.to_string()))
    }
}

/// Special token ids; `None` where the model has none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub eot: Option<TokenId>,
    pub eom: Option<TokenId>,
    pub unk: Option<TokenId>,
    pub sep: Option<TokenId>,
    pub pad: Option<TokenId>,
    pub mask: Option<TokenId>,
    pub fim_pre: Option<TokenId>,
    pub fim_suf: Option<TokenId>,
    pub fim_mid: Option<TokenId>,
    pub fim_pad: Option<TokenId>,
    pub fim_rep: Option<TokenId>,
    pub fim_sep: Option<TokenId>,
}

/// The vocabulary and the switches that steer encoding and decoding.
#[derive(Clone, Debug)]
pub struct Vocab {
    pub(crate) kind: VocabKind,
    pub(crate) pre: PreTokenizer,
    pub(crate) texts: Vec<String>,
    pub(crate) scores: Vec<f32>,
    pub(crate) attrs: Vec<TokenAttr>,
    pub(crate) text_to_id: FxHashMap<String, TokenId>,
    /// BPE merges as (left, right) → rank; first occurrence wins, as with
    /// llama.cpp's `bpe_ranks.emplace`.
    pub(crate) merges: Vec<(String, String)>,
    pub(crate) special: SpecialTokens,
    /// End-of-generation ids, sorted.
    pub(crate) eog: Vec<TokenId>,
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
    pub(crate) add_space_prefix: bool,
    pub(crate) clean_spaces: bool,
    pub(crate) ignore_merges: bool,
    /// BPE: words are GPT-2 byte-encoded before merging (false for the
    /// SPM-style BPE of Gemma 4, Sarvam and jina-v2-zh).
    pub(crate) byte_encode: bool,
    /// BPE: spaces are U+2581 in the token texts (`escape_whitespaces`).
    pub(crate) escape_whitespaces: bool,
    /// BPE: the `whitespace` tokenizer model (jina-v2-zh): whitespace is
    /// dropped and the runs between are merged, lowercased when
    /// `tokenizer.ggml.normalizer.lowercase` says so.
    pub(crate) whitespace_session: bool,
    /// WPM: lowercase the input (`tokenizer.ggml.normalizer.lowercase`,
    /// default true as in llama.cpp).
    pub(crate) lowercase: bool,
    /// WPM: strip accents (`tokenizer.ggml.normalizer.strip_accents`,
    /// default: as `lowercase`).
    pub(crate) strip_accents: bool,
    /// The longest token text, in bytes (WPM's longest-match bound).
    pub(crate) max_token_len: usize,
    /// UGM: collapse runs of spaces (`tokenizer.ggml.remove_extra_whitespaces`).
    pub(crate) remove_extra_whitespaces: bool,
    /// UGM: SentencePiece's compiled normalization rules
    /// (`tokenizer.ggml.precompiled_charsmap`).
    pub(crate) charsmap: Option<Vec<u8>>,
    /// Ids whose text is split out of the input before tokenizing (control,
    /// user-defined and unknown), longest text first.
    pub(crate) special_cache: Vec<TokenId>,
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

fn bad(key: &'static str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::BadMetadata {
        key,
        reason: reason.into(),
    }
}

impl Vocab {
    /// Reads the vocabulary from GGUF metadata.
    pub fn from_metadata(md: &Metadata) -> Result<Vocab> {
        let model = md.get_str(KEY_MODEL)?;
        let pre_name = md.opt_str(KEY_PRE)?.unwrap_or("");

        let texts_raw = md
            .get_array(KEY_TOKENS)?
            .as_strings()
            .ok_or_else(|| bad(KEY_TOKENS, "expected an array of strings"))?;
        let n = texts_raw.len();
        if n == 0 {
            return Err(bad(KEY_TOKENS, "the vocabulary is empty"));
        }
        if u32::try_from(n).is_err() {
            return Err(bad(KEY_TOKENS, format!("{n} tokens do not fit 32-bit ids")));
        }

        let mut v = Vocab {
            kind: VocabKind::Spm,
            pre: PreTokenizer::Default,
            texts: Vec::with_capacity(n),
            scores: vec![0.0; n],
            attrs: vec![TokenAttr::NORMAL; n],
            text_to_id: FxHashMap::default(),
            merges: Vec::new(),
            special: SpecialTokens::default(),
            eog: Vec::new(),
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
            clean_spaces: false,
            ignore_merges: false,
            byte_encode: true,
            escape_whitespaces: false,
            whitespace_session: false,
            lowercase: false,
            strip_accents: false,
            max_token_len: 0,
            remove_extra_whitespaces: false,
            charsmap: None,
            special_cache: Vec::new(),
        };

        // Defaults per model type, then the pre-tokenizer switches.
        let mut force_bos = false;
        let (bos, eos, unk): (i64, i64, i64) = match model {
            "llama" => {
                v.kind = VocabKind::Spm;
                v.add_space_prefix = true;
                v.add_bos = true;
                (1, 2, 0)
            }
            // `gemma4` is BPE with SPM-style texts; llama.cpp forces its
            // pre-tokenizer name and takes the special ids from the file only.
            "gpt2" | "gemma4" | "whitespace" => {
                v.kind = VocabKind::Bpe;
                v.whitespace_session = model == "whitespace";
                let pre_name = if model == "gemma4" {
                    "gemma4"
                } else {
                    pre_name
                };
                if pre_name.is_empty() {
                    eprintln!(
                        "tl: warning: the GGUF has no tokenizer.ggml.pre; using the 'default' \
                         pre-tokenizer as llama.cpp does (generation quality may suffer)"
                    );
                }
                let info = PreTokenizer::from_name(pre_name)?;
                v.pre = info.pre;
                v.clean_spaces = info.clean_spaces;
                v.ignore_merges = info.ignore_merges;
                v.byte_encode = info.byte_encode;
                v.escape_whitespaces = info.escape_whitespaces;
                force_bos = info.force_bos;
                if let Some(b) = info.add_bos {
                    v.add_bos = b;
                }

                let merges = md
                    .get_array(KEY_MERGES)?
                    .as_strings()
                    .ok_or_else(|| bad(KEY_MERGES, "expected an array of strings"))?;
                v.merges = merges
                    .iter()
                    // C strings in llama.cpp: a merge ends at a NUL.
                    .map(|m| m.split('\0').next().unwrap_or_default())
                    .map(|m| {
                        // llama.cpp splits at the first space after the first byte.
                        let space = m.as_bytes().iter().skip(1).position(|&b| b == b' ');
                        match space {
                            // The space is ASCII, so both sides are on character boundaries.
                            Some(p) => (m[..p + 1].to_string(), m[p + 2..].to_string()),
                            None => (String::new(), String::new()),
                        }
                    })
                    .collect();
                if model == "gemma4" {
                    (-1, -1, -1)
                } else {
                    (if info.no_bos { -1 } else { 11 }, 11, -1)
                }
            }
            // llama.cpp: [CLS] 101 as BOS, no EOS, [UNK] 100, [SEP] 102,
            // [PAD] 0, [MASK] 103; BOS added, SEP appended.
            "bert" => {
                v.kind = VocabKind::Wpm;
                v.add_bos = true;
                v.clean_spaces = true;
                (101, -1, 100)
            }
            // llama.cpp: no BOS, </s> 1 as EOS (appended), <unk> 2, <pad> 0.
            "t5" => {
                v.kind = VocabKind::Ugm;
                v.add_space_prefix = true;
                v.add_eos = true;
                v.remove_extra_whitespaces = md
                    .opt_bool("tokenizer.ggml.remove_extra_whitespaces")?
                    .unwrap_or(false);
                v.charsmap = match md.opt_array("tokenizer.ggml.precompiled_charsmap")? {
                    None => None,
                    Some(Array::U8(b)) => Some(b.clone()),
                    Some(Array::I8(b)) => Some(b.iter().map(|&x| x as u8).collect()),
                    Some(_) => {
                        return Err(bad(
                            "tokenizer.ggml.precompiled_charsmap",
                            "expected an array of u8 or i8",
                        ))
                    }
                };
                (-1, 1, 2)
            }
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        };
        if let Some(b) = md.opt_bool("tokenizer.ggml.add_space_prefix")? {
            v.add_space_prefix = b;
        }

        let scores = md.opt_array(KEY_SCORES)?;
        if let Some(a) = scores {
            if a.len() < n {
                return Err(bad(
                    KEY_SCORES,
                    format!("{} scores for {n} tokens", a.len()),
                ));
            }
            match a {
                Array::F32(s) => v.scores.copy_from_slice(&s[..n]),
                Array::I32(s) => {
                    for (d, &x) in v.scores.iter_mut().zip(s) {
                        *d = x as f32;
                    }
                }
                _ => return Err(bad(KEY_SCORES, "expected an array of f32 or i32")),
            }
        }
        if let Some(a) = md.opt_array(KEY_TYPES)? {
            if a.len() < n {
                return Err(bad(
                    KEY_TYPES,
                    format!("{} token types for {n} tokens", a.len()),
                ));
            }
            let types = match a {
                Array::I32(t) => t,
                _ => return Err(bad(KEY_TYPES, "expected an array of i32")),
            };
            for (d, &t) in v.attrs.iter_mut().zip(types) {
                *d = TokenAttr::from_gguf_type(i64::from(t));
            }
        }

        // llama.cpp's default is true; the `whitespace` pre-tokenizer turns it
        // off unless the file says otherwise.
        v.lowercase = md
            .opt_bool("tokenizer.ggml.normalizer.lowercase")?
            .unwrap_or(v.pre != PreTokenizer::Regex(RegexSet::Whitespace));
        v.strip_accents = md
            .opt_bool("tokenizer.ggml.normalizer.strip_accents")?
            .unwrap_or(v.lowercase);

        v.text_to_id.reserve(n);
        for (i, t) in texts_raw.iter().enumerate() {
            // llama.cpp reads the text as a C string: it ends at a NUL.
            let t = t.split('\0').next().unwrap_or_default();
            let text = if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.to_string()
            };
            // Later duplicates win, as with llama.cpp's `token_to_id[word] = i`.
            v.max_token_len = v.max_token_len.max(text.len());
            v.text_to_id.insert(text.clone(), i as TokenId);
            v.texts.push(text);
        }

        // Special ids: model defaults (dropped when out of range), then metadata.
        let in_range = |id: i64| -> Option<TokenId> {
            if id >= 0 && (id as u64) < n as u64 {
                Some(id as TokenId)
            } else {
                None
            }
        };
        let read = |key: &str, default: Option<TokenId>| -> Result<Option<TokenId>> {
            match md.get(key).and_then(|val| val.as_i64()) {
                Some(id) if id >= 0 => Ok(in_range(id).or(default)),
                _ => Ok(default),
            }
        };
        let s = &mut v.special;
        s.bos = read("tokenizer.ggml.bos_token_id", in_range(bos))?;
        s.eos = read("tokenizer.ggml.eos_token_id", in_range(eos))?;
        s.eot = read("tokenizer.ggml.eot_token_id", None)?;
        s.eom = read("tokenizer.ggml.eom_token_id", None)?;
        s.unk = read("tokenizer.ggml.unknown_token_id", in_range(unk))?;
        let wpm = v.kind == VocabKind::Wpm;
        s.sep = read(
            "tokenizer.ggml.seperator_token_id",
            if wpm { in_range(102) } else { None },
        )?;
        s.pad = read(
            "tokenizer.ggml.padding_token_id",
            if wpm || v.kind == VocabKind::Ugm {
                in_range(0)
            } else {
                None
            },
        )?;
        s.mask = read(
            "tokenizer.ggml.mask_token_id",
            if wpm { in_range(103) } else { None },
        )?;
        s.fim_pre = read("tokenizer.ggml.fim_pre_token_id", None)?;
        s.fim_suf = read("tokenizer.ggml.fim_suf_token_id", None)?;
        s.fim_mid = read("tokenizer.ggml.fim_mid_token_id", None)?;
        s.fim_pad = read("tokenizer.ggml.fim_pad_token_id", None)?;
        s.fim_rep = read("tokenizer.ggml.fim_rep_token_id", None)?;
        s.fim_sep = read("tokenizer.ggml.fim_sep_token_id", None)?;
        s.fim_pre = read("tokenizer.ggml.prefix_token_id", s.fim_pre)?;
        s.fim_suf = read("tokenizer.ggml.suffix_token_id", s.fim_suf)?;
        s.fim_mid = read("tokenizer.ggml.middle_token_id", s.fim_mid)?;

        if let Some(b) = md.opt_bool("tokenizer.ggml.add_bos_token")? {
            v.add_bos = b;
        }
        if let Some(b) = md.opt_bool("tokenizer.ggml.add_eos_token")? {
            v.add_eos = b;
        }
        if force_bos {
            v.add_bos = true;
        }

        v.fix_up_special_tokens();
        v.build_special_cache();
        Ok(v)
    }

    /// llama.cpp finds EOT/FIM/EOG tokens by their text and forces them to
    /// CONTROL. It walks an `unordered_map`, so where several texts match
    /// (Qwen has both `<|im_end|>` and `<|endoftext|>`) its pick depends on
    /// hashing; here the first text in llama.cpp's list wins, which is what
    /// llama.cpp reports for the models in the fixtures.
    fn fix_up_special_tokens(&mut self) {
        const EOT: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ];
        const EOM: &[&str] = &["<|eom_id|>"];
        const FIM_PRE: &[&str] = &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ];
        const FIM_SUF: &[&str] = &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ];
        const FIM_MID: &[&str] = &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ];
        const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
        const FIM_REP: &[&str] = &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ];
        const FIM_SEP: &[&str] = &["<|file_sep|>"];
        const EOG: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|flush|>",
            "<|calls|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "[EOS]",
            "<|end_of_text|>",
            "<end_of_utterance>",
            "<eos>",
            "<turn|>",
            "<|tool_response>",
            "<｜end▁of▁sentence｜>",
            "[e~[",
        ];

        let lookup = |texts: &[&str], map: &FxHashMap<String, TokenId>| {
            texts.iter().find_map(|t| map.get(*t).copied())
        };
        let mut force_control = Vec::new();
        let s = &mut self.special;
        for (slot, list) in [
            (&mut s.eot, EOT),
            (&mut s.eom, EOM),
            (&mut s.fim_pre, FIM_PRE),
            (&mut s.fim_suf, FIM_SUF),
            (&mut s.fim_mid, FIM_MID),
            (&mut s.fim_pad, FIM_PAD),
            (&mut s.fim_rep, FIM_REP),
            (&mut s.fim_sep, FIM_SEP),
        ] {
            if slot.is_none() {
                if let Some(id) = lookup(list, &self.text_to_id) {
                    *slot = Some(id);
                    force_control.push(id);
                }
            }
        }
        for id in force_control {
            self.attrs[id as usize] = self.attrs[id as usize].with(TokenAttr::CONTROL);
        }

        // Control tokens whose text says "unused" are marked unused.
        for (text, &id) in &self.text_to_id {
            let a = &mut self.attrs[id as usize];
            if a.has(TokenAttr::CONTROL) && text.contains("unused") {
                *a = a.with(TokenAttr::UNUSED);
            }
        }

        let mut eog: Vec<TokenId> = [
            self.special.fim_pad,
            self.special.fim_rep,
            self.special.fim_sep,
        ]
        .into_iter()
        .flatten()
        .collect();
        for t in EOG {
            if let Some(&id) = self.text_to_id.get(*t) {
                eog.push(id);
                self.attrs[id as usize] = self.attrs[id as usize].with(TokenAttr::CONTROL);
            }
        }
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = self.text_to_id.get(t) {
                self.attrs[id as usize] = TokenAttr::USER_DEFINED;
            }
        }
        eog.extend(
            [self.special.eos, self.special.eot, self.special.eom]
                .into_iter()
                .flatten(),
        );
        eog.sort_unstable();
        eog.dedup();

        // With <|return|> and <|call|> (or <|calls|> and <|flush|>), <|end|> is not EOG.
        let has = |eog: &[TokenId], t: &str| eog.iter().any(|&id| self.texts[id as usize] == t);
        let has_call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
        if has(&eog, "<|end|>") && has_call && (has(&eog, "<|return|>") || has(&eog, "<|flush|>")) {
            if let Some(pos) = eog
                .iter()
                .position(|&id| self.texts[id as usize] == "<|end|>")
            {
                let id = eog.remove(pos);
                self.attrs[id as usize] = TokenAttr::USER_DEFINED;
            }
        }
        // Where </s> is an ordinary token (gemma4, plamo), it is not EOG.
        if has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>") {
            if let Some(pos) = eog.iter().position(|&id| self.texts[id as usize] == "</s>") {
                let id = eog.remove(pos);
                self.attrs[id as usize] = TokenAttr::NORMAL;
            }
        }
        self.eog = eog;
    }

    fn build_special_cache(&mut self) {
        let mask =
            TokenAttr(TokenAttr::CONTROL.0 | TokenAttr::USER_DEFINED.0 | TokenAttr::UNKNOWN.0);
        let mut cache: Vec<TokenId> = (0..self.texts.len() as TokenId)
            .filter(|&id| self.attrs[id as usize].has(mask))
            .collect();
        // llama.cpp sorts by length only (std::sort, unstable); ties keep id order here.
        cache.sort_by(|&a, &b| {
            self.texts[b as usize]
                .len()
                .cmp(&self.texts[a as usize].len())
        });
        self.special_cache = cache;
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Always false for a loaded vocabulary (loading refuses an empty one).
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// The pre-tokenizer (meaningful for BPE vocabularies).
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Token ids that end generation, sorted.
    pub fn eog_ids(&self) -> &[TokenId] {
        &self.eog
    }

    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether encoding with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether encoding with `add_special` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The stored text of a token (with `▁` or GPT-2 byte characters as in the file).
    pub fn text(&self, id: TokenId) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    pub fn score(&self, id: TokenId) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    pub fn attr(&self, id: TokenId) -> Option<TokenAttr> {
        self.attrs.get(id as usize).copied()
    }

    /// The id of a token with exactly this stored text.
    pub fn id_of(&self, text: &str) -> Option<TokenId> {
        self.text_to_id.get(text).copied()
    }

    /// The id for a raw byte in SPM vocabularies (llama.cpp `byte_to_token`):
    /// `<0xXX>`, else the byte itself as a one-character token.
    pub(crate) fn spm_byte_token(&self, byte: u8) -> Result<TokenId> {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let name = [
            b'<',
            b'0',
            b'x',
            HEX[(byte >> 4) as usize],
            HEX[(byte & 15) as usize],
            b'>',
        ];
        let name = std::str::from_utf8(&name).unwrap_or_default();
        if let Some(&id) = self.text_to_id.get(name) {
            return Ok(id);
        }
        let mut buf = [0u8; 4];
        let single = if byte < 0x80 {
            Some(char::from(byte).encode_utf8(&mut buf) as &str)
        } else {
            None
        };
        single
            .and_then(|s| self.text_to_id.get(s).copied())
            .ok_or(TokenizerError::NoByteToken { byte })
    }
}
