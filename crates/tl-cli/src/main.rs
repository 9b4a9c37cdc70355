mod cmd_tokenize;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tl",
    version,
    about = "TensorLogic: LLM inference and a tensor language"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show how a model's tokenizer splits a text.
    Tokenize(cmd_tokenize::TokenizeArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Tokenize(args) => cmd_tokenize::run(&args),
    }
}
