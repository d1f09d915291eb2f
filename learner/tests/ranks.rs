//! N learner ranks = 1 learner, as separate processes: this test binary re-runs itself as each
//! rank ([`rank_process_entry`]); ranks > 1 meet over the TCP collective on loopback. Three
//! steps on the tiny model over fixed batches with ragged lengths, an empty response, replays
//! and on-policy samples; every rank writes its reduced gradients, statistics and weights
//! after each step, and the test compares:
//! - the ranks of one run with each other: bit for bit;
//! - a multi-rank run with the single-rank run: gradients and statistics to a relative 1e-4,
//!   the weight updates to a relative 1e-3 (L2 over the whole model).
//!
//! Also uneven shards (world size 4, 3 sequences: one rank trains on nothing). The gradient
//! comparison fails if a rank normalised its loss by its own token count (its gradient would
//! be scaled by global / local tokens, about 2x here): checked by making exactly that change.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use hindsight_collective::{Collective, Single};
use hindsight_learner::loss::PpoConfig;
use hindsight_learner::trainer::{shard_indices, TrainConfig, Trainer};
use hindsight_learner::AdvantageKind;
use hindsight_proto::v1::{BatchStats, Provenance, Sample, TrainingBatch};
use prost::Message;

const CHILD_ENV: &str = "HINDSIGHT_RANKS_TEST_CHILD";
const STEPS: u64 = 3;

fn config(advantage: AdvantageKind, mini_batches: usize) -> TrainConfig {
    TrainConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        // Small enough that every step clips: the clip must use the reduced (global) norm.
        max_grad_norm: 0.05,
        advantage,
        kl_beta: 0.0,
        ppo: PpoConfig {
            clip: 0.2,
            dual_clip: 3.0,
        },
        micro_batch: 2,
        mini_batches,
    }
}

fn trainer(advantage: AdvantageKind, mini_batches: usize) -> Trainer {
    let model = hindsight_policy::tiny(7).unwrap();
    Trainer::new(&model, false, config(advantage, mini_batches), &Device::Cpu).unwrap()
}

/// `n` samples for batch `id`: ragged prompts and responses, one empty response (when
/// `n > 3`), every third a replay, behaviour log-probs = the model's own, perturbed so some
/// ratios leave the clip range.
fn batch(t: &Trainer, id: u64, n: usize) -> TrainingBatch {
    let mut samples = Vec::new();
    for i in 0..n {
        let plen = 3 + (i * 5 + id as usize) % 9;
        let rlen = if n > 3 && i == 2 {
            0
        } else {
            1 + (i * 3 + id as usize) % 8
        };
        let tok = |k: usize| ((k * 31 + i * 17 + id as usize * 13) % 250 + 3) as u32;
        samples.push(Sample {
            prompt_token_ids: (0..plen).map(tok).collect(),
            response_token_ids: (0..rlen).map(|k| tok(k + 100)).collect(),
            loss_mask: vec![1; rlen],
            behaviour_logprobs: Vec::new(),
            // Both rewards in every GRPO group of two: no all-zero advantage.
            reward: ((i + id as usize) % 2) as f32,
            is_replay: i % 3 == 1,
            group_index: (i / 2) as u32,
            provenance: Some(Provenance {
                policy_version: 0,
                group_seq: i as u64,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = samples
        .iter()
        .filter(|s| !s.response_token_ids.is_empty())
        .map(|s| (s.prompt_token_ids.clone(), s.response_token_ids.clone()))
        .collect();
    let lp = t.model.forward_train(&pairs, 1.0).unwrap().logp;
    let rows = lp.to_vec2::<f32>().unwrap();
    let mut r = rows.into_iter();
    for (i, s) in samples.iter_mut().enumerate() {
        if s.response_token_ids.is_empty() {
            continue;
        }
        let row = r.next().unwrap();
        s.behaviour_logprobs = (0..s.response_token_ids.len())
            .map(|j| row[j] + (((i * 7 + j * 3) % 5) as f32 - 2.0) * 0.12)
            .collect();
    }
    TrainingBatch {
        batch_id: id,
        step: id,
        samples,
        stats: Some(BatchStats::default()),
        temperature: 1.0,
    }
}

/// What one rank process is told.
#[derive(serde::Serialize, serde::Deserialize)]
struct Job {
    out: PathBuf,
    batches: Vec<PathBuf>,
    grpo: bool,
    /// Above 1: run `train_step_with` itself (K optimizer steps per batch) and write its
    /// weights and step figures only.
    mini_batches: usize,
    world: u32,
    rank: u32,
    addr: String,
}

/// Not a test of its own: the body of one rank when [`run`] re-runs this binary (returns at
/// once otherwise).
#[test]
fn rank_process_entry() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let job: Job = serde_json::from_str(&job).unwrap();
    let advantage = if job.grpo {
        AdvantageKind::Grpo
    } else {
        AdvantageKind::ReinforcePp
    };
    let mut t = trainer(advantage, job.mini_batches);
    let mut c: Box<dyn Collective> = if job.world == 1 {
        Box::new(Single)
    } else {
        let hello = hindsight_collective::Hello {
            rank: job.rank,
            world_size: job.world,
            version: "test".into(),
            config_digest: hindsight_learner::ranks::config_digest(&t).unwrap(),
            model_fingerprint: "tiny".into(),
            backend: "tcp".into(),
        };
        Box::new(
            hindsight_collective::TcpCollective::establish(
                &job.addr,
                hello,
                Vec::new(),
                hindsight_collective::tcp::TcpConfig {
                    chunk_bytes: 4096,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    };
    for (s, path) in job.batches.iter().enumerate() {
        let step = s as u64 + 1;
        let b = TrainingBatch::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        let f = |name: &str| job.out.join(format!("rank{}-step{step}.{name}", job.rank));
        if job.mini_batches > 1 {
            let stats = t.train_step_with(&mut *c, &b, step, step - 1).unwrap();
            std::fs::write(f("weights"), bytes(&weights_of(&t))).unwrap();
            std::fs::write(f("json"), serde_json::to_string(&stats).unwrap()).unwrap();
            continue;
        }
        // The steps of `train_step_with`, spelled out to see the reduced gradients.
        let prepared = t.prepare(&b, step - 1).unwrap();
        let shard = shard_indices(&prepared.costs, c.rank() as usize, c.world_size() as usize);
        let local = t
            .compute_gradients(&prepared, &prepared.whole(), &shard, step)
            .unwrap();
        let reduced = t.reduce(&mut *c, local, step).unwrap();
        let mut grads = Vec::new();
        for (_, v) in t.model.vars() {
            let g = reduced
                .grads
                .get(v.as_tensor())
                .expect("every parameter has a gradient");
            grads.extend(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let sums = reduced.sums;
        let norm = reduced.norm;
        t.apply(reduced).unwrap();
        let stats = serde_json::json!({
            "loss": sums.loss, "clipped": sums.clipped_tokens, "ratio": sums.ratio_sum,
            "mismatch_sum": sums.mismatch_sum, "mismatch_n": sums.mismatch_n,
            "mismatch_max": sums.mismatch_max, "norm": norm, "shard": shard,
        });
        std::fs::write(f("grads"), bytes(&grads)).unwrap();
        std::fs::write(f("weights"), bytes(&weights_of(&t))).unwrap();
        std::fs::write(f("json"), stats.to_string()).unwrap();
    }
    // The same digests on every rank, through the learner's own check.
    hindsight_learner::ranks::check_digest(&mut *c, &t, STEPS).unwrap();
}

fn weights_of(t: &Trainer) -> Vec<f32> {
    let mut weights = Vec::new();
    for (_, v) in t.model.vars() {
        weights.extend(
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    weights
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Runs `world` rank processes on `batches`; their output directory.
fn run(
    dir: &Path,
    name: &str,
    batches: &[PathBuf],
    grpo: bool,
    mini_batches: usize,
    world: u32,
) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let job = Job {
                out: out.clone(),
                batches: batches.to_vec(),
                grpo,
                mini_batches,
                world,
                rank,
                addr: format!("127.0.0.1:{port}"),
            };
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "rank_process_entry",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, serde_json::to_string(&job).unwrap())
                .env("RAYON_NUM_THREADS", "1")
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "{name}: rank {rank} failed: {status}");
    }
    out
}

fn read(out: &Path, rank: u32, step: u64, what: &str) -> Vec<u8> {
    std::fs::read(out.join(format!("rank{rank}-step{step}.{what}"))).unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The figures each rank process writes per step (the spelled-out step's sums).
const FIGURES: [&str; 7] = [
    "loss",
    "clipped",
    "ratio",
    "mismatch_sum",
    "mismatch_n",
    "mismatch_max",
    "norm",
];

/// Compares a `world`-rank run with the single-rank run.
fn compare(single: &Path, multi: &Path, world: u32, w0: &[f32]) {
    for step in 1..=STEPS {
        // The ranks agree bit for bit with each other.
        for r in 1..world {
            for what in ["grads", "weights"] {
                assert!(
                    read(multi, 0, step, what) == read(multi, r, step, what),
                    "step {step}: rank {r}'s {what} differ from rank 0's"
                );
            }
            let a: serde_json::Value =
                serde_json::from_slice(&read(multi, 0, step, "json")).unwrap();
            let b: serde_json::Value =
                serde_json::from_slice(&read(multi, r, step, "json")).unwrap();
            for k in FIGURES {
                assert_eq!(a[k], b[k], "step {step}: {k} of rank {r} vs rank 0");
            }
        }
        // And with one rank on the whole batch, within rounding.
        let g1 = floats(&read(single, 0, step, "grads"));
        let gn = floats(&read(multi, 0, step, "grads"));
        let e = rel_l2(&gn, &g1);
        assert!(
            e < 1e-4,
            "step {step}: world {world} gradients differ from one rank's by {e:e} (relative L2)"
        );
        let s1: serde_json::Value = serde_json::from_slice(&read(single, 0, step, "json")).unwrap();
        let sn: serde_json::Value = serde_json::from_slice(&read(multi, 0, step, "json")).unwrap();
        for k in FIGURES {
            let (x, y) = (s1[k].as_f64().unwrap(), sn[k].as_f64().unwrap());
            // Relative, plus an absolute floor: the loss is a sum of f32 terms of order one
            // that nearly cancel, so its own size says nothing about its rounding.
            assert!(
                (x - y).abs() <= 1e-4 * x.abs() + 1e-6,
                "step {step}: {k} is {y} with world {world}, {x} with one rank"
            );
        }
        let (w1, wn) = (
            floats(&read(single, 0, step, "weights")),
            floats(&read(multi, 0, step, "weights")),
        );
        let d1: Vec<f32> = w1.iter().zip(w0).map(|(a, b)| a - b).collect();
        let dn: Vec<f32> = wn.iter().zip(w0).map(|(a, b)| a - b).collect();
        let e = rel_l2(&dn, &d1);
        eprintln!("world {world} step {step}: weight updates relative L2 {e:e} from one rank's");
        assert!(e < 1e-3, "step {step}: world {world} weight updates differ from one rank's by {e:e} (relative L2)");
    }
}

fn setup(n: usize, grpo: bool) -> (tempfile::TempDir, Vec<PathBuf>, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let t = trainer(
        if grpo {
            AdvantageKind::Grpo
        } else {
            AdvantageKind::ReinforcePp
        },
        1,
    );
    let batches = (1..=STEPS)
        .map(|id| {
            let p = dir.path().join(format!("batch{id}.pb"));
            std::fs::write(&p, batch(&t, id, n).encode_to_vec()).unwrap();
            p
        })
        .collect();
    let mut w0 = Vec::new();
    for (_, v) in t.model.vars() {
        w0.extend(
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    (dir, batches, w0)
}

#[test]
fn two_ranks_equal_one_rank() {
    let (dir, batches, w0) = setup(7, false);
    let single = run(dir.path(), "world1", &batches, false, 1, 1);
    let two = run(dir.path(), "world2", &batches, false, 1, 2);
    compare(&single, &two, 2, &w0);
    // Both ranks trained on something: the shards split the batch.
    let s: serde_json::Value = serde_json::from_slice(&read(&two, 1, 1, "json")).unwrap();
    assert!(!s["shard"].as_array().unwrap().is_empty());
}

#[test]
fn four_ranks_on_three_sequences_equal_one_rank() {
    let (dir, batches, w0) = setup(3, true);
    let single = run(dir.path(), "world1", &batches, true, 1, 1);
    let four = run(dir.path(), "world4", &batches, true, 1, 4);
    compare(&single, &four, 4, &w0);
    let empty = (0..4)
        .filter(|&r| {
            let s: serde_json::Value = serde_json::from_slice(&read(&four, r, 1, "json")).unwrap();
            s["shard"].as_array().unwrap().is_empty()
        })
        .count();
    assert_eq!(
        empty, 1,
        "3 sequences over 4 ranks leave one rank without a sample"
    );
}

/// `--mini-batches 2` through `train_step_with` itself: each mini-batch is sharded, reduced
/// and applied on its own, so two ranks still take one rank's two optimizer steps (and
/// those differ from one step on the whole batch, so the mini-batches are really taken).
#[test]
fn two_ranks_with_two_mini_batches_equal_one_rank() {
    let (dir, batches, w0) = setup(7, false);
    let whole = run(dir.path(), "k1", &batches, false, 1, 1);
    let single = run(dir.path(), "k2-world1", &batches, false, 2, 1);
    let two = run(dir.path(), "k2-world2", &batches, false, 2, 2);
    for step in 1..=STEPS {
        assert!(
            read(&two, 0, step, "weights") == read(&two, 1, step, "weights"),
            "step {step}: the ranks' weights differ"
        );
        let stats = |out: &Path, rank| -> serde_json::Value {
            serde_json::from_slice(&read(out, rank, step, "json")).unwrap()
        };
        let (s1, s2, s2b) = (stats(&single, 0), stats(&two, 0), stats(&two, 1));
        assert_eq!(s1["mini_batches"], 2);
        for k in [
            "loss",
            "grad_norm",
            "clip_fraction",
            "clip_fraction_original",
            "clip_fraction_replay",
            "approx_kl",
            "ratio_mean",
        ] {
            assert_eq!(s2[k], s2b[k], "step {step}: {k} of rank 1 vs rank 0");
            let (x, y) = (s1[k].as_f64().unwrap(), s2[k].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs() + 1e-6,
                "step {step}: {k} is {y} with two ranks, {x} with one"
            );
        }
        let delta = |out: &Path| -> Vec<f32> {
            floats(&read(out, 0, step, "weights"))
                .iter()
                .zip(&w0)
                .map(|(a, b)| a - b)
                .collect()
        };
        let (d1, d2, dw) = (delta(&single), delta(&two), delta(&whole));
        let e = rel_l2(&d2, &d1);
        assert!(e < 1e-3, "step {step}: weight updates differ by {e:e}");
        let apart = rel_l2(&dw, &d1);
        assert!(
            apart > 1e-2,
            "step {step}: two mini-batches moved the weights like one ({apart:e})"
        );
    }
}

#[test]
fn shards_are_token_balanced_and_cover_the_batch() {
    let costs = [10, 3, 7, 7, 1, 12];
    let shards: Vec<Vec<usize>> = (0..3).map(|r| shard_indices(&costs, r, 3)).collect();
    let mut all: Vec<usize> = shards.concat();
    all.sort_unstable();
    assert_eq!(all, (0..costs.len()).collect::<Vec<_>>());
    let loads: Vec<usize> = shards
        .iter()
        .map(|s| s.iter().map(|&i| costs[i]).sum())
        .collect();
    assert_eq!(loads, vec![13, 13, 14], "{shards:?}");
    assert_eq!(shard_indices(&costs, 0, 1), (0..6).collect::<Vec<_>>());
    assert!(shard_indices(&[5], 1, 2).is_empty());
}
