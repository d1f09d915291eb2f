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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hindsight_constraints::{build_from, supported_ids, with_response_cache, Map, Value};
use serde_json::json;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bench {
    Ifeval,
    Ifbench,
}

impl Bench {
    fn name(self) -> &'static str {
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

/// One record to verify.
struct Record {
    key: Value,
    ids: Vec<String>,
    kwargs: Vec<Map<String, Value>>,
    response: String,
}

/// One record's verdicts (`None` = could not be evaluated).
struct Verdicts {
    strict: Vec<Option<bool>>,
    loose: Vec<Option<bool>>,
    errors: Vec<(usize, String)>,
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: bad JSON", path.display(), i + 1))
        })
        .collect()
}

/// Python `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

fn record_from(v: &Value, response: String) -> Result<Record> {
    let ids: Vec<String> = v["instruction_id_list"]
        .as_array()
        .context("record without instruction_id_list")?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .context("instruction id is not a string")
        })
        .collect::<Result<_>>()?;
    let kws = v.get("kwargs").and_then(Value::as_array);
    let kwargs = (0..ids.len())
        .map(|i| {
            kws.and_then(|k| k.get(i))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    Ok(Record {
        key: v.get("key").cloned().unwrap_or(Value::Null),
        ids,
        kwargs,
        response,
    })
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
            out.push(record_from(&v, resp.unwrap_or("").to_string())?);
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
        out.push(record_from(&p, resp.unwrap_or_default())?);
    }
    Ok((out, missing_keys))
}

/// Verify one record (build every constraint, strict and loose), sharing analyses of the
/// response and its loose variants between the checks ([`with_response_cache`]).
fn verify_record(r: &Record) -> Verdicts {
    with_response_cache(|| verify_record_uncached(r))
}

fn verify_record_uncached(r: &Record) -> Verdicts {
    let n = r.ids.len();
    let mut v = Verdicts {
        strict: Vec::with_capacity(n),
        loose: Vec::with_capacity(n),
        errors: Vec::new(),
    };
    for (i, id) in r.ids.iter().enumerate() {
        match build_from(id, &r.kwargs[i]) {
            Ok(c) => {
                let strict = c.check_strict(&r.response);
                v.strict.push(Some(strict));
                // the response itself is the first loose variant: not checked twice
                v.loose
                    .push(Some(c.check_loose_given_strict(&r.response, strict)));
            }
            Err(e) => {
                v.strict.push(None);
                v.loose.push(None);
                v.errors.push((i, e.to_string()));
            }
        }
    }
    v
}

/// Records handed to a worker at a time (small, so that threads finish together).
const BATCH: usize = 8;

/// Verify all records on exactly `jobs` threads (the calling thread is one of them),
/// keeping their order. Workers take batches of [`BATCH`] records from a shared counter,
/// so uneven record costs do not leave a thread idle.
fn verify_all(records: &[Record], jobs: usize) -> Vec<Verdicts> {
    let jobs = jobs.clamp(1, records.len().div_ceil(BATCH).max(1));
    if jobs == 1 {
        return records.iter().map(verify_record).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done: Vec<(usize, Vec<Verdicts>)> = Vec::new();
        loop {
            let start = next.fetch_add(BATCH, std::sync::atomic::Ordering::Relaxed);
            if start >= records.len() {
                return done;
            }
            let end = (start + BATCH).min(records.len());
            done.push((
                start,
                records[start..end].iter().map(verify_record).collect(),
            ));
        }
    };
    let mut parts: Vec<(usize, Vec<Verdicts>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..jobs).map(|_| s.spawn(work)).collect();
        let mut parts = work();
        for h in handles {
            parts.extend(h.join().expect("verifier thread panicked"));
        }
        parts
    });
    parts.sort_unstable_by_key(|p| p.0);
    parts.into_iter().flat_map(|p| p.1).collect()
}

/// Python `json.dumps(v, ensure_ascii=False)` (default separators).
fn py_json(v: &Value, out: &mut String) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_json(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn opt_bools(v: &[Option<bool>]) -> String {
    let parts: Vec<&str> = v
        .iter()
        .map(|b| match b {
            Some(true) => "true",
            Some(false) => "false",
            None => "null",
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// One output line, field order and layout as the oracle's.
fn output_line(r: &Record, v: &Verdicts, out: &mut String) {
    let all = |x: &[Option<bool>]| x.iter().all(|b| *b == Some(true));
    out.push_str("{\"key\": ");
    py_json(&r.key, out);
    out.push_str(", \"instruction_id_list\": ");
    py_json(
        &Value::Array(r.ids.iter().cloned().map(Value::String).collect()),
        out,
    );
    let _ = write!(
        out,
        ", \"follow_instruction_list_strict\": {}, \"follow_instruction_list_loose\": {}, \
         \"follow_all_instructions_strict\": {}, \"follow_all_instructions_loose\": {}",
        opt_bools(&v.strict),
        opt_bools(&v.loose),
        all(&v.strict),
        all(&v.loose)
    );
    if !v.errors.is_empty() {
        // oracle field order: index, instruction_id, error
        let errs: Vec<String> = v
            .errors
            .iter()
            .map(|(i, e)| {
                format!(
                    "{{\"index\": {i}, \"instruction_id\": {}, \"error\": {}}}",
                    json!(r.ids[*i]),
                    json!(e)
                )
            })
            .collect();
        let _ = write!(out, ", \"errors\": [{}]", errs.join(", "));
    }
    out.push_str("}\n");
}

/// Instruction ids of `records` the registry does not know, with their counts.
fn unsupported(records: &[Record]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        for id in &r.ids {
            if !supported_ids().contains(&id.as_str()) {
                *m.entry(id.clone()).or_default() += 1;
            }
        }
    }
    m
}

fn summary(
    bench: Bench,
    records: &[Record],
    verdicts: &[Verdicts],
    missing: &[Value],
    missing_policy: Missing,
    seconds: f64,
) -> Value {
    let mut n_inst = 0usize;
    let (mut n_s, mut n_l, mut n_ps, mut n_pl) = (0usize, 0usize, 0usize, 0usize);
    let mut per_id: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for (r, v) in records.iter().zip(verdicts) {
        n_inst += r.ids.len();
        let s = v.strict.iter().filter(|b| **b == Some(true)).count();
        let l = v.loose.iter().filter(|b| **b == Some(true)).count();
        n_s += s;
        n_l += l;
        n_ps += usize::from(s == r.ids.len());
        n_pl += usize::from(l == r.ids.len());
        for (i, id) in r.ids.iter().enumerate() {
            let e = per_id.entry(id).or_default();
            e[0] += 1;
            e[1] += usize::from(v.strict[i] == Some(true));
            e[2] += usize::from(v.loose[i] == Some(true));
            e[3] += usize::from(v.strict[i].is_none());
            if v.strict[i].is_none() {
                *errors.entry(id).or_default() += 1;
            }
        }
    }
    let ratio = |a: usize, b: usize| {
        if b == 0 {
            Value::Null
        } else {
            json!(a as f64 / b as f64)
        }
    };
    let n = records.len();
    json!({
        "bench": bench.name(),
        "impl": "hindsight",
        "records": n,
        "instructions": n_inst,
        "missing_responses": missing,
        "missing_policy": match missing_policy { Missing::Empty => "empty", Missing::Skip => "skip" },
        "prompt_level_strict": ratio(n_ps, n),
        "prompt_level_loose": ratio(n_pl, n),
        "instruction_level_strict": ratio(n_s, n_inst),
        "instruction_level_loose": ratio(n_l, n_inst),
        "lm_eval": {
            "prompt_level_strict_acc": ratio(n_ps, n),
            "inst_level_strict_acc": ratio(n_s, n_inst),
            "prompt_level_loose_acc": ratio(n_pl, n),
            "inst_level_loose_acc": ratio(n_l, n_inst),
        },
        "errors_by_instruction_id": errors,
        "random_used_by_instruction_id": {},
        "per_instruction_id": per_id.iter().map(|(k, v)| {
            (k.to_string(), json!({"n": v[0], "strict": v[1], "loose": v[2], "errors": v[3]}))
        }).collect::<Map<String, Value>>(),
        "seconds_eval": (seconds * 1000.0).round() / 1000.0,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

fn jobs_or_all(jobs: usize) -> usize {
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
    let verdicts = verify_all(&records, jobs_or_all(args.jobs));
    let mut text = String::with_capacity(records.len() * 256);
    for (r, v) in records.iter().zip(&verdicts) {
        output_line(r, v, &mut text);
    }
    let seconds = t0.elapsed().as_secs_f64();
    std::fs::write(&args.output, text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let s = summary(
        args.bench,
        &records,
        &verdicts,
        &missing,
        args.missing,
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
                let v = verify_record(r);
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
        let _ = verify_all(&records, 1);
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
