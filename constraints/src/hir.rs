//! Hindsight instruction Replay (HiR) as pure functions: reward, constraint-level
//! accuracy (CLA), the step-dependent CLA weight `lambda`, candidate scoring and replay
//! selection, and the instruction layouts of the reference HiR implementation.

pub use crate::record::Template;

/// Initial CLA weight `lambda0`.
pub const LAMBDA0: f64 = 2.0;
/// Per-step growth rate of the CLA weight.
pub const ETA: f64 = 0.05;

/// Upper bound of [`lambda`]. Selection only ranks candidates by
/// `lambda * cla + entropy`; once `lambda` times the smallest CLA gap between two
/// candidates exceeds any entropy gap, the ranking is "by CLA, then by entropy" and a
/// larger `lambda` changes nothing. CLA values are fractions `a/n` with `n` at most a few
/// dozen constraints (gaps >= 1/n^2 >= 1e-4) and mean token entropies are below
/// `ln(vocab) < 20`, so that point is reached near `lambda = 2e5`; 1e9 leaves four orders
/// of magnitude margin while the f64 spacing at 1e9 (~1.2e-7) still resolves entropy
/// differences between candidates of equal CLA.
pub const LAMBDA_CAP: f64 = 1e9;

/// 1.0 if every constraint holds (and there is at least one), else 0.0.
pub fn reward(verdicts: &[bool]) -> f32 {
    if !verdicts.is_empty() && verdicts.iter().all(|&v| v) {
        1.0
    } else {
        0.0
    }
}

/// Constraint-level accuracy: the fraction of constraints that hold (0.0 for none).
pub fn constraint_accuracy(verdicts: &[bool]) -> f64 {
    if verdicts.is_empty() {
        return 0.0;
    }
    verdicts.iter().filter(|&&v| v).count() as f64 / verdicts.len() as f64
}

/// `lambda0 * (1 + eta)^step`, computed in f64 and clamped to `[-LAMBDA_CAP,
/// LAMBDA_CAP]` so it is always finite (a NaN from NaN inputs gives 0.0).
pub fn lambda(step: u64, lambda0: f64, eta: f64) -> f64 {
    let base = 1.0 + eta;
    let growth = match i32::try_from(step) {
        Ok(s) => base.powi(s),
        Err(_) => base.powf(step as f64),
    };
    let v = lambda0 * growth;
    if v.is_nan() {
        0.0
    } else {
        v.clamp(-LAMBDA_CAP, LAMBDA_CAP)
    }
}

/// A rollout considered for replay.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Constraint-level accuracy of the rollout, in `[0, 1]`.
    pub cla: f64,
    /// Mean per-token entropy of the rollout.
    pub mean_entropy: f64,
}

/// `lambda * cla + mean_entropy`; a non-finite entropy counts as 0.
pub fn score(c: &Candidate, lambda: f64) -> f64 {
    let entropy = if c.mean_entropy.is_finite() {
        c.mean_entropy
    } else {
        0.0
    };
    lambda * c.cla + entropy
}

/// Indices (into `candidates`) of the replays: only candidates with 0 < cla < 1; top k by
/// score, descending; ties broken by lower index first; non-finite entropies treated as 0.
/// Returns fewer than k when there are fewer eligible candidates.
pub fn select(candidates: &[Candidate], k: usize, lambda: f64) -> Vec<usize> {
    let mut eligible: Vec<(usize, f64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.cla > 0.0 && c.cla < 1.0)
        .map(|(i, c)| (i, score(c, lambda)))
        .collect();
    // total_cmp: a NaN lambda cannot make the sort panic or misbehave.
    eligible.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    eligible.into_iter().take(k).map(|(i, _)| i).collect()
}

/// Join descriptions into one paragraph: each is followed by `" "` if it already ends in
/// `,` `.` `?` or `!`, else by `". "`; the result is stripped.
pub fn join(descriptions: &[&str]) -> String {
    let mut out = String::new();
    for d in descriptions {
        out.push_str(d);
        if d.ends_with([',', '.', '?', '!']) {
            out.push(' ');
        } else {
            out.push_str(". ");
        }
    }
    crate::pytext::py_strip(&out).to_string()
}

/// Lay out a question and constraint descriptions with one of the HiR templates:
/// * `Type1`: question + `" "` + [`join`]ed descriptions;
/// * `Type2`: question + `"\n"` + joined;
/// * `Type3`: question + `"\n\nThe output must follow the following rules:\n"` +
///   `"1. c1\n2. c2..."`;
/// * `Type4`: question + `"\n\n"` + `"- c1\n- c2..."`;
/// * `Type5`: joined + `"\n\n"` + question;
/// * `Type6`: question + `"\n\n"` + one description per line.
///
/// With no descriptions the question is returned unchanged.
pub fn layout(template: Template, question: &str, descriptions: &[&str]) -> String {
    if descriptions.is_empty() {
        return question.to_string();
    }
    match template {
        Template::Type1 => format!("{question} {}", join(descriptions)),
        Template::Type2 => format!("{question}\n{}", join(descriptions)),
        Template::Type3 => {
            let rules: Vec<String> = descriptions
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{}. {d}", i + 1))
                .collect();
            format!(
                "{question}\n\nThe output must follow the following rules:\n{}",
                rules.join("\n")
            )
        }
        Template::Type4 => {
            let items: Vec<String> = descriptions.iter().map(|d| format!("- {d}")).collect();
            format!("{question}\n\n{}", items.join("\n"))
        }
        Template::Type5 => format!("{}\n\n{question}", join(descriptions)),
        Template::Type6 => format!("{question}\n\n{}", descriptions.join("\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(cla: f64, mean_entropy: f64) -> Candidate {
        Candidate { cla, mean_entropy }
    }

    #[test]
    fn reward_and_cla() {
        assert_eq!(reward(&[]), 0.0);
        assert_eq!(reward(&[true, true]), 1.0);
        assert_eq!(reward(&[true, false]), 0.0);
        assert_eq!(constraint_accuracy(&[]), 0.0);
        assert_eq!(constraint_accuracy(&[true, false, true, true]), 0.75);
        assert_eq!(constraint_accuracy(&[false, false]), 0.0);
    }

    #[test]
    fn lambda_schedule() {
        assert!((lambda(0, LAMBDA0, ETA) - 2.0).abs() < 1e-12);
        assert!((lambda(1, LAMBDA0, ETA) - 2.1).abs() < 1e-12);
        assert!((lambda(2, LAMBDA0, ETA) - 2.205).abs() < 1e-12);
        assert!((lambda(10, 1.0, 0.1) - 2.5937424601).abs() < 1e-9);
        for s in [1_000, 100_000, u64::from(u32::MAX), u64::MAX] {
            let l = lambda(s, LAMBDA0, ETA);
            assert!(l.is_finite() && l == LAMBDA_CAP, "step {s}: {l}");
        }
        // monotone up to the cap
        let mut prev = 0.0;
        for s in 0..2000 {
            let l = lambda(s, LAMBDA0, ETA);
            assert!(l >= prev && l.is_finite());
            prev = l;
        }
        assert_eq!(lambda(5, f64::NAN, ETA), 0.0);
        assert_eq!(lambda(5, f64::INFINITY, ETA), LAMBDA_CAP);
        assert_eq!(lambda(u64::MAX, -1.0, ETA), -LAMBDA_CAP);
    }

    #[test]
    fn score_values() {
        assert_eq!(score(&c(0.5, 1.0), 2.0), 2.0);
        assert_eq!(score(&c(0.25, f64::NAN), 4.0), 1.0);
        assert_eq!(score(&c(0.25, f64::INFINITY), 4.0), 1.0);
    }

    #[test]
    fn select_orders_filters_and_breaks_ties() {
        let cands = vec![
            c(0.5, 0.1),      // 0: 2*0.5+0.1 = 1.1
            c(1.0, 9.0),      // 1: excluded (cla = 1)
            c(0.0, 9.0),      // 2: excluded (cla = 0)
            c(0.75, 0.0),     // 3: 1.5
            c(0.5, 0.1),      // 4: 1.1 (tie with 0, later index)
            c(0.25, 1.2),     // 5: 1.7
            c(0.5, f64::NAN), // 6: 1.0 (NaN entropy -> 0)
        ];
        assert_eq!(select(&cands, 3, 2.0), vec![5, 3, 0]);
        assert_eq!(select(&cands, 100, 2.0), vec![5, 3, 0, 4, 6]);
        assert_eq!(select(&cands, 0, 2.0), Vec::<usize>::new());
        // a larger lambda makes CLA dominate
        assert_eq!(select(&cands, 100, 1000.0), vec![3, 0, 4, 6, 5]);
        assert!(select(&[], 3, 2.0).is_empty());
        assert!(select(&[c(1.0, 0.0), c(0.0, 0.0), c(f64::NAN, 0.0)], 3, 2.0).is_empty());
        // NaN lambda: no panic, still only eligible candidates
        assert_eq!(select(&cands, 10, f64::NAN).len(), 5);
    }

    #[test]
    fn join_punctuation() {
        assert_eq!(
            join(&["Use no commas", "Answer briefly."]),
            "Use no commas. Answer briefly."
        );
        assert_eq!(join(&["Ready?", "Go!", "a,", "end"]), "Ready? Go! a, end.");
        assert_eq!(join(&["x"]), "x.");
        assert_eq!(join(&[]), "");
    }

    #[test]
    fn layouts() {
        let q = "Write a poem.";
        let d = ["Use no commas", "End with Bye."];
        assert_eq!(
            layout(Template::Type1, q, &d),
            "Write a poem. Use no commas. End with Bye."
        );
        assert_eq!(
            layout(Template::Type2, q, &d),
            "Write a poem.\nUse no commas. End with Bye."
        );
        assert_eq!(
            layout(Template::Type3, q, &d),
            "Write a poem.\n\nThe output must follow the following rules:\n1. Use no commas\n2. End with Bye."
        );
        assert_eq!(
            layout(Template::Type4, q, &d),
            "Write a poem.\n\n- Use no commas\n- End with Bye."
        );
        assert_eq!(
            layout(Template::Type5, q, &d),
            "Use no commas. End with Bye.\n\nWrite a poem."
        );
        assert_eq!(
            layout(Template::Type6, q, &d),
            "Write a poem.\n\nUse no commas\nEnd with Bye."
        );
        for t in Template::ALL {
            assert_eq!(layout(t, q, &[]), q);
        }
    }
}
