//! `hindsight plot` as a process: two run directories (fixtures written here in the formats
//! `hindsight up` and the evaluator write) become one PNG and one SVG with both runs in the
//! legend; bad input is one clear line and exit code 2.

mod common;

use std::path::Path;

use common::hindsight;

fn run_dir(root: &Path, name: &str, arm: &str, m: u64, steps: u64, with_eval: bool) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for step in 1..=steps {
        let success = (step as f64 / steps as f64) * 0.4;
        lines.push_str(
            &serde_json::json!({
                "step": step,
                "success_rate": success,
                "reward_mean": 0.2 + success,
                "replay_samples": if m < 8 { 8 } else { 0 },
                "original_samples": 4 * m,
                "step_generated_responses": 4 * m,
                "generated_responses": 4 * m * step,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(dir.join("steps.jsonl"), lines).unwrap();
    std::fs::write(
        dir.join("summary.json"),
        serde_json::json!({ "arm": arm }).to_string(),
    )
    .unwrap();
    if with_eval {
        let mut evals = String::new();
        for (step, score) in [(0, 0.2), (10, 0.25), (20, 0.3)] {
            evals.push_str(
                &serde_json::json!({
                    "version": step, "step": step, "bench": "ifeval", "limit": 50,
                    "prompt_strict": score, "prompt_loose": score + 0.02,
                    "instruction_strict": score + 0.1, "instruction_loose": score + 0.12,
                    "seconds": 30.5, "time_unix": 1_700_000_000 + step,
                })
                .to_string(),
            );
            evals.push('\n');
        }
        std::fs::write(dir.join("eval.jsonl"), evals).unwrap();
    }
}

#[test]
fn plot_writes_png_and_svg_with_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    run_dir(tmp.path(), "hir-run", "HiR", 6, 20, true);
    run_dir(tmp.path(), "baseline-run", "binary", 8, 15, false);
    for (file, check_svg) in [("fig.png", false), ("out/fig.svg", true)] {
        let out = tmp.path().join(file);
        let o = hindsight()
            .arg("plot")
            .arg(tmp.path().join("hir-run"))
            .arg(tmp.path().join("baseline-run"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(&out).unwrap();
        if check_svg {
            let text = String::from_utf8(bytes).unwrap();
            assert!(
                text.starts_with("<svg") || text.contains("<svg "),
                "not an SVG"
            );
            for name in [
                // The directory's name, with the arm when the name does not say it.
                "hir-run",
                "baseline-run (binary)",
                "generated responses",
                "learner step",
                "eval: prompt-level strict",
            ] {
                assert!(text.contains(name), "the SVG lacks {name:?}");
            }
        } else {
            assert!(
                bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
                "not a PNG: {:?}",
                &bytes[..8.min(bytes.len())]
            );
            assert!(
                bytes.len() > 20_000,
                "suspiciously small PNG: {} bytes",
                bytes.len()
            );
        }
    }
}

#[test]
fn plot_refuses_bad_input_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    run_dir(tmp.path(), "good", "HiR", 6, 3, false);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("steps.jsonl"), "").unwrap();
    let cases: [(&[&Path], &str, &str); 4] = [
        (
            &[&tmp.path().join("missing")],
            "fig.png",
            "no such run directory",
        ),
        (&[&empty], "fig.png", "no steps"),
        (
            &[&tmp.path().join("good"), tmp.path()],
            "fig.png",
            "no steps.jsonl",
        ),
        (&[&tmp.path().join("good")], "fig.pdf", ".png or .svg"),
    ];
    for (dirs, output, want) in cases {
        let o = hindsight()
            .arg("plot")
            .args(dirs)
            .arg("--output")
            .arg(tmp.path().join(output))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{dirs:?}: {err}");
        assert!(err.contains(want), "{dirs:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!tmp.path().join("fig.png").exists());
}
