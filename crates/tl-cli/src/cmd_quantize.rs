//! `tl quantize`: rewrites a GGUF model in another block type with
//! llama-quantize's per-tensor mixes (`tl_model::quantize`).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use tl_gguf::GgmlType;
use tl_model::imatrix::Imatrix;
use tl_model::quantize::{self, FileType, ImatrixUse, QuantizeOptions, SplitOutput};

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Input GGUF model (F32/F16/BF16, or quantized with --allow-requantize).
    pub input: PathBuf,
    /// Output GGUF file (written to OUTPUT.partial, then renamed); with
    /// --keep-split or --split-max-*, the prefix of the parts
    /// (OUTPUT-00001-of-0000N.gguf, ...; a trailing .gguf is dropped).
    pub output: PathBuf,
    /// File type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q2_K_S,
    /// Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL,
    /// IQ4_XS, IQ3_M, IQ3_S, IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS,
    /// IQ1_M, IQ1_S, TQ1_0, TQ2_0 (Q3_K, Q4_K and Q5_K mean the _M mixes; Q2_K_S, IQ3_XS,
    /// IQ3_XXS and the IQ2/IQ1 types need --imatrix), or llama.cpp's number
    /// for one.
    #[arg(value_name = "TYPE")]
    pub ftype: String,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// Quantize tensors that are already quantized (dequantizing them first).
    #[arg(long)]
    pub allow_requantize: bool,
    /// Copy output.weight unchanged.
    #[arg(long)]
    pub leave_output_tensor: bool,
    /// Give every quantized tensor the file type's default block type (no mix).
    #[arg(long)]
    pub pure: bool,
    /// Block type of output.weight (and of a tied token_embd).
    #[arg(long, value_name = "TYPE")]
    pub output_tensor_type: Option<String>,
    /// Block type of token_embd.weight.
    #[arg(long, value_name = "TYPE")]
    pub token_embedding_type: Option<String>,
    /// Print each tensor's chosen type and the sizes, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Importance matrix (llama-imatrix's GGUF or legacy .dat format, or
    /// `tl imatrix`'s output): quantize with the weighted quantizers.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Use the importance matrix only for tensors whose name contains NAME
    /// (repeatable).
    #[arg(
        long,
        value_name = "NAME",
        requires = "imatrix",
        conflicts_with = "exclude_weights"
    )]
    pub include_weights: Vec<String>,
    /// Don't use the importance matrix for tensors whose name contains NAME
    /// (repeatable).
    #[arg(long, value_name = "NAME", requires = "imatrix")]
    pub exclude_weights: Vec<String>,
    /// Give the tensors whose name matches PATTERN (a regular expression
    /// searched in the name, lower-cased first) the type TYPE instead of
    /// the mix's choice, as llama-quantize's --tensor-type (repeatable; the
    /// first matching pattern wins).
    #[arg(long, value_name = "PATTERN=TYPE")]
    pub tensor_type: Vec<String>,
    /// Read PATTERN=TYPE entries, as --tensor-type takes them, from FILE
    /// (separated by spaces or newlines; lines starting with # are
    /// comments), as llama-quantize's --tensor-type-file (repeatable; they
    /// come after the --tensor-type ones).
    #[arg(long, value_name = "FILE")]
    pub tensor_type_file: Vec<PathBuf>,
    /// Write as many parts as the split input has, each holding the
    /// tensors of the input part of the same number (llama-quantize's
    /// --keep-split); an input of one file gives OUTPUT-00001-of-00001.gguf.
    #[arg(long, conflicts_with_all = ["split_max_tensors", "split_max_size"])]
    pub keep_split: bool,
    /// Split the output into parts of at most N tensors
    /// (llama-gguf-split's --split-max-tensors).
    #[arg(long, value_name = "N", conflicts_with = "split_max_size")]
    pub split_max_tensors: Option<u64>,
    /// Split the output into parts of at most SIZE bytes of tensor data,
    /// SIZE a whole number followed by M (10^6) or G (10^9), as 500M or 4G
    /// (llama-gguf-split's --split-max-size).
    #[arg(long, value_name = "SIZE")]
    pub split_max_size: Option<String>,
}

fn block_type(flag: &str, s: &str) -> anyhow::Result<GgmlType> {
    let ty = GgmlType::from_name(&s.to_ascii_uppercase())
        .or_else(|| GgmlType::from_name(s))
        .with_context(|| format!("{flag}: unknown tensor type '{s}'"))?;
    if !quantize::can_write(ty) {
        anyhow::bail!("{flag}: can't write tensors of type {ty}");
    }
    Ok(ty)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn run(a: &QuantizeArgs) -> anyhow::Result<()> {
    let ftype: FileType = a.ftype.parse()?;
    let mut opts = QuantizeOptions::new(ftype);
    opts.threads = a.threads;
    opts.allow_requantize = a.allow_requantize;
    opts.leave_output_tensor = a.leave_output_tensor;
    opts.pure = a.pure;
    opts.output_tensor_type = a
        .output_tensor_type
        .as_deref()
        .map(|s| block_type("--output-tensor-type", s))
        .transpose()?;
    opts.token_embedding_type = a
        .token_embedding_type
        .as_deref()
        .map(|s| block_type("--token-embedding-type", s))
        .transpose()?;

    opts.split = if a.keep_split {
        SplitOutput::KeepInput
    } else if let Some(n) = a.split_max_tensors {
        SplitOutput::MaxTensors(n)
    } else if let Some(s) = &a.split_max_size {
        SplitOutput::MaxBytes(quantize::parse_split_size(s)?)
    } else {
        SplitOutput::Single
    };

    opts.tensor_types = a
        .tensor_type
        .iter()
        .map(|s| quantize::TensorTypeOverride::parse(s))
        .collect::<Result<_, _>>()?;
    for path in &a.tensor_type_file {
        opts.tensor_types
            .extend(quantize::read_tensor_type_file(path)?);
    }

    if let Some(path) = &a.imatrix {
        let mut m = Imatrix::load(path)?;
        let loaded = m.entries.len();
        m.filter(&a.include_weights, &a.exclude_weights);
        eprintln!(
            "importance matrix {}: {} entries{}{}{}",
            path.display(),
            m.entries.len(),
            if m.entries.len() != loaded {
                format!(" (of {loaded}, filtered)")
            } else {
                String::new()
            },
            if m.chunk_count > 0 {
                format!(", computed on {} chunks", m.chunk_count)
            } else {
                String::new()
            },
            m.datasets
                .first()
                .map(|d| format!(" of {d}"))
                .unwrap_or_default()
        );
        if m.entries.is_empty() {
            eprintln!("warning: no importance-matrix entries left; quantizing without one");
        }
        opts.imatrix = Some(Arc::new(m));
    }

    let q = quantize::Quantization::prepare(&a.input, &a.output, &opts)
        .with_context(|| format!("quantizing {}", a.input.display()))?;
    if a.keep_split && q.parts().len() == 1 {
        eprintln!(
            "note: --keep-split with an input of one file: writing one file, {} (as llama-quantize)",
            q.parts()[0].path.display()
        );
    }
    for p in q.plans() {
        match p.imatrix {
            ImatrixUse::NoEntry => {
                eprintln!("note: no importance-matrix entry for {}", p.name)
            }
            ImatrixUse::WrongSizeIgnored { got, want } => eprintln!(
                "note: the importance-matrix entry for {} has {got} values instead of {want}; not used",
                p.name
            ),
            _ => {}
        }
    }
    if a.dry_run {
        let (mut inb, mut outb) = (0, 0);
        for p in q.plans() {
            println!(
                "{:<40} {:>22} {:>6} -> {:<6}{}{} {:>9.2} MiB -> {:>9.2} MiB",
                p.name,
                format!("{:?}", p.dims),
                p.from.name(),
                p.to.name(),
                if p.fallback { " (fallback)" } else { "" },
                if p.imatrix == ImatrixUse::Used {
                    " (imatrix)"
                } else {
                    ""
                },
                mib(p.in_bytes()),
                mib(p.out_bytes())
            );
            inb += p.in_bytes();
            outb += p.out_bytes();
        }
        println!(
            "{} tensors: {:.2} MiB -> {:.2} MiB ({ftype})",
            q.plans().len(),
            mib(inb),
            mib(outb)
        );
        if opts.split != SplitOutput::Single {
            for part in q.parts() {
                println!("{}: {} tensors", part.path.display(), part.tensors.len());
            }
        }
        return Ok(());
    }

    let total = q.plans().iter().map(|p| p.out_bytes()).sum::<u64>();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {elapsed_precise} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let summary = q.write(&mut |p, bytes| {
        bar.set_message(format!("{} {} -> {}", p.name, p.from.name(), p.to.name()));
        bar.inc(bytes);
    });
    bar.finish_and_clear();
    let summary = summary?;
    eprintln!(
        "quantized {} of {} tensors to {ftype}{}: {:.2} MiB -> {:.2} MiB ({:.2} bits per weight) in {:.1} s -> {}",
        summary.quantized,
        summary.tensors,
        if summary.fallbacks > 0 {
            format!(" ({} by fallback types: rows not whole super-blocks)", summary.fallbacks)
        } else {
            String::new()
        },
        mib(summary.in_bytes),
        mib(summary.out_bytes),
        summary.out_bytes as f64 * 8.0 / summary.elements.max(1) as f64,
        t0.elapsed().as_secs_f64(),
        match q.parts() {
            [one] => one.path.display().to_string(),
            parts => format!(
                "{} parts, {} .. {}",
                parts.len(),
                parts.first().map(|p| p.path.display().to_string()).unwrap_or_default(),
                parts.last().map(|p| p.path.display().to_string()).unwrap_or_default()
            ),
        }
    );
    Ok(())
}
