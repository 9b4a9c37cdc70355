// Debug: per-position logit differences against a forward fixture.
use tl_model::generate::Runner;
use tl_model::model::Model;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&args[1]).unwrap()).unwrap();
    let model = Model::load(&args[2]).unwrap();
    let case_i: usize = args[3].parse().unwrap();
    let vocab = model.config.vocab;
    let mut r = Runner::new(&model, 512).unwrap();
    let case = &fx["cases"][case_i];
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    let all: Vec<u32> = ids(&case["prompt_ids"])
        .into_iter()
        .chain(ids(&case["greedy"]))
        .collect();
    let logits = r.all_logits(&all).unwrap();
    for (i, row) in case["teacher_forced_top"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let ours = &logits[i * vocab..(i + 1) * vocab];
        let rid = ids(&row["ids"]);
        let rl: Vec<f64> = row["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let am = tl_model::sampler::argmax(ours);
        let diffs: Vec<String> = rid
            .iter()
            .zip(&rl)
            .map(|(id, l)| format!("{:+.3}", ours[*id as usize] as f64 - l))
            .collect();
        println!(
            "{i:3} tok {:6} ref_top {:6} ours_top {:6} ref {:.3} diffs {}",
            all[i],
            rid[0],
            am,
            rl[0],
            diffs.join(" ")
        );
    }
}
