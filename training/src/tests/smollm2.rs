//! Real-model tests on SmolLM2-135M-Instruct (fetched once via `fetch_smollm2`
//! into `default_cache_dir()`): tokenizer, chat template, GGUF un-permutation,
//! trainer/sampler agreement, and a greedy chat generation (prints tokens/s).

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Device;

use super::max_abs_diff;
use hindsight_policy::*;

use crate::*;

fn gguf_path() -> std::path::PathBuf {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| fetch_smollm2(&default_cache_dir()).expect("fetch SmolLM2"))
        .clone()
}

pub(super) fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let t = Instant::now();
        let m = load(
            gguf_path().to_str().unwrap(),
            &default_cache_dir(),
            &Device::Cpu,
        )
        .expect("load SmolLM2");
        eprintln!(
            "SmolLM2 loaded in {:.2}s ({} params)",
            t.elapsed().as_secs_f64(),
            m.weights.num_parameters()
        );
        m
    })
}

#[test]
fn smollm2_config_and_tokenizer() {
    let m = model();
    let c = &m.config;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (49152, 576, 1536, 30, 9, 3)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(m.weights.num_parameters(), 134_515_008);

    let tok = &m.tokenizer;
    // The metadata-only path gives the same tokenizer.
    let tok2 = load_tokenizer("smollm2", &default_cache_dir()).unwrap();
    assert_eq!(tok2.vocab_size(), 49152);
    for text in [
        "Hello, world! The year is 2024.",
        "  spaces\tand\nnewlines  ",
        "héllo wörld 😀 ünïcödé",
        "x = f(3) + 42; // code",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok2.encode(text).unwrap(), ids);
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip {ids:?}");
    }
    // Individual digits (SmolLM2 pre-tokenizer) and merges actually applied.
    let ids = tok.encode("Hello world").unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
    assert_eq!(tok.eos_token_id(), 2);
    assert!(tok.stop_token_ids().contains(&0) && tok.stop_token_ids().contains(&2));
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(tok.chat_prompt("What is 2+2?"), want);
    let ids = tok.encode_chat("What is 2+2?").unwrap();
    eprintln!("SmolLM2 chat prompt ids: {ids:?}");
    // What HF's tokenizer.json gives: <|im_start|> system \n You Ġare Ġa Ġhelpful ...
    assert_eq!(ids[..7], [1, 9690, 198, 2683, 359, 253, 5356]);
    assert_eq!(tok.decode(&ids, false).unwrap(), want);
    assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&t| t == 2).count(), 2);
}

#[test]
fn smollm2_unpermuted_half_rope_equals_gguf_interleaved_rope() {
    let m = model();
    let dev = Device::Cpu;
    let (cfg_raw, raw) = weights_from_gguf(&gguf_path(), &dev, false).unwrap();
    assert_eq!(cfg_raw, m.config);
    let toks = m.tokenizer.encode_chat("Name three colors.").unwrap();
    let hf = Sampler::new(&m.config, &m.weights, &[], &dev).unwrap();
    let mut gg = Sampler::new(&m.config, &raw, &[], &dev).unwrap();
    gg.set_interleaved_rope(true);
    let a = hf.logits(&toks).unwrap();
    let b = gg.logits(&toks).unwrap();
    let d = max_abs_diff(&a, &b);
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!(
        "SmolLM2 un-permuted+half-rope vs GGUF+rope_i: max |dlogit| = {d:e} (max |logit| {scale:.1}, relative {:e}) over {} tokens",
        d / scale,
        toks.len()
    );
    // Only the f32 summation order of the q.k dot products differs (interleaved vs
    // half layout) across 30 layers; the exact check is the tiny-model test.
    assert!(d < 1e-3 && d / scale < 2e-5, "{d}");
    // And the permutation is really needed: without it logits differ a lot.
    let c = hf.logits(&toks).unwrap();
    let mut wrong = Sampler::new(&m.config, &raw, &[], &dev).unwrap();
    wrong.set_interleaved_rope(false);
    assert!(max_abs_diff(&c, &wrong.logits(&toks).unwrap()) > 0.1);
    // permute_qk inverts unpermute_qk.
    let q = m
        .weights
        .get("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let rq = raw.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(max_abs_diff(&ops::permute_qk(q, 9).unwrap(), rq), 0.0);
}

#[test]
fn smollm2_trainable_matches_sampler_and_greedy_chat() {
    let m = model();
    let dev = Device::Cpu;
    let mut s = Sampler::new(&m.config, &m.weights, m.tokenizer.stop_token_ids(), &dev).unwrap();
    let tm = TrainableModel::new(&m.config, &m.weights, &dev).unwrap();
    let toks = m.tokenizer.encode("The capital of France is").unwrap();
    let a = s.logits(&toks).unwrap();
    let b = tm.logits(&toks).unwrap();
    let d = max_abs_diff(&a, &b);
    eprintln!("SmolLM2 trainable vs sampler: max |dlogit| = {d:e}");
    assert!(d < 1e-3, "{d}");

    let prompt = m.tokenizer.encode_chat("What is 2+2?").unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 64,
        seed: 0,
    };
    let t = Instant::now();
    let g = s
        .generate(std::slice::from_ref(&prompt), &params)
        .unwrap()
        .remove(0);
    let dt = t.elapsed().as_secs_f64();
    let text = m.tokenizer.decode(&g.token_ids, false).unwrap();
    eprintln!(
        "SmolLM2 greedy: {} tokens in {dt:.2}s = {:.1} tok/s (batch 1, prompt {} tokens): {text:?}",
        g.token_ids.len(),
        g.token_ids.len() as f64 / dt,
        prompt.len()
    );
    assert!(g.finished, "did not stop within 64 tokens: {text:?}");
    assert!(text.ends_with("<|im_end|>"), "{text:?}");
    let clean = m.tokenizer.decode(&g.token_ids, true).unwrap();
    assert!(!clean.trim().is_empty());
    assert!(clean.contains('4'), "{clean:?}");

    // Batched sampling throughput (printed for the lead).
    let qs = [
        "What is 2+2?",
        "Name a fruit.",
        "Say hello in French.",
        "What color is the sky?",
        "Count to five.",
        "Give me a synonym for happy.",
        "What is the capital of Italy?",
        "Write a haiku about rain.",
    ];
    let ps: Vec<Vec<u32>> = qs
        .iter()
        .map(|q| m.tokenizer.encode_chat(q).unwrap())
        .collect();
    let params = SamplingParams {
        temperature: 0.7,
        top_p: 0.95,
        max_new_tokens: 32,
        seed: 1,
    };
    let t = Instant::now();
    let gens = s.generate(&ps, &params).unwrap();
    let dt = t.elapsed().as_secs_f64();
    let n: usize = gens.iter().map(|g| g.token_ids.len()).sum();
    eprintln!(
        "SmolLM2 sampling batch {}: {n} tokens in {dt:.2}s = {:.1} tok/s",
        ps.len(),
        n as f64 / dt
    );

    // The trainer reproduces the sampler's log-probs on the real model too.
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = ps
        .iter()
        .cloned()
        .zip(gens.iter().map(|g| g.token_ids.clone()))
        .take(2)
        .collect();
    let t = Instant::now();
    let fw = tm.forward_train(&pairs, 0.7).unwrap();
    let lp = fw.logp.clone();
    let loss = lp.sum_all().unwrap();
    let fwd = t.elapsed().as_secs_f64();
    let mut grads = loss.backward().unwrap();
    for (g, (name, v)) in fw
        .param_grads(&tm, &grads)
        .unwrap()
        .into_iter()
        .zip(tm.vars())
    {
        let g = g.unwrap_or_else(|| panic!("no gradient for {name}"));
        grads.insert(v.as_tensor(), g);
    }
    let bwd = t.elapsed().as_secs_f64() - fwd;
    let lp = lp.to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (bi, g) in gens.iter().take(2).enumerate() {
        for (j, &l) in g.logprobs.iter().enumerate() {
            worst = worst.max((lp[bi][j] - l).abs());
        }
    }
    eprintln!("SmolLM2 trainer vs sampler logprob max diff {worst:e}; fwd {fwd:.2}s bwd {bwd:.2}s (2 seqs)");
    assert!(worst < 2e-3, "{worst}");
    let mut opt = AdamW::new(tm.vars(), 1e-5, 0.0);
    let gn = grad_norm(&grads, tm.vars()).unwrap();
    let t = Instant::now();
    opt.step(&grads, tm.vars(), 1.0).unwrap();
    eprintln!(
        "SmolLM2 grad norm {gn:.3}; fused AdamW step {:.3}s",
        t.elapsed().as_secs_f64()
    );
    assert!(gn.is_finite() && gn > 0.0);
}

#[test]
fn smollm2_hf_checkpoint_round_trip_gives_identical_logits() {
    let m = model();
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    save_hf_checkpoint(tmp.path(), &m.config, &m.weights, &m.tokenizer).unwrap();
    let saved = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = load(tmp.path().to_str().unwrap(), tmp.path(), &dev).unwrap();
    eprintln!(
        "SmolLM2 HF checkpoint: saved in {saved:.2}s, loaded in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(back.config, m.config);
    assert_eq!(back.weights.num_parameters(), m.weights.num_parameters());
    // The rendered Jinja template is still exactly the ChatML prompt.
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(back.tokenizer.chat_prompt("Name three colors."), want);
    assert_eq!(m.tokenizer.chat_prompt("Name three colors."), want);
    let toks = back.tokenizer.encode_chat("Name three colors.").unwrap();
    assert_eq!(toks, m.tokenizer.encode_chat("Name three colors.").unwrap());
    assert_eq!(
        back.tokenizer.stop_token_ids(),
        m.tokenizer.stop_token_ids()
    );
    assert_eq!(back.tokenizer.eos_token_id(), 2);
    assert_eq!(back.tokenizer.bos_token_id(), Some(1));
    let a = Sampler::new(&m.config, &m.weights, &[], &dev)
        .unwrap()
        .logits(&toks)
        .unwrap();
    let b = Sampler::new(&back.config, &back.weights, &[], &dev)
        .unwrap()
        .logits(&toks)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// Actor-vs-learner log-prob mismatch on SmolLM2: responses sampled by the engine (f32 and
/// bf16 weights), log-probs recomputed by the learner's f32 trainable forward.
#[test]
fn smollm2_actor_vs_learner_logprob_mismatch() {
    let m = model();
    let prompts: Vec<Vec<u32>> = [
        "Write a haiku about rain. Do not use any commas.",
        "List three fruits in all capital letters.",
        "Explain gravity in two sentences.",
        "Say hello in French, then in German.",
    ]
    .iter()
    .map(|p| m.tokenizer.encode(&m.tokenizer.chat_prompt(p)).unwrap())
    .collect();
    let trainer = TrainableModel::new(&m.config, &m.weights, &Device::Cpu).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 24,
        seed: 5,
    };
    for (precision, mean_bound, max_bound) in
        [(Precision::F32, 1e-4, 1e-3), (Precision::Bf16, 0.05, 0.5)]
    {
        let mut s = Sampler::with_precision(
            &m.config,
            &m.weights,
            m.tokenizer.stop_token_ids(),
            &Device::Cpu,
            precision,
        )
        .unwrap();
        let gens = s.generate(&prompts, &params).unwrap();
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = prompts
            .iter()
            .cloned()
            .zip(gens.iter().map(|g| g.token_ids.clone()))
            .collect();
        let lp = trainer.forward_train(&pairs, 1.0).unwrap().logp;
        let lp = lp.to_vec2::<f32>().unwrap();
        let (mut sum, mut max, mut n) = (0f64, 0f64, 0usize);
        for (bi, g) in gens.iter().enumerate() {
            for (j, &a) in g.logprobs.iter().enumerate() {
                let d = (a as f64 - lp[bi][j] as f64).abs();
                sum += d;
                max = max.max(d);
                n += 1;
            }
        }
        let mean = sum / n as f64;
        eprintln!("{precision}: |log p_actor - log p_learner| over {n} tokens: mean {mean:.2e}, max {max:.2e}");
        assert!(n > 0);
        assert!(
            mean < mean_bound && max < max_bound,
            "{precision}: mean {mean}, max {max}"
        );
    }
}
