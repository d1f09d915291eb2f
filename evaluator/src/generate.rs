//! Responses to benchmark prompts from our engine: every prompt rendered with the model's own
//! chat template, generated with continuous batching ([`Sampler::generate_stream`]: as a
//! sequence ends, the next prompt takes its slot) and decoded without special tokens, the
//! way the replay server decodes a rollout.
//!
//! Greedy decoding (`temperature 0`) is deterministic: on the CPU engine a sequence's tokens
//! do not depend on which other sequences share a forward (the engine's batch invariance),
//! so a prompt gets the same response alone, in a batch, or after a resume. At a positive
//! temperature each prompt draws from its own random stream (seed, stream = its index in
//! the benchmark), which is also independent of the batch.

use anyhow::{Context, Result};
use hindsight_constraints::score::{score_all, scores, ScoreRecord, Scores, Verdicts};
use hindsight_policy::{ChatTokenizer, Sampler, SamplingParams};

use crate::bench::Benchmark;

/// How responses are generated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// 0 = greedy.
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

/// One finished response.
#[derive(Clone, Debug)]
pub struct Response {
    /// The prompt's index in the benchmark.
    pub index: usize,
    pub text: String,
    /// The chat-templated prompt's token ids, as fed to the engine.
    pub prompt_ids: Vec<u32>,
    /// The generated token ids (a final stop token included).
    pub token_ids: Vec<u32>,
    /// Ended on a stop token (false: cut at `max_new_tokens`).
    pub finished: bool,
}

/// Generates a response to each of `todo` (indices into `bench`), handing each to `done` as
/// soon as it is finished.
pub fn generate(
    sampler: &mut Sampler,
    tokenizer: &ChatTokenizer,
    bench: &Benchmark,
    todo: &[usize],
    settings: &Settings,
    done: &mut dyn FnMut(Response) -> Result<()>,
) -> Result<()> {
    let encoded: Vec<(usize, Vec<u32>)> = todo
        .iter()
        .map(|&i| {
            let p = &bench.prompts[i].prompt;
            tokenizer
                .encode_chat(p)
                .with_context(|| format!("encoding prompt {i} of {}", bench.name))
                .map(|ids| (i, ids))
        })
        .collect::<Result<_>>()?;
    let params = SamplingParams {
        temperature: settings.temperature,
        top_p: 1.0,
        max_new_tokens: settings.max_new_tokens,
        seed: settings.seed,
    };
    // The engine takes the prompts by value; keep a copy to hand back with each response.
    let mut prompt_ids: std::collections::HashMap<usize, Vec<u32>> =
        encoded.iter().cloned().collect();
    let mut it = encoded.into_iter();
    sampler.generate_stream(&params, &mut || it.next(), &mut |index, g| {
        let text = tokenizer
            .decode(&g.token_ids, true)
            .with_context(|| format!("decoding the response to prompt {index}"))?;
        done(Response {
            index,
            text,
            prompt_ids: prompt_ids.remove(&index).unwrap_or_default(),
            token_ids: g.token_ids,
            finished: g.finished,
        })
    })
}

/// The scored benchmark: one record per prompt with its response, its verdicts and the four
/// accuracies.
pub struct Scored {
    pub records: Vec<ScoreRecord>,
    pub verdicts: Vec<Verdicts>,
    pub scores: Scores,
}

/// Scores `responses[i]` (the response to prompt `i`) on `jobs` threads.
pub fn score(bench: &Benchmark, responses: &[String], jobs: usize) -> Scored {
    let records: Vec<ScoreRecord> = bench
        .prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| ScoreRecord {
            response: r.clone(),
            ..p.record.clone()
        })
        .collect();
    let verdicts = score_all(&records, jobs);
    let scores = scores(&records, &verdicts);
    Scored {
        records,
        verdicts,
        scores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_policy::Device;

    fn tiny_sampler(max_batch: usize) -> (Sampler, ChatTokenizer) {
        let m = hindsight_policy::tiny(7).unwrap();
        let mut s = Sampler::new(
            &m.config,
            &m.weights,
            m.tokenizer.stop_token_ids(),
            &Device::Cpu,
        )
        .unwrap();
        s.set_max_batch(max_batch);
        (s, m.tokenizer)
    }

    fn run(max_batch: usize, todo: &[usize], bench: &Benchmark) -> Vec<(usize, Vec<u32>, String)> {
        let (mut s, tok) = tiny_sampler(max_batch);
        let settings = Settings {
            temperature: 0.0,
            max_new_tokens: 24,
            seed: 0,
        };
        let mut out = Vec::new();
        generate(&mut s, &tok, bench, todo, &settings, &mut |r| {
            out.push((r.index, r.token_ids, r.text));
            Ok(())
        })
        .unwrap();
        out.sort_by_key(|r| r.0);
        out
    }

    #[test]
    fn greedy_responses_do_not_depend_on_the_batch() {
        let bench = Benchmark::load("ifeval", 6).unwrap();
        let all: Vec<usize> = (0..6).collect();
        let batched = run(6, &all, &bench);
        let again = run(3, &all, &bench);
        assert_eq!(batched, again, "batch 6 vs batch 3");
        for i in [0usize, 4] {
            let alone = run(1, &[i], &bench);
            assert_eq!(alone[0], batched[i], "prompt {i} alone vs in a batch of 6");
        }
        assert!(batched.iter().any(|r| !r.2.is_empty()), "{batched:?}");
    }
}
