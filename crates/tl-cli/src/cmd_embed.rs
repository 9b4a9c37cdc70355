//! `tl embed`: embeddings of texts with an encoder model (bert,
//! nomic-bert), pooled and normalised as llama.cpp's embedding example does.

use std::path::PathBuf;

use anyhow::Context as _;
use tl_model::encoder::{Embedder, Pooling};

#[derive(clap::Args, Debug, Clone)]
pub struct EmbedArgs {
    /// GGUF embedding model (bert, nomic-bert).
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: PathBuf,
    /// Text to embed (repeat for several inputs).
    #[arg(short = 'p', long = "prompt", value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// File of inputs, one per line (empty lines skipped; "-" reads
    /// standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Output: `json` (an array with one vector per input; with pooling
    /// `none`, one array of token vectors per input) or `lines` (one line
    /// of space-separated values per vector).
    #[arg(long, default_value = "json")]
    pub format: String,
    /// Leave the vectors as pooled, without the L2 normalisation.
    #[arg(long)]
    pub no_normalize: bool,
}

fn read_inputs(a: &EmbedArgs) -> anyhow::Result<Vec<String>> {
    let mut inputs = a.prompt.clone();
    if let Some(f) = &a.file {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        };
        inputs.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if inputs.is_empty() {
        anyhow::bail!("nothing to embed: give -p TEXT or -f FILE");
    }
    Ok(inputs)
}

pub fn run(a: &EmbedArgs) -> anyhow::Result<()> {
    if !matches!(a.format.as_str(), "json" | "lines") {
        anyhow::bail!("--format {}: expected json or lines", a.format);
    }
    let inputs = read_inputs(a)?;
    let emb = Embedder::load_on(&a.model, crate::device())
        .with_context(|| format!("loading {}", a.model.display()))?;
    let seqs = inputs
        .iter()
        .map(|t| emb.tokenize(t))
        .collect::<Result<Vec<_>, _>>()?;
    emb.check(&seqs).map_err(anyhow::Error::msg)?;
    let vecs = emb.embed(&seqs, !a.no_normalize)?;
    let d = emb.encoder.n_embd();
    let per_token = emb.encoder.config.pooling == Pooling::None;
    let mut out = String::new();
    if a.format == "lines" {
        for v in &vecs {
            for row in v.chunks(d) {
                let line: Vec<String> = row.iter().map(|x| x.to_string()).collect();
                out.push_str(&line.join(" "));
                out.push('\n');
            }
        }
    } else {
        // Serialised from f32 directly: the shortest text that reads back
        // as the same f32.
        out = if per_token {
            let rows: Vec<Vec<&[f32]>> = vecs.iter().map(|v| v.chunks(d).collect()).collect();
            serde_json::to_string(&rows)?
        } else {
            serde_json::to_string(&vecs)?
        };
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
