//! `hindsight eval`: one model on one benchmark. Generates a response per prompt with our
//! engine (`hindsight-evaluator`: continuous batching, the model's own chat template, greedy
//! by default), scores them with our verifiers (the functions `hindsight verify` uses),
//! prints the lm-eval-style table and writes
//!
//! - `--output`: the responses, one `{"prompt", "response"}` line per prompt, the format the
//!   official IFEval / IFBench scripts and `hindsight verify --prompts P --responses R` read;
//! - `--summary`: the scores (the `hindsight verify --summary` JSON plus the generation
//!   settings and throughput);
//! - `--verdicts`: the per-record verdict lines (the reference oracle's format);
//! - `--token-ids`: the token ids of the responses generated in this run, one
//!   `{"index", "prompt", "prompt_ids", "token_ids", "finished"}` line each, in the order they
//!   finish (for token-level comparisons with other engines: `bench/greedy_agreement.py`).
//!   A separate file so that `--output` stays in the official format.
//!
//! Resumable: responses already in `--output` (matched on the prompt text) are kept and only
//! the other prompts are generated; each response is appended (and flushed) as soon as it is
//! finished, so an interrupted run loses at most the sequences in flight. A torn last line
//! (a process killed mid-write) is dropped. The file does not record which model wrote it:
//! resume with the same `--model` and settings.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use hindsight_constraints::score::{output_line, summary_json, table};
use hindsight_constraints::Value;
use hindsight_evaluator::generate::{generate, score, Settings};
use hindsight_evaluator::Benchmark;
use hindsight_policy::{Device, Precision, Sampler};
use hindsight_service::{ConfigError, ConfigResultExt as _};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model: "tiny", "smollm2" (SmolLM2-135M-Instruct), a .gguf path or a Hugging Face
    /// checkpoint directory (e.g. one the learner wrote).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Model cache directory (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// `ifeval` (541 prompts), `ifbench` (294; both shipped with the binary) or a .jsonl file
    /// of {key, prompt, instruction_id_list, kwargs}.
    #[arg(long, default_value = "ifeval")]
    pub bench: String,
    /// Evaluate only the first N prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Sampling temperature; 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Most tokens generated per response (lm-eval's IFEval setting is 1280).
    #[arg(long, default_value_t = 1280)]
    pub max_new_tokens: usize,
    /// Seed (only used with a positive temperature; each prompt has its own stream).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The responses (JSONL of {prompt, response}); kept and extended when it exists.
    #[arg(long)]
    pub output: PathBuf,
    /// Where to write the scores (JSON).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Where to write the per-record verdicts (JSONL, the reference oracle's format).
    #[arg(long)]
    pub verdicts: Option<PathBuf>,
    /// Also write the token ids of the responses generated in this run (JSONL of {index,
    /// prompt, prompt_ids, token_ids, finished}; `index` is the prompt's position in the
    /// benchmark; responses kept from an earlier run are not in it). Truncated first.
    #[arg(long)]
    pub token_ids: Option<PathBuf>,
    /// Precision of the generation weights (`f32`, `bf16`).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Device: `cpu` or `cuda` / `cuda:N` (a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Sequences generated at once (continuous batching).
    #[arg(long, default_value_t = hindsight_policy::sampler::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// No progress bar (a line per 10% instead).
    #[arg(long)]
    pub no_progress: bool,
}

/// Responses already in `path`, by prompt text; a torn last line is cut off the file.
fn read_existing(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(ConfigError::wrap(
                anyhow::Error::new(e).context(format!("reading --output {}", path.display())),
            ))
        }
    };
    // Everything up to the last newline is complete; what follows it is a torn write.
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        tracing::warn!(
            bytes = text.len() - complete,
            "dropping a torn last line of {}",
            path.display()
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.set_len(complete as u64)?;
    }
    let text = String::from_utf8_lossy(&text[..complete]);
    for (line, v) in crate::jsonl::lines(&text) {
        let v: Value = v
            .ok()
            .filter(|v: &Value| v["prompt"].is_string() && v["response"].is_string())
            .with_context(|| {
                format!(
                    "{}:{line}: not a {{\"prompt\", \"response\"}} line: remove the file or \
                     choose another --output",
                    path.display(),
                )
            })
            .map_err(ConfigError::wrap)?;
        out.insert(
            v["prompt"].as_str().unwrap_or_default().to_string(),
            v["response"].as_str().unwrap_or_default().to_string(),
        );
    }
    Ok(out)
}

fn response_line(prompt: &str, response: &str) -> String {
    let mut s = serde_json::to_string(&json!({"prompt": prompt, "response": response}))
        .expect("strings serialise");
    s.push('\n');
    s
}

/// `hindsight eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    if args.max_batch == 0 {
        return Err(ConfigError::wrap(anyhow::anyhow!(
            "--max-batch must be at least 1"
        )));
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(ConfigError::wrap(anyhow::anyhow!(
            "--temperature must be a finite number >= 0"
        )));
    }
    let bench = Benchmark::load(&args.bench, args.limit).map_err(ConfigError::wrap)?;
    let existing = read_existing(&args.output)?;
    let n = bench.prompts.len();
    let mut responses: Vec<Option<String>> = bench
        .prompts
        .iter()
        .map(|p| existing.get(&p.prompt).cloned())
        .collect();
    let todo: Vec<usize> = (0..n).filter(|&i| responses[i].is_none()).collect();
    let resumed = n - todo.len();

    let mut ids_out = match &args.token_ids {
        Some(path) => Some((
            path,
            std::fs::File::create(path)
                .map(std::io::BufWriter::new)
                .with_context(|| format!("opening --token-ids {}", path.display()))
                .map_err(ConfigError::wrap)?,
        )),
        None => None,
    };
    let mut gen_tokens = 0usize;
    let mut gen_secs = 0.0f64;
    let mut stopped = 0usize;
    if !todo.is_empty() {
        let cache = args
            .cache_dir
            .clone()
            .unwrap_or_else(hindsight_policy::default_cache_dir);
        let device = hindsight_policy::parse_device(&args.device).config_err()?;
        let m = hindsight_policy::load(&args.model, &cache, &Device::Cpu)
            .with_context(|| format!("loading --model {}", args.model))
            .map_err(ConfigError::wrap)?;
        let mut sampler = Sampler::with_precision(
            &m.config,
            &m.weights,
            m.tokenizer.stop_token_ids(),
            &device,
            args.precision,
        )?;
        sampler.set_max_batch(args.max_batch);
        drop(m.weights);
        eprintln!(
            "{}: {} prompts of {} ({resumed} already in {}), model {}, temperature {}, at most {} new tokens, batch {}",
            bench.name,
            todo.len(),
            n,
            args.output.display(),
            m.name,
            args.temperature,
            args.max_new_tokens,
            args.max_batch
        );
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.output)
            .with_context(|| format!("opening --output {}", args.output.display()))
            .map_err(ConfigError::wrap)?;
        let bar = progress_bar(todo.len() as u64, args.no_progress);
        let settings = Settings {
            temperature: args.temperature,
            max_new_tokens: args.max_new_tokens,
            seed: args.seed,
        };
        let started = Instant::now();
        let mut done = 0usize;
        generate(
            &mut sampler,
            &m.tokenizer,
            &bench,
            &todo,
            &settings,
            &mut |r| {
                out.write_all(response_line(&bench.prompts[r.index].prompt, &r.text).as_bytes())
                    .and_then(|()| out.flush())
                    .with_context(|| format!("writing {}", args.output.display()))?;
                if let Some((path, f)) = &mut ids_out {
                    let line = json!({
                        "index": r.index,
                        "prompt": bench.prompts[r.index].prompt,
                        "prompt_ids": r.prompt_ids,
                        "token_ids": r.token_ids,
                        "finished": r.finished,
                    });
                    serde_json::to_writer(&mut *f, &line)
                        .map_err(std::io::Error::from)
                        .and_then(|()| f.write_all(b"\n"))
                        .and_then(|()| f.flush())
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                gen_tokens += r.token_ids.len();
                stopped += usize::from(r.finished);
                done += 1;
                responses[r.index] = Some(r.text);
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                // Tokens of finished responses only (those in flight are not counted yet), so
                // the rate reads low early on and exact at the end.
                let msg = format!("{:.1} tok/s (finished responses)", gen_tokens as f64 / secs);
                match &bar {
                    Some(b) => {
                        b.set_message(msg);
                        b.inc(1);
                    }
                    None if done * 10 / todo.len() != (done - 1) * 10 / todo.len()
                        || done == todo.len() =>
                    {
                        eprintln!("{done}/{} prompts, {msg}, {secs:.0}s", todo.len());
                    }
                    None => {}
                }
                Ok(())
            },
        )?;
        gen_secs = started.elapsed().as_secs_f64();
        if let Some(b) = bar {
            b.finish();
        }
    }

    // Rewrite the file in benchmark order (responses to prompts outside this run's set,
    // e.g. from a larger --limit, stay after them), atomically.
    let responses: Vec<String> = responses
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    let mut text = String::new();
    for (p, r) in bench.prompts.iter().zip(&responses) {
        text += &response_line(&p.prompt, r);
    }
    let in_set: std::collections::HashSet<&str> =
        bench.prompts.iter().map(|p| p.prompt.as_str()).collect();
    let mut others: Vec<(&String, &String)> = existing
        .iter()
        .filter(|(p, _)| !in_set.contains(p.as_str()))
        .collect();
    others.sort();
    for (p, r) in others {
        text += &response_line(p, r);
    }
    let tmp = args.output.with_extension("jsonl.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;

    let t0 = Instant::now();
    let scored = score(&bench, &responses, crate::verify::jobs_or_all(0));
    let score_secs = t0.elapsed().as_secs_f64();
    if let Some(path) = &args.verdicts {
        let mut text = String::new();
        for (r, v) in scored.records.iter().zip(&scored.verdicts) {
            output_line(r, v, &mut text);
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", table(&bench.name, &scored.scores));
    let generated = todo.len();
    let tok_s = gen_tokens as f64 / gen_secs.max(1e-9);
    let prompts_s = generated as f64 / gen_secs.max(1e-9);
    if generated > 0 {
        println!(
            "\ngenerated {generated} responses ({gen_tokens} tokens, {} ended on a stop token) in {gen_secs:.1}s: {tok_s:.1} tokens/s, {prompts_s:.3} prompts/s; {resumed} kept from {}",
            stopped,
            args.output.display()
        );
    } else {
        println!(
            "\nall {n} responses were already in {}",
            args.output.display()
        );
    }
    if let Some(path) = &args.summary {
        let mut s = summary_json(&bench.name, &scored.scores, &[], "empty", score_secs);
        let o = s.as_object_mut().expect("summary is an object");
        o.insert("model".into(), json!(args.model));
        o.insert("limit".into(), json!(args.limit));
        o.insert("temperature".into(), json!(args.temperature));
        o.insert("max_new_tokens".into(), json!(args.max_new_tokens));
        o.insert("precision".into(), json!(args.precision.to_string()));
        o.insert(
            "generation".into(),
            json!({
                "responses_generated": generated,
                "responses_kept": resumed,
                "tokens": gen_tokens,
                "ended_on_stop_token": stopped,
                "seconds": (gen_secs * 1000.0).round() / 1000.0,
                "tokens_per_s": if generated > 0 { json!(tok_s) } else { Value::Null },
                "prompts_per_s": if generated > 0 { json!(prompts_s) } else { Value::Null },
                "threads": rayon::current_num_threads(),
            }),
        );
        let mut f =
            std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
        serde_json::to_writer_pretty(&mut f, &s)?;
        writeln!(f)?;
    }
    Ok(())
}

fn progress_bar(len: u64, off: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal as _;
    if off || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} prompts  {msg}  elapsed {elapsed_precise}  ETA {eta_precise}",
        )
        .expect("static template"),
    );
    Some(bar)
}
