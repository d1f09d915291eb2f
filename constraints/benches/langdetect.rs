//! Language-detection speed of our `langdetect` port on the conformance texts
//! (`tests/data/langdetect_golden.jsonl`): `cargo bench -p hindsight-constraints --bench
//! langdetect` (`LANGDETECT_REPS=<n>` passes over the texts, default 5). Prints one JSON
//! line; `bench/langdetect_speed.sh` runs it next to the Python reference.

use std::time::Instant;

use hindsight_constraints::langdetect::detect;
use serde_json::Value;

fn main() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/langdetect_golden.jsonl");
    let texts: Vec<String> = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            v["text"].as_str().expect("text").to_string()
        })
        .collect();
    let reps: usize = std::env::var("LANGDETECT_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let t0 = Instant::now();
    let _ = detect("warm up: load the profiles");
    let load_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut detected = 0usize;
    for _ in 0..reps {
        for t in &texts {
            detected += usize::from(detect(t).is_ok());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = texts.len() * reps;
    println!(
        "{{\"impl\": \"rust\", \"texts\": {}, \"reps\": {reps}, \"detected\": {}, \"seconds\": {secs:.4}, \"texts_per_s\": {:.1}, \"ms_per_text\": {:.4}, \"profile_load_s\": {load_s:.4}}}",
        texts.len(),
        detected / reps,
        n as f64 / secs,
        secs * 1000.0 / n as f64
    );
}
