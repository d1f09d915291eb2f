//! The exactly-once check of ARCHITECTURE.md ("Exactly-once training"), shared by the fault
//! tests (`hindsight up`) and the docker-compose test: from the learner's step log, the
//! replay server's batch log, the group sequence numbers the actors were told are accepted,
//! and the replay server's counters.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// What a run left behind.
pub struct Ledger {
    /// `steps.jsonl`: one object per learner step (`step`, `policy_version`, `batch_id`,
    /// `group_seqs`).
    pub steps: Vec<Value>,
    /// The batch log: one object per (batch, group) (`batch_id`, `group_seq`).
    pub batch_log: Vec<Value>,
    /// Group sequence numbers acknowledged to actors.
    pub acked: BTreeSet<u64>,
    /// Accepted groups in no batch yet, and groups dropped as stale (replay server Status).
    pub groups_waiting: u64,
    pub groups_stale: u64,
}

impl Ledger {
    /// Checks that step numbers (1..=`steps` when given, else 1..=last) and weight versions
    /// never repeat, no group is in two batches, no batch is trained twice or skipped, and
    /// every acknowledged group is trained exactly once or still waits. Returns a one-line
    /// summary, or why the run broke the protocol.
    pub fn check(&self, steps: Option<u64>) -> Result<String, String> {
        let numbers: Vec<u64> = self.steps.iter().map(|s| u(&s["step"])).collect();
        let expected = steps.unwrap_or(numbers.len() as u64);
        if numbers != (1..=expected).collect::<Vec<_>>() {
            return Err(format!("step numbers in the step log: {numbers:?}"));
        }
        let versions: Vec<u64> = self.steps.iter().map(|s| u(&s["policy_version"])).collect();
        if !versions.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("weight versions repeat or go back: {versions:?}"));
        }
        let trained_batches: Vec<u64> = self.steps.iter().map(|s| u(&s["batch_id"])).collect();
        if !trained_batches.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!(
                "batch ids trained out of order or twice: {trained_batches:?}"
            ));
        }

        // What each batch id is made of (a re-served batch is logged once).
        let mut batches: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for line in &self.batch_log {
            batches
                .entry(u(&line["batch_id"]))
                .or_default()
                .insert(u(&line["group_seq"]));
        }
        let mut home: BTreeMap<u64, u64> = BTreeMap::new();
        for (&batch, seqs) in &batches {
            for &seq in seqs {
                if let Some(other) = home.insert(seq, batch) {
                    return Err(format!("group {seq} is in batches {other} and {batch}"));
                }
            }
        }
        let last_trained = trained_batches.last().copied().unwrap_or(0);
        let skipped: Vec<u64> = batches
            .keys()
            .copied()
            .filter(|b| *b <= last_trained && !trained_batches.contains(b))
            .collect();
        if !skipped.is_empty() {
            return Err(format!(
                "batches {skipped:?} were served before batch {last_trained} but are not in \
                 the weights' history {trained_batches:?}"
            ));
        }
        let mut trained: BTreeSet<u64> = BTreeSet::new();
        for s in &self.steps {
            let batch = u(&s["batch_id"]);
            let seqs: BTreeSet<u64> = s["group_seqs"]
                .as_array()
                .map(|a| a.iter().map(u).collect())
                .unwrap_or_default();
            if batches.get(&batch) != Some(&seqs) {
                return Err(format!(
                    "step {} trained groups {seqs:?} as batch {batch}, the batch log says {:?}",
                    s["step"],
                    batches.get(&batch)
                ));
            }
            for seq in seqs {
                if !trained.insert(seq) {
                    return Err(format!("group {seq} trained twice"));
                }
            }
        }

        if self.acked.is_empty() {
            return Err("the actors' logs show no acknowledged group".into());
        }
        let mut unbatched = 0;
        for seq in &self.acked {
            match home.get(seq) {
                Some(batch) if *batch <= last_trained && !trained.contains(seq) => {
                    return Err(format!(
                        "acknowledged group {seq} of trained batch {batch} was not trained"
                    ))
                }
                Some(_) => {}
                None => unbatched += 1,
            }
        }
        if unbatched > self.groups_waiting {
            return Err(format!(
                "{unbatched} acknowledged groups are in no batch, but the replay server has \
                 only {} waiting: acknowledged groups were lost",
                self.groups_waiting
            ));
        }
        if self.groups_stale != 0 {
            return Err(format!(
                "{} groups were dropped as stale",
                self.groups_stale
            ));
        }
        Ok(format!(
            "{} acknowledged groups: {} trained once, {} waiting; batches trained {trained_batches:?}",
            self.acked.len(),
            self.acked.iter().filter(|s| trained.contains(s)).count(),
            self.acked.iter().filter(|s| !trained.contains(s)).count()
        ))
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected an unsigned number, got {v}"))
}

/// Group sequence numbers in an actor's log ("group accepted ... group_seq=N" lines at debug
/// level), colour escapes ignored.
pub fn acknowledged_in(log: &str) -> BTreeSet<u64> {
    strip_ansi(log)
        .lines()
        .filter(|l| l.contains("group accepted"))
        .filter_map(|line| {
            line.split("group_seq=")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// `text` without terminal colour escapes (`ESC [ ... m`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
