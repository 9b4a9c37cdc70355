//! Constrained decoding: JSON schemas, GBNF and Lark grammars and regular
//! expressions, enforced token by token with llguidance.
//!
//! [`Grammars`] is built once per model from its vocabulary (the token
//! trie llguidance walks to compute masks): every token's bytes as
//! `llama_token_to_piece` gives them; a control token, which has no text,
//! is entered as llama.cpp's llguidance integration enters it, its text
//! behind llguidance's special-token marker byte (0xFF), so grammars can
//! name it and free text never produces it. [`Grammars::compile`] turns a
//! [`GrammarSpec`] into a per-sequence [`Constraint`]: before each sample
//! [`Constraint::apply`] sets the logits of every token the grammar does
//! not allow next to −∞ (the end-of-generation tokens are allowed exactly
//! when the grammar may end), and [`Constraint::commit`] advances it by the
//! chosen token ([`Constraint::pick`] does the three around a draw).
//! [`Constraint::prepare`] computes the next mask ahead, on another thread
//! if the caller likes (the server's scheduler does it while the step's
//! forward runs): the mask depends only on the tokens already committed.
//!
//! A lazy constraint ([`GrammarSpec::Lazy`], for `tool_choice: "auto"`)
//! leaves the text free until its trigger appears (a tool-call token, a
//! reply that opens with `{`, or one that opens a ```` ```json ```` fence),
//! and from there holds the rest to the grammar, as llama.cpp's lazy
//! grammars do. llguidance (1.9) has no trigger of its own — its Lark
//! `[lazy]`/`stop=` rules are shortest-match lexemes inside a grammar that
//! is on from the first token, which would mean a mask for every token of
//! the free text — so the triggers are watched here: a token trigger by id,
//! a text trigger on the bytes of the tokens drawn so far (the trie's
//! spelling of each token, so the check is the same whatever the
//! tokenization), after which the tokens drawn so far are replayed into
//! the matcher.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tl_tokenizer::{EncodeOptions, Tokenizer};

/// What a generation is constrained to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// A llama.cpp GBNF grammar (root rule `root`).
    Gbnf(String),
    /// A grammar in llguidance's Lark syntax (root rule `start`).
    Lark(String),
    /// Text matching this regular expression.
    Regex(String),
    /// Free text until `trigger` appears, then `grammar` from the trigger
    /// on (the trigger is its first token or text).
    Lazy {
        trigger: Trigger,
        grammar: Box<GrammarSpec>,
    },
}

/// What turns a lazy constraint on.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// This token (Hermes' `<tool_call>`, Mistral's `[TOOL_CALLS]`): the
    /// grammar starts with it.
    Token(u32),
    /// A reply whose first non-blank character is `{` (a Llama 3 JSON
    /// call is the whole reply): the grammar starts at the reply's start
    /// and must allow the leading blanks. A token that begins such a reply
    /// but that the grammar refuses (`{"answer`) is drawn again under the
    /// grammar.
    JsonReply,
    /// A reply whose text, after leading blanks, opens a Markdown code
    /// fence of language `lang`: "```" and `lang` followed by a blank, `{`
    /// or `[` (so ```` ```json ```` fires and ```` ```jsonc ````,
    /// ```` ```python ```` or a fence after some prose do not). The text
    /// is checked on the bytes drawn so far, whatever tokens spell them;
    /// the grammar starts at the reply's start (it must allow the leading
    /// blanks and the fence's opening) and, as with [`Trigger::JsonReply`],
    /// a token that completes the opening but that the grammar refuses is
    /// drawn again under the grammar. `token`, when given, also fires
    /// anywhere as [`Trigger::Token`] does (the grammar must allow a start
    /// with that token too).
    Fence { lang: String, token: Option<u32> },
}

/// How the reply's opening text stands against a text trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opening {
    /// It may still become the trigger.
    Maybe,
    /// It is the trigger.
    Fired,
    /// It can no longer be.
    Missed,
}

/// The reply's opening text `text` (its blanks included) against a
/// trigger at the reply's start.
fn opening(trigger: &Trigger, text: &[u8]) -> Opening {
    let t = text.trim_ascii_start();
    match trigger {
        Trigger::Token(_) => Opening::Missed,
        Trigger::JsonReply => match t.first() {
            None => Opening::Maybe,
            Some(b'{') => Opening::Fired,
            Some(_) => Opening::Missed,
        },
        Trigger::Fence { lang, .. } => {
            let open = [b"```".as_slice(), lang.as_bytes()].concat();
            if open.starts_with(t) {
                Opening::Maybe
            } else if t.starts_with(&open)
                && matches!(
                    t.get(open.len()),
                    Some(b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[')
                )
            {
                Opening::Fired
            } else {
                Opening::Missed
            }
        }
    }
}

impl GrammarSpec {
    fn to_top(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(v) => TopLevelGrammar::from_json_schema(compact(v.clone())),
            GrammarSpec::Gbnf(g) => TopLevelGrammar::from_lark(crate::gbnf::to_lark(g)?),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Lazy { grammar, .. } => grammar.to_top()?,
        })
    }

    /// What kind of constraint this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            GrammarSpec::JsonObject => "JSON object",
            GrammarSpec::JsonSchema(_) => "JSON schema",
            GrammarSpec::Gbnf(_) => "GBNF grammar",
            GrammarSpec::Lark(_) => "Lark grammar",
            GrammarSpec::Regex(_) => "regular expression",
            GrammarSpec::Lazy { grammar, .. } => grammar.kind(),
        }
    }
}

/// JSON is generated in the one layout `json.dumps` writes (`", "` and
/// `": "`, no other whitespace) unless the schema sets llguidance's
/// `x-guidance` options itself: free whitespace lets a model pad its
/// answer with blank lines until it runs out of tokens.
pub fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// The tokenizer as llguidance sees it: the trie of token bytes, and our
/// tokenizer for the text it needs tokenized (forced prefixes).
struct Env {
    trie: TokTrie,
    tok: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        // As llama.cpp's integration: no BOS, control-token text parsed.
        // llguidance needs tokens that spell exactly `s`; where the model's
        // tokenizer changes the text (SentencePiece's leading space), the
        // trie's greedy tokenization is used instead.
        let text = String::from_utf8_lossy(s);
        let ids = self
            .tok
            .encode(
                &text,
                EncodeOptions {
                    add_special: false,
                    parse_special: true,
                },
            )
            .unwrap_or_default();
        let mut spelled = Vec::with_capacity(s.len());
        for &id in &ids {
            spelled.extend_from_slice(self.trie.token(id));
        }
        if spelled == s {
            ids
        } else {
            self.trie.greedy_tokenize(s)
        }
    }
}

/// Compiles grammars for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
    env: TokEnv,
    /// Tokens that end generation: allowed when the grammar may end.
    stop_ids: Arc<Vec<u32>>,
    eos: u32,
}

impl Grammars {
    /// `tok` must be the model's tokenizer (a second copy: llguidance keeps
    /// it); `n_vocab` the width of the logits rows.
    pub fn new(tok: Tokenizer, n_vocab: usize) -> Result<Grammars, String> {
        let stop: Vec<u32> = tok.eog_ids().to_vec();
        let eos = tok
            .eot()
            .or(tok.eos())
            .or(stop.first().copied())
            .ok_or("the model has no end-of-generation token")?;
        let mut words = Vec::with_capacity(n_vocab);
        for id in 0..n_vocab as u32 {
            let plain = tok.token_to_piece(id, false).unwrap_or(&[]);
            if !plain.is_empty() {
                words.push(plain.to_vec());
                continue;
            }
            let special = tok.token_to_piece(id, true).unwrap_or(&[]);
            if special.is_empty() {
                words.push(Vec::new());
            } else {
                let mut w = Vec::with_capacity(special.len() + 1);
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                w.extend_from_slice(special);
                words.push(w);
            }
        }
        let mut info = TokRxInfo::new(n_vocab as u32, eos);
        info.tok_bos = tok.bos();
        info.tok_end_of_turn = tok.eot();
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tok });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.set_stderr_log_level(0);
        Ok(Grammars {
            factory,
            env,
            stop_ids: Arc::new(stop),
            eos,
        })
    }

    /// A constraint in its start state; an invalid schema or grammar is an
    /// error saying what is wrong and where.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let top = spec.to_top()?;
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| format!("invalid {}: {e}", spec.kind()))?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(format!("invalid {}: {e}", spec.kind()));
        }
        let state = match spec {
            GrammarSpec::Lazy { trigger, .. } => {
                let token = match trigger {
                    Trigger::Token(t) => Some(*t),
                    Trigger::Fence { token, .. } => *token,
                    Trigger::JsonReply => None,
                };
                if let Some(t) = token {
                    if t as usize >= self.env.tok_trie().vocab_size() {
                        return Err(format!("the trigger token {t} is not in the vocabulary"));
                    }
                }
                match trigger {
                    Trigger::Token(t) => State::WaitToken(*t),
                    _ => State::WaitOpening {
                        trigger: trigger.clone(),
                        lead: Vec::new(),
                        text: Vec::new(),
                    },
                }
            }
            _ => State::Active,
        };
        Ok(Constraint {
            m,
            env: self.env.clone(),
            state,
            stop_ids: self.stop_ids.clone(),
            eos: self.eos,
            done: false,
            pending: None,
            time: MaskTime::default(),
            mask_us: Default::default(),
        })
    }
}

/// Where a constraint stands.
#[derive(Clone, Debug, PartialEq)]
enum State {
    /// Every token is masked.
    Active,
    /// Lazy: free until this token.
    WaitToken(u32),
    /// Lazy, at the reply's start: free while the text drawn so far
    /// (`text`, spelled by the tokens `lead`) may still open `trigger`'s
    /// text; once it does, the grammar gets `lead` first. A miss leaves
    /// the trigger's token, if it has one, to wait for.
    WaitOpening {
        trigger: Trigger,
        lead: Vec<u32>,
        text: Vec<u8>,
    },
    /// Lazy, and the trigger can no longer come: free to the end.
    Off,
}

/// Time spent on masks since the last [`Constraint::take_time`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaskTime {
    /// Masks computed.
    pub masks: u64,
    /// Computing them (llguidance's `compute_mask`), wherever it ran.
    pub compute_us: u64,
    /// Setting refused logits to −∞ (always on the sampling path).
    pub apply_us: u64,
}

/// What a pick drawn away from the host must respect
/// ([`Constraint::device_mask`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceMask {
    /// Nothing: the grammar is not on (a lazy one waiting for its trigger).
    Free,
    /// The allowed tokens, one bit each: token `t` is bit `t % 32` of word
    /// `t / 32`; words past the end refuse.
    Words(Vec<u32>),
    /// The grammar is complete and allows nothing more: the caller drops
    /// the pick and ends the sequence.
    End,
}

/// One sequence's grammar state.
pub struct Constraint {
    m: Matcher,
    env: TokEnv,
    state: State,
    stop_ids: Arc<Vec<u32>>,
    eos: u32,
    done: bool,
    /// The next mask, computed ahead by [`Constraint::prepare`] (with its
    /// compute time); any step of the grammar drops it.
    pending: Option<(Result<SimpleVob, String>, u64)>,
    time: MaskTime,
    /// Microseconds of each mask (compute + apply), shared by the copies
    /// made from one compiled constraint ([`Constraint::mask_times`]).
    mask_us: Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            m: self.m.deep_clone(),
            env: self.env.clone(),
            state: self.state.clone(),
            stop_ids: self.stop_ids.clone(),
            eos: self.eos,
            done: self.done,
            pending: self.pending.clone(),
            time: MaskTime::default(),
            mask_us: self.mask_us.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("state", &self.state)
            .field("done", &self.done)
            .finish()
    }
}

impl Constraint {
    /// Whether the next pick is masked (an active grammar not yet
    /// complete): a lazy constraint waiting for its trigger has no mask.
    pub fn needs_mask(&self) -> bool {
        self.state == State::Active && !self.done && !self.m.is_stopped()
    }

    /// Whether the grammar is not on: a lazy constraint whose trigger has
    /// not fired (or can no longer fire). Its picks are free text (at the
    /// reply's start, through [`Constraint::pick`]), so its sequence may
    /// speculate and verify the drafts with [`Constraint::pick`].
    pub fn is_waiting(&self) -> bool {
        self.state != State::Active
    }

    /// Whether the next pick needs the logits on the host: not while a
    /// lazy constraint waits for its trigger token or can no longer fire
    /// (the token may be drawn elsewhere, on the GPU, and shown to
    /// [`Constraint::observe`]).
    pub fn needs_logits(&self) -> bool {
        !matches!(self.state, State::WaitToken(_) | State::Off)
    }

    /// Takes note of a token drawn without this constraint (allowed only
    /// where [`Constraint::needs_logits`] is false): the trigger token
    /// turns a lazy constraint on.
    pub fn observe(&mut self, t: u32) -> Result<(), String> {
        match self.state {
            State::WaitToken(trigger) if t == trigger => {
                self.state = State::Active;
                self.commit(t)
            }
            State::WaitToken(_) | State::Off => Ok(()),
            _ => Err("a token was drawn without the grammar's mask".into()),
        }
    }

    /// Computes the next mask ahead (for [`Constraint::apply`] to use),
    /// e.g. on another thread while the model computes the logits: it
    /// depends only on the tokens committed so far. Does nothing when no
    /// mask is needed or one is ready.
    pub fn prepare(&mut self) {
        if self.pending.is_some() || !self.needs_mask() {
            return;
        }
        let t0 = std::time::Instant::now();
        let mask = self.m.compute_mask().map_err(|e| e.to_string());
        let us = t0.elapsed().as_micros() as u64;
        self.time.masks += 1;
        self.time.compute_us += us;
        self.pending = Some((mask, us));
    }

    /// Marks the mask being prepared as failed (the thread computing it
    /// panicked): the next [`Constraint::apply`] returns `msg`.
    pub fn fail_pending(&mut self, msg: &str) {
        self.pending = Some((Err(msg.to_string()), 0));
    }

    /// Time spent on masks since the last call.
    pub fn take_time(&mut self) -> MaskTime {
        std::mem::take(&mut self.time)
    }

    /// Sets every logit the grammar does not allow next to −∞. Returns
    /// `false` when nothing but ending is allowed (the text is complete):
    /// the caller then ends the sequence. A lazy constraint waiting for
    /// its trigger leaves the logits alone.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<bool, String> {
        // The same bits a device sampler gets, applied here.
        match self.device_mask(logits.len())? {
            DeviceMask::Free => Ok(true),
            DeviceMask::End => Ok(false),
            DeviceMask::Words(words) => {
                let t0 = std::time::Instant::now();
                crate::sampler::apply_mask(logits, &words);
                self.time.apply_us += t0.elapsed().as_micros() as u64;
                Ok(true)
            }
        }
    }

    /// Whether the next pick can be drawn on the device under
    /// [`Constraint::device_mask`]: anything but a lazy trigger spelled by
    /// text at the reply's start, which needs the row on the host.
    pub fn device_pickable(&self) -> bool {
        !matches!(self.state, State::WaitOpening { .. })
    }

    /// The next pick's mask as bits (for a sampler that runs elsewhere, the
    /// GPU's, or for [`Constraint::apply`]): the grammar's tokens, stop
    /// tokens allowed exactly when ending is.
    /// The drawn token then goes to [`Constraint::take_device_pick`].
    pub fn device_mask(&mut self, vocab: usize) -> Result<DeviceMask, String> {
        if self.state != State::Active {
            return Ok(DeviceMask::Free);
        }
        if self.done || self.m.is_stopped() {
            self.done = true;
            return Ok(DeviceMask::End);
        }
        self.prepare();
        let Some((mask, compute_us)) = self.pending.take() else {
            return Err("no mask was computed".into());
        };
        let mask = mask?;
        let t0 = std::time::Instant::now();
        let may_end = mask.is_allowed(self.eos);
        let n = vocab.div_ceil(32);
        let mut words = vec![0u32; n];
        let src = mask.as_slice();
        let k = n.min(src.len());
        words[..k].copy_from_slice(&src[..k]);
        if !vocab.is_multiple_of(32) {
            if let Some(last) = words.last_mut() {
                *last &= (1u32 << (vocab % 32)) - 1;
            }
        }
        for &t in self.stop_ids.iter() {
            let (w, bit) = (t as usize / 32, t % 32);
            if let Some(word) = words.get_mut(w).filter(|_| (t as usize) < vocab) {
                if may_end {
                    *word |= 1 << bit;
                } else {
                    *word &= !(1 << bit);
                }
            }
        }
        let any = may_end || mask.num_set() > 0;
        let apply_us = t0.elapsed().as_micros() as u64;
        self.time.apply_us += apply_us;
        if let Ok(mut v) = self.mask_us.lock() {
            v.push((compute_us + apply_us).min(u32::MAX as u64) as u32);
        }
        if !any {
            self.done = true;
            return Ok(DeviceMask::End);
        }
        Ok(DeviceMask::Words(words))
    }

    /// Takes a token drawn under [`Constraint::device_mask`]: committed
    /// where the grammar is on, shown to the trigger where it waits.
    pub fn take_device_pick(&mut self, t: u32) -> Result<(), String> {
        if self.state == State::Active {
            self.commit(t)
        } else {
            self.observe(t)
        }
    }

    /// One constrained pick: masks `row`, draws a token with `draw` and
    /// commits it. `Ok(None)`: the grammar is complete and allows nothing
    /// more (the caller ends the sequence). A lazy constraint draws freely
    /// until its trigger, which turns it on; a token that fires a text
    /// trigger ([`Trigger::JsonReply`], [`Trigger::Fence`]) but that the
    /// grammar refuses is drawn again from the unmasked row under the
    /// grammar's mask.
    pub fn pick(
        &mut self,
        row: &mut [f32],
        mut draw: impl FnMut(&mut [f32]) -> u32,
    ) -> Result<Option<u32>, String> {
        match &mut self.state {
            State::Active => {
                if !self.apply(row)? {
                    return Ok(None);
                }
                let t = draw(row);
                self.commit(t)?;
                Ok(Some(t))
            }
            State::Off => Ok(Some(draw(row))),
            State::WaitToken(trigger) => {
                let trigger = *trigger;
                let t = draw(row);
                if t == trigger {
                    self.state = State::Active;
                    self.commit(t)?;
                }
                Ok(Some(t))
            }
            State::WaitOpening { .. } => {
                let saved = row.to_vec();
                let t = draw(row);
                let State::WaitOpening {
                    trigger,
                    lead,
                    text,
                } = &mut self.state
                else {
                    return Ok(Some(t));
                };
                // What waits after a miss: the trigger's token, if any.
                let missed = match trigger {
                    Trigger::Fence {
                        token: Some(id), ..
                    } => State::WaitToken(*id),
                    _ => State::Off,
                };
                if self.stop_ids.contains(&t) {
                    self.state = State::Off;
                    return Ok(Some(t));
                }
                if missed == State::WaitToken(t) {
                    // The trigger token at the reply's start: the grammar
                    // starts with it, as anywhere else.
                    self.state = State::Active;
                    self.commit(t)?;
                    return Ok(Some(t));
                }
                text.extend_from_slice(self.env.tok_trie().token(t));
                match opening(trigger, text) {
                    Opening::Maybe => {
                        lead.push(t);
                        return Ok(Some(t));
                    }
                    Opening::Missed => {
                        self.state = missed;
                        return Ok(Some(t));
                    }
                    Opening::Fired => {}
                }
                // The trigger's text is out: the grammar from the reply's
                // start.
                let lead = std::mem::take(lead);
                self.state = State::Active;
                self.pending = None;
                if self.m.validate_tokens(&lead).unwrap_or(0) < lead.len() {
                    // An opening the grammar does not allow (blanks it
                    // has no room for): the text stays free.
                    self.state = missed;
                    return Ok(Some(t));
                }
                self.m.consume_tokens(&lead).map_err(|e| e.to_string())?;
                if self.m.validate_tokens(&[t]).unwrap_or(0) == 1 {
                    self.commit(t)?;
                    return Ok(Some(t));
                }
                row.copy_from_slice(&saved);
                if !self.apply(row)? {
                    return Ok(None);
                }
                let t = draw(row);
                self.commit(t)?;
                Ok(Some(t))
            }
        }
    }

    /// The mask times (µs) of this constraint and every copy of it so far.
    pub fn mask_times(&self) -> Vec<u32> {
        self.mask_us.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Advances by the chosen token (end-of-generation tokens end it).
    pub fn commit(&mut self, t: u32) -> Result<(), String> {
        self.pending = None;
        if self.state != State::Active {
            return Ok(());
        }
        if self.stop_ids.contains(&t) {
            self.done = true;
            return Ok(());
        }
        self.m.consume_token(t).map_err(|e| e.to_string())?;
        if self.m.is_stopped() {
            self.done = true;
        }
        Ok(())
    }

    /// The tokens the grammar forces from here (where it allows one
    /// continuation only, e.g. the fixed keys and punctuation of a JSON
    /// schema), consumed: the caller appends them without sampling and
    /// runs them through the model in one step, as a prompt chunk.
    /// Empty when nothing is forced.
    pub fn take_forced(&mut self) -> Vec<u32> {
        if !self.needs_mask() {
            return Vec::new();
        }
        let toks = self.m.consume_ff_tokens();
        if !toks.is_empty() {
            self.pending = None;
        }
        if self.m.is_stopped() {
            self.done = true;
        }
        toks
    }

    /// Whether the grammar is complete and allows nothing more.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the text so far is a complete match (ending is allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.m.is_accepting().unwrap_or(false)
    }

    /// How many of `tokens` the grammar accepts from its current state
    /// (the state is left unchanged).
    pub fn validate(&mut self, tokens: &[u32]) -> usize {
        self.m.validate_tokens(tokens).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_triggers_at_the_reply_start() {
        let fence = Trigger::Fence {
            lang: "json".into(),
            token: None,
        };
        let at = |t: &str| opening(&fence, t.as_bytes());
        for t in ["", "\n", " `", "``", "```", "```j", "```json"] {
            assert_eq!(at(t), Opening::Maybe, "{t:?}");
        }
        for t in [
            "```json\n",
            "\n```json ",
            "```json{",
            "```json\r\n{\"na",
            "```json[",
        ] {
            assert_eq!(at(t), Opening::Fired, "{t:?}");
        }
        for t in [
            "```python\n",
            "```jsonc\n",
            "``json",
            "Here: ```json\n",
            "{\"name\"",
            "```\n{",
        ] {
            assert_eq!(at(t), Opening::Missed, "{t:?}");
        }
        let json = |t: &str| opening(&Trigger::JsonReply, t.as_bytes());
        assert_eq!(json(" \n"), Opening::Maybe);
        assert_eq!(json(" {\"a\""), Opening::Fired);
        assert_eq!(json("Sure"), Opening::Missed);
        assert_eq!(opening(&Trigger::Token(3), b""), Opening::Missed);
    }
}
