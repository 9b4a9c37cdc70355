//! Requests as they arrive ([`GenerationRequest`]), checked once into
//! [`ValidRequest`] (which only [`Validator::validate`] can build), and the
//! events a request streams back.

use std::sync::Arc;

use tl_model::llm::Llm;
use tl_model::sampler::SamplingParams;
use tl_tokenizer::ChatMessage;

use crate::error::{EngineError, Result};

/// Largest `n` (choices per request).
pub const MAX_N: usize = 16;
/// Largest number of alternatives per token in logprobs (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Largest number of stop strings (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// What to continue.
#[derive(Clone, Debug)]
pub enum PromptInput {
    /// Raw text; special-token text in it is parsed as tokens.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A generation request before validation. `None` means "the default".
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: PromptInput,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stop: Vec<String>,
    /// Alternatives per token to report; `Some(0)` = only the chosen token.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    /// OpenAI-style tool definitions, passed to chat templates that use them.
    pub tools: Option<serde_json::Value>,
    /// Speculative decoding for this request: `None` takes the server's
    /// default.
    pub speculative: Option<bool>,
    /// The output must follow this grammar; the name is the request field
    /// it came from (for the error message when it does not compile).
    pub grammar: Option<(&'static str, tl_model::constrain::GrammarSpec)>,
}

impl GenerationRequest {
    pub fn new(prompt: PromptInput) -> Self {
        GenerationRequest {
            prompt,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            seed: None,
            n: None,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
            tools: None,
            grammar: None,
            speculative: None,
        }
    }
}

/// A request that passed validation: tokenized, within the context and the
/// KV pool, with sane sampling parameters and a fixed seed.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) n: usize,
    pub(crate) stop: Vec<String>,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) logprobs: Option<usize>,
    pub(crate) speculative: Option<bool>,
    /// The compiled grammar's start state (each choice gets a copy).
    pub(crate) constraint: Option<Box<tl_model::constrain::Constraint>>,
}

impl ValidRequest {
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.prompt
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn seed(&self) -> u64 {
        self.sampling.seed
    }
}

/// Checks requests against the model: template, tokenizer, context and KV
/// pool size. Cheap to clone; used on the request's own task.
#[derive(Clone)]
pub struct Validator {
    llm: Arc<Llm>,
    /// Tokens one sequence may hold: the model context, capped by the pool.
    limit: usize,
    limit_is_pool: bool,
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // `RandomState` is seeded from the OS once per process; mixing in a
    // counter gives a fresh value per call without another dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

fn range_f32(param: &'static str, v: f32, lo: f32, hi: f32, lo_open: bool) -> Result<f32> {
    let ok = v.is_finite() && v <= hi && if lo_open { v > lo } else { v >= lo };
    if ok {
        Ok(v)
    } else {
        let lb = if lo_open { "<" } else { "≤" };
        Err(EngineError::InvalidParam {
            param,
            message: format!("{v} is out of range ({lo} {lb} {param} ≤ {hi})"),
        })
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl Validator {
    pub fn new(llm: Arc<Llm>, pool_tokens: usize) -> Self {
        let ctx = llm.model.config.context;
        Validator {
            llm,
            limit: ctx.min(pool_tokens),
            limit_is_pool: pool_tokens < ctx,
        }
    }

    pub fn llm(&self) -> &Arc<Llm> {
        &self.llm
    }

    /// Tokens one sequence (prompt + completion) may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The prompt's token ids, as a generation request would see them
    /// (chat template applied, BOS added where the model adds one).
    pub fn tokenize(
        &self,
        prompt: &PromptInput,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let llm = &*self.llm;
        let text = match prompt {
            PromptInput::Tokens(t) => {
                let vocab = llm.model.config.vocab;
                if let Some(&bad) = t.iter().find(|&&t| t as usize >= vocab) {
                    return Err(EngineError::BadToken { token: bad, vocab });
                }
                return Ok(t.clone());
            }
            PromptInput::Text(s) => {
                if s.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                s.clone()
            }
            PromptInput::Chat(msgs) => {
                if msgs.is_empty() {
                    return Err(EngineError::EmptyMessages);
                }
                let mut msgs = msgs.clone();
                for (index, m) in msgs.iter_mut().enumerate() {
                    if !ROLES.contains(&m.role.as_str()) {
                        return Err(EngineError::UnknownRole {
                            index,
                            role: m.role.clone(),
                        });
                    }
                    // OpenAI's newer name for the system role; templates
                    // only know "system".
                    if m.role == "developer" {
                        m.role = "system".into();
                    }
                }
                llm.chat_prompt_with_tools(&msgs, tools)
                    .map_err(|e| EngineError::Template(e.to_string()))?
            }
        };
        llm.encode_prompt(&text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn validate(&self, r: GenerationRequest) -> Result<ValidRequest> {
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: range_f32("temperature", r.temperature.unwrap_or(1.0), 0.0, 2.0, false)?,
            top_p: range_f32("top_p", r.top_p.unwrap_or(1.0), 0.0, 1.0, true)?,
            top_k: r.top_k.unwrap_or(0),
            min_p: range_f32("min_p", r.min_p.unwrap_or(0.0), 0.0, 1.0, false)?,
            repeat_penalty: range_f32(
                "repetition_penalty",
                r.repetition_penalty.unwrap_or(1.0),
                0.0,
                10.0,
                true,
            )?,
            presence_penalty: range_f32(
                "presence_penalty",
                r.presence_penalty.unwrap_or(0.0),
                -2.0,
                2.0,
                false,
            )?,
            frequency_penalty: range_f32(
                "frequency_penalty",
                r.frequency_penalty.unwrap_or(0.0),
                -2.0,
                2.0,
                false,
            )?,
            penalty_last_n: d.penalty_last_n,
            seed: r.seed.unwrap_or_else(random_seed),
        };
        sampling.validate().map_err(|e| EngineError::InvalidParam {
            param: "temperature",
            message: e.to_string(),
        })?;
        let n = r.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(EngineError::InvalidParam {
                param: "n",
                message: format!("{n} is out of range (1 ≤ n ≤ {MAX_N})"),
            });
        }
        if r.stop.len() > MAX_STOPS {
            return Err(EngineError::InvalidParam {
                param: "stop",
                message: format!("at most {MAX_STOPS} stop sequences, got {}", r.stop.len()),
            });
        }
        if let Some(k) = r.logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(EngineError::InvalidParam {
                    param: "top_logprobs",
                    message: format!("{k} is out of range (0 ≤ top_logprobs ≤ {MAX_TOP_LOGPROBS})"),
                });
            }
        }
        let constraint = match &r.grammar {
            None => None,
            Some((param, spec)) => {
                Some(
                    self.llm
                        .constraint(spec)
                        .map_err(|e| EngineError::InvalidParam {
                            param,
                            message: match e {
                                tl_model::ModelError::Constraint(m) => m,
                                e => e.to_string(),
                            },
                        })?,
                )
            }
        };
        let prompt = self.tokenize(&r.prompt, r.tools.as_ref())?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let what = if self.limit_is_pool {
            "KV cache size"
        } else {
            "model context"
        };
        let max_tokens = match r.max_tokens {
            Some(0) => {
                return Err(EngineError::InvalidParam {
                    param: "max_tokens",
                    message: "must be at least 1".into(),
                })
            }
            Some(m) => m,
            None => self.limit.saturating_sub(prompt.len()).max(1),
        };
        if prompt.len().saturating_add(max_tokens) > self.limit {
            return Err(EngineError::TooLong {
                prompt: prompt.len(),
                max_tokens,
                limit: self.limit,
                what,
            });
        }
        let stop_ids = if r.ignore_eos {
            Vec::new()
        } else {
            self.llm.tokenizer.eog_ids().to_vec()
        };
        Ok(ValidRequest {
            prompt,
            max_tokens,
            sampling,
            n,
            stop: r.stop,
            stop_ids,
            logprobs: r.logprobs,
            speculative: r.speculative,
            constraint: constraint.map(Box::new),
        })
    }
}

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Log-probability of one token and, if asked, its top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's text (lossy where a piece is part of a character).
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(u32, String, Vec<u8>, f32)>,
}

/// What a request's stream carries.
#[derive(Clone, Debug)]
pub enum Event {
    /// New text of one choice (may be empty while text is held back for a
    /// possible stop string or an unfinished character).
    Delta {
        choice: usize,
        text: String,
        token: Option<u32>,
        logprob: Option<TokenLogprob>,
    },
    /// A choice ended.
    Finished {
        choice: usize,
        reason: FinishReason,
        completion_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: usize,
    },
    /// The request failed; no more events follow.
    Error(EngineError),
}
