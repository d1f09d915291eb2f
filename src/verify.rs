//! `hindsight verify` and `hindsight bench verify`: score responses against IFEval /
//! IFBench instructions with the `hindsight-constraints` verifiers, writing exactly the
//! reference oracle's output format (`../shared/oracle/verify.py`), and measure
//! throughput side by side with the reference.
//!
//! Output, one JSON line per record (Python `json.dumps` layout, non-ASCII kept):
//! `{key, instruction_id_list, follow_instruction_list_strict, follow_instruction_list_loose,
//! follow_all_instructions_strict, follow_all_instructions_loose[, errors]}`. An instruction
//! whose kwargs cannot be built gets `null` verdicts and an `errors` entry, as the oracle
//! writes for a checker that raises. Our verifiers never draw random values, so
//! `random_used` is never written. The summary carries prompt- and instruction-level
//! strict / loose accuracy (also under lm-eval's names) and per-id counts.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hindsight_constraints::score::{
    output_line, record_from, score_all, score_record, scores, summary_json, unsupported,
    ScoreRecord as Record, BATCH,
};
use hindsight_constraints::{supported_ids, Map, Value};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bench {
    Ifeval,
    Ifbench,
}

impl Bench {
    pub fn name(self) -> &'static str {
        match self {
            Bench::Ifeval => "ifeval",
            Bench::Ifbench => "ifbench",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Evaluate the empty response (every instruction fails), as upstream IFBench does.
    Empty,
    /// Leave the record out.
    Skip,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Which benchmark's instruction ids the records use.
    #[arg(long, value_enum)]
    pub bench: Bench,
    /// JSONL of {key, prompt, instruction_id_list, kwargs, response}.
    #[arg(long, conflicts_with_all = ["prompts", "responses"], required_unless_present = "prompts")]
    pub input: Option<PathBuf>,
    /// JSONL of {key, prompt, instruction_id_list, kwargs}; joined with --responses on the
    /// exact prompt text (then on the stripped prompt), as the official scripts do.
    #[arg(long, requires = "responses")]
    pub prompts: Option<PathBuf>,
    /// JSONL of {prompt, response}.
    #[arg(long, requires = "prompts")]
    pub responses: Option<PathBuf>,
    /// Where to write the per-record verdicts (JSONL).
    #[arg(long)]
    pub output: PathBuf,
    /// Where to write the summary (JSON).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// What to do with a prompt that has no response.
    #[arg(long, value_enum, default_value = "empty")]
    pub missing: Missing,
    /// Write null verdicts (and an `errors` entry) for instruction ids this build does not
    /// support, instead of refusing to run.
    #[arg(long)]
    pub allow_unsupported: bool,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub jobs: usize,
}

/// The values of a JSONL file, in order (errors name the line).
fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    Ok(crate::jsonl::read(path)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Python `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Records as the oracle's `load_records` builds them; also returns the keys of prompts
/// without a response.
fn load_records(
    input: Option<&Path>,
    prompts: Option<&Path>,
    responses: Option<&Path>,
    missing: Missing,
) -> Result<(Vec<Record>, Vec<Value>)> {
    let mut out = Vec::new();
    let mut missing_keys = Vec::new();
    if let Some(input) = input {
        for v in read_jsonl(input)? {
            let resp = v.get("response").and_then(Value::as_str);
            if resp.is_none() {
                missing_keys.push(v.get("key").cloned().unwrap_or(Value::Null));
                if missing == Missing::Skip {
                    continue;
                }
            }
            out.push(record_from(&v, resp.unwrap_or("").to_string()).map_err(anyhow::Error::msg)?);
        }
        return Ok((out, missing_keys));
    }
    let (Some(prompts), Some(responses)) = (prompts, responses) else {
        bail!("give --input, or --prompts with --responses");
    };
    let mut p2r: HashMap<String, String> = HashMap::new();
    let mut p2r_stripped: HashMap<String, String> = HashMap::new();
    for r in read_jsonl(responses)? {
        let (Some(p), Some(resp)) = (r["prompt"].as_str(), r["response"].as_str()) else {
            continue;
        };
        p2r.insert(p.to_string(), resp.to_string());
        p2r_stripped
            .entry(py_strip(p).to_string())
            .or_insert_with(|| resp.to_string());
    }
    for p in read_jsonl(prompts)? {
        let prompt = p["prompt"].as_str().unwrap_or("");
        let resp = p2r
            .get(prompt)
            .or_else(|| p2r_stripped.get(py_strip(prompt)))
            .cloned();
        if resp.is_none() {
            missing_keys.push(p.get("key").cloned().unwrap_or(Value::Null));
            if missing == Missing::Skip {
                continue;
            }
        }
        out.push(record_from(&p, resp.unwrap_or_default()).map_err(anyhow::Error::msg)?);
    }
    Ok((out, missing_keys))
}

pub(crate) fn jobs_or_all(jobs: usize) -> usize {
    if jobs > 0 {
        jobs
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// `hindsight verify`.
pub fn run(args: VerifyArgs) -> Result<()> {
    let (records, missing) = load_records(
        args.input.as_deref(),
        args.prompts.as_deref(),
        args.responses.as_deref(),
        args.missing,
    )?;
    let unknown = unsupported(&records);
    if !unknown.is_empty() && !args.allow_unsupported {
        let list: Vec<String> = unknown
            .iter()
            .map(|(id, n)| format!("  {id} ({n})"))
            .collect();
        bail!(
            "{} instruction id(s) used by the input are not supported by this build \
             ({} ids are):\n{}\nre-run with --allow-unsupported to write null verdicts and an \
             `errors` entry for them",
            unknown.len(),
            supported_ids().len(),
            list.join("\n")
        );
    }
    let t0 = Instant::now();
    let verdicts = score_all(&records, jobs_or_all(args.jobs));
    let mut text = String::with_capacity(records.len() * 256);
    for (r, v) in records.iter().zip(&verdicts) {
        output_line(r, v, &mut text);
    }
    let seconds = t0.elapsed().as_secs_f64();
    std::fs::write(&args.output, text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let policy = match args.missing {
        Missing::Empty => "empty",
        Missing::Skip => "skip",
    };
    let s = summary_json(
        args.bench.name(),
        &scores(&records, &verdicts),
        &missing,
        policy,
        seconds,
    );
    if let Some(path) = &args.summary {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
        serde_json::to_writer_pretty(&mut f, &s)?;
        writeln!(f)?;
    }
    let brief: Map<String, Value> = [
        "bench",
        "records",
        "instructions",
        "prompt_level_strict",
        "prompt_level_loose",
        "instruction_level_strict",
        "instruction_level_loose",
        "errors_by_instruction_id",
        "seconds_eval",
    ]
    .iter()
    .map(|k| (k.to_string(), s[*k].clone()))
    .collect();
    println!("{}", Value::Object(brief));
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct BenchVerifyArgs {
    /// The oracle directory (holding data/ and verify.py).
    #[arg(long, env = "HINDSIGHT_ORACLE_DIR", default_value = "../shared/oracle")]
    pub oracle_dir: PathBuf,
    /// Python of the oracle's venv (default: $ORACLE_HOME/venv/bin/python, ORACLE_HOME
    /// defaulting to ~/.cache/ifeval-oracle).
    #[arg(long)]
    pub oracle_python: Option<PathBuf>,
    /// Skip the reference run.
    #[arg(long)]
    pub no_reference: bool,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Minimum measuring time per configuration, in seconds (split into three windows,
    /// the best one reported).
    #[arg(long, default_value_t = 2.0)]
    pub min_seconds: f64,
}

/// Records/s of ours on exactly `threads` threads (the calling thread and `threads - 1`
/// spawned ones), the work split by records: passes over the set are repeated until
/// `min_seconds` have passed, each pass's records taken in batches of [`BATCH`] from a
/// shared counter by whichever thread is free (build, strict, loose, output line), so
/// the figure is the throughput of the threads together on one workload.
fn measure(records: &[Record], threads: usize, min_seconds: f64) -> f64 {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let n = records.len().max(1);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let work = || {
        let mut done = 0usize;
        let mut buf = String::new();
        loop {
            let i = next.fetch_add(BATCH, Ordering::Relaxed);
            // a pass ends when the counter crosses a multiple of the set size; stop at
            // the first pass boundary after `min_seconds` (all threads finish their batch)
            if i % n < BATCH && i > 0 && start.elapsed().as_secs_f64() >= min_seconds {
                stop.store(true, Ordering::Relaxed);
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            for k in i..i + BATCH {
                let r = &records[k % n];
                let v = score_record(r);
                buf.clear();
                output_line(r, &v, &mut buf);
                done += 1;
            }
        }
        std::hint::black_box(&buf);
        done
    };
    let total: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mine = work();
        mine + hs
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum::<usize>()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// The reference oracle's records/s (its own `seconds_eval`, import time excluded).
fn reference_rate(
    python: &Path,
    oracle: &Path,
    bench: Bench,
    prompts: &Path,
    responses: &Path,
) -> Result<(f64, usize)> {
    let out = std::env::temp_dir().join(format!("hindsight-bench-ref-{}.jsonl", bench.name()));
    let o = std::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(python)
        .arg(oracle.join("verify.py"))
        .args(["--bench", bench.name(), "--prompts"])
        .arg(prompts)
        .arg("--responses")
        .arg(responses)
        .arg("--output")
        .arg(&out)
        .output()
        .or_else(|_| {
            std::process::Command::new(python)
                .arg(oracle.join("verify.py"))
                .args(["--bench", bench.name(), "--prompts"])
                .arg(prompts)
                .arg("--responses")
                .arg(responses)
                .arg("--output")
                .arg(&out)
                .output()
        })
        .context("running the reference oracle")?;
    let _ = std::fs::remove_file(&out);
    if !o.status.success() {
        bail!(
            "reference oracle failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line).context("reference output")?;
    let secs = v["seconds_eval"].as_f64().context("seconds_eval")?;
    let n = v["records"].as_u64().context("records")? as usize;
    Ok((n as f64 / secs.max(1e-9), n))
}

/// `hindsight bench verify`.
pub fn bench(args: BenchVerifyArgs) -> Result<()> {
    let d = &args.oracle_dir;
    let sets = [
        (
            Bench::Ifeval,
            d.join("data/ifeval/input_data.jsonl"),
            d.join("data/ifeval/input_response_data_gpt4_20231107_145030.jsonl"),
        ),
        (
            Bench::Ifbench,
            d.join("data/ifbench/IFBench_test.jsonl"),
            d.join("data/ifbench/sample_output.jsonl"),
        ),
    ];
    let python = args.oracle_python.clone().unwrap_or_else(|| {
        let home = std::env::var_os("ORACLE_HOME").map_or_else(
            || {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/ifeval-oracle")
            },
            PathBuf::from,
        );
        home.join("venv/bin/python")
    });
    println!(
        "{:<8} {:>7} {:>10} {:>14} {:>14} {:>9}  notes",
        "bench", "records", "threads", "ours rec/s", "reference", "speedup"
    );
    for (bench, prompts, responses) in sets {
        let (mut records, _) =
            load_records(None, Some(&prompts), Some(&responses), Missing::Empty)?;
        let unknown = unsupported(&records);
        let mut note = String::new();
        if !unknown.is_empty() {
            let n: usize = unknown.values().sum();
            note = format!(
                "{n} instructions of {} unsupported ids left out",
                unknown.len()
            );
            for r in &mut records {
                let keep: Vec<usize> = (0..r.ids.len())
                    .filter(|&i| supported_ids().contains(&r.ids[i].as_str()))
                    .collect();
                r.ids = keep.iter().map(|&i| r.ids[i].clone()).collect();
                r.kwargs = keep.iter().map(|&i| r.kwargs[i].clone()).collect();
            }
        }
        let reference = if args.no_reference {
            None
        } else {
            match reference_rate(&python, d, bench, &prompts, &responses) {
                Ok((rate, _)) => Some(rate),
                Err(e) => {
                    eprintln!("reference run failed for {}: {e:#}", bench.name());
                    None
                }
            }
        };
        // warm up lazily initialised tables
        let _ = score_all(&records, 1);
        let mut one_thread: Option<f64> = None;
        for &t in &args.threads {
            let t = t.max(1);
            // best of three windows: other processes on a shared machine only ever slow
            // a window down
            let rate = (0..3)
                .map(|_| measure(&records, t, args.min_seconds / 3.0))
                .fold(0.0, f64::max);
            let (r, x) = match reference {
                Some(r) => (format!("{r:.0}"), format!("{:.0}x", rate / r)),
                None => ("-".into(), "-".into()),
            };
            if t == 1 {
                one_thread = Some(rate);
            }
            let mut notes = format!("load {}", crate::bench::load_average());
            if let (Some(r1), true) = (one_thread, t > 1) {
                // scaling efficiency: 100% = linear in the thread count
                let _ = write!(
                    notes,
                    ", {:.2}x of 1 thread ({:.0}% of linear)",
                    rate / r1,
                    100.0 * rate / (r1 * t as f64)
                );
            }
            if !note.is_empty() {
                let _ = write!(notes, "; {note}");
            }
            println!(
                "{:<8} {:>7} {:>10} {:>14.0} {:>14} {:>9}  {notes}",
                bench.name(),
                records.len(),
                t,
                rate,
                r,
                x
            );
        }
    }
    Ok(())
}
