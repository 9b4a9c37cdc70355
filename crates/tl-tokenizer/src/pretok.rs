//! BPE pre-tokenization: splitting a text fragment into words before merges.
//!
//! Ported from llama.cpp `src/unicode.cpp` (`unicode_regex_split` and the
//! hand-written `unicode_regex_split_custom_{gpt2,llama3,qwen2,qwen35}`). llama.cpp
//! does not run the tokenizer.json regexes as written: the common ones are
//! hand-coded state machines with their own corner cases (e.g. `\s+(?!\S)`
//! is decided by "is there another code point in this segment"), and the
//! rest run through `std::regex` on a text where every non-ASCII code point is
//! replaced by one byte standing for its category. Matching llama.cpp token
//! for token means reproducing those machines, not a regex engine, so this
//! file follows them line by line. Offsets are in code points, as there.

use crate::unicode::{flags, to_lower_ascii, Flags, NUMBER, PUNCTUATION};
use crate::vocab::PreTokenizer;

const OUT_OF_RANGE: u32 = 0xFFFF_FFFF;

/// Splits `cpts` into words; returns their lengths in code points.
pub(crate) fn split(pre: PreTokenizer, cpts: &[u32], out: &mut Vec<usize>) {
    out.clear();
    match pre {
        PreTokenizer::Gpt2 => split_gpt2(cpts, &[cpts.len()], out),
        PreTokenizer::Llama3 => split_llama3(cpts, &[cpts.len()], 3, out),
        PreTokenizer::Qwen2 => split_llama3(cpts, &[cpts.len()], 1, out),
        PreTokenizer::Qwen35 => split_letters_marks(cpts, &[cpts.len()], 1, true, out),
        PreTokenizer::KimiK2 => split_kimi_k2(cpts, &[cpts.len()], out),
        PreTokenizer::Regex(set) => match crate::pretok_regex::compiled(set) {
            Ok(stages) => crate::pretok_regex::split(stages, cpts, out),
            // Compiled (and checked) when the vocabulary was loaded.
            Err(_) => out.push(cpts.len()),
        },
        PreTokenizer::Default => {
            // "[\p{P}\$\+<=>\^~\|]+", then GPT-2, then "\p{N}+", then "[0-9][0-9][0-9]".
            let mut a = Vec::new();
            split_runs(cpts, &[cpts.len()], is_default_punct, &mut a);
            let mut b = Vec::new();
            split_gpt2(cpts, &a, &mut b);
            a.clear();
            split_runs(cpts, &b, is_collapsed_number, &mut a);
            split_ascii_digit_triples(cpts, &a, out);
        }
    }
}

/// `re`, `ve` or `ll` after an apostrophe.
#[inline]
fn two_letter_suffix(a: u32, b: u32) -> bool {
    matches!(
        (char::from_u32(a), char::from_u32(b)),
        (Some('r' | 'v'), Some('e')) | (Some('l'), Some('l'))
    )
}

/// Sub-slice of `cpts` seen by llama.cpp's `_get_cpt`/`_get_flags` lambdas.
struct Segment<'a> {
    cpts: &'a [u32],
    ini: usize,
    end: usize,
}

impl Segment<'_> {
    #[inline]
    fn cpt(&self, pos: usize) -> u32 {
        if self.ini <= pos && pos < self.end {
            self.cpts[pos]
        } else {
            OUT_OF_RANGE
        }
    }
    #[inline]
    fn flags(&self, pos: usize) -> Flags {
        if self.ini <= pos && pos < self.end {
            flags(self.cpts[pos])
        } else {
            Flags(0)
        }
    }
}

/// Emits word ends as llama.cpp's `_add_token` does (empty words dropped).
struct Emitter<'o> {
    prev_end: usize,
    out: &'o mut Vec<usize>,
}

impl Emitter<'_> {
    #[inline]
    fn add(&mut self, end: usize) -> usize {
        let len = end.saturating_sub(self.prev_end);
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// (llama.cpp `unicode_regex_split_custom_gpt2`).
pub(crate) fn split_gpt2(cpts: &[u32], offsets: &[usize], out: &mut Vec<usize>) {
    let mut start = 0;
    for &len in offsets {
        let seg = Segment {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut em = Emitter {
            prev_end: seg.ini,
            out: &mut *out,
        };
        let mut pos = seg.ini;
        while pos < seg.end {
            let cpt = seg.cpt(pos);
            let f = seg.flags(pos);

            if cpt == '\'' as u32 && pos + 1 < seg.end {
                let next = seg.cpt(pos + 1);
                if next == 's' as u32
                    || next == 't' as u32
                    || next == 'm' as u32
                    || next == 'd' as u32
                {
                    pos += em.add(pos + 2);
                    continue;
                }
                if pos + 2 < seg.end {
                    let next2 = seg.cpt(pos + 2);
                    if two_letter_suffix(next, next2) {
                        pos += em.add(pos + 3);
                        continue;
                    }
                }
            }

            let space = cpt == ' ' as u32;
            let mut f2 = if space { seg.flags(pos + 1) } else { f };
            if f2.is_letter() {
                pos += usize::from(space);
                while f2.is_letter() {
                    pos += 1;
                    f2 = seg.flags(pos);
                }
                em.add(pos);
                continue;
            }
            if f2.is_number() {
                pos += usize::from(space);
                while f2.is_number() {
                    pos += 1;
                    f2 = seg.flags(pos);
                }
                em.add(pos);
                continue;
            }
            if !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && f2.any() {
                pos += usize::from(space);
                while !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && f2.any() {
                    pos += 1;
                    f2 = seg.flags(pos);
                }
                em.add(pos);
                continue;
            }

            let mut n_ws = 0;
            while seg.flags(pos + n_ws).is_whitespace() {
                n_ws += 1;
            }
            if n_ws > 1 && seg.cpt(pos + n_ws) != OUT_OF_RANGE {
                pos += n_ws - 1;
                em.add(pos);
                continue;
            }
            if n_ws > 0 {
                pos += n_ws;
                em.add(pos);
                continue;
            }
            pos += 1;
            em.add(pos);
        }
    }
}

/// Llama 3 (`max_digits` 3) and Qwen 2 (`max_digits` 1):
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// (llama.cpp `unicode_regex_split_custom_llama3` / `_qwen2`, which differ only in the digit rule;
/// one digit at a time and runs of single digits give the same words).
pub(crate) fn split_llama3(
    cpts: &[u32],
    offsets: &[usize],
    max_digits: usize,
    out: &mut Vec<usize>,
) {
    split_letters_marks(cpts, offsets, max_digits, false, out)
}

/// [`split_llama3`], with `marks` Qwen 3.5's variant of the Qwen 2 machine
/// (llama.cpp `unicode_regex_split_custom_qwen35`): letter runs take
/// combining marks too, and marks are not punctuation:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
fn split_letters_marks(
    cpts: &[u32],
    offsets: &[usize],
    max_digits: usize,
    marks: bool,
    out: &mut Vec<usize>,
) {
    let word = |f: Flags| f.is_letter() || (marks && f.is_accent_mark());
    let is_crlf = |c: u32| c == '\r' as u32 || c == '\n' as u32;
    let mut start = 0;
    for &len in offsets {
        let seg = Segment {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut em = Emitter {
            prev_end: seg.ini,
            out: &mut *out,
        };
        let mut pos = seg.ini;
        while pos < seg.end {
            let cpt = seg.cpt(pos);
            let f = seg.flags(pos);

            if cpt == '\'' as u32 && pos + 1 < seg.end {
                let next = to_lower_ascii(seg.cpt(pos + 1));
                if next == 's' as u32
                    || next == 't' as u32
                    || next == 'm' as u32
                    || next == 'd' as u32
                {
                    pos += em.add(pos + 2);
                    continue;
                }
                if pos + 2 < seg.end {
                    let next2 = to_lower_ascii(seg.cpt(pos + 2));
                    if two_letter_suffix(next, next2) {
                        pos += em.add(pos + 3);
                        continue;
                    }
                }
            }

            // [^\r\n\p{L}\p{N}]?\p{L}+ (with marks: [\p{L}\p{M}]+)
            if !(is_crlf(cpt) || f.is_number()) && (word(f) || word(seg.flags(pos + 1))) {
                pos += 1;
                while word(seg.flags(pos)) {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }

            // \p{N}{1,max}
            if f.is_number() {
                let mut ini = pos;
                while seg.flags(pos).is_number() {
                    pos += 1;
                    if pos - ini >= max_digits {
                        em.add(pos);
                        ini = pos;
                    }
                }
                em.add(pos);
                continue;
            }

            // <space>?[^\s\p{L}\p{N}]+[\r\n]*  (the guard tests the first code point's
            // flags, not the one after the space, as llama.cpp does)
            let mut f2 = if cpt == ' ' as u32 {
                seg.flags(pos + 1)
            } else {
                f
            };
            if !(f2.is_whitespace() || word(f2) || f2.is_number()) && f.any() {
                pos += usize::from(cpt == ' ' as u32);
                while !(f2.is_whitespace() || word(f2) || f2.is_number()) && f2.any() {
                    pos += 1;
                    f2 = seg.flags(pos);
                }
                let mut c2 = seg.cpt(pos);
                while is_crlf(c2) {
                    pos += 1;
                    c2 = seg.cpt(pos);
                }
                em.add(pos);
                continue;
            }

            let mut n_ws = 0;
            let mut last_crlf_end = 0;
            while seg.flags(pos + n_ws).is_whitespace() {
                if is_crlf(seg.cpt(pos + n_ws)) {
                    last_crlf_end = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            // \s*[\r\n]+
            if last_crlf_end > 0 {
                pos = last_crlf_end;
                em.add(pos);
                continue;
            }
            // \s+(?!\S)
            if n_ws > 1 && seg.cpt(pos + n_ws) != OUT_OF_RANGE {
                pos += n_ws - 1;
                em.add(pos);
                continue;
            }
            // \s+
            if n_ws > 0 {
                pos += n_ws;
                em.add(pos);
                continue;
            }
            pos += 1;
            em.add(pos);
        }
    }
}

/// llama.cpp `unicode_cpt_is_han`: the CJK ideograph blocks.
fn is_han(cp: u32) -> bool {
    matches!(cp,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0x2CEB0..=0x2EBEF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// Kimi K2 (llama.cpp `unicode_regex_split_custom_kimi_k2`), for
/// `[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|…|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`:
/// Han runs on their own, other letters (any case) with an optional
/// leading non-letter and a contraction after them. Its guards differ
/// from Qwen 2's where llama.cpp's do (the punctuation rule tests the code
/// point after a space), so it is its own machine.
fn split_kimi_k2(cpts: &[u32], offsets: &[usize], out: &mut Vec<usize>) {
    let is_crlf = |c: u32| c == '\r' as u32 || c == '\n' as u32;
    let mut start = 0;
    for &len in offsets {
        let seg = Segment {
            cpts,
            ini: start,
            end: start + len,
        };
        start += len;
        let mut em = Emitter {
            prev_end: seg.ini,
            out: &mut *out,
        };
        // A letter that is not Han.
        let word = |p: usize| seg.flags(p).is_letter() && !is_han(seg.cpt(p));
        let mut pos = seg.ini;
        while pos < seg.end {
            let cpt = seg.cpt(pos);
            let f = seg.flags(pos);

            // [\p{Han}]+
            if is_han(cpt) {
                while is_han(seg.cpt(pos)) {
                    pos += 1;
                }
                em.add(pos);
                continue;
            }

            // The letter words, with their optional leading character.
            let leader = !(is_crlf(cpt) || f.is_letter() || f.is_number());
            if word(pos) || (leader && word(pos + 1)) {
                let mut has_leader = false;
                if leader {
                    has_leader = true;
                    pos += 1;
                }
                let mut has_letters = false;
                while word(pos) {
                    has_letters = true;
                    pos += 1;
                }
                if has_letters || (!has_leader && word(pos)) {
                    if !has_letters {
                        pos += 1;
                    }
                    while word(pos) {
                        pos += 1;
                    }
                    if seg.cpt(pos) == '\'' as u32 && pos + 1 < seg.end {
                        let next = to_lower_ascii(seg.cpt(pos + 1));
                        if next == 's' as u32
                            || next == 't' as u32
                            || next == 'm' as u32
                            || next == 'd' as u32
                        {
                            pos += 2;
                        } else if pos + 2 < seg.end
                            && two_letter_suffix(next, to_lower_ascii(seg.cpt(pos + 2)))
                        {
                            pos += 3;
                        }
                    }
                    em.add(pos);
                    continue;
                } else if has_leader {
                    pos -= 1;
                }
            }

            // \p{N}{1,3}
            if f.is_number() {
                let mut ini = pos;
                while seg.flags(pos).is_number() {
                    pos += 1;
                    if pos - ini >= 3 {
                        em.add(pos);
                        ini = pos;
                    }
                }
                em.add(pos);
                continue;
            }

            // <space>?[^\s\p{L}\p{N}]+[\r\n]*  (the guard tests the code point
            // after the space, unlike Qwen 2's)
            let mut f2 = if cpt == ' ' as u32 {
                seg.flags(pos + 1)
            } else {
                f
            };
            if !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && f2.any() {
                pos += usize::from(cpt == ' ' as u32);
                while !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && f2.any() {
                    pos += 1;
                    f2 = seg.flags(pos);
                }
                let mut c2 = seg.cpt(pos);
                while is_crlf(c2) {
                    pos += 1;
                    c2 = seg.cpt(pos);
                }
                em.add(pos);
                continue;
            }

            let mut n_ws = 0;
            let mut last_crlf_end = 0;
            while seg.flags(pos + n_ws).is_whitespace() {
                if is_crlf(seg.cpt(pos + n_ws)) {
                    last_crlf_end = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            if last_crlf_end > 0 {
                pos = last_crlf_end;
                em.add(pos);
                continue;
            }
            if n_ws > 1 && seg.cpt(pos + n_ws) != OUT_OF_RANGE {
                pos += n_ws - 1;
                em.add(pos);
                continue;
            }
            if n_ws > 0 {
                pos += n_ws;
                em.add(pos);
                continue;
            }
            pos += 1;
            em.add(pos);
        }
    }
}

/// What llama.cpp's category-collapsed `std::regex` sees for a code point:
/// ASCII as is; otherwise whitespace, or one byte per category.
#[inline]
fn collapsed_category(cp: u32) -> u16 {
    let f = flags(cp);
    if f.is_whitespace() {
        0
    } else {
        f.category()
    }
}

/// `[\p{P}\$\+<=>\^~\|]` on the collapsed text: ASCII punctuation and symbols
/// except the backtick, or a non-ASCII punctuation code point.
fn is_default_punct(cp: u32) -> bool {
    if cp < 0x80 {
        let c = cp as u8;
        c.is_ascii_punctuation() && c != b'`'
    } else {
        collapsed_category(cp) == PUNCTUATION
    }
}

/// `\p{N}` on the collapsed text.
fn is_collapsed_number(cp: u32) -> bool {
    if cp < 0x80 {
        (cp as u8).is_ascii_digit()
    } else {
        collapsed_category(cp) == NUMBER
    }
}

/// `std::regex` split with a pattern `[class]+` (llama.cpp
/// `unicode_regex_split_stl`): matches and the gaps between them both become words.
fn split_runs(cpts: &[u32], offsets: &[usize], class: fn(u32) -> bool, out: &mut Vec<usize>) {
    let mut start = 0;
    for &len in offsets {
        let seg = &cpts[start..start + len];
        start += len;
        let mut i = 0;
        while i < seg.len() {
            let inside = class(seg[i]);
            let j = seg[i..]
                .iter()
                .position(|&c| class(c) != inside)
                .map_or(seg.len(), |k| i + k);
            out.push(j - i);
            i = j;
        }
    }
}

/// `[0-9][0-9][0-9]`: leftmost non-overlapping triples of ASCII digits are
/// words; whatever lies between them too.
fn split_ascii_digit_triples(cpts: &[u32], offsets: &[usize], out: &mut Vec<usize>) {
    let digit = |c: u32| (c as u8).is_ascii_digit() && c < 0x80;
    let mut start = 0;
    for &len in offsets {
        let seg = &cpts[start..start + len];
        start += len;
        let mut gap_start = 0;
        let mut i = 0;
        while i + 3 <= seg.len() {
            if digit(seg[i]) && digit(seg[i + 1]) && digit(seg[i + 2]) {
                if i > gap_start {
                    out.push(i - gap_start);
                }
                out.push(3);
                i += 3;
                gap_start = i;
            } else {
                i += 1;
            }
        }
        if seg.len() > gap_start {
            out.push(seg.len() - gap_start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, s: &str) -> Vec<String> {
        let cpts: Vec<u32> = s.chars().map(u32::from).collect();
        let mut lens = Vec::new();
        split(pre, &cpts, &mut lens);
        let chars: Vec<char> = s.chars().collect();
        let mut at = 0;
        lens.iter()
            .map(|&n| {
                let w: String = chars[at..at + n].iter().collect();
                at += n;
                w
            })
            .collect()
    }

    #[test]
    fn qwen2_splits() {
        assert_eq!(
            words(PreTokenizer::Qwen2, "Hello world"),
            ["Hello", " world"]
        );
        assert_eq!(
            words(PreTokenizer::Qwen2, "x = 12345;\n"),
            ["x", " =", " ", "1", "2", "3", "4", "5", ";\n"]
        );
        assert_eq!(words(PreTokenizer::Qwen2, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(PreTokenizer::Qwen2, "I'M here"), ["I", "'M", " here"]);
        assert_eq!(
            words(PreTokenizer::Qwen2, "  \n\n  x"),
            ["  \n\n", " ", " x"]
        );
    }

    #[test]
    fn llama3_digits() {
        assert_eq!(words(PreTokenizer::Llama3, "1234567"), ["123", "456", "7"]);
    }

    #[test]
    fn default_splits() {
        assert_eq!(
            words(PreTokenizer::Default, "1234567 ab"),
            ["123", "456", "7", " ab"]
        );
        assert_eq!(
            words(PreTokenizer::Default, "a, b!?"),
            ["a", ",", " b", "!?"]
        );
    }

    #[test]
    fn empty() {
        assert!(words(PreTokenizer::Qwen2, "").is_empty());
        assert!(words(PreTokenizer::Default, "").is_empty());
    }
}
