//! Unigram (`tokenizer.ggml.model = t5`), as llama.cpp's
//! `llm_tokenizer_ugm` tokenizes.
//!
//! The text is first normalized: user-defined tokens pass unchanged; with
//! a `tokenizer.ggml.precompiled_charsmap` (SentencePiece's compiled
//! normalization rules: a double-array trie over byte prefixes and the
//! replacement strings) the longest matching prefix is replaced, else one
//! UTF-8 character is copied (an invalid byte becomes U+FFFD); spaces
//! become "▁", runs of them collapse with `remove_extra_whitespaces`, and
//! with `add_space_prefix` a "▁" opens the text. Then the best
//! segmentation by summed token scores (Viterbi) over the vocabulary's
//! normal, user-defined (score 0) and unused tokens; a character no token
//! covers costs the lowest normal score minus 10 and becomes `<unk>`
//! (consecutive unknowns merge into one).

use crate::error::{Result, TokenizerError};
use crate::vocab::{TokenAttr, Vocab};
use crate::TokenId;

/// llama.cpp's penalty below the lowest normal score for an unknown
/// character.
const UNK_PENALTY: f64 = 10.0;

/// A byte trie; `value` is the id ending at a node.
#[derive(Default)]
struct Trie {
    /// Per node: (byte, child) sorted by byte.
    children: Vec<Vec<(u8, u32)>>,
    value: Vec<Option<TokenId>>,
}

impl Trie {
    fn new() -> Trie {
        Trie {
            children: vec![Vec::new()],
            value: vec![None],
        }
    }

    fn insert(&mut self, key: &[u8], id: TokenId) {
        let mut n = 0usize;
        for &b in key {
            n = match self.children[n].binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.children[n][i].1 as usize,
                Err(i) => {
                    let new = self.children.len();
                    self.children.push(Vec::new());
                    self.value.push(None);
                    self.children[n].insert(i, (b, new as u32));
                    new
                }
            };
        }
        // A later duplicate wins, as in llama.cpp's trie.
        self.value[n] = Some(id);
    }

    fn step(&self, n: usize, b: u8) -> Option<usize> {
        let c = &self.children[n];
        c.binary_search_by_key(&b, |x| x.0)
            .ok()
            .map(|i| c[i].1 as usize)
    }

    /// The length of the longest key that prefixes `s`.
    fn longest(&self, s: &[u8]) -> usize {
        let (mut n, mut best) = (0usize, 0usize);
        for (i, &b) in s.iter().enumerate() {
            match self.step(n, b) {
                Some(c) => n = c,
                None => break,
            }
            if self.value[n].is_some() {
                best = i + 1;
            }
        }
        best
    }
}

/// SentencePiece's precompiled normalization map: a double-array trie
/// (`xcda`) whose leaves point into NUL-terminated replacement strings.
struct CharsMap {
    xcda: Vec<u32>,
    replacements: Vec<u8>,
}

impl CharsMap {
    fn parse(blob: &[u8]) -> Result<CharsMap> {
        let bad = |reason: String| TokenizerError::BadMetadata {
            key: "tokenizer.ggml.precompiled_charsmap",
            reason,
        };
        let head: [u8; 4] = blob
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| {
                bad(format!(
                    "{} bytes, shorter than its 4-byte header",
                    blob.len()
                ))
            })?;
        let size = u32::from_le_bytes(head) as usize;
        let body = &blob[4..];
        if size > body.len() || !size.is_multiple_of(4) {
            return Err(bad(format!(
                "the trie claims {size} bytes of {} (a multiple of 4 needed)",
                body.len()
            )));
        }
        let xcda = body[..size]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(CharsMap {
            xcda,
            replacements: body[size..].to_vec(),
        })
    }

    fn node(&self, i: usize) -> Option<u32> {
        self.xcda.get(i).copied()
    }

    fn base(p: u32) -> usize {
        ((p >> 10) << ((p & (1 << 9)) >> 6)) as usize
    }

    /// The longest prefix of `s` with a rule: (bytes consumed, replacement).
    fn longest(&self, s: &[u8]) -> Result<Option<(usize, &[u8])>> {
        let Some(root) = self.node(0) else {
            return Ok(None);
        };
        let mut n = Self::base(root);
        let mut best: Option<(usize, usize)> = None;
        for (i, &c) in s.iter().enumerate() {
            if c == 0 {
                break;
            }
            n ^= c as usize;
            let Some(p) = self.node(n) else { break };
            if p & ((1 << 31) | 0xff) != u32::from(c) {
                break;
            }
            let leaf = (p >> 8) & 1 == 1;
            n ^= Self::base(p);
            if leaf {
                let Some(v) = self.node(n) else { break };
                best = Some((i + 1, (v & ((1 << 31) - 1)) as usize));
            }
        }
        let Some((len, off)) = best else {
            return Ok(None);
        };
        let rest = self
            .replacements
            .get(off..)
            .ok_or_else(|| TokenizerError::BadMetadata {
                key: "tokenizer.ggml.precompiled_charsmap",
                reason: format!(
                    "a rule points at byte {off} of {} replacement bytes",
                    self.replacements.len()
                ),
            })?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Ok(Some((len, &rest[..end])))
    }
}

/// What the Unigram tokenizer needs beyond the vocabulary.
pub(crate) struct Ugm {
    tokens: Trie,
    user_defined: Trie,
    charsmap: Option<CharsMap>,
    unk_score: f64,
}

impl Ugm {
    pub(crate) fn new(v: &Vocab) -> Result<Ugm> {
        let mut tokens = Trie::new();
        let mut user_defined = Trie::new();
        let mut lo = f32::MAX;
        for (id, (text, &attr)) in v.texts.iter().zip(&v.attrs).enumerate() {
            let id = id as TokenId;
            if attr.has(TokenAttr::NORMAL) {
                lo = lo.min(v.scores[id as usize]);
            }
            if attr.has(TokenAttr::NORMAL)
                || attr.has(TokenAttr::USER_DEFINED)
                || attr.has(TokenAttr::UNUSED)
            {
                tokens.insert(text.as_bytes(), id);
            }
            if attr.has(TokenAttr::USER_DEFINED) {
                user_defined.insert(text.as_bytes(), id);
            }
        }
        let charsmap = match &v.charsmap {
            Some(b) if !b.is_empty() => Some(CharsMap::parse(b)?),
            _ => None,
        };
        Ok(Ugm {
            tokens,
            user_defined,
            charsmap,
            unk_score: f64::from(lo) - UNK_PENALTY,
        })
    }

    /// llama.cpp `normalize` of one text fragment.
    fn normalize(&self, v: &Vocab, text: &[u8], out: &mut Vec<u8>) -> Result<()> {
        const SPACE: &[u8] = "▁".as_bytes();
        let prepend = v.add_space_prefix;
        let merge = v.remove_extra_whitespaces;
        let (mut prepended, mut in_word) = (false, false);
        let mut at = 0;
        let mut push = |piece: &[u8], out: &mut Vec<u8>| {
            for &c in piece {
                if c != b' ' {
                    if !in_word {
                        in_word = true;
                        if (prepend && !prepended) || merge {
                            out.extend_from_slice(SPACE);
                            prepended = true;
                        }
                    }
                    out.push(c);
                } else {
                    in_word = false;
                    if !merge {
                        out.extend_from_slice(SPACE);
                    }
                }
            }
        };
        while at < text.len() {
            let rest = &text[at..];
            let ud = self.user_defined.longest(rest);
            if ud > 0 {
                push(&rest[..ud], out);
                at += ud;
                continue;
            }
            if let Some(m) = &self.charsmap {
                if let Some((len, rep)) = m.longest(rest)? {
                    push(rep, out);
                    at += len;
                    continue;
                }
            }
            let n = utf8_len(rest[0]).min(rest.len());
            if std::str::from_utf8(&rest[..n]).is_ok() {
                push(&rest[..n], out);
                at += n;
            } else {
                push("\u{FFFD}".as_bytes(), out);
                at += 1;
            }
        }
        Ok(())
    }

    /// Appends the ids of one text fragment.
    pub(crate) fn encode(
        &self,
        v: &Vocab,
        text: &str,
        unk: TokenId,
        out: &mut Vec<TokenId>,
    ) -> Result<()> {
        let mut s = Vec::with_capacity(text.len() + 8);
        self.normalize(v, text.as_bytes(), &mut s)?;
        let len = s.len();
        // Per end offset: (token, start offset, best score).
        let mut best: Vec<(TokenId, usize, f64)> = vec![(unk, 0, f64::MIN); len + 1];
        best[0] = (unk, 0, 0.0);
        let mut at = 0;
        while at < len {
            let n_cp = utf8_len(s[at]).min(len - at);
            let here = best[at].2;
            let mut single = false;
            let mut node = 0usize;
            let mut end = at;
            while end < len {
                let Some(c) = self.tokens.step(node, s[end]) else {
                    break;
                };
                node = c;
                end += 1;
                if let Some(id) = self.tokens.value[node] {
                    if end - at == n_cp {
                        single = true;
                    }
                    let score = if v.attrs[id as usize].has(TokenAttr::USER_DEFINED) {
                        0.0
                    } else {
                        f64::from(v.scores[id as usize])
                    };
                    if here + score > best[end].2 {
                        best[end] = (id, at, here + score);
                    }
                }
            }
            if !single {
                let e = at + n_cp;
                if here + self.unk_score > best[e].2 {
                    best[e] = (unk, at, here + self.unk_score);
                }
            }
            at += n_cp;
        }
        // Back from the end; consecutive unknowns become one.
        let first = out.len();
        let mut e = len;
        let mut prev_unk = false;
        while e > 0 {
            let (id, start, _) = best[e];
            let is_unk = id == unk;
            if !(prev_unk && is_unk) {
                out.push(id);
            }
            prev_unk = is_unk;
            e = start;
        }
        out[first..].reverse();
        Ok(())
    }
}

/// llama.cpp `unicode_len_utf8`: the sequence length its lead byte says.
fn utf8_len(b: u8) -> usize {
    const LOOKUP: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
    LOOKUP[(b >> 4) as usize]
}
