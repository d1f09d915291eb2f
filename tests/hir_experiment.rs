//! `scripts/hir-experiment.sh` end to end on the tiny model, with the binary under test: the
//! three arms train in two interleaved rounds on the same prompts and the same generation
//! budget, the final checkpoints and the base model go through `hindsight eval`, and the
//! figure and the table come out. The real experiment is the same script with SmolLM2 and a
//! larger budget (README, "Does it learn?").

use std::path::Path;
use std::process::Command;

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hir-experiment.sh")
}

/// Runs the script with `flags` (split at white space), `extra` and `--out out` on the binary
/// under test; returns its output after checking that it succeeded.
fn run_experiment(flags: &str, extra: &[&str], out: &Path) -> String {
    let output = Command::new("bash")
        .arg(script())
        .args(flags.split_whitespace())
        .args(extra)
        .arg("--out")
        .arg(out)
        .env("HINDSIGHT_BIN", env!("CARGO_BIN_EXE_hindsight"))
        .output()
        .expect("running scripts/hir-experiment.sh");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the experiment failed:\n{log}");
    log
}

#[test]
fn the_experiment_script_runs_three_arms_evaluates_and_tabulates() {
    let root =
        std::env::temp_dir().join(format!("hindsight-hir-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = root.join("exp");
    // Budget 48 responses: HiR generates 3 of each prompt's 4 samples (2 prompts a step: 6 a
    // step, 8 steps), the baselines all 4 (8 a step, 6 steps).
    let log = run_experiment(
        "--model tiny --budget 48 --rounds 2 --actors 1 --prompts-per-batch 2 --group-size 4 \
         --responses-per-prompt 3 --num-prompts 16 --max-new-tokens 16 --eval-limit 4",
        &[],
        &out,
    );

    let expected_steps = [("hir", 8u64), ("binary", 6), ("cla", 6)];
    for (arm, steps) in expected_steps {
        let rows = read_jsonl(&out.join(arm).join("steps.jsonl"));
        let last = rows
            .last()
            .unwrap_or_else(|| panic!("{arm}: no steps\n{log}"));
        assert_eq!(last["step"].as_u64(), Some(steps), "{arm}: steps\n{log}");
        // Equal budgets: every arm generated the same number of responses.
        assert_eq!(
            last["generated_responses"].as_u64(),
            Some(48),
            "{arm}: budget\n{log}"
        );
        let replays: u64 = rows
            .iter()
            .filter_map(|r| r["replay_samples"].as_u64())
            .sum();
        assert_eq!(
            replays > 0,
            arm == "hir",
            "{arm}: replays only with hindsight on"
        );
        // Two rounds, each timed.
        let wall = std::fs::read_to_string(out.join(arm).join("wall-seconds.txt")).unwrap();
        assert_eq!(wall.lines().count(), 2, "{arm}: one wall time per round");
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(arm).join("summary.json")).unwrap(),
        )
        .unwrap();
        let label = match arm {
            "hir" => "HiR",
            "binary" => "binary",
            _ => "CLA",
        };
        assert_eq!(summary["arm"], label, "{arm}: summary arm");
    }
    for who in ["base", "hir", "binary", "cla"] {
        let responses = read_jsonl(&out.join(format!("eval-{who}.jsonl")));
        assert_eq!(
            responses.len(),
            4,
            "{who}: one response per evaluated prompt"
        );
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("eval-{who}.json"))).unwrap(),
        )
        .unwrap();
        assert!(
            summary["prompt_level_strict"].is_number(),
            "{who}: {summary}"
        );
    }
    let png = std::fs::read(out.join("figure.png")).unwrap();
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let svg = std::fs::read_to_string(out.join("figure.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("hir") && svg.contains("cla"));
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    for row in [
        "| base model |",
        "| HiR | 8 | 48 |",
        "| binary | 6 | 48 |",
        "| CLA | 6 | 48 |",
    ] {
        assert!(table.contains(row), "table lacks {row:?}:\n{table}");
    }
    // Every arm and the base model got an eval score, not "n/a".
    assert_eq!(table.matches("n/a").count(), 0, "{table}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `--deadline` boxes the run in time: after the first round, a round starts only if it would
/// end by the deadline, so with the deadline already past only round 1 runs. Rounds end on equal
/// budgets, so the arms still compare at equal generated responses (half the budget each here),
/// and the table says that the run was cut.
#[test]
fn a_deadline_stops_the_experiment_between_rounds_at_equal_budgets() {
    let bad = Command::new("bash")
        .arg(script())
        .args(["--deadline", "soon", "--no-eval"])
        .env("HINDSIGHT_BIN", env!("CARGO_BIN_EXE_hindsight"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--deadline takes +MINUTES or a Unix time"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let root = std::env::temp_dir().join(format!("hindsight-hir-deadline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = root.join("exp");
    let log = run_experiment(
        "--model tiny --budget 16 --rounds 2 --deadline +0 --no-eval --actors 1 \
         --prompts-per-batch 2 --group-size 4 --responses-per-prompt 3 --num-prompts 8 \
         --max-new-tokens 8",
        &["--arms", "binary cla"],
        &out,
    );
    assert!(log.contains("stopping after 1 of 2 rounds"), "{log}");
    assert_eq!(
        std::fs::read_to_string(out.join("rounds.txt"))
            .unwrap()
            .trim(),
        "1 2"
    );
    for arm in ["binary", "cla"] {
        let rows = read_jsonl(&out.join(arm).join("steps.jsonl"));
        // 16 responses at 8 a step is 2 steps; one round of two is 1 step, 8 responses.
        let last = rows
            .last()
            .unwrap_or_else(|| panic!("{arm}: no steps\n{log}"));
        assert_eq!(last["step"].as_u64(), Some(1), "{arm}\n{log}");
        assert_eq!(
            last["generated_responses"].as_u64(),
            Some(8),
            "{arm}\n{log}"
        );
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(table.contains("Time-boxed: 1 of 2 rounds ran"), "{table}");
    assert!(
        table.contains("| binary | 1 | 8 |") && table.contains("| CLA | 1 | 8 |"),
        "{table}"
    );
    assert!(std::fs::metadata(out.join("figure.png")).unwrap().len() > 1000);
    let _ = std::fs::remove_dir_all(&root);
}
