//! Reading a run directory into the series `hindsight plot` draws: one point per learner step
//! from `steps.jsonl`, one per evaluated version from `eval.jsonl` (optional), and the run's
//! name for the legend (the directory's name, with the arm from `summary.json` when that
//! says more).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// One learner step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    pub step: u64,
    /// Responses generated through this step (cumulative).
    pub generated: f64,
    /// Fraction of the batch's original responses that met every constraint.
    pub success: f64,
    /// Mean reward of the batch (originals and replays).
    pub reward: f64,
    /// Replays in the batch.
    pub replays: f64,
}

/// One evaluation of one weight version on one benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    pub step: u64,
    pub bench: String,
    pub prompt_strict: f64,
    pub instruction_strict: f64,
}

/// A run as the figure sees it.
#[derive(Debug, Clone)]
pub struct Run {
    /// Legend label.
    pub name: String,
    pub steps: Vec<StepPoint>,
    pub evals: Vec<EvalPoint>,
}

impl Run {
    /// Generated responses at `step` (0 before the first step; the last known value after
    /// the last one), to place an evaluation on the generated-responses axis.
    pub fn generated_at(&self, step: u64) -> f64 {
        self.steps
            .iter()
            .take_while(|s| s.step <= step)
            .last()
            .map_or(0.0, |s| s.generated)
    }
}

fn number(v: &Value, key: &str, path: &Path, line: usize) -> Result<f64> {
    v[key].as_f64().with_context(|| {
        format!(
            "{}:{line}: field {key:?} is missing or not a number",
            path.display()
        )
    })
}

/// Reads `dir` (see the module docs). Errors name the file and line.
pub fn read_run(dir: &Path) -> Result<Run> {
    if !dir.is_dir() {
        bail!("{}: no such run directory", dir.display());
    }
    let steps_path = dir.join("steps.jsonl");
    if !steps_path.is_file() {
        bail!(
            "{}: no steps.jsonl (not a `hindsight up` run directory?)",
            dir.display()
        );
    }
    let mut steps = Vec::new();
    // Runs from before `generated_responses` existed: the originals are what was generated.
    let mut generated_sum = 0.0;
    for (line, v) in crate::jsonl::read(&steps_path)? {
        let step = v["step"].as_u64().with_context(|| {
            format!(
                "{}:{line}: field \"step\" is missing or not a step number",
                steps_path.display()
            )
        })?;
        generated_sum += v["original_samples"].as_f64().unwrap_or(0.0);
        steps.push(StepPoint {
            step,
            generated: v["generated_responses"].as_f64().unwrap_or(generated_sum),
            success: number(&v, "success_rate", &steps_path, line)?,
            reward: number(&v, "reward_mean", &steps_path, line)?,
            replays: number(&v, "replay_samples", &steps_path, line)?,
        });
    }
    if steps.is_empty() {
        bail!(
            "{}: no steps in it (the run trained nothing)",
            steps_path.display()
        );
    }
    let eval_path = dir.join("eval.jsonl");
    let mut evals = Vec::new();
    if eval_path.is_file() {
        for (line, v) in crate::jsonl::read(&eval_path)? {
            evals.push(EvalPoint {
                step: v["step"].as_u64().with_context(|| {
                    format!(
                        "{}:{line}: field \"step\" is missing or not a step number",
                        eval_path.display()
                    )
                })?,
                bench: v["bench"].as_str().unwrap_or("eval").to_string(),
                prompt_strict: number(&v, "prompt_strict", &eval_path, line)?,
                instruction_strict: number(&v, "instruction_strict", &eval_path, line)?,
            });
        }
        evals.sort_by_key(|e| e.step);
    }
    let dir_name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let arm = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|s| s["arm"].as_str().map(str::to_owned));
    let name = match arm {
        Some(arm) if !dir_name.to_lowercase().contains(&arm.to_lowercase()) => {
            format!("{dir_name} ({arm})")
        }
        _ => dir_name,
    };
    Ok(Run { name, steps, evals })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_steps_evals_and_the_arm() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run-a");
        std::fs::create_dir(&dir).unwrap();
        write(
            &dir,
            "steps.jsonl",
            concat!(
                r#"{"step":1,"success_rate":0.25,"reward_mean":0.5,"replay_samples":4,"original_samples":12,"generated_responses":12}"#,
                "\n",
                r#"{"step":2,"success_rate":0.5,"reward_mean":0.6,"replay_samples":3,"original_samples":12,"generated_responses":24}"#,
                "\n"
            ),
        );
        write(
            &dir,
            "eval.jsonl",
            r#"{"version":2,"step":2,"bench":"ifeval","limit":50,"prompt_strict":0.3,"prompt_loose":0.35,"instruction_strict":0.4,"instruction_loose":0.45,"seconds":9.5,"time_unix":1}"#,
        );
        write(&dir, "summary.json", r#"{"arm":"HiR"}"#);
        let run = read_run(&dir).unwrap();
        assert_eq!(run.name, "run-a (HiR)");
        assert_eq!(run.steps.len(), 2);
        assert_eq!(run.steps[1].generated, 24.0);
        assert_eq!(run.evals[0].bench, "ifeval");
        assert_eq!(run.evals[0].prompt_strict, 0.3);
        assert_eq!(run.generated_at(2), 24.0);
        assert_eq!(run.generated_at(0), 0.0);
    }

    #[test]
    fn older_step_logs_count_originals_and_bad_input_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hir");
        std::fs::create_dir(&dir).unwrap();
        write(
            &dir,
            "steps.jsonl",
            "{\"step\":1,\"success_rate\":0,\"reward_mean\":0.25,\"replay_samples\":4,\"original_samples\":12}\n{\"step\":2,\"success_rate\":0,\"reward_mean\":0.25,\"replay_samples\":4,\"original_samples\":12}\n",
        );
        write(&dir, "summary.json", r#"{"arm":"HiR"}"#);
        let run = read_run(&dir).unwrap();
        assert_eq!(run.name, "hir");
        assert_eq!(run.steps[1].generated, 24.0);

        let missing = read_run(&tmp.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("no such run directory"), "{missing}");
        write(&dir, "steps.jsonl", "");
        let empty = read_run(&dir).unwrap_err().to_string();
        assert!(empty.contains("no steps"), "{empty}");
        write(&dir, "steps.jsonl", "{\"step\":1}\n");
        let bad = format!("{:#}", read_run(&dir).unwrap_err());
        assert!(
            bad.contains("steps.jsonl:1") && bad.contains("success_rate"),
            "{bad}"
        );
    }
}
