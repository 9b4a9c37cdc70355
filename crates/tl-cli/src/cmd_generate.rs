//! `tl generate` and `tl chat`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use tl_model::llm::{GenerateOptions, Llm};
use tl_model::sampler::SamplingParams;
use tl_tokenizer::ChatMessage;

/// Options shared by `generate` and `chat`.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// The GGUF model file.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// KV cache capacity in tokens (default: prompt + max tokens; chat: 4096). When given,
    /// also the runtime context that picks Phi-3 LongRoPE's factors as llama.cpp's `-c`
    /// does (long ones where it, rounded up to 256, exceeds the original context; without
    /// it, the training context decides, as llama.cpp's default `-c 0`).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx_size: usize,
    /// Scan all weights for NaN/Inf before running.
    #[arg(long)]
    pub check_tensors: bool,
    /// A Jinja chat template file overriding the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Temperature; 0 = greedy.
    #[arg(long, alias = "temperature", default_value_t = 0.0)]
    pub temp: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: i64,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop after this token id (repeatable).
    #[arg(long)]
    pub stop_id: Vec<u32>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Drop the oldest prompt tokens when the prompt does not fit the context.
    #[arg(long)]
    pub truncate: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// The speculative-decoding flags of `generate`, `chat` and `bench`.
#[derive(clap::Args, Clone)]
pub struct SpecArgs {
    /// Speculative decoding: `ngram` (prompt lookup), `draft` (a draft
    /// model, `--draft-model`) or `self` (the model drafts with a subset of
    /// its layers). The output distribution is unchanged (greedy: the same
    /// text).
    #[arg(long, value_name = "METHOD")]
    pub spec: Option<tl_model::spec::SpecMethod>,
    /// Most tokens drafted per speculative round (1..=32); default 6 with
    /// a draft model, 8 otherwise.
    #[arg(long)]
    pub spec_k: Option<usize>,
    /// The draft model for `--spec draft` (same vocabulary as the model).
    #[arg(long, value_name = "FILE")]
    pub draft_model: Option<PathBuf>,
    /// A draft model stops a round's drafts at the first token whose
    /// probability (its softmax) is below P; 0 drafts all `--spec-k`.
    #[arg(long, value_name = "P", default_value_t = DRAFT_P_MIN)]
    pub draft_p_min: f32,
    /// The draft model's output projection is requantized to this block
    /// type at load where the file's is wider (CPU; exact either way: the
    /// model verifies every draft); `keep` leaves it as the file has it.
    #[arg(long, value_name = "TYPE", default_value = DRAFT_OUTPUT_TYPE)]
    pub draft_output_type: String,
}

/// The default of `--draft-output-type`: Q4_0. On the 2-core CPU the 0.5B
/// draft's Q8_0 head as Q4_0 made the rounds 4–9% faster at the same or
/// nearly the same acceptance (docs/BENCHMARKS.md, "A cheaper draft head").
pub const DRAFT_OUTPUT_TYPE: &str = "q4_0";

/// The default of `--draft-p-min`: off, as llama.cpp's. On a quiet
/// machine 0.5 with `--spec-k 15` was no faster than k 6 without it
/// (docs/BENCHMARKS.md, "Cheaper draft rounds" and the quiet rerun after
/// it), and a positive P reads the draft's rows on the host.
pub const DRAFT_P_MIN: f32 = 0.0;

/// `--spec-k`, or its default for `method`: 6 for a draft model (the best
/// k of 4, 6 and 8 for the 0.5B drafting for the 1.5B on the CPU,
/// docs/BENCHMARKS.md "A cheaper draft head"), 8 otherwise.
pub fn spec_k(method: &tl_model::spec::SpecMethod, k: Option<usize>) -> usize {
    k.unwrap_or(match method {
        tl_model::spec::SpecMethod::Draft => 6,
        _ => 8,
    })
}

/// `--draft-output-type`'s value: `None` for `keep`.
pub fn draft_output_type(ty: &str) -> anyhow::Result<Option<tl_gguf::GgmlType>> {
    if ty.eq_ignore_ascii_case("keep") {
        return Ok(None);
    }
    let t = tl_gguf::GgmlType::from_name(&ty.to_ascii_uppercase())
        .or_else(|| tl_gguf::GgmlType::from_name(ty))
        .with_context(|| format!("--draft-output-type: unknown block type '{ty}' (or `keep`)"))?;
    if !tl_model::quantize::can_write(t) || tl_core::quant::requires_imatrix(t) {
        anyhow::bail!("--draft-output-type: can't quantize to {t} (without an importance matrix)");
    }
    Ok(Some(t))
}

/// Applies `--draft-output-type` to a loaded draft model (see
/// [`tl_model::model::Model::requantize_output`]).
pub fn cheapen_draft(
    d: &mut tl_model::model::Model,
    ty: Option<tl_gguf::GgmlType>,
) -> anyhow::Result<()> {
    let Some(t) = ty else {
        return Ok(());
    };
    let from = d.output_type();
    if d.requantize_output(t)
        .context("--draft-output-type: requantizing the draft's output projection")?
    {
        eprintln!("draft model: output projection requantized {from} -> {t} for drafting");
    }
    Ok(())
}

impl SpecArgs {
    /// The speculation settings, `None` without `--spec`.
    pub fn config(&self) -> anyhow::Result<Option<tl_model::spec::SpecConfig>> {
        self.spec
            .as_ref()
            .map(|m| {
                tl_model::spec::SpecConfig::new(m.clone(), spec_k(m, self.spec_k))
                    .map_err(|e| anyhow::anyhow!("--spec-k: {e}"))?
                    .with_p_min(self.draft_p_min)
                    .map_err(|e| anyhow::anyhow!("--draft-p-min: {e}"))
            })
            .transpose()
    }

    /// The draft model of `--spec draft --draft-model FILE`, on the same
    /// device; the flags checked against each other.
    pub fn load_draft(&self) -> anyhow::Result<Option<Llm>> {
        use tl_model::spec::SpecMethod;
        match (&self.spec, &self.draft_model) {
            (Some(SpecMethod::Draft), Some(p)) => {
                let ty = draft_output_type(&self.draft_output_type)?;
                let mut d = Llm::load_on(p, crate::device())
                    .with_context(|| format!("loading the draft model {}", p.display()))?;
                crate::configure(&mut d.model)?;
                cheapen_draft(&mut d.model, ty)?;
                Ok(Some(d))
            }
            (Some(SpecMethod::Draft), None) => {
                anyhow::bail!("--spec draft needs --draft-model FILE")
            }
            (_, Some(_)) => anyhow::bail!("--draft-model is used with --spec draft"),
            _ => Ok(None),
        }
    }
}

impl SamplingArgs {
    fn options(&self, ctx_size: usize) -> anyhow::Result<GenerateOptions> {
        let spec = self.spec.config()?;
        Ok(GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                penalty_last_n: self.repeat_last_n,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            stop_ids: self.stop_id.clone(),
            ignore_eos: self.ignore_eos,
            ctx_size,
            truncate_prompt: self.truncate,
            spec,
            ..Default::default()
        })
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(short, long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Constrain the output to JSON valid against the JSON schema in FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to the grammar in FILE: llama.cpp's GBNF, or
    /// llguidance's Lark syntax when the file name ends in `.lark`.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl GenerateArgs {
    /// The grammar of --json-schema / --grammar, read and checked.
    fn grammar_spec(&self) -> anyhow::Result<Option<tl_model::constrain::GrammarSpec>> {
        use tl_model::constrain::GrammarSpec;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        if let Some(p) = &self.json_schema {
            let v: serde_json::Value = serde_json::from_str(&read(p)?)
                .with_context(|| format!("{}: not valid JSON", p.display()))?;
            return Ok(Some(GrammarSpec::JsonSchema(v)));
        }
        if let Some(p) = &self.grammar {
            let g = read(p)?;
            let lark = p.extension().is_some_and(|e| e == "lark");
            return Ok(Some(if lark {
                GrammarSpec::Lark(g)
            } else {
                GrammarSpec::Gbnf(g)
            }));
        }
        Ok(None)
    }
}

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Initial system message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(t) = threads {
        anyhow::ensure!(t > 0, "--threads must be positive");
        // The pool runs matmuls and attention; rayon (only the comparison
        // modes of tl_core::matmul_with) gets the same count.
        tl_core::pool::configure_global_threads(t);
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(())
}

pub fn load(a: &ModelArgs) -> anyhow::Result<Llm> {
    init_threads(a.threads)?;
    // `--ctx-size` is also the runtime context llama.cpp's `-c` would be:
    // it picks Phi-3 LongRoPE's factor set (0: the training context).
    let mut llm = Llm::load_ctx(&a.model, crate::device(), a.ctx_size)
        .with_context(|| format!("loading {} on {}", a.model.display(), crate::device()))?;
    crate::configure(&mut llm.model)?;
    crate::log_device(&llm.model);
    if let Some(t) = &a.chat_template {
        llm.set_template_file(t)?;
    }
    if a.check_tensors {
        let bad = llm.model.check_tensors()?;
        anyhow::ensure!(
            bad.is_empty(),
            "tensors with NaN/Inf values: {}",
            bad.join(", ")
        );
        eprintln!(
            "check-tensors: all {} tensors finite",
            llm.model.file.tensors.len()
        );
    }
    Ok(llm)
}

pub fn run_generate(a: &GenerateArgs) -> anyhow::Result<()> {
    let llm = load(&a.model)?;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", a.prompt.clone()));
        llm.chat_prompt(&msgs)?
    } else {
        a.prompt.clone()
    };
    let mut opts = a.sampling.options(a.model.ctx_size)?;
    let mut compile_ms = 0.0;
    if let Some(spec) = a.grammar_spec()? {
        // The vocabulary's trie is built once per model, before compiling.
        llm.grammars()?;
        let t0 = std::time::Instant::now();
        anyhow::ensure!(
            opts.spec.is_none(),
            "--spec does not combine with --json-schema / --grammar"
        );
        let what = a.json_schema.as_ref().or(a.grammar.as_ref());
        opts.constraint = Some(
            llm.constraint(&spec)
                .with_context(|| what.map(|p| p.display().to_string()).unwrap_or_default())?,
        );
        compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    let draft = a.sampling.spec.load_draft()?;
    let mut stdout = std::io::stdout().lock();
    let print = |piece: &str| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
        true
    };
    let out = match &draft {
        Some(d) => llm.generate_with_draft(&prompt, &opts, d, print)?,
        None => llm.generate(&prompt, &opts, print)?,
    };
    let _ = writeln!(stdout);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?}",
        out.prompt_tokens,
        out.prompt_tok_per_s(),
        out.tokens.len(),
        out.decode_tok_per_s(),
        out.finish
    );
    if let Some(c) = &opts.constraint {
        let mut t = c.mask_times();
        t.sort_unstable();
        if !t.is_empty() {
            let p = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
            eprintln!(
                "grammar: compiled in {:.1} ms; {} masks, p50 {} µs, p99 {} µs",
                compile_ms,
                t.len(),
                p(0.5),
                p(0.99)
            );
        }
    }
    if opts.spec.is_some() {
        eprintln!(
            "speculation: {} rounds, {} drafted, {} accepted ({:.1}%)",
            out.spec.rounds,
            out.spec.drafted,
            out.spec.accepted,
            100.0 * out.spec.acceptance()
        );
    }
    Ok(())
}

/// Interactive chat: one line per user turn (a terminal or piped stdin);
/// `/reset` clears the history, `/system TEXT` sets the system message,
/// Ctrl-D (end of input) quits.
pub fn run_chat(a: &ChatArgs) -> anyhow::Result<()> {
    let llm = load(&a.model)?;
    let ctx = if a.model.ctx_size == 0 {
        4096
    } else {
        a.model.ctx_size
    };
    let opts = a.sampling.options(ctx)?;
    let draft = a.sampling.spec.load_draft()?;
    let interactive = std::io::stdin().is_terminal();
    let mut system = a.system.clone();
    let mut history: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    loop {
        if interactive {
            print!("> ");
            stdout.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if text == "/reset" {
            history.clear();
            eprintln!("(history cleared)");
            continue;
        }
        if let Some(s) = text.strip_prefix("/system") {
            system = Some(s.trim().to_string());
            history.clear();
            eprintln!("(system message set; history cleared)");
            continue;
        }
        if text == "/quit" || text == "/exit" {
            break;
        }
        history.push(ChatMessage::new("user", text));
        let mut msgs = Vec::new();
        if let Some(s) = &system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.extend(history.iter().cloned());
        let prompt = llm.chat_prompt(&msgs)?;
        let print = |piece: &str| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
            true
        };
        let out = match &draft {
            Some(d) => llm.generate_with_draft(&prompt, &opts, d, print),
            None => llm.generate(&prompt, &opts, print),
        };
        println!();
        match out {
            Ok(g) => history.push(ChatMessage::new("assistant", g.text)),
            Err(e) => {
                // Keep the session alive: report, drop the failed turn.
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}
