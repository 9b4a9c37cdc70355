//! The embedding API: a model with its tokenizer and chat template, text in,
//! text out, streamed through a callback.
//!
//! A runnable example on a tiny random-weight model (the output is noise,
//! the mechanics are real):
//!
//! ```
//! use tl_model::llm::{GenerateOptions, Llm};
//! use tl_model::synth::{synthesize, SynthSpec};
//!
//! let path = std::env::temp_dir().join(format!("tl-doc-{}.gguf", std::process::id()));
//! synthesize(&SynthSpec::default())?.write_file(&path)?;
//! let llm = Llm::load(&path)?;
//! let opts = GenerateOptions { max_tokens: 4, ignore_eos: true, ..Default::default() };
//! let mut streamed = String::new();
//! let out = llm.generate("hello", &opts, |piece| {
//!     streamed.push_str(piece);
//!     true
//! })?;
//! assert_eq!(out.tokens.len(), 4);
//! assert_eq!(streamed, out.text);
//! // Greedy decoding is deterministic, alone or in a batch.
//! let again = llm.generate_batch(&["hello", "other"], &opts)?;
//! assert_eq!(again[0].tokens, out.tokens);
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With a real model:
//!
//! ```no_run
//! use tl_model::llm::{GenerateOptions, Llm};
//!
//! let llm = Llm::load("qwen2.5-coder-0.5b-instruct-q4.gguf")?;
//! let opts = GenerateOptions { max_tokens: 32, ..Default::default() };
//! let out = llm.generate("The capital of France is", &opts, |piece| {
//!     print!("{piece}");
//!     true // keep going
//! })?;
//! println!("\n{} tokens, finish: {:?}", out.tokens.len(), out.finish);
//! # Ok::<(), tl_model::ModelError>(())
//! ```

use std::time::Instant;

use tl_tokenizer::{ChatMessage, ChatTemplate, EncodeOptions, RenderOptions, Tokenizer};

use crate::error::{ModelError, Result};
use crate::generate::{Finish, Runner, TokenOptions};
use crate::model::Model;
use crate::sampler::SamplingParams;

/// Text-level generation options.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these strings
    /// (the stop string itself is not returned).
    pub stop: Vec<String>,
    /// Extra stop token ids besides the model's end-of-generation tokens.
    pub stop_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// KV cache capacity in tokens (prompt + generation); `0` = prompt + max_tokens.
    pub ctx_size: usize,
    /// Drop the oldest prompt tokens instead of failing when the prompt does
    /// not fit the context.
    pub truncate_prompt: bool,
    /// Parse special-token text (`<|im_start|>`) in the prompt as tokens.
    pub parse_special: bool,
    pub prefill_chunk: usize,
    /// Speculative decoding (the output distribution is unchanged).
    pub spec: Option<crate::spec::SpecConfig>,
    /// The output must follow this grammar ([`Llm::constraint`] compiles
    /// one); speculation is off while it is set.
    pub constraint: Option<crate::constrain::Constraint>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_ids: Vec::new(),
            ignore_eos: false,
            ctx_size: 0,
            truncate_prompt: false,
            parse_special: true,
            prefill_chunk: 512,
            spec: None,
            constraint: None,
        }
    }
}

/// The outcome of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: Finish,
    /// Seconds spent in prefill (until the first token) and in decoding.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Drafted and accepted tokens when speculation was on.
    pub spec: crate::spec::SpecStats,
}

impl Generation {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
    }

    /// Decode speed over the tokens after the first.
    pub fn decode_tok_per_s(&self) -> f64 {
        (self.tokens.len().saturating_sub(1)) as f64 / self.decode_s.max(1e-9)
    }
}

/// A model ready to generate text.
pub struct Llm {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    grammars: std::sync::OnceLock<std::result::Result<crate::constrain::Grammars, String>>,
}

/// Streams decoded text and holds back whatever could still become a stop
/// string, so a stop string never reaches the caller.
struct StopFilter<'a> {
    stops: &'a [String],
    held: String,
    out: String,
}

impl StopFilter<'_> {
    /// Adds text; returns (text safe to emit, whether a stop string was hit).
    fn push(&mut self, s: &str) -> (String, bool) {
        self.held.push_str(s);
        if let Some(at) = self
            .stops
            .iter()
            .filter(|st| !st.is_empty())
            .filter_map(|st| self.held.find(st.as_str()))
            .min()
        {
            let emit = self.held[..at].to_string();
            self.out.push_str(&emit);
            self.held.clear();
            return (emit, true);
        }
        // Keep the longest suffix of `held` that is a prefix of a stop string.
        let mut keep = 0;
        for st in self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if st.starts_with(suffix) {
                    keep = keep.max(suffix.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        self.out.push_str(&emit);
        (emit, false)
    }

    fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        self.out.push_str(&rest);
        rest
    }
}

impl Llm {
    /// Loads weights, tokenizer and chat template (the file's, or a built-in
    /// one chosen by architecture) from one GGUF file.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::load_on(path, tl_core::Device::Cpu)
    }

    /// [`Llm::load`] with the model's weights and forward on `device`.
    pub fn load_on(path: impl AsRef<std::path::Path>, device: tl_core::Device) -> Result<Self> {
        Self::load_ctx(path, device, 0)
    }

    /// [`Llm::load_on`] for a runtime context of `ctx` tokens (0: the
    /// training context), which picks Phi-3 LongRoPE's factor set
    /// ([`Model::from_file_ctx`]).
    pub fn load_ctx(
        path: impl AsRef<std::path::Path>,
        device: tl_core::Device,
        ctx: usize,
    ) -> Result<Self> {
        let model = Model::load_ctx(path, device, ctx)?;
        let tokenizer = Tokenizer::from_gguf(&model.file)?;
        let template = ChatTemplate::from_metadata(&model.file.metadata, &tokenizer)?;
        if tokenizer.n_vocab() != model.config.vocab {
            return Err(ModelError::BadConfig(format!(
                "tokenizer has {} tokens, the model {}",
                tokenizer.n_vocab(),
                model.config.vocab
            )));
        }
        Ok(Llm {
            model,
            tokenizer,
            template,
            grammars: Default::default(),
        })
    }

    /// Replaces the chat template with one read from a file.
    pub fn set_template_file(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.template = ChatTemplate::from_file(path, &self.tokenizer)?;
        Ok(())
    }

    /// Renders a conversation with the chat template, ending with the
    /// opening of the assistant's turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        self.chat_prompt_with_tools(messages, None)
    }

    /// [`Llm::chat_prompt`] with OpenAI-style tool definitions, for
    /// templates that render them.
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let opts = RenderOptions {
            add_generation_prompt: true,
            tools: tools.cloned(),
            ..Default::default()
        };
        Ok(self.template.render(messages, &opts)?)
    }

    /// Tokenizes a prompt the way llama.cpp does (BOS when the model adds one).
    pub fn encode_prompt(&self, prompt: &str, parse_special: bool) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(
            prompt,
            EncodeOptions {
                add_special: true,
                parse_special,
            },
        )?)
    }

    fn token_options(&self, o: &GenerateOptions) -> TokenOptions {
        let mut stop_ids = o.stop_ids.clone();
        if !o.ignore_eos {
            stop_ids.extend_from_slice(self.tokenizer.eog_ids());
        }
        TokenOptions {
            max_tokens: o.max_tokens,
            sampling: o.sampling.clone(),
            stop_ids,
            prefill_chunk: o.prefill_chunk,
            spec: o.spec.clone(),
            constraint: o.constraint.clone(),
        }
    }

    /// The grammar compiler for this model's vocabulary, built on first use
    /// (a second copy of the tokenizer and the token trie, ≈0.1–0.5 s for a
    /// 150k vocabulary) and shared after.
    pub fn grammars(&self) -> Result<&crate::constrain::Grammars> {
        let g = self.grammars.get_or_init(|| {
            Tokenizer::from_gguf(&self.model.file)
                .map_err(|e| e.to_string())
                .and_then(|t| crate::constrain::Grammars::new(t, self.model.config.vocab))
        });
        g.as_ref().map_err(|e| ModelError::Constraint(e.clone()))
    }

    /// Compiles `spec` for this model (an invalid schema or grammar is a
    /// [`ModelError::Constraint`] saying what is wrong).
    pub fn constraint(
        &self,
        spec: &crate::constrain::GrammarSpec,
    ) -> Result<crate::constrain::Constraint> {
        self.grammars()?
            .compile(spec)
            .map_err(ModelError::Constraint)
    }

    /// Fits the prompt into the context (error, or truncation when asked).
    fn fit_prompt(&self, mut ids: Vec<u32>, o: &GenerateOptions) -> Result<(Vec<u32>, usize)> {
        let model_ctx = self.model.config.context;
        let want = if o.ctx_size == 0 {
            (ids.len() + o.max_tokens).min(model_ctx)
        } else {
            o.ctx_size.min(model_ctx)
        };
        if ids.len() >= want {
            if !o.truncate_prompt {
                return Err(ModelError::PromptTooLong {
                    prompt: ids.len(),
                    context: want,
                });
            }
            // Keep the most recent tokens, leaving room to generate.
            let keep = want.saturating_sub(o.max_tokens.min(want / 2)).max(1);
            ids.drain(..ids.len() - keep);
        }
        Ok((ids, want))
    }

    /// Generates text for one prompt, streaming pieces to `on_text`, which
    /// may return `false` to stop early.
    pub fn generate(
        &self,
        prompt: &str,
        o: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let ids = self.encode_prompt(prompt, o.parse_special)?;
        self.generate_tokens(ids, o, &mut on_text)
    }

    /// Like [`Llm::generate`] for an already tokenized prompt.
    pub fn generate_tokens(
        &self,
        ids: Vec<u32>,
        o: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generate_inner(ids, o, on_text, None)
    }

    /// [`Llm::generate`] with `draft` drafting for speculative decoding
    /// (`o.spec` with `SpecMethod::Draft`). The draft must have the same
    /// vocabulary, token for token ([`Llm::check_draft`]).
    pub fn generate_with_draft(
        &self,
        prompt: &str,
        o: &GenerateOptions,
        draft: &Llm,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.check_draft(draft)?;
        let ids = self.encode_prompt(prompt, o.parse_special)?;
        self.generate_inner(ids, o, &mut on_text, Some(draft))
    }

    /// Checks that `draft` can draft for this model: the same token text at
    /// every id (equal sizes are not enough: a different tokenizer of the
    /// same size would draft nonsense ids).
    pub fn check_draft(&self, draft: &Llm) -> Result<()> {
        let (a, b) = (&self.tokenizer, &draft.tokenizer);
        if a.n_vocab() != b.n_vocab() {
            return Err(ModelError::BadConfig(format!(
                "the draft model's vocabulary has {} tokens, the target's {}",
                b.n_vocab(),
                a.n_vocab()
            )));
        }
        for id in 0..a.n_vocab() as u32 {
            if a.token_text(id) != b.token_text(id) {
                return Err(ModelError::BadConfig(format!(
                    "the draft model's token {id} is {:?}, the target's {:?}: the vocabularies differ",
                    b.token_text(id).unwrap_or(""),
                    a.token_text(id).unwrap_or("")
                )));
            }
        }
        Ok(())
    }

    fn generate_inner(
        &self,
        ids: Vec<u32>,
        o: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
        draft: Option<&Llm>,
    ) -> Result<Generation> {
        let (ids, ctx) = self.fit_prompt(ids, o)?;
        let mut runner = Runner::new(&self.model, ctx)?;
        if matches!(
            o.spec.as_ref().map(|s| &s.method),
            Some(crate::spec::SpecMethod::Draft)
        ) {
            let d = draft.ok_or_else(|| {
                ModelError::BadConfig("speculation with a draft model needs a draft model".into())
            })?;
            runner = runner.with_draft(&d.model, ctx)?;
        }
        if matches!(
            o.spec.as_ref().map(|s| &s.method),
            Some(crate::spec::SpecMethod::SelfDraft)
        ) {
            runner = runner.with_self_draft(ctx)?;
        }
        let topts = self.token_options(o);
        let mut dec = self.tokenizer.stream_decoder(false);
        let mut filt = StopFilter {
            stops: &o.stop,
            held: String::new(),
            out: String::new(),
        };
        let start = Instant::now();
        let mut first_at: Option<Instant> = None;
        let mut stopped_by_string = false;
        let mut err = None;
        let res = runner.generate_batch(std::slice::from_ref(&ids), &topts, |_, t| {
            first_at.get_or_insert_with(Instant::now);
            let piece = match dec.push(t) {
                Ok(p) => p,
                Err(e) => {
                    err = Some(e);
                    return false;
                }
            };
            let (emit, hit) = filt.push(&piece);
            let keep_going = emit.is_empty() || on_text(&emit);
            if hit {
                stopped_by_string = true;
                return false;
            }
            keep_going
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        let (tokens, mut finish) = res
            .into_iter()
            .next()
            .unwrap_or((Vec::new(), Finish::Length));
        if stopped_by_string {
            finish = Finish::Stop;
        } else {
            let tail = dec.finish();
            let (emit, _) = filt.push(&tail);
            if !emit.is_empty() {
                on_text(&emit);
            }
            let rest = filt.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        let end = Instant::now();
        let first = first_at.unwrap_or(end);
        Ok(Generation {
            text: filt.out,
            tokens,
            prompt_tokens: ids.len(),
            finish,
            prefill_s: (first - start).as_secs_f64(),
            decode_s: (end - first).as_secs_f64(),
            spec: runner.spec_stats,
        })
    }

    /// Generates for several prompts in one ragged batch (no streaming).
    pub fn generate_batch(&self, prompts: &[&str], o: &GenerateOptions) -> Result<Vec<Generation>> {
        let mut all = Vec::with_capacity(prompts.len());
        let mut total_ctx = 0;
        for p in prompts {
            let (ids, ctx) = self.fit_prompt(self.encode_prompt(p, o.parse_special)?, o)?;
            total_ctx += ctx;
            all.push(ids);
        }
        let mut runner = Runner::new(&self.model, total_ctx)?;
        if matches!(
            o.spec.as_ref().map(|s| &s.method),
            Some(crate::spec::SpecMethod::SelfDraft)
        ) {
            runner = runner.with_self_draft(total_ctx)?;
        }
        let topts = self.token_options(o);
        let start = Instant::now();
        let res = runner.generate_batch(&all, &topts, |_, _| true)?;
        let secs = start.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(res.len());
        for ((tokens, finish), ids) in res.into_iter().zip(&all) {
            let mut text = self.tokenizer.decode(&tokens, Default::default())?;
            let mut finish = finish;
            if let Some(at) = o
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                finish = Finish::Stop;
            }
            out.push(Generation {
                text,
                tokens,
                prompt_tokens: ids.len(),
                finish,
                prefill_s: 0.0,
                decode_s: secs,
                spec: runner.spec_stats,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let stops = vec!["STOP".to_string(), "\n\n".to_string()];
        let mut f = StopFilter {
            stops: &stops,
            held: String::new(),
            out: String::new(),
        };
        assert_eq!(f.push("hello S"), ("hello ".to_string(), false));
        assert_eq!(f.push("T"), (String::new(), false));
        assert_eq!(f.push("x"), ("STx".to_string(), false));
        assert_eq!(f.push(" a\n"), (" a".to_string(), false));
        assert_eq!(f.push("\nrest"), (String::new(), true));
        assert_eq!(f.out, "hello STx a");
    }
}
