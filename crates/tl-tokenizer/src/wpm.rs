//! WordPiece (`tokenizer.ggml.model = bert`), ported from llama.cpp
//! `src/llama-vocab.cpp` (`llm_tokenizer_wpm_session`).
//!
//! Each text fragment is split into words: whitespace ends a word; NUL,
//! U+FFFD and control characters are dropped; punctuation, ASCII symbols
//! and CJK ideographs are words of their own. With
//! `tokenizer.ggml.normalizer.lowercase` (default true) code points are
//! lowercased, and with `tokenizer.ggml.normalizer.strip_accents` (default:
//! the lowercase flag) each is first replaced by the first code point of its
//! canonical decomposition (llama.cpp's one-to-one NFD table) and accent
//! marks are dropped. Every word gets the phantom-space prefix "▁" (the
//! GGUF stores word-initial pieces as "▁piece" and continuations bare,
//! where BERT's vocab.txt has "piece" and "##piece") and is covered
//! greedily by the longest matching byte substrings; a word with a gap
//! becomes one `[UNK]`.

use crate::error::{Result, TokenizerError};
use crate::unicode::{flags, CONTROL, PUNCTUATION, SYMBOL};
use crate::unicode_data::{LOWER, NFD};
use crate::vocab::Vocab;
use crate::TokenId;

/// llama.cpp `unicode_tolower`.
pub(crate) fn to_lower(cp: u32) -> u32 {
    match LOWER.binary_search_by_key(&cp, |p| p.0) {
        Ok(i) => LOWER[i].1,
        Err(_) => cp,
    }
}

/// llama.cpp `unicode_cpts_normalize_nfd` for one code point.
fn nfd(cp: u32) -> u32 {
    let i = NFD.partition_point(|r| r.0 <= cp);
    match NFD.get(i.wrapping_sub(1)) {
        Some(&(first, last, to)) if first <= cp && cp <= last => to,
        _ => cp,
    }
}

/// llama.cpp's `is_chinese_char` (its 0x2B920 bound kept as HF's is).
fn is_chinese_char(cp: u32) -> bool {
    (0x4E00..=0x9FFF).contains(&cp)
        || (0x3400..=0x4DBF).contains(&cp)
        || (0x20000..=0x2A6DF).contains(&cp)
        || (0x2A700..=0x2B73F).contains(&cp)
        || (0x2B740..=0x2B81F).contains(&cp)
        || (0x2B920..=0x2CEAF).contains(&cp)
        || (0xF900..=0xFAFF).contains(&cp)
        || (0x2F800..=0x2FA1F).contains(&cp)
}

/// The words of one text fragment (llama.cpp `preprocess`).
pub(crate) fn words(text: &str, lowercase: bool, strip_accents: bool) -> Vec<String> {
    let mut words = vec![String::new()];
    for c in text.chars() {
        let mut cp = u32::from(c);
        if strip_accents {
            cp = nfd(cp);
        }
        let f = flags(cp);
        if f.is_whitespace() {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            continue;
        }
        if cp == 0 || cp == 0xFFFD || f.0 & CONTROL != 0 {
            continue;
        }
        if strip_accents && f.0 & crate::unicode::ACCENT_MARK != 0 {
            continue;
        }
        let out = if lowercase { to_lower(cp) } else { cp };
        // Every entry of the tables is a scalar value; anything else is
        // dropped like a control character.
        let Some(ch) = char::from_u32(out) else {
            continue;
        };
        let single =
            f.0 & PUNCTUATION != 0 || (cp < 0x7F && f.0 & SYMBOL != 0) || is_chinese_char(cp);
        let Some(last) = words.last_mut() else {
            continue;
        };
        if single {
            if !last.is_empty() {
                words.push(String::new());
            }
            if let Some(last) = words.last_mut() {
                last.clear();
                last.push(ch);
            }
            words.push(String::new());
        } else {
            last.push(ch);
        }
    }
    if words.last().is_some_and(String::is_empty) {
        words.pop();
    }
    words
}

/// Longest-match WordPiece over one fragment, appended to `out`.
pub(crate) fn encode(
    v: &Vocab,
    text: &str,
    max_token_len: usize,
    unk: Result<TokenId>,
    out: &mut Vec<TokenId>,
) -> Result<()> {
    let mut word1 = String::new();
    for word in words(text, v.lowercase, v.strip_accents) {
        if word.is_empty() {
            continue;
        }
        word1.clear();
        word1.push('▁');
        word1.push_str(&word);
        let b = word1.as_bytes();
        let n = b.len();
        let start = out.len();
        let mut i = 0;
        while i < n {
            let mut matched = false;
            let mut j = n.min(i + max_token_len + 1);
            while j > i {
                // llama.cpp compares byte substrings; one cut inside a
                // character is no token's text.
                if let Some(id) = std::str::from_utf8(&b[i..j]).ok().and_then(|s| v.id_of(s)) {
                    out.push(id);
                    matched = true;
                    i = j;
                    break;
                }
                j -= 1;
            }
            if !matched {
                out.truncate(start);
                break;
            }
        }
        if out.len() == start {
            match &unk {
                Ok(id) => out.push(*id),
                Err(_) => return Err(TokenizerError::MissingSpecialToken { what: "UNK" }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_splits_and_normalises() {
        assert_eq!(
            words("Héllo,  WORLD!\tça\u{0301}", true, true),
            vec!["hello", ",", "world", "!", "ca"]
        );
        assert_eq!(words("Héllo", false, false), vec!["Héllo"]);
        assert_eq!(words("a中b", true, true), vec!["a", "中", "b"]);
        assert!(words("  \n ", true, true).is_empty());
    }
}
