//! The `tl` command-line tool.

use clap::{Parser, Subcommand};

mod cmd_inspect;
mod cmd_synth;

#[derive(Parser)]
#[command(
    name = "tl",
    version,
    about = "TensorLogic: GGUF LLM inference engine and tensor language"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF model's architecture, hyper-parameters, tokenizer and tensors.
    Inspect(cmd_inspect::InspectArgs),
    /// Write a small random-weight GGUF model of a given architecture.
    Synth(cmd_synth::SynthArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(a) => cmd_inspect::run(a),
        Command::Synth(a) => cmd_synth::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
