//! Splitting special-token text out of the input before tokenization
//! (llama.cpp `src/llama-vocab.cpp`, `tokenizer_st_partition`).
//!
//! llama.cpp takes the special tokens longest first and, for each, splits
//! every remaining text fragment at all its occurrences. A single
//! leftmost-longest scan (the HF `tokenizers` added-vocabulary matcher) gives
//! different fragments when token texts overlap (a shorter token that starts
//! earlier loses to a longer one found first), so the order is kept here.
//! To stay fast with vocabularies holding thousands of special tokens
//! (Gemma: ~6k), a trie pass first finds which of them occur at all; only
//! those are then split out, in llama.cpp's order.

use rustc_hash::FxHashSet;

use crate::vocab::{TokenAttr, Vocab};
use crate::TokenId;

/// A piece of input: raw text (byte range into the input) or a special token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text { start: usize, end: usize },
    Token(TokenId),
}

#[derive(Default)]
struct Node {
    /// Sorted by byte.
    edges: Vec<(u8, u32)>,
    token: Option<TokenId>,
}

/// Byte trie over the texts of all special tokens.
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
    first_byte: [bool; 256],
}

impl SpecialMatcher {
    pub(crate) fn new(vocab: &Vocab) -> SpecialMatcher {
        let mut nodes = vec![Node::default()];
        let mut first_byte = [false; 256];
        for &id in &vocab.special_cache {
            let text = vocab.texts[id as usize].as_bytes();
            let Some(&b0) = text.first() else { continue };
            first_byte[b0 as usize] = true;
            let mut cur = 0usize;
            for &b in text {
                let next = match nodes[cur].edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(i) => nodes[cur].edges[i].1 as usize,
                    Err(i) => {
                        let n = nodes.len();
                        nodes[cur].edges.insert(i, (b, n as u32));
                        nodes.push(Node::default());
                        n
                    }
                };
                cur = next;
            }
            // Duplicate texts: the one llama.cpp would try first (earlier in the cache) stays.
            if nodes[cur].token.is_none() {
                nodes[cur].token = Some(id);
            }
        }
        SpecialMatcher { nodes, first_byte }
    }

    /// Ids of special tokens whose text occurs somewhere in `text`.
    fn occurring(&self, text: &[u8]) -> FxHashSet<TokenId> {
        let mut found = FxHashSet::default();
        for start in 0..text.len() {
            if !self.first_byte[text[start] as usize] {
                continue;
            }
            let mut cur = 0usize;
            for &b in &text[start..] {
                match self.nodes[cur].edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(i) => cur = self.nodes[cur].edges[i].1 as usize,
                    Err(_) => break,
                }
                if let Some(id) = self.nodes[cur].token {
                    found.insert(id);
                }
            }
        }
        found
    }
}

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Splits `text` into raw fragments and special tokens.
pub(crate) fn partition(
    vocab: &Vocab,
    matcher: &SpecialMatcher,
    text: &str,
    parse_special: bool,
) -> Vec<Fragment> {
    let mut frags = Vec::new();
    if text.is_empty() {
        return frags;
    }
    frags.push(Fragment::Text {
        start: 0,
        end: text.len(),
    });
    let bytes = text.as_bytes();
    let occurring = matcher.occurring(bytes);
    if occurring.is_empty() {
        return frags;
    }
    let skip = TokenAttr(TokenAttr::CONTROL.0 | TokenAttr::UNKNOWN.0);
    for &id in &vocab.special_cache {
        if !occurring.contains(&id) {
            continue;
        }
        let attr = vocab.attrs[id as usize];
        if !parse_special && attr.has(skip) {
            continue;
        }
        let needle = vocab.texts[id as usize].as_str();
        let mut next = Vec::with_capacity(frags.len() + 2);
        for f in frags {
            let Fragment::Text { start, end } = f else {
                next.push(f);
                continue;
            };
            let mut base = start;
            loop {
                let Some(rel) = text[base..end].find(needle) else {
                    next.push(Fragment::Text { start: base, end });
                    break;
                };
                let m = base + rel;
                let mut left_end = m;
                if attr.has(TokenAttr::LSTRIP) {
                    while left_end > base && is_c_space(bytes[left_end - 1]) {
                        left_end -= 1;
                    }
                }
                if left_end > base {
                    next.push(Fragment::Text {
                        start: base,
                        end: left_end,
                    });
                }
                next.push(Fragment::Token(id));
                let mut right = m + needle.len();
                if right >= end {
                    break;
                }
                if attr.has(TokenAttr::RSTRIP) {
                    while right < end && is_c_space(bytes[right]) {
                        right += 1;
                    }
                }
                if right >= end {
                    break;
                }
                base = right;
            }
        }
        frags = next;
    }
    frags
}
