//! SentencePiece-style BPE: merge the adjacent pair whose concatenation is
//! the highest-scoring token, until none is left; characters that never
//! became a token fall back to byte tokens `<0xXX>`.
//!
//! Ported from llama.cpp `src/llama-vocab.cpp` (`llm_tokenizer_spm_session`).
//! This is why the HF `tokenizers` BPE model is not used for these
//! vocabularies: it merges by a merge list's rank, and these GGUF files carry
//! scores and no merges; llama.cpp's result depends on score order with ties
//! broken leftmost-first, which only this loop reproduces.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use crate::error::Result;
use crate::vocab::Vocab;
use crate::TokenId;

#[derive(Clone, Copy)]
struct Symbol {
    start: u32,
    len: u32,
    prev: i32,
    next: i32,
}

struct Bigram {
    score: f32,
    left: i32,
    right: i32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}

impl Ord for Bigram {
    // Highest score first, then leftmost (llama.cpp `llm_bigram_spm::comparator`,
    // which uses `<` on the scores: incomparable scores count as a tie).
    fn cmp(&self, o: &Self) -> Ordering {
        let by_score = if self.score < o.score {
            Ordering::Less
        } else if self.score > o.score {
            Ordering::Greater
        } else {
            Ordering::Equal
        };
        by_score.then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Default)]
pub(crate) struct SpmScratch {
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Bigram>,
}

/// Tokenizes `text` (spaces already replaced by `▁`) and appends the tokens.
pub(crate) fn encode(
    vocab: &Vocab,
    text: &str,
    scratch: &mut SpmScratch,
    out: &mut Vec<TokenId>,
) -> Result<()> {
    let syms = &mut scratch.symbols;
    syms.clear();
    for (i, (off, c)) in text.char_indices().enumerate() {
        syms.push(Symbol {
            start: off as u32,
            len: c.len_utf8() as u32,
            prev: i as i32 - 1,
            next: i as i32 + 1,
        });
    }
    let Some(last) = syms.last_mut() else {
        return Ok(());
    };
    last.next = -1;

    let heap = &mut scratch.heap;
    heap.clear();
    for i in 1..syms.len() {
        try_add_bigram(vocab, text, syms, heap, i as i32 - 1, i as i32);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (bg.left as usize, bg.right as usize);
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != bg.size {
            continue;
        }
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        syms[l].next = syms[r].next;
        if syms[r].next >= 0 {
            let n = syms[r].next as usize;
            syms[n].prev = bg.left;
        }
        let (prev, next) = (syms[l].prev, syms[l].next);
        try_add_bigram(vocab, text, syms, heap, prev, bg.left);
        try_add_bigram(vocab, text, syms, heap, bg.left, next);
    }

    // llama.cpp's `resegment` also consults a reverse-merge map, but a symbol
    // only grows by a merge whose text is a token, so a symbol that is not a
    // token is a single character, which no merge key (two or more
    // characters) can name: it always goes to byte fallback.
    let mut i = 0i32;
    while i != -1 {
        let s = syms[i as usize];
        let piece = &text[s.start as usize..(s.start + s.len) as usize];
        match vocab.text_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    out.push(vocab.spm_byte_token(b)?);
                }
            }
        }
        i = s.next;
    }
    Ok(())
}

fn try_add_bigram(
    vocab: &Vocab,
    text: &str,
    syms: &[Symbol],
    heap: &mut BinaryHeap<Bigram>,
    left: i32,
    right: i32,
) {
    if left < 0 || right < 0 {
        return;
    }
    let (l, r) = (syms[left as usize], syms[right as usize]);
    let size = l.len + r.len;
    let Some(piece) = text.get(l.start as usize..(l.start + size) as usize) else {
        return;
    };
    if let Some(&token) = vocab.text_to_id.get(piece) {
        heap.push(Bigram {
            score: vocab.scores[token as usize],
            left,
            right,
            size,
        });
    }
}

/// Where a text may be cut into pieces that tokenize independently.
///
/// A symbol only grows by merging into a vocabulary token, so no symbol can
/// span two adjacent characters `a b` that occur next to each other in no
/// token; merges on either side of such a place never meet, and the
/// leftmost-first tie-break keeps the same relative order on each side. The
/// pieces therefore tokenize exactly as the whole. Only places before `▁`
/// are used (word starts), which is where SentencePiece vocabularies nearly
/// never join characters (Gemma 3: one token, `>▁</`).
pub(crate) struct SpmSplitter {
    /// Characters that some token has right before a `▁`.
    joins_space: rustc_hash::FxHashSet<char>,
}

impl SpmSplitter {
    pub(crate) fn new(vocab: &Vocab) -> SpmSplitter {
        let mut joins_space = rustc_hash::FxHashSet::default();
        for t in &vocab.texts {
            let mut prev = None;
            for c in t.chars() {
                if c == '▁' {
                    if let Some(p) = prev {
                        joins_space.insert(p);
                    }
                }
                prev = Some(c);
            }
        }
        SpmSplitter { joins_space }
    }

    /// Tokenizes `text` (spaces already `▁`) piece by piece; pieces seen
    /// before in this call reuse their tokens.
    pub(crate) fn encode<'t>(
        &self,
        vocab: &Vocab,
        text: &'t str,
        scratch: &mut SpmScratch,
        seen: &mut FxHashMap<&'t str, (usize, usize)>,
        out: &mut Vec<TokenId>,
    ) -> Result<()> {
        let mut start = 0;
        let mut prev: Option<char> = None;
        for (i, c) in text.char_indices() {
            if c == '▁' && i > start && prev.is_some_and(|p| !self.joins_space.contains(&p)) {
                self.encode_piece(vocab, &text[start..i], scratch, seen, out)?;
                start = i;
            }
            prev = Some(c);
        }
        self.encode_piece(vocab, &text[start..], scratch, seen, out)
    }

    fn encode_piece<'t>(
        &self,
        vocab: &Vocab,
        piece: &'t str,
        scratch: &mut SpmScratch,
        seen: &mut FxHashMap<&'t str, (usize, usize)>,
        out: &mut Vec<TokenId>,
    ) -> Result<()> {
        if let Some(&(s, len)) = seen.get(piece) {
            out.extend_from_within(s..s + len);
            return Ok(());
        }
        let s = out.len();
        encode(vocab, piece, scratch, out)?;
        if piece.len() <= MAX_CACHED_PIECE {
            seen.insert(piece, (s, out.len() - s));
        }
        Ok(())
    }
}

/// Longer pieces are not remembered (they rarely repeat).
const MAX_CACHED_PIECE: usize = 64;
