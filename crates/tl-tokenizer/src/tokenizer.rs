//! The tokenizer facade: encode, decode, pieces.

use std::path::Path;

use rustc_hash::FxHashMap;
use tl_gguf::{GgufFile, Metadata};

use crate::bpe::{BpeModel, BpeScratch};
use crate::error::{Result, TokenizerError};
use crate::pretok;
use crate::special::{partition, Fragment, SpecialMatcher};
use crate::spm::{SpmScratch, SpmSplitter};
use crate::stream::StreamDecoder;
use crate::unicode::cp_to_byte;
use crate::vocab::{TokenAttr, Vocab, VocabKind};
use crate::TokenId;

/// Words longer than this are not remembered within one `encode` call
/// (long words rarely repeat, and the map would grow with the text).
const MAX_CACHED_WORD: usize = 64;

/// How to encode (llama.cpp `llama_tokenize`'s `add_special` / `parse_special`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Add BOS/EOS where the model asks for them (`tokenizer.ggml.add_bos_token`, …).
    pub add_special: bool,
    /// Turn the text of control tokens in the input (`<|im_start|>`) into those
    /// tokens. User-defined tokens are always matched, as in llama.cpp.
    pub parse_special: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            add_special: true,
            parse_special: false,
        }
    }
}

/// How to decode (llama.cpp `llama_detokenize`'s `remove_special` / `unparse_special`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Drop a leading BOS and trailing EOS where the model adds them.
    pub remove_special: bool,
    /// Render control tokens as their text instead of nothing.
    pub unparse_special: bool,
}

/// A tokenizer built from GGUF metadata alone.
pub struct Tokenizer {
    vocab: Vocab,
    bpe: Option<BpeModel>,
    spm: Option<SpmSplitter>,
    ugm: Option<crate::ugm::Ugm>,
    matcher: SpecialMatcher,
    /// Every token's piece as rendered with special tokens shown
    /// (llama.cpp `cache_token_to_piece`), concatenated; `piece_ends[i]` ends piece i.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.vocab.kind)
            .field("pre", &self.vocab.pre)
            .field("n_vocab", &self.vocab.len())
            .field("special", &self.vocab.special)
            .finish()
    }
}

impl Tokenizer {
    /// Opens a GGUF file and builds its tokenizer.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let file = GgufFile::open(path)?;
        Tokenizer::from_metadata(&file.metadata)
    }

    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        Tokenizer::from_metadata(&file.metadata)
    }

    pub fn from_metadata(md: &Metadata) -> Result<Tokenizer> {
        Tokenizer::from_vocab(Vocab::from_metadata(md)?)
    }

    pub fn from_vocab(vocab: Vocab) -> Result<Tokenizer> {
        let bpe = (vocab.kind == VocabKind::Bpe).then(|| BpeModel::new(&vocab));
        let spm = (vocab.kind == VocabKind::Spm).then(|| SpmSplitter::new(&vocab));
        let ugm = match vocab.kind {
            VocabKind::Ugm => Some(crate::ugm::Ugm::new(&vocab)?),
            _ => None,
        };
        let matcher = SpecialMatcher::new(&vocab);
        let mut piece_bytes = Vec::new();
        let mut piece_ends = Vec::with_capacity(vocab.len());
        for id in 0..vocab.len() {
            render_piece(&vocab, id, &mut piece_bytes);
            let end =
                u32::try_from(piece_bytes.len()).map_err(|_| TokenizerError::BadMetadata {
                    key: "tokenizer.ggml.tokens",
                    reason: "token texts exceed 4 GiB".into(),
                })?;
            piece_ends.push(end);
        }
        Ok(Tokenizer {
            vocab,
            bpe,
            spm,
            ugm,
            matcher,
            piece_bytes,
            piece_ends,
        })
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Vocabulary size (the number of rows of the embedding matrix).
    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos(&self) -> Option<TokenId> {
        self.vocab.special.bos
    }

    pub fn eos(&self) -> Option<TokenId> {
        self.vocab.special.eos
    }

    pub fn eot(&self) -> Option<TokenId> {
        self.vocab.special.eot
    }

    pub fn pad(&self) -> Option<TokenId> {
        self.vocab.special.pad
    }

    pub fn unk(&self) -> Option<TokenId> {
        self.vocab.special.unk
    }

    /// Whether generation stops at this token (EOS, EOT, `<|im_end|>`, …).
    pub fn is_eog(&self, id: TokenId) -> bool {
        self.vocab.is_eog(id)
    }

    pub fn eog_ids(&self) -> &[TokenId] {
        self.vocab.eog_ids()
    }

    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// The stored text of a token (`<|im_start|>`, `Ġhello`, `▁hello`).
    pub fn token_text(&self, id: TokenId) -> Option<&str> {
        self.vocab.text(id)
    }

    /// The id of the token whose stored text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.vocab.id_of(text)
    }

    /// Encodes UTF-8 bytes; invalid UTF-8 is an error naming its offset.
    pub fn encode_bytes(&self, bytes: &[u8], opts: EncodeOptions) -> Result<Vec<TokenId>> {
        let text = std::str::from_utf8(bytes).map_err(|e| TokenizerError::InvalidUtf8 {
            offset: e.valid_up_to(),
        })?;
        self.encode(text, opts)
    }

    /// Encodes text exactly as llama.cpp's `llama_tokenize` does.
    pub fn encode(&self, text: &str, opts: EncodeOptions) -> Result<Vec<TokenId>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let frags = partition(&self.vocab, &self.matcher, text, opts.parse_special);
        let v = &self.vocab;
        let bos = || {
            v.special
                .bos
                .ok_or(TokenizerError::MissingSpecialToken { what: "BOS" })
        };
        let eos = || {
            v.special
                .eos
                .ok_or(TokenizerError::MissingSpecialToken { what: "EOS" })
        };
        match (&self.bpe, v.kind) {
            (Some(bpe), VocabKind::Bpe) => {
                if opts.add_special && v.add_bos {
                    out.push(bos()?);
                }
                let mut scratch = BpeScratch::default();
                // The texts BPE splits and merges, by fragment start, where they
                // are not the fragment itself: SPM-style BPE writes spaces as
                // U+2581 first (llama.cpp `llama_escape_whitespace`), and the
                // `whitespace` model drops whitespace and merges what lies
                // between (`llm_tokenizer_whitespace_session`).
                let rewritten: Option<FxHashMap<usize, Vec<String>>> =
                    (v.escape_whitespaces || v.whitespace_session).then(|| {
                        frags
                            .iter()
                            .filter_map(|f| match *f {
                                Fragment::Text { start, end } => {
                                    let t = &text[start..end];
                                    Some((start, bpe_pieces(v, t)))
                                }
                                Fragment::Token(_) => None,
                            })
                            .collect()
                    });
                let mut seen: FxHashMap<&str, (usize, usize)> = FxHashMap::default();
                let mut cpts = Vec::new();
                let mut offs = Vec::new();
                let mut lens = Vec::new();
                for f in frags {
                    let (start, end) = match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            continue;
                        }
                        Fragment::Text { start, end } => (start, end),
                    };
                    let own = [&text[start..end]];
                    let pieces: Vec<&str> = match rewritten.as_ref().and_then(|r| r.get(&start)) {
                        Some(p) => p.iter().map(String::as_str).collect(),
                        None => own.to_vec(),
                    };
                    for frag in pieces {
                        cpts.clear();
                        offs.clear();
                        for (i, c) in frag.char_indices() {
                            cpts.push(u32::from(c));
                            offs.push(i);
                        }
                        offs.push(frag.len());
                        pretok::split(v.pre, &cpts, &mut lens);
                        // Word lengths are in code points.
                        let mut at = 0;
                        for &n in &lens {
                            let word = &frag[offs[at]..offs[at + n]];
                            at += n;
                            // A word always merges the same way, so repeats copy
                            // the tokens of its first occurrence.
                            if let Some(&(s, len)) = seen.get(word) {
                                out.extend_from_within(s..s + len);
                                continue;
                            }
                            let s = out.len();
                            bpe.encode_word(v, word, &mut scratch, &mut out);
                            if word.len() <= MAX_CACHED_WORD {
                                seen.insert(word, (s, out.len() - s));
                            }
                        }
                    }
                }
                if opts.add_special && v.add_eos {
                    out.push(eos()?);
                }
            }
            (_, VocabKind::Ugm) => {
                if opts.add_special && v.add_bos {
                    out.push(bos()?);
                }
                let ugm = self
                    .ugm
                    .as_ref()
                    .ok_or(TokenizerError::MissingSpecialToken {
                        what: "the Unigram model",
                    })?;
                let unk = v
                    .special
                    .unk
                    .ok_or(TokenizerError::MissingSpecialToken { what: "UNK" })?;
                for f in frags {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text { start, end } => {
                            ugm.encode(v, &text[start..end], unk, &mut out)?
                        }
                    }
                }
                if opts.add_special && v.add_eos {
                    out.push(eos()?);
                }
            }
            (_, VocabKind::Wpm) => {
                // llama.cpp adds [CLS] (the BOS id) and [SEP] with
                // `add_special`, whatever `add_bos`/`add_eos` say.
                if opts.add_special {
                    out.push(bos()?);
                }
                for f in frags {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text { start, end } => {
                            let unk = v
                                .special
                                .unk
                                .ok_or(TokenizerError::MissingSpecialToken { what: "UNK" });
                            crate::wpm::encode(
                                v,
                                &text[start..end],
                                v.max_token_len,
                                unk,
                                &mut out,
                            )?;
                        }
                    }
                }
                if opts.add_special {
                    out.push(
                        v.special
                            .sep
                            .ok_or(TokenizerError::MissingSpecialToken { what: "SEP" })?,
                    );
                }
            }
            _ => {
                if opts.add_special && v.add_bos {
                    out.push(bos()?);
                }
                // Escape every text fragment first: the per-call piece cache
                // borrows from these strings.
                let mut prev_special = true;
                let escaped: Vec<Option<String>> = frags
                    .iter()
                    .map(|f| match *f {
                        Fragment::Token(_) => {
                            prev_special = true;
                            None
                        }
                        Fragment::Text { start, end } => {
                            let mut buf = String::with_capacity(end - start + 3);
                            if v.add_space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in text[start..end].chars() {
                                buf.push(if c == ' ' { '▁' } else { c });
                            }
                            prev_special = false;
                            Some(buf)
                        }
                    })
                    .collect();
                let mut scratch = SpmScratch::default();
                let mut seen = FxHashMap::default();
                for (f, esc) in frags.iter().zip(&escaped) {
                    match (f, esc, &self.spm) {
                        (Fragment::Token(id), _, _) => out.push(*id),
                        (_, Some(t), Some(spm)) => {
                            spm.encode(v, t, &mut scratch, &mut seen, &mut out)?
                        }
                        _ => {}
                    }
                }
                if opts.add_special && v.add_eos {
                    out.push(eos()?);
                }
            }
        }
        Ok(out)
    }

    /// The bytes a token stands for (llama.cpp `llama_token_to_piece` with
    /// `lstrip` 0). Control tokens give nothing unless `special`.
    pub fn token_to_piece(&self, id: TokenId, special: bool) -> Result<&[u8]> {
        let attr = self.vocab.attr(id).ok_or(TokenizerError::TokenOutOfRange {
            id,
            n_vocab: self.vocab.len(),
        })?;
        if !special && attr.has(TokenAttr(TokenAttr::UNKNOWN.0 | TokenAttr::CONTROL.0)) {
            return Ok(&[]);
        }
        let i = id as usize;
        let start = if i == 0 {
            0
        } else {
            self.piece_ends[i - 1] as usize
        };
        Ok(&self.piece_bytes[start..self.piece_ends[i] as usize])
    }

    /// Decodes to bytes as llama.cpp's `llama_detokenize` does.
    pub fn decode_bytes(&self, ids: &[TokenId], opts: DecodeOptions) -> Result<Vec<u8>> {
        let v = &self.vocab;
        let mut ids = ids;
        let mut remove_space = v.add_space_prefix;
        if opts.remove_special && v.add_bos {
            if let (Some(&first), Some(bos)) = (ids.first(), v.special.bos) {
                if first == bos {
                    remove_space = false;
                    ids = &ids[1..];
                }
            }
        }
        if opts.remove_special && v.add_eos {
            if let (Some(&last), Some(eos)) = (ids.last(), v.special.eos) {
                if last == eos {
                    ids = &ids[..ids.len() - 1];
                }
            }
        }
        let mut out = Vec::new();
        for &id in ids {
            let mut piece = self.token_to_piece(id, opts.unparse_special)?;
            if remove_space {
                if let Some(rest) = piece.strip_prefix(b" ") {
                    piece = rest;
                }
            }
            remove_space = false;
            out.extend_from_slice(piece);
        }
        if v.clean_spaces {
            clean_up_spaces(&mut out);
        }
        Ok(out)
    }

    /// Decodes to a string; byte sequences that are not UTF-8 (a token
    /// sequence cut inside a character) become U+FFFD.
    pub fn decode(&self, ids: &[TokenId], opts: DecodeOptions) -> Result<String> {
        let bytes = self.decode_bytes(ids, opts)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// An incremental decoder for streaming generated tokens.
    pub fn stream_decoder(&self, unparse_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, unparse_special)
    }

    pub(crate) fn add_space_prefix(&self) -> bool {
        self.vocab.add_space_prefix
    }
}

/// The texts a BPE text fragment is merged as, where they differ from the
/// fragment: spaces escaped as U+2581, or the whitespace-free runs (each
/// lowercased when the normalizer says so) of the `whitespace` model.
fn bpe_pieces(v: &Vocab, t: &str) -> Vec<String> {
    let t = if v.escape_whitespaces {
        std::borrow::Cow::Owned(t.replace(' ', "\u{2581}"))
    } else {
        std::borrow::Cow::Borrowed(t)
    };
    if !v.whitespace_session {
        return vec![t.into_owned()];
    }
    let mut pieces = Vec::new();
    let mut cur = String::new();
    for c in t.chars() {
        if crate::unicode::flags(u32::from(c)).is_whitespace() {
            if !cur.is_empty() {
                pieces.push(std::mem::take(&mut cur));
            }
        } else if v.lowercase {
            cur.push(char::from_u32(crate::wpm::to_lower(u32::from(c))).unwrap_or(c));
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        pieces.push(cur);
    }
    pieces
}

/// llama.cpp `token_to_piece` for one token with `special` set, appended to `out`.
fn render_piece(v: &Vocab, id: usize, out: &mut Vec<u8>) {
    let attr = v.attrs[id];
    let text = &v.texts[id];
    if attr.has(TokenAttr(
        TokenAttr::UNKNOWN.0 | TokenAttr::CONTROL.0 | TokenAttr::USER_DEFINED.0,
    )) {
        out.extend_from_slice(text.as_bytes());
    } else if attr.has(TokenAttr::NORMAL) {
        match v.kind {
            VocabKind::Spm | VocabKind::Wpm | VocabKind::Ugm => {
                out.extend_from_slice(text.replace('▁', " ").as_bytes())
            }
            VocabKind::Bpe if v.escape_whitespaces => {
                out.extend_from_slice(text.replace('▁', " ").as_bytes())
            }
            VocabKind::Bpe => {
                // llama.cpp `llama_decode_text`.
                for c in text.chars() {
                    match cp_to_byte(c) {
                        Some(b) => out.push(b),
                        None => {
                            out.extend_from_slice(b"[UNK_BYTE_0x");
                            let mut buf = [0u8; 4];
                            for b in c.encode_utf8(&mut buf).bytes() {
                                out.extend_from_slice(format!("{b:02x}").as_bytes());
                            }
                            out.extend_from_slice(text.as_bytes());
                            out.push(b']');
                        }
                    }
                }
            }
        }
    } else if attr.has(TokenAttr::BYTE) {
        // `<0xXX>`; llama.cpp reads two hex digits with strtol (0 when unreadable).
        let byte = text
            .get(3..5)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        out.push(byte);
    }
}

/// llama.cpp `detokenize`'s `clean_spaces` passes (the HF
/// `clean_up_tokenization_spaces` rules), kept in place and index for index:
/// the second pass blanks the byte after a removed " ' " and later tests see
/// that blank.
fn clean_up_spaces(t: &mut Vec<u8>) {
    let mut total = t.len();

    // " ?", " !", " .", " ," lose the space.
    let total1 = total;
    total = total.min(1);
    for i in 1..total1 {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }

    // " ' " loses both spaces.
    let total2 = total;
    total = total.min(1);
    let mut i = 1;
    while i < total2 {
        let x = t[i];
        if x == b'\'' && i + 1 < total2 && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }

    // " 's", " 'm", " 're", " 've" lose the space.
    let total3 = total;
    total = total.min(1);
    for i in 1..total3 {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = t[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < total3 {
                let x2 = t[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
}
