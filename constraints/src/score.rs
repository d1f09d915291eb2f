//! Scoring a benchmark: every response of an IFEval / IFBench run checked against its
//! record's instructions (strict and loose), the per-record output line in the reference
//! oracle's format, and the summary (prompt- and instruction-level accuracy, per id) with
//! its lm-eval-style table. Shared by `hindsight verify` (responses from a file),
//! `hindsight eval` and the evaluator (responses from our engine), so that all three score
//! alike. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::{build_from, supported_ids, with_response_cache};

/// One record to score: the benchmark's key, instruction ids and kwargs, and the response.
#[derive(Clone, Debug)]
pub struct ScoreRecord {
    pub key: Value,
    pub ids: Vec<String>,
    pub kwargs: Vec<Map<String, Value>>,
    pub response: String,
}

/// The record fields of a benchmark line (`{key, prompt, instruction_id_list, kwargs}`),
/// with `response`. Missing kwargs are empty objects, as the reference reads them.
pub fn record_from(v: &Value, response: String) -> Result<ScoreRecord, String> {
    let ids: Vec<String> = v
        .get("instruction_id_list")
        .and_then(Value::as_array)
        .ok_or("record without instruction_id_list")?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| "instruction id is not a string".to_string())
        })
        .collect::<Result<_, _>>()?;
    let kws = v.get("kwargs").and_then(Value::as_array);
    let kwargs = (0..ids.len())
        .map(|i| {
            kws.and_then(|k| k.get(i))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    Ok(ScoreRecord {
        key: v.get("key").cloned().unwrap_or(Value::Null),
        ids,
        kwargs,
        response,
    })
}

/// One record's verdicts (`None` = the instruction could not be built from its kwargs).
#[derive(Clone, Debug)]
pub struct Verdicts {
    pub strict: Vec<Option<bool>>,
    pub loose: Vec<Option<bool>>,
    pub errors: Vec<(usize, String)>,
}

impl Verdicts {
    pub fn all_strict(&self) -> bool {
        self.strict.iter().all(|b| *b == Some(true))
    }
    pub fn all_loose(&self) -> bool {
        self.loose.iter().all(|b| *b == Some(true))
    }
}

/// Verify one record (build every constraint, strict and loose), sharing analyses of the
/// response and its loose variants between the checks ([`with_response_cache`]).
pub fn score_record(r: &ScoreRecord) -> Verdicts {
    with_response_cache(|| score_record_uncached(r))
}

fn score_record_uncached(r: &ScoreRecord) -> Verdicts {
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
pub const BATCH: usize = 8;

/// Scores all records on exactly `jobs` threads (the calling thread is one of them),
/// keeping their order. Workers take batches of [`BATCH`] records from a shared counter,
/// so uneven record costs do not leave a thread idle.
pub fn score_all(records: &[ScoreRecord], jobs: usize) -> Vec<Verdicts> {
    let jobs = jobs.clamp(1, records.len().div_ceil(BATCH).max(1));
    if jobs == 1 {
        return records.iter().map(score_record).collect();
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
                records[start..end].iter().map(score_record).collect(),
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
pub fn py_json(v: &Value, out: &mut String) {
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

/// One verdict line, field order and layout as the reference oracle's:
/// `{key, instruction_id_list, follow_instruction_list_strict, follow_instruction_list_loose,
/// follow_all_instructions_strict, follow_all_instructions_loose[, errors]}`.
pub fn output_line(r: &ScoreRecord, v: &Verdicts, out: &mut String) {
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
        v.all_strict(),
        v.all_loose()
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
pub fn unsupported(records: &[ScoreRecord]) -> BTreeMap<String, usize> {
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

/// Per-instruction-id counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdCounts {
    pub n: usize,
    pub strict: usize,
    pub loose: usize,
    pub errors: usize,
}

/// The four accuracies of a run (`None` when there is nothing to divide by) and the counts
/// per instruction id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores {
    pub records: usize,
    pub instructions: usize,
    pub prompt_strict: Option<f64>,
    pub prompt_loose: Option<f64>,
    pub instruction_strict: Option<f64>,
    pub instruction_loose: Option<f64>,
    pub per_id: BTreeMap<String, IdCounts>,
}

/// Prompt-level (every instruction of a record followed) and instruction-level accuracy,
/// strict and loose; an instruction that could not be built counts as not followed.
pub fn scores(records: &[ScoreRecord], verdicts: &[Verdicts]) -> Scores {
    let mut s = Scores {
        records: records.len(),
        ..Default::default()
    };
    let (mut n_s, mut n_l, mut n_ps, mut n_pl) = (0usize, 0usize, 0usize, 0usize);
    for (r, v) in records.iter().zip(verdicts) {
        s.instructions += r.ids.len();
        let st = v.strict.iter().filter(|b| **b == Some(true)).count();
        let lo = v.loose.iter().filter(|b| **b == Some(true)).count();
        n_s += st;
        n_l += lo;
        n_ps += usize::from(st == r.ids.len());
        n_pl += usize::from(lo == r.ids.len());
        for (i, id) in r.ids.iter().enumerate() {
            let e = s.per_id.entry(id.clone()).or_default();
            e.n += 1;
            e.strict += usize::from(v.strict[i] == Some(true));
            e.loose += usize::from(v.loose[i] == Some(true));
            e.errors += usize::from(v.strict[i].is_none());
        }
    }
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    s.prompt_strict = ratio(n_ps, s.records);
    s.prompt_loose = ratio(n_pl, s.records);
    s.instruction_strict = ratio(n_s, s.instructions);
    s.instruction_loose = ratio(n_l, s.instructions);
    s
}

/// The summary JSON `hindsight verify --summary` writes (also under lm-eval's names).
/// `missing`: keys of prompts that had no response; `missing_policy`: `empty` or `skip`.
pub fn summary_json(
    bench: &str,
    s: &Scores,
    missing: &[Value],
    missing_policy: &str,
    seconds: f64,
) -> Value {
    let errors: BTreeMap<&str, usize> = s
        .per_id
        .iter()
        .filter(|(_, c)| c.errors > 0)
        .map(|(k, c)| (k.as_str(), c.errors))
        .collect();
    json!({
        "bench": bench,
        "impl": "hindsight",
        "records": s.records,
        "instructions": s.instructions,
        "missing_responses": missing,
        "missing_policy": missing_policy,
        "prompt_level_strict": s.prompt_strict,
        "prompt_level_loose": s.prompt_loose,
        "instruction_level_strict": s.instruction_strict,
        "instruction_level_loose": s.instruction_loose,
        "lm_eval": {
            "prompt_level_strict_acc": s.prompt_strict,
            "inst_level_strict_acc": s.instruction_strict,
            "prompt_level_loose_acc": s.prompt_loose,
            "inst_level_loose_acc": s.instruction_loose,
        },
        "errors_by_instruction_id": errors,
        "random_used_by_instruction_id": {},
        "per_instruction_id": s.per_id.iter().map(|(k, v)| {
            (k.clone(), json!({"n": v.n, "strict": v.strict, "loose": v.loose, "errors": v.errors}))
        }).collect::<Map<String, Value>>(),
        "seconds_eval": (seconds * 1000.0).round() / 1000.0,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// The lm-eval-style table: the four aggregate metrics, then one row per instruction id
/// (count, strict and loose accuracy).
pub fn table(bench: &str, s: &Scores) -> String {
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "|{:<8}|{:<24}|{:>8}|   |{:>6}|",
        "Tasks", "Metric", "Value", "N"
    );
    let _ = writeln!(out, "|{:-<8}|{:-<24}|{:->8}|---|{:->6}|", "", "", "", "");
    for (metric, v, n) in [
        ("prompt_level_strict_acc", s.prompt_strict, s.records),
        (
            "inst_level_strict_acc",
            s.instruction_strict,
            s.instructions,
        ),
        ("prompt_level_loose_acc", s.prompt_loose, s.records),
        ("inst_level_loose_acc", s.instruction_loose, s.instructions),
    ] {
        let _ = writeln!(
            out,
            "|{:<8}|{:<24}|{:>8}|↑  |{:>6}|",
            bench,
            metric,
            pct(v),
            n
        );
    }
    if !s.per_id.is_empty() {
        let _ = writeln!(out);
        let w = s.per_id.keys().map(String::len).max().unwrap_or(0).max(14);
        let _ = writeln!(
            out,
            "{:<w$} {:>5} {:>7} {:>7}",
            "instruction_id", "n", "strict", "loose"
        );
        for (id, c) in &s.per_id {
            let _ = writeln!(
                out,
                "{:<w$} {:>5} {:>7.3} {:>7.3}{}",
                id,
                c.n,
                c.strict as f64 / c.n.max(1) as f64,
                c.loose as f64 / c.n.max(1) as f64,
                if c.errors > 0 {
                    format!("  ({} not buildable)", c.errors)
                } else {
                    String::new()
                }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ids: &[&str], response: &str) -> ScoreRecord {
        ScoreRecord {
            key: json!(1),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            kwargs: vec![Map::new(); ids.len()],
            response: response.into(),
        }
    }

    #[test]
    fn prompt_and_instruction_level_accuracy() {
        let records = vec![
            rec(
                &["punctuation:no_comma", "change_case:english_lowercase"],
                "all lowercase no commas here",
            ),
            rec(
                &["punctuation:no_comma", "change_case:english_lowercase"],
                "Has, a comma",
            ),
        ];
        let v = score_all(&records, 2);
        let s = scores(&records, &v);
        assert_eq!((s.records, s.instructions), (2, 4));
        assert_eq!(s.prompt_strict, Some(0.5));
        assert_eq!(s.instruction_strict, Some(0.5));
        assert_eq!(s.per_id["punctuation:no_comma"].strict, 1);
        let t = table("ifeval", &s);
        assert!(
            t.contains("prompt_level_strict_acc") && t.contains("0.5000"),
            "{t}"
        );
        let mut line = String::new();
        output_line(&records[1], &v[1], &mut line);
        assert!(
            line.contains("\"follow_all_instructions_strict\": false"),
            "{line}"
        );
    }

    #[test]
    fn unbuildable_kwargs_are_errors_not_panics() {
        let r = rec(&["length_constraints:number_words"], "a b c");
        let v = score_record(&r);
        assert_eq!(v.strict, vec![None]);
        assert_eq!(v.errors.len(), 1);
        let s = scores(std::slice::from_ref(&r), &[v]);
        assert_eq!(s.per_id["length_constraints:number_words"].errors, 1);
        assert_eq!(s.prompt_strict, Some(0.0));
    }
}
