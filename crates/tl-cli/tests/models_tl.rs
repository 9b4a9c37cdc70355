#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `examples/qwen2_generate.tl` and `examples/gemma3_generate.tl` — whole
//! models written in TensorLogic over the real GGUF files — generate the
//! same greedy tokens as the native engine (`tl generate --temp 0`). Needs
//! the real models; they are always present where the tests run, so their
//! absence is a failure, not a skip.

use std::path::PathBuf;
use std::process::Command;

use tl_model::llm::{GenerateOptions, Llm};
use tl_model::sampler::SamplingParams;

const N: usize = 24;

fn model_path(file: &str) -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let p = PathBuf::from(home)
        .join(".cache/tensorlogic/models")
        .join(file);
    assert!(p.exists(), "the test model {} is missing", p.display());
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn qwen2_in_tensorlogic_matches_native_greedy() {
    same_greedy_tokens(
        "qwen2_generate.tl",
        "qwen2.5-coder-0.5b-instruct-q4.gguf",
        "Write a Python function that checks whether a number is prime, with a docstring.",
    );
}

#[test]
fn gemma3_in_tensorlogic_matches_native_greedy() {
    same_greedy_tokens(
        "gemma3_generate.tl",
        "gemma-3-270m-q4_k_m.gguf",
        "The three primary colors are red, yellow and blue. Mixing red and yellow gives",
    );
}

fn same_greedy_tokens(example: &str, model_file: &str, prompt: &str) {
    let model = model_path(model_file);
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(example);
    let out = Command::new(env!("CARGO_BIN_EXE_tl"))
        .args(["run", "-t", "2"])
        .arg(&example)
        .arg(&model)
        .arg(prompt)
        .arg(N.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let ids_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ids:"))
        .unwrap_or_else(|| panic!("no ids line in:\n{stdout}"));
    let tl_ids: Vec<u32> = ids_line
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();

    // The native engine, as `tl generate --temp 0` configures it.
    let llm = Llm::load(&model).unwrap();
    let prompt_ids = llm.encode_prompt(prompt, true).unwrap();
    assert!(
        prompt_ids.len() > 16,
        "the prompt must span more than one KV block"
    );
    let opts = GenerateOptions {
        max_tokens: N,
        // Greedy, no penalties: `tl generate --temp 0`'s settings.
        sampling: SamplingParams::default(),
        ..Default::default()
    };
    let native = llm.generate(prompt, &opts, |_| true).unwrap();
    assert!(!native.tokens.is_empty());
    assert_eq!(tl_ids, native.tokens, "greedy token ids differ");

    // And the text `tl generate` prints is the text the program prints.
    let gen = Command::new(env!("CARGO_BIN_EXE_tl"))
        .args(["generate", "-t", "2", "--temp", "0", "-n"])
        .arg(N.to_string())
        .arg("-m")
        .arg(&model)
        .arg("-p")
        .arg(prompt)
        .output()
        .unwrap();
    assert!(gen.status.success(), "stderr:\n{}", text(&gen.stderr));
    let gen_text = text(&gen.stdout);
    let printed = stdout
        .lines()
        .skip_while(|l| !l.starts_with("ids:"))
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        printed.strip_prefix(prompt).map(str::trim_end),
        Some(gen_text.trim_end()),
        "program output:\n{stdout}"
    );
}
