//! Drawing one token from a row of logits, the same way for every generator: temperature /
//! top-p sampling that reports the token's log-prob and the distribution's entropy.
//!
//! Log-prob convention: `logprobs[t]` is `log p(token_t)` under
//! `softmax(logits / temperature)` — the distribution actually sampled from —
//! *before* top-p truncation (so it is a smooth function of the weights, and equals
//! what the trainer recomputes with the same temperature). `entropies[t]` is the
//! entropy of that same distribution. With `temperature == 0` (greedy) both refer
//! to the temperature-1 distribution.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Sampling parameters. `temperature == 0` => greedy; `top_p >= 1` => no truncation.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 128,
            seed: 0,
        }
    }
}

/// One generated continuation. Stop tokens are included (with their log-prob).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub entropies: Vec<f32>,
    /// True iff the sequence ended on a stop token (false: hit `max_new_tokens`).
    pub finished: bool,
}

/// One pass over `logits * inv_t` shifted by its max: returns `(max, inv_t, ln Σe^z, entropy)`
/// with f64 accumulation and no allocation (`H = lse - Σ p z`).
fn softmax_stats(logits: &[f32], inv_t: f64) -> (f64, f64, f64) {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let (mut s0, mut s1) = (0f64, 0f64);
    for &l in logits {
        let z = (l as f64 - m) * inv_t;
        let e = z.exp();
        s0 += e;
        s1 += e * z;
    }
    let lse = s0.ln();
    (m, lse, (lse - s1 / s0).max(0.0))
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Samples one token: returns (token, log-prob before top-p truncation, entropy).
pub(crate) fn sample_row(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> (u32, f32, f32) {
    let greedy = params.temperature <= 0.0;
    let inv_t = if greedy {
        1.0
    } else {
        1.0 / params.temperature as f64
    };
    let (m, lse, ent) = softmax_stats(logits, inv_t);
    let logp = |i: usize| (logits[i] as f64 - m) * inv_t - lse;
    let tok = if greedy {
        argmax(logits)
    } else if params.top_p >= 1.0 {
        let u: f64 = rng.random::<f64>();
        let mut acc = 0.0;
        let mut tok = argmax(logits);
        for i in 0..logits.len() {
            acc += logp(i).exp();
            if u < acc {
                tok = i;
                break;
            }
        }
        tok
    } else {
        let u: f64 = rng.random::<f64>();
        // Nucleus: find the smallest top-k (k grown geometrically) whose mass reaches
        // top_p, using selection instead of a full sort.
        let v = logits.len();
        let mut idx: Vec<u32> = (0..v as u32).collect();
        let desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut k = 64.min(v);
        let kept = loop {
            if k < v {
                idx.select_nth_unstable_by(k - 1, desc);
            }
            idx[..k].sort_unstable_by(desc);
            let mut mass = 0.0;
            let mut kept = None;
            for (n, &i) in idx[..k].iter().enumerate() {
                mass += logp(i as usize).exp();
                if mass >= params.top_p as f64 {
                    kept = Some((n + 1, mass));
                    break;
                }
            }
            match kept {
                Some(x) => break x,
                None if k == v => break (v, mass),
                None => k = if k < 1024 { 1024.min(v) } else { v },
            }
        };
        let (kept, mass) = kept;
        let target = u * mass;
        let mut acc = 0.0;
        let mut tok = idx[kept - 1] as usize;
        for &i in &idx[..kept] {
            acc += logp(i as usize).exp();
            if target < acc {
                tok = i as usize;
                break;
            }
        }
        tok
    };
    (tok as u32, logp(tok) as f32, ent as f32)
}
