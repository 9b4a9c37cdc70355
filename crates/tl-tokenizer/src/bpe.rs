//! Byte-level BPE merging by rank (and its raw-UTF-8 form for SPM-style
//! vocabularies) (llama.cpp `src/llama-vocab.cpp`,
//! `llm_tokenizer_bpe_session::tokenize`).
//!
//! llama.cpp compares symbol texts as strings on every step; here the texts
//! that can take part in a merge are interned once at load, so a step is a
//! hash lookup on two integers. The merge order (lowest rank first, then
//! leftmost) and the final lookups are the same.
//!
//! Why not the HF `tokenizers` crate here: built programmatically from the
//! same GGUF data (`examples/hf_compare.rs`, feature `hf-compare`), it gives
//! llama.cpp's ids on the Qwen fixture corpus, but encodes 1 MB of English at
//! 1.6 MB/s against 44 MB/s for this file (2-core x86-64, 2026-11,
//! tokenizers 0.22 with its pure-Rust `fancy-regex` backend; the default
//! backend is the Oniguruma C library). It also cannot do the score-ordered
//! SentencePiece merges (`spm.rs`) nor llama.cpp's special-token pass
//! (`special.rs`), so it would cover half the vocabularies at a fifth of
//! the speed of llama.cpp's own splitter port.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use crate::unicode::byte_to_cp_table;
use crate::vocab::Vocab;
use crate::TokenId;

/// Interned symbol id; `NONE` for a text that appears in no merge.
type Sym = u32;
const NONE: Sym = u32::MAX;

pub(crate) struct BpeModel {
    /// Single characters that appear in merges → symbol id.
    char_sym: FxHashMap<char, Sym>,
    /// (left, right) → (rank, merged symbol).
    pairs: FxHashMap<(Sym, Sym), (u32, Sym)>,
    /// Symbol → token id of its text, if the text is a token.
    sym_token: Vec<Option<TokenId>>,
}

impl BpeModel {
    pub(crate) fn new(vocab: &Vocab) -> BpeModel {
        let mut intern: FxHashMap<&str, Sym> = FxHashMap::default();
        let mut texts: Vec<&str> = Vec::new();
        fn id_of<'a>(
            s: &'a str,
            intern: &mut FxHashMap<&'a str, Sym>,
            texts: &mut Vec<&'a str>,
        ) -> Sym {
            *intern.entry(s).or_insert_with(|| {
                texts.push(s);
                (texts.len() - 1) as Sym
            })
        }
        let mut merged_texts: Vec<String> = Vec::with_capacity(vocab.merges.len());
        for (a, b) in &vocab.merges {
            merged_texts.push(format!("{a}{b}"));
        }
        let mut pairs = FxHashMap::default();
        pairs.reserve(vocab.merges.len());
        for (rank, ((a, b), ab)) in vocab.merges.iter().zip(&merged_texts).enumerate() {
            if a.is_empty() || b.is_empty() {
                continue;
            }
            let sa = id_of(a, &mut intern, &mut texts);
            let sb = id_of(b, &mut intern, &mut texts);
            let sab = id_of(ab, &mut intern, &mut texts);
            // First occurrence of a pair keeps its rank (`std::map::emplace`).
            pairs.entry((sa, sb)).or_insert((rank as u32, sab));
        }
        let mut char_sym = FxHashMap::default();
        for (s, &id) in &intern {
            let mut it = s.chars();
            if let (Some(c), None) = (it.next(), it.next()) {
                char_sym.insert(c, id);
            }
        }
        let sym_token = texts
            .iter()
            .map(|t| vocab.text_to_id.get(*t).copied())
            .collect();
        BpeModel {
            char_sym,
            pairs,
            sym_token,
        }
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    sym: Sym,
    /// Byte range in the encoded word.
    start: u32,
    len: u32,
    prev: i32,
    next: i32,
}

#[derive(PartialEq, Eq)]
struct Bigram {
    rank: u32,
    left: i32,
    right: i32,
    left_sym: Sym,
    right_sym: Sym,
    merged: Sym,
}

impl Ord for Bigram {
    // BinaryHeap pops the greatest: lowest rank first, then leftmost
    // (llama.cpp `llm_bigram_bpe::comparator`).
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Scratch buffers reused across words.
#[derive(Default)]
pub(crate) struct BpeScratch {
    encoded: String,
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Bigram>,
}

impl BpeModel {
    /// Merges one pre-tokenized word (raw UTF-8) and appends its tokens.
    pub(crate) fn encode_word(
        &self,
        vocab: &Vocab,
        word: &str,
        scratch: &mut BpeScratch,
        out: &mut Vec<TokenId>,
    ) {
        let enc = &mut scratch.encoded;
        enc.clear();
        if vocab.byte_encode {
            let table = byte_to_cp_table();
            for &b in word.as_bytes() {
                enc.push(table[b as usize]);
            }
        } else {
            enc.push_str(word);
        }

        if vocab.ignore_merges {
            if let Some(&id) = vocab.text_to_id.get(enc.as_str()) {
                out.push(id);
                return;
            }
        }

        let syms = &mut scratch.symbols;
        syms.clear();
        for (i, (off, c)) in enc.char_indices().enumerate() {
            syms.push(Symbol {
                sym: self.char_sym.get(&c).copied().unwrap_or(NONE),
                start: off as u32,
                len: c.len_utf8() as u32,
                prev: i as i32 - 1,
                next: i as i32 + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }

        let heap = &mut scratch.heap;
        heap.clear();
        for i in 1..syms.len() {
            self.push_bigram(syms, heap, i as i32 - 1, i as i32);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left as usize, bg.right as usize);
            if syms[l].len == 0
                || syms[r].len == 0
                || syms[l].sym != bg.left_sym
                || syms[r].sym != bg.right_sym
            {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[l].sym = bg.merged;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if syms[r].next >= 0 {
                let n = syms[r].next as usize;
                syms[n].prev = bg.left;
            }
            let prev = syms[l].prev;
            let next = syms[l].next;
            self.push_bigram(syms, heap, prev, bg.left);
            self.push_bigram(syms, heap, bg.left, next);
        }

        for s in syms.iter().filter(|s| s.len > 0) {
            let tok = if s.sym != NONE {
                self.sym_token.get(s.sym as usize).copied().flatten()
            } else {
                None
            };
            let text = &enc[s.start as usize..(s.start + s.len) as usize];
            match tok.or_else(|| vocab.text_to_id.get(text).copied()) {
                Some(id) => out.push(id),
                None if !vocab.byte_encode => {
                    // Raw UTF-8 (SPM-style BPE): each byte as its `<0xXX>` token.
                    for &b in text.as_bytes() {
                        if let Some(&id) = vocab.text_to_id.get(&format!("<0x{b:02X}>")) {
                            out.push(id);
                        }
                    }
                }
                None => {
                    // llama.cpp then looks up each byte of the encoded text on its own;
                    // only ASCII bytes can name a token.
                    for &b in text.as_bytes() {
                        if b < 0x80 {
                            let mut buf = [0u8; 4];
                            if let Some(&id) = vocab
                                .text_to_id
                                .get(char::from(b).encode_utf8(&mut buf) as &str)
                            {
                                out.push(id);
                            }
                        }
                    }
                }
            }
        }
    }

    #[inline]
    fn push_bigram(&self, syms: &[Symbol], heap: &mut BinaryHeap<Bigram>, left: i32, right: i32) {
        if left < 0 || right < 0 {
            return;
        }
        let (ls, rs) = (syms[left as usize].sym, syms[right as usize].sym);
        if ls == NONE || rs == NONE {
            return;
        }
        if let Some(&(rank, merged)) = self.pairs.get(&(ls, rs)) {
            heap.push(Bigram {
                rank,
                left,
                right,
                left_sym: ls,
                right_sym: rs,
                merged,
            });
        }
    }
}
