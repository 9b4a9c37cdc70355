//! The pre-tokenizers llama.cpp runs through its general regex path
//! (`unicode_regex_split` falling back to `std::regex`), for the
//! `tokenizer.ggml.pre` names whose expressions have no hand-written
//! splitter.
//!
//! llama.cpp runs each expression of a set in turn over the pieces the
//! previous one left, with "isolated" behaviour (matches and the text
//! between them both become pieces). An expression that uses a Unicode
//! category (`\p{L}`, `\p{N}`, `\p{P}`, `\p{M}`, `\p{S}`, `\p{Lu}`…) runs on a
//! *collapsed* text where every non-ASCII code point is one marker standing
//! for its category (whitespace becomes U+000B) and each `\p{X}` becomes
//! "the marker or the ASCII members of X"; the others run on the code points
//! with non-ASCII whitespace replaced by U+000B. The regexes are ECMAScript
//! (backtracking, ordered alternation, lookahead); `fancy-regex` has the same
//! semantics for the constructs these sets use, so the expressions are
//! rewritten from llama.cpp's dialect to its syntax here (`\d`, `\w` made
//! ASCII as `std::regex` has them in the C locale) and run on a string
//! where each marker is the code point of its byte value.

use std::sync::OnceLock;

use fancy_regex::Regex;

use crate::pretok;
use crate::unicode::{flags, ACCENT_MARK, LETTER, NUMBER, PUNCTUATION, SYMBOL};

/// One stage of a set: a hand-written splitter (bit-identical to the regex
/// it stands for in llama.cpp) or a general expression.
#[derive(Clone, Copy)]
pub(crate) enum Stage {
    Gpt2,
    Qwen2,
    Newlines,
    /// llama.cpp `unicode_regex_split_custom_afmoe` (`\p{AFMoE_digits}`,
    /// and tiny_aya's `\d{1,3}(?=(?:\d{3})*\b)`).
    AfmoeDigits,
    Re(&'static str),
}

const GPT2: Stage = Stage::Gpt2;
const QWEN2: Stage = Stage::Qwen2;

/// The regex sets (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` whose expressions
/// are not all hand-written).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegexSet {
    Falcon,
    Starcoder,
    DeepseekLlm,
    DeepseekCoder,
    Deepseek3,
    Spark25,
    Youtu,
    Jais2,
    Poro,
    Viking,
    Tekken,
    Chameleon,
    Gpt4o,
    GraniteEmbMulti,
    Superbpe,
    Bailingmoe,
    SeedCoder,
    Ufakzeka,
    Laguna,
    ExaoneMoe,
    Minicpm5,
    TinyAya,
    Afmoe,
    /// Gemma 4 / Sarvam: SPM-style BPE over the whole line (`[^\n]+|[\n]+`).
    Gemma4,
    /// jina-v2-zh's `\S+` (the whitespace between runs is its own word).
    Whitespace,
}

/// Every set, in declaration order.
const ALL: [RegexSet; 25] = [
    RegexSet::Falcon,
    RegexSet::Starcoder,
    RegexSet::DeepseekLlm,
    RegexSet::DeepseekCoder,
    RegexSet::Deepseek3,
    RegexSet::Spark25,
    RegexSet::Youtu,
    RegexSet::Jais2,
    RegexSet::Poro,
    RegexSet::Viking,
    RegexSet::Tekken,
    RegexSet::Chameleon,
    RegexSet::Gpt4o,
    RegexSet::GraniteEmbMulti,
    RegexSet::Superbpe,
    RegexSet::Bailingmoe,
    RegexSet::SeedCoder,
    RegexSet::Ufakzeka,
    RegexSet::Laguna,
    RegexSet::ExaoneMoe,
    RegexSet::Minicpm5,
    RegexSet::TinyAya,
    RegexSet::Afmoe,
    RegexSet::Gemma4,
    RegexSet::Whitespace,
];

impl RegexSet {
    /// The stages, as llama.cpp's `llm_tokenizer_bpe` lists the expressions.
    pub(crate) fn stages(self) -> Vec<Stage> {
        use RegexSet::*;
        let deepseek3_main = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
        match self {
            Falcon => vec![Stage::Re("[\\p{P}\\$\\+<=>\\^~\\|`]+"), GPT2, Stage::Re("[0-9][0-9][0-9]")],
            Starcoder => vec![Stage::Re("\\p{N}"), GPT2],
            DeepseekLlm => vec![
                Stage::Re("[\r\n]"),
                Stage::Re("\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+"),
                Stage::Re("\\s?[!-/:-~！-／：-～‘-‟　-。]+"),
                Stage::Re("\\s+$"),
                Stage::Re("[一-龥ࠀ-一가-퟿]+"),
                Stage::Re("\\p{N}+"),
            ],
            DeepseekCoder => vec![
                Stage::Re("[\r\n]"),
                Stage::Re("\\s?\\p{L}+"),
                Stage::Re("\\s?\\p{P}+"),
                Stage::Re("[一-龥ࠀ-一가-퟿]+"),
                Stage::Re("\\p{N}"),
            ],
            Deepseek3 => vec![
                Stage::Re("\\p{N}{1,3}"),
                Stage::Re("[一-龥぀-ゟ゠-ヿ]+"),
                Stage::Re(deepseek3_main),
            ],
            Spark25 => vec![
                Stage::Re("\\p{N}{1,3}"),
                Stage::Re("[一-龥぀-ゟ゠-ヿ]+"),
                Stage::Re("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+"),
                Stage::Re("\\p{N}"),
            ],
            Youtu => vec![
                Stage::Re("[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+"),
                Stage::Re("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
            ],
            Jais2 => vec![Stage::Re(
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}",
            )],
            Poro => vec![Stage::Re(" ?[^(\\s|.,!?…。，、।۔،)]+")],
            Viking => vec![Stage::Re(" ?[^(\\s|.,!?…。，、।۔،)]+"), Stage::Re("\\p{N}")],
            Tekken => vec![Stage::Re(
                "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            )],
            Chameleon => vec![
                Stage::Re("<sentinel:[0-9]+>"),
                Stage::Re("(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"),
                Stage::Re("([\\t\\n]|    |  )"),
                Stage::Re("\\p{N}"),
                Stage::Re("[\\p{P}!-/:-@\\[-`{-~]"),
                GPT2,
            ],
            Gpt4o => vec![Stage::Re(
                "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            )],
            GraniteEmbMulti => vec![Stage::Re(
                "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            )],
            Superbpe => vec![Stage::Re("\\p{N}+"), Stage::Re("(?=(\\d{3})+(?!\\d))")],
            Bailingmoe => vec![Stage::Re(
                "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
            )],
            SeedCoder => vec![Stage::Re(
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            )],
            Ufakzeka => vec![Stage::Re(
                "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            )],
            Laguna => vec![Stage::Newlines, QWEN2],
            Gemma4 => vec![Stage::Newlines],
            Whitespace => vec![Stage::Re("\\S+")],
            ExaoneMoe => vec![Stage::Re(
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
            )],
            TinyAya => vec![
                Stage::AfmoeDigits,
                Stage::Re("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
            ],
            Afmoe => vec![
                Stage::AfmoeDigits,
                Stage::Re("[\u{4E00}-\u{9FFF}\u{3400}-\u{4DBF}\u{8C48}-\u{FAFF}\u{3040}-\u{309F}\u{30A0}-\u{30FF}\u{FF65}-\u{FF9F}\u{2F00}-\u{2FDF}\u{E40}-\u{E7F}\u{E80}-\u{EFF}\u{1780}-\u{17FF}\u{1000}-\u{109F}\u{AA60}-\u{AA7F}\u{A9E0}-\u{A9FF}\u{AC00}-\u{D7AF}\u{1100}-\u{11FF}]+"),
                Stage::Re(deepseek3_main),
            ],
            Minicpm5 => vec![
                Stage::Re("\\p{N}{1,3}"),
                Stage::Re(
                    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
                ),
            ],
        }
    }
}

/// The category markers of the collapsed text (llama.cpp `k_ucat_cpt`) and
/// the ASCII members each `\p{X}` stands for there (`k_ucat_map`).
const CATEGORIES: [(&str, u32, &str); 10] = [
    ("\\p{N}", 0xD1, "0-9"),
    ("\\p{L}", 0xD2, "A-Za-z"),
    ("\\p{P}", 0xD3, "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}"),
    ("\\p{M}", 0xD4, ""),
    ("\\p{S}", 0xD5, "\\$\\+<->\\^`\\|~"),
    ("\\p{Lu}", 0xD2, "A-Za-z"),
    ("\\p{Ll}", 0xD2, "A-Za-z"),
    ("\\p{Lt}", 0xD2, "A-Za-z"),
    ("\\p{Lm}", 0xD2, "A-Za-z"),
    ("\\p{Lo}", 0xD2, "A-Za-z"),
];

fn uses_categories(expr: &str) -> bool {
    CATEGORIES.iter().any(|(p, _, _)| expr.contains(p))
}

/// llama.cpp's collapsing of the expression (the same scan: `[`/`]` not
/// preceded by a backslash open and close a class, `\p{X}` outside a class
/// becomes a class), then `\d`/`\w` made ASCII. Other characters are kept.
fn translate(expr: &str, collapsed: bool) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let escaped = i > 0 && chars[i - 1] == '\\';
        if c == '[' && !escaped {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && c == ']' && !escaped {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if c == '\\' && i + 1 < chars.len() {
            let rest: String = chars[i..chars.len().min(i + 8)].iter().collect();
            if collapsed {
                if let Some((pat, marker, ascii)) =
                    CATEGORIES.iter().find(|(p, _, _)| rest.starts_with(p))
                {
                    if !inside {
                        out.push('[');
                    }
                    out.push_str(&format!("\\x{{{marker:X}}}{ascii}"));
                    if !inside {
                        out.push(']');
                    }
                    i += pat.chars().count();
                    continue;
                }
            }
            let (cls, n) = match chars[i + 1] {
                'd' => ("0-9", 2),
                'w' => ("0-9A-Za-z_", 2),
                'D' if !inside => ("^0-9", 2),
                'W' if !inside => ("^0-9A-Za-z_", 2),
                _ => ("", 0),
            };
            if n > 0 {
                if inside {
                    out.push_str(cls);
                } else {
                    out.push('[');
                    out.push_str(cls);
                    out.push(']');
                }
                i += n;
                continue;
            }
            // Any other escape is copied with its character.
            out.push(c);
            out.push(chars[i + 1]);
            i += 2;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// A stage ready to run.
pub(crate) enum Compiled {
    Gpt2,
    Qwen2,
    Newlines,
    AfmoeDigits,
    Re { re: Regex, collapsed: bool },
}

/// The compiled stages of `set` (compiled once per process).
pub(crate) fn compiled(set: RegexSet) -> Result<&'static [Compiled], String> {
    static CELLS: [OnceLock<Result<Vec<Compiled>, String>>; ALL.len()] =
        [const { OnceLock::new() }; ALL.len()];
    // The variants are declared in `ALL`'s order, so the discriminant is
    // the index.
    CELLS[set as usize]
        .get_or_init(|| {
            set.stages()
                .into_iter()
                .map(|st| {
                    Ok(match st {
                        Stage::Gpt2 => Compiled::Gpt2,
                        Stage::Qwen2 => Compiled::Qwen2,
                        Stage::Newlines => Compiled::Newlines,
                        Stage::AfmoeDigits => Compiled::AfmoeDigits,
                        Stage::Re(e) => {
                            let collapsed = uses_categories(e);
                            let t = translate(e, collapsed);
                            let re = fancy_regex::RegexBuilder::new(&t)
                                .backtrack_limit(10_000_000)
                                .build()
                                .map_err(|err| {
                                    format!("pre-tokenizer {set:?}: regex {t:?}: {err}")
                                })?;
                            Compiled::Re { re, collapsed }
                        }
                    })
                })
                .collect()
        })
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

/// The marker of a code point in the collapsed text.
fn collapse(cpt: u32) -> u32 {
    if cpt < 128 {
        return cpt;
    }
    let f = flags(cpt);
    if f.is_whitespace() {
        return 0x0B;
    }
    match f.category() {
        NUMBER => 0xD1,
        LETTER => 0xD2,
        PUNCTUATION => 0xD3,
        ACCENT_MARK => 0xD4,
        SYMBOL => 0xD5,
        _ => 0xD0,
    }
}

/// The text a regex stage runs on, with the code-point index of every byte
/// offset that starts a character.
struct Text {
    s: String,
    /// Byte offset of code point i (and the length at the end).
    starts: Vec<usize>,
}

impl Text {
    fn new(cpts: &[u32], collapsed: bool) -> Text {
        let mut s = String::with_capacity(cpts.len());
        let mut starts = Vec::with_capacity(cpts.len() + 1);
        for &c in cpts {
            starts.push(s.len());
            let u = if collapsed {
                collapse(c)
            } else if c > 0x7F && flags(c).is_whitespace() {
                0x0B
            } else {
                c
            };
            s.push(char::from_u32(u).unwrap_or('\u{FFFD}'));
        }
        starts.push(s.len());
        Text { s, starts }
    }

    fn cp_at(&self, byte: usize) -> usize {
        self.starts.partition_point(|&b| b < byte)
    }
}

/// llama.cpp `unicode_regex_split_stl`: in each piece, every match and the
/// text before it become pieces, then the rest. Empty pieces are kept
/// (they separate, as there) and dropped at the end.
fn split_re(t: &Text, re: &Regex, offsets: &[usize], out: &mut Vec<usize>) {
    let mut start = 0usize;
    for &len in offsets {
        let (b0, b1) = (t.starts[start], t.starts[start + len]);
        let piece = &t.s[b0..b1];
        let mut last = 0usize; // code points into the piece
        for m in re.find_iter(piece) {
            // A backtracking limit hit ends the matching of this piece; the
            // rest stays one piece.
            let Ok(m) = m else { break };
            let ms = t.cp_at(b0 + m.start()) - start;
            let me = t.cp_at(b0 + m.end()) - start;
            if ms > last {
                out.push(ms - last);
            }
            out.push(me - ms);
            last = me;
        }
        if last < len {
            out.push(len - last);
        }
        start += len;
    }
}

/// llama.cpp `unicode_regex_split_custom_newlines` (`[^\n]+|[\n]+`).
fn split_newlines(cpts: &[u32], offsets: &[usize], out: &mut Vec<usize>) {
    let mut start = 0;
    for &len in offsets {
        let seg = &cpts[start..start + len];
        let mut i = 0;
        while i < seg.len() {
            let nl = seg[i] == u32::from(b'\n');
            let mut j = i + 1;
            while j < seg.len() && (seg[j] == u32::from(b'\n')) == nl {
                j += 1;
            }
            out.push(j - i);
            i = j;
        }
        start += len;
    }
}

/// llama.cpp `unicode_regex_split_custom_afmoe`: each run of digits
/// (`\p{N}`) in groups of three from the right (the leading one or two
/// first). As there, the text before a run is not a piece of its own: it
/// joins the run's first group (the next stage splits it again), and the
/// text after the last run is one piece.
fn split_afmoe_digits(cpts: &[u32], offsets: &[usize], out: &mut Vec<usize>) {
    let mut start = 0;
    for &len in offsets {
        let (ini, end) = (start, start + len);
        start = end;
        let is_num = |p: usize| p < end && flags(cpts[p]).is_number();
        let mut prev = ini;
        let mut add = |to: usize, out: &mut Vec<usize>| {
            if to > prev {
                out.push(to - prev);
            }
            prev = to;
        };
        let mut pos = ini;
        while pos < end {
            if !is_num(pos) {
                pos += 1;
                continue;
            }
            let digits = pos;
            while is_num(pos) {
                pos += 1;
            }
            let count = pos - digits;
            let mut cur = digits;
            let rem = count % 3;
            if rem > 0 {
                cur += rem;
                add(cur, out);
            }
            while cur < digits + count {
                cur += 3;
                add(cur, out);
            }
        }
        // The rest (nothing when the segment ends in digits).
        add(end, out);
    }
}

/// Runs the stages of a set over `cpts`; word lengths (non-zero) in `out`.
pub(crate) fn split(stages: &[Compiled], cpts: &[u32], out: &mut Vec<usize>) {
    let mut offs = vec![cpts.len()];
    let mut next = Vec::new();
    let mut texts: [Option<Text>; 2] = [None, None];
    for st in stages {
        next.clear();
        match st {
            Compiled::Gpt2 => pretok::split_gpt2(cpts, &offs, &mut next),
            Compiled::Qwen2 => pretok::split_llama3(cpts, &offs, 1, &mut next),
            Compiled::Newlines => split_newlines(cpts, &offs, &mut next),
            Compiled::AfmoeDigits => split_afmoe_digits(cpts, &offs, &mut next),
            Compiled::Re { re, collapsed } => {
                let t = texts[usize::from(*collapsed)]
                    .get_or_insert_with(|| Text::new(cpts, *collapsed));
                split_re(t, re, &offs, &mut next);
            }
        }
        std::mem::swap(&mut offs, &mut next);
    }
    out.clear();
    out.extend(offs.into_iter().filter(|&l| l > 0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_the_sets_in_declaration_order() {
        for (i, s) in ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn every_set_compiles() {
        for s in ALL {
            if let Err(e) = compiled(s) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn collapsing_follows_llama_cpp() {
        assert_eq!(translate("\\p{N}{1,3}", true), "[\\x{D1}0-9]{1,3}");
        assert_eq!(
            translate("[^\\s\\p{L}\\p{N}]+", true),
            "[^\\s\\x{D2}A-Za-z\\x{D1}0-9]+"
        );
        assert_eq!(
            translate("(?=(\\d{3})+(?!\\d))", false),
            "(?=([0-9]{3})+(?![0-9]))"
        );
    }

    fn words(set: RegexSet, text: &str) -> Vec<String> {
        let cpts: Vec<u32> = text.chars().map(u32::from).collect();
        let mut out = Vec::new();
        split(compiled(set).unwrap(), &cpts, &mut out);
        let mut i = 0;
        out.iter()
            .map(|&l| {
                let w: String = text.chars().skip(i).take(l).collect();
                i += l;
                w
            })
            .collect()
    }

    #[test]
    fn starcoder_splits_digits_then_gpt2() {
        assert_eq!(
            words(RegexSet::Starcoder, "ab 123"),
            ["ab", " ", "1", "2", "3"]
        );
    }

    #[test]
    fn afmoe_digits_group_from_the_right_and_keep_llama_cpps_joins() {
        let cpts = |t: &str| t.chars().map(u32::from).collect::<Vec<u32>>();
        let mut out = Vec::new();
        split_afmoe_digits(&cpts("ab1234567 x12"), &[13], &mut out);
        // "ab1" (the text before joins the first group), "234", "567",
        // " x12".
        assert_eq!(out, [3, 3, 3, 4]);
        assert_eq!(
            words(RegexSet::TinyAya, "Total: 1234567 items"),
            ["Total", ":", " ", "1", "234", "567", " items"]
        );
    }

    #[test]
    fn superbpe_groups_digits_from_the_right() {
        assert_eq!(
            words(RegexSet::Superbpe, "x1234567"),
            ["x", "1", "234", "567"]
        );
    }

    /// The general path on the expressions llama.cpp hand-writes must give
    /// the hand-written splitters' words (they were written to match
    /// `std::regex` on the collapsed text): a check of the collapsing and of
    /// the regex semantics on text with every category.
    #[test]
    fn general_path_agrees_with_the_hand_written_splitters() {
        let gpt2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
        let qwen2 = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
        let texts = [
            "Hello world, it's 2024! Don't   stop\n\n  now\t\tx",
            "日本語のテキスト 123456 café naïve  \u{a0}x\u{3000}y \u{1F980}!!",
            "   leading and trailing   ",
            "a\r\n\r\nb  \n  c'LL 'Re",
            "def f(x):\n    return {'a': [1, 2]}\n",
        ];
        for (expr, custom) in [(gpt2, Compiled::Gpt2), (qwen2, Compiled::Qwen2)] {
            let re = Regex::new(&translate(expr, true)).unwrap();
            let general = [Compiled::Re {
                re,
                collapsed: true,
            }];
            for t in texts {
                let cpts: Vec<u32> = t.chars().map(u32::from).collect();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                split(&general, &cpts, &mut a);
                split(std::slice::from_ref(&custom), &cpts, &mut b);
                assert_eq!(a, b, "{expr} on {t:?}");
            }
        }
    }
}
