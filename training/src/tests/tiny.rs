//! Tiny-model tests: gradients (non-zero, finite differences in f64), trainer vs
//! sampler consistency, sampling behaviour, serialisation, AdamW.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use hindsight_policy::*;

use crate::*;

fn pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![257, 72, 105, 10], vec![104, 101, 108, 108, 111, 258]),
        (vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], vec![200, 201]),
        (vec![42], vec![7, 8, 9, 10]),
    ]
}

fn loss_of(m: &TrainableModel, pairs: &[(Vec<u32>, Vec<u32>)]) -> Tensor {
    let (lp, mask) = m.response_logprobs(pairs).unwrap();
    // A weighted sum so no symmetric cancellation hides errors.
    let (b, t) = lp.dims2().unwrap();
    let w: Vec<f64> = (0..b * t).map(|i| 1.0 + 0.1 * (i % 7) as f64).collect();
    let w = Tensor::from_vec(w, (b, t), lp.device())
        .unwrap()
        .to_dtype(lp.dtype())
        .unwrap();
    ((lp * w).unwrap() * mask).unwrap().sum_all().unwrap()
}

#[test]
fn every_parameter_gets_nonzero_gradient_f32() {
    for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
        every_parameter_gets_nonzero_gradient(kind);
    }
}

fn every_parameter_gets_nonzero_gradient(kind: TinyKind) {
    let tm = tiny_kind(kind, 3).unwrap();
    if kind == TinyKind::Qwen2 {
        assert!(tm
            .config
            .parameter_shapes()
            .iter()
            .any(|(n, _)| n == "lm_head.weight"));
        assert!(tm
            .config
            .parameter_shapes()
            .iter()
            .any(|(n, _)| n.ends_with("k_proj.bias")));
    }
    let m = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
    assert_eq!(m.vars().len(), tm.config.parameter_shapes().len());
    let loss = loss_of(&m, &pairs());
    let grads = loss.backward().unwrap();
    for (name, v) in m.vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            s.is_finite() && s > 0.0,
            "zero/non-finite gradient for {name}: {s}"
        );
    }
    let gn = grad_norm(&grads, m.vars()).unwrap();
    assert!(gn.is_finite() && gn > 0.0);
}

#[test]
fn gradients_match_finite_differences_f64() {
    // Llama, and Qwen2 (q/k/v biases, untied lm_head).
    for kind in [TinyKind::Llama, TinyKind::Qwen2] {
        gradients_match_finite_differences(kind);
    }
}

fn gradients_match_finite_differences(kind: TinyKind) {
    let tm = tiny_kind(kind, 5).unwrap();
    let m =
        TrainableModel::new_with_dtype(&tm.config, &tm.weights, &Device::Cpu, DType::F64).unwrap();
    let ps = pairs();
    let grads = loss_of(&m, &ps).backward().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let eps = 1e-5;
    let mut worst = 0f64;
    let mut checked = 0;
    for (name, var) in m.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().shape().clone();
        // Largest-gradient entry plus a few random ones.
        let mut idxs: Vec<usize> = (0..3).map(|_| rng.random_range(0..orig.len())).collect();
        let imax = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        idxs.push(imax);
        for i in idxs {
            let eval = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&m, &ps).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (fd - g[i]).abs() / (1e-4 + fd.abs().max(g[i].abs()));
            worst = worst.max(err);
            checked += 1;
            assert!(
                err < 1e-4,
                "{name}[{i}]: autograd {} vs finite difference {fd} (rel err {err:e})",
                g[i]
            );
        }
    }
    eprintln!("finite differences ({kind:?}): {checked} entries, worst relative error {worst:e}");
}

#[test]
fn trainable_logits_match_sampler_tiny() {
    for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
        trainable_logits_match_sampler(kind);
    }
}

fn trainable_logits_match_sampler(kind: TinyKind) {
    let tm = tiny_kind(kind, 0).unwrap();
    let dev = Device::Cpu;
    let s = Sampler::new(&tm.config, &tm.weights, tm.tokenizer.stop_token_ids(), &dev).unwrap();
    let m = TrainableModel::new(&tm.config, &tm.weights, &dev).unwrap();
    let toks = tm
        .tokenizer
        .encode_chat("Hello there, tiny model!")
        .unwrap();
    let a = s.logits(&toks).unwrap();
    let b = m.logits(&toks).unwrap();
    assert_eq!(a.dims(), &[toks.len(), tm.config.vocab_size]);
    let d = super::max_abs_diff(&a, &b);
    eprintln!("tiny ({kind:?}) trainable vs sampler max |dlogit| = {d:e}");
    assert!(d < 1e-5, "max diff {d}");
}

#[test]
fn gguf_permutation_with_rope_i_equals_half_rope_tiny() {
    let tm = tiny(8).unwrap();
    let dev = Device::Cpu;
    let mut permuted = tm.weights.clone();
    for l in 0..tm.config.num_hidden_layers {
        for (proj, heads) in [
            ("q_proj", tm.config.num_attention_heads),
            ("k_proj", tm.config.num_key_value_heads),
        ] {
            let name = format!("model.layers.{l}.self_attn.{proj}.weight");
            let w = ops::permute_qk(&tm.weights.tensors[&name], heads).unwrap();
            assert_eq!(
                ops::unpermute_qk(&w, heads)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                tm.weights.tensors[&name].to_vec2::<f32>().unwrap()
            );
            permuted.tensors.insert(name, w);
        }
    }
    let hf = Sampler::new(&tm.config, &tm.weights, &[], &dev).unwrap();
    let mut gg = Sampler::new(&tm.config, &permuted, &[], &dev).unwrap();
    gg.set_interleaved_rope(true);
    let toks = tm
        .tokenizer
        .encode("rotary embeddings, interleaved or not")
        .unwrap();
    let d = super::max_abs_diff(&hf.logits(&toks).unwrap(), &gg.logits(&toks).unwrap());
    eprintln!("tiny permuted+rope_i vs half rope: max |dlogit| = {d:e}");
    assert!(d < 1e-5, "{d}");
    gg.set_interleaved_rope(false);
    let d2 = super::max_abs_diff(&hf.logits(&toks).unwrap(), &gg.logits(&toks).unwrap());
    assert!(d2 > 1e-2, "permutation had no effect: {d2}");
}

fn log_softmax_row(row: &[f32], t: f64) -> Vec<f64> {
    let z: Vec<f64> = row.iter().map(|&x| x as f64 / t).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = z.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
    z.iter().map(|x| x - lse).collect()
}

#[test]
fn response_logprobs_batched_match_sampler_logits() {
    let tm = tiny(2).unwrap();
    let dev = Device::Cpu;
    let s = Sampler::new(&tm.config, &tm.weights, &[], &dev).unwrap();
    let m = TrainableModel::new(&tm.config, &tm.weights, &dev).unwrap();
    let ps = pairs();
    let (lp, mask) = m.response_logprobs(&ps).unwrap();
    assert_eq!(lp.dims(), &[3, 6]);
    let lp = lp.to_vec2::<f32>().unwrap();
    let mask = mask.to_vec2::<f32>().unwrap();
    for (bi, (p, r)) in ps.iter().enumerate() {
        let full: Vec<u32> = p.iter().chain(r).copied().collect();
        let logits = s.logits(&full).unwrap().to_vec2::<f32>().unwrap();
        for j in 0..6 {
            if j < r.len() {
                assert_eq!(mask[bi][j], 1.0);
                let want = log_softmax_row(&logits[p.len() - 1 + j], 1.0)[r[j] as usize];
                assert!(
                    (lp[bi][j] as f64 - want).abs() < 1e-4,
                    "pair {bi} tok {j}: {} vs {want}",
                    lp[bi][j]
                );
            } else {
                assert_eq!(mask[bi][j], 0.0);
                assert_eq!(lp[bi][j], 0.0);
            }
        }
    }
}

fn sampler() -> (LoadedModel, Sampler) {
    let tm = tiny(7).unwrap();
    let s = Sampler::new(
        &tm.config,
        &tm.weights,
        tm.tokenizer.stop_token_ids(),
        &Device::Cpu,
    )
    .unwrap();
    (tm, s)
}

fn prompts(tm: &LoadedModel) -> Vec<Vec<u32>> {
    vec![
        tm.tokenizer.encode("abc").unwrap(),
        tm.tokenizer.encode("The quick brown fox").unwrap(),
        tm.tokenizer.encode_chat("hi").unwrap(),
        vec![5],
    ]
}

/// A weight swap from safetensors bytes: a bad buffer (garbage, a missing tensor, a wrong
/// shape, an unreadable dtype, an extra unreadable tensor) is refused before anything changes, and the sampler goes on
/// generating with its weights; a good one gives exactly what a sampler built from those
/// weights generates.
#[test]
fn weight_swap_from_bytes_checks_first_then_replaces() {
    let (tm, mut s) = sampler();
    let ps = prompts(&tm);
    let params = SamplingParams {
        max_new_tokens: 12,
        seed: 3,
        ..Default::default()
    };
    let before = s.generate(&ps, &params).unwrap();
    let other = tiny(8).unwrap();
    let mut missing = other.weights.clone();
    missing.tensors.remove("model.norm.weight");
    let mut misshapen = other.weights.clone();
    misshapen.tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let mut ints = std::collections::HashMap::new();
    for (n, t) in &other.weights.tensors {
        let v = vec![0u8; t.elem_count() * 4];
        ints.insert(n.clone(), (t.dims().to_vec(), v));
    }
    let as_st =
        |ints: &std::collections::HashMap<String, (Vec<usize>, Vec<u8>)>, floats: &Weights| {
            let f32_views: Vec<(String, Vec<usize>, Vec<u8>)> = floats
                .tensors
                .iter()
                .map(|(n, t)| {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    (n.clone(), t.dims().to_vec(), b)
                })
                .collect();
            let views =
                ints.iter()
                    .map(|(n, (shape, v))| (n.clone(), safetensors::Dtype::I32, shape.clone(), v))
                    .chain(f32_views.iter().map(|(n, shape, b)| {
                        (n.clone(), safetensors::Dtype::F32, shape.clone(), b)
                    }))
                    .map(|(n, dt, shape, b)| {
                        (
                            n,
                            safetensors::tensor::TensorView::new(dt, shape, b).unwrap(),
                        )
                    });
            safetensors::serialize(views, None).unwrap()
        };
    let int_bytes = as_st(
        &ints,
        &Weights {
            tensors: Default::default(),
        },
    );
    // Every tensor the model needs is fine, but one more cannot be read: refused up front too.
    let extra =
        std::collections::HashMap::from([("extra.step".to_string(), (vec![1], vec![0u8; 4]))]);
    let extra_bytes = as_st(&extra, &other.weights);
    for (what, bytes, needle) in [
        ("garbage", b"not safetensors".to_vec(), "safetensors"),
        (
            "missing",
            missing.to_safetensors_bytes().unwrap(),
            "missing weight tensor model.norm.weight",
        ),
        (
            "misshapen",
            misshapen.to_safetensors_bytes().unwrap(),
            "shape [3]",
        ),
        ("ints", int_bytes, "unsupported safetensors dtype"),
        (
            "extra",
            extra_bytes,
            "tensor extra.step: unsupported safetensors dtype",
        ),
    ] {
        let err = s.load_safetensors(bytes).expect_err(what);
        assert!(format!("{err:#}").contains(needle), "{what}: {err:#}");
        assert!(s.has_weights(), "{what}: weights kept");
        assert_eq!(s.generate(&ps, &params).unwrap(), before, "{what}");
    }
    s.load_safetensors(other.weights.to_safetensors_bytes().unwrap())
        .unwrap();
    assert!(s.has_weights());
    let mut fresh = Sampler::new(
        &other.config,
        &other.weights,
        tm.tokenizer.stop_token_ids(),
        &Device::Cpu,
    )
    .unwrap();
    let want = fresh.generate(&ps, &params).unwrap();
    assert_ne!(want, before, "different weights generate differently");
    assert_eq!(s.generate(&ps, &params).unwrap(), want);
}

#[test]
fn sampling_shapes_and_values() {
    let (tm, mut s) = sampler();
    let ps = prompts(&tm);
    for (temp, top_p) in [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0), (1.3, 0.5)] {
        let params = SamplingParams {
            temperature: temp,
            top_p,
            max_new_tokens: 12,
            seed: 3,
        };
        let gens = s.generate(&ps, &params).unwrap();
        assert_eq!(gens.len(), ps.len());
        for g in &gens {
            assert!(!g.token_ids.is_empty() && g.token_ids.len() <= 12);
            assert_eq!(g.token_ids.len(), g.logprobs.len());
            assert_eq!(g.token_ids.len(), g.entropies.len());
            if !g.finished {
                assert_eq!(g.token_ids.len(), 12);
            } else {
                assert!(tm
                    .tokenizer
                    .stop_token_ids()
                    .contains(g.token_ids.last().unwrap()));
            }
            // No stop token before the end.
            for t in &g.token_ids[..g.token_ids.len() - 1] {
                assert!(!tm.tokenizer.stop_token_ids().contains(t));
            }
            assert!(g
                .token_ids
                .iter()
                .all(|&t| (t as usize) < tm.config.vocab_size));
            assert!(
                g.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0),
                "{:?}",
                g.logprobs
            );
            assert!(
                g.entropies.iter().all(|e| e.is_finite() && *e >= 0.0),
                "{:?}",
                g.entropies
            );
            assert!(g
                .entropies
                .iter()
                .all(|e| *e <= (tm.config.vocab_size as f32).ln() + 1e-3));
        }
    }
    assert!(s
        .generate(&[], &SamplingParams::default())
        .unwrap()
        .is_empty());
}

#[test]
fn sampling_stops_on_stop_tokens() {
    let (tm, mut s) = sampler();
    let ps = prompts(&tm);
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 10,
        seed: 0,
    };
    s.set_stop_token_ids(&[]);
    let free = s.generate(&ps, &greedy).unwrap();
    assert!(free.iter().all(|g| g.token_ids.len() == 10 && !g.finished));
    // Use the 4th greedy token of prompt 1 as a stop: it must end there (or at an earlier occurrence).
    let stop = free[1].token_ids[3];
    s.set_stop_token_ids(&[stop]);
    let stopped = s.generate(&ps, &greedy).unwrap();
    for (f, g) in free.iter().zip(&stopped) {
        match f.token_ids.iter().position(|&t| t == stop) {
            Some(k) => {
                assert!(g.finished);
                assert_eq!(g.token_ids, f.token_ids[..=k].to_vec());
                assert_eq!(g.logprobs, f.logprobs[..=k].to_vec());
            }
            None => {
                assert!(!g.finished);
                assert_eq!(g.token_ids, f.token_ids);
            }
        }
    }
    assert!(stopped[1].finished && stopped[1].token_ids.len() <= 4);
}

#[test]
fn sampling_is_seed_deterministic() {
    let (tm, mut s) = sampler();
    let ps = prompts(&tm);
    let p = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        max_new_tokens: 16,
        seed,
    };
    let a = s.generate(&ps, &p(9)).unwrap();
    let b = s.generate(&ps, &p(9)).unwrap();
    let c = s.generate(&ps, &p(10)).unwrap();
    assert_eq!(a, b);
    assert_ne!(
        a.iter().map(|g| g.token_ids.clone()).collect::<Vec<_>>(),
        c.iter().map(|g| g.token_ids.clone()).collect::<Vec<_>>()
    );
    // Per-sequence RNG streams: a sequence's sample does not depend on its batch mates
    // (as long as its index is the same).
    let a0 = s.generate(&ps[..1], &p(9)).unwrap();
    assert_eq!(a0[0].token_ids, a[0].token_ids);
}

#[test]
fn batched_greedy_equals_single() {
    let (tm, mut s) = sampler();
    let ps = prompts(&tm);
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 20,
        seed: 0,
    };
    let batched = s.generate(&ps, &greedy).unwrap();
    for (i, p) in ps.iter().enumerate() {
        let single = s
            .generate(std::slice::from_ref(p), &greedy)
            .unwrap()
            .remove(0);
        assert_eq!(single.token_ids, batched[i].token_ids, "prompt {i}");
        assert_eq!(single.finished, batched[i].finished);
        for (a, b) in single.logprobs.iter().zip(&batched[i].logprobs) {
            assert!((a - b).abs() < 1e-4, "prompt {i}: logprob {a} vs {b}");
        }
        for (a, b) in single.entropies.iter().zip(&batched[i].entropies) {
            assert!((a - b).abs() < 1e-4, "prompt {i}: entropy {a} vs {b}");
        }
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    let (tm, mut s) = sampler();
    let ps = prompts(&tm);
    let greedy = s
        .generate(
            &ps,
            &SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                max_new_tokens: 15,
                seed: 0,
            },
        )
        .unwrap();
    let nucleus = s
        .generate(
            &ps,
            &SamplingParams {
                temperature: 1.0,
                top_p: 1e-6,
                max_new_tokens: 15,
                seed: 4,
            },
        )
        .unwrap();
    for (g, n) in greedy.iter().zip(&nucleus) {
        assert_eq!(g.token_ids, n.token_ids);
        // Greedy reports temperature-1 log-probs, as does temperature 1 sampling.
        for (a, b) in g.logprobs.iter().zip(&n.logprobs) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

#[test]
fn sampler_logprobs_match_trainer() {
    let (tm, mut s) = sampler();
    let m = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
    let ps = prompts(&tm);
    for temp in [1.0f32, 0.7] {
        let gens = s
            .generate(
                &ps,
                &SamplingParams {
                    temperature: temp,
                    top_p: 0.9,
                    max_new_tokens: 10,
                    seed: 1,
                },
            )
            .unwrap();
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = ps
            .iter()
            .cloned()
            .zip(gens.iter().map(|g| g.token_ids.clone()))
            .collect();
        let (lp, _) = m.response_logprobs_t(&pairs, temp as f64).unwrap();
        let lp = lp.to_vec2::<f32>().unwrap();
        for (bi, g) in gens.iter().enumerate() {
            for (j, &l) in g.logprobs.iter().enumerate() {
                assert!(
                    (lp[bi][j] - l).abs() < 1e-4,
                    "T={temp} seq {bi} tok {j}: trainer {} sampler {l}",
                    lp[bi][j]
                );
            }
        }
    }
}

#[test]
fn weights_and_config_round_trip() {
    let tm = tiny(1).unwrap();
    assert_eq!(
        tm.weights.num_parameters(),
        tiny(1).unwrap().weights.num_parameters()
    );
    let bytes = tm.weights.to_safetensors_bytes().unwrap();
    let back = Weights::from_safetensors_bytes(&bytes, &Device::Cpu).unwrap();
    assert_eq!(back.tensors.len(), tm.weights.tensors.len());
    for (n, t) in &tm.weights.tensors {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = back.tensors[n]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{n}");
        assert_eq!(t.dims(), back.tensors[n].dims());
    }
    // Determinism of the tiny generator.
    let again = tiny(1).unwrap().weights.to_safetensors_bytes().unwrap();
    assert_eq!(bytes, again);
    assert_ne!(
        bytes,
        tiny(2).unwrap().weights.to_safetensors_bytes().unwrap()
    );
    // Trainable snapshot round trip.
    let m = TrainableModel::new(&tm.config, &back, &Device::Cpu).unwrap();
    assert_eq!(m.weights().unwrap().to_safetensors_bytes().unwrap(), bytes);
    // Config: HF field names.
    let js = serde_json::to_value(&tm.config).unwrap();
    for k in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
    ] {
        assert!(js.get(k).is_some(), "{k}");
    }
    let back: ModelConfig = serde_json::from_value(js).unwrap();
    assert_eq!(back, tm.config);
}

#[test]
fn tiny_tokenizer_and_template() {
    let tok = ChatTokenizer::tiny().unwrap();
    assert_eq!(tok.vocab_size(), 259);
    assert_eq!(tok.encode("hi<|im_end|>").unwrap(), vec![104, 105, 258]);
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![257]);
    assert_eq!(tok.eos_token_id(), 258);
    assert!(tok.stop_token_ids().contains(&256) && tok.stop_token_ids().contains(&258));
    let text = "héllo wörld 😀 12345\n\ttabs";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), text.len());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&[104, 105, 258], true).unwrap(), "hi");
    assert_eq!(
        tok.chat_prompt("Hey"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHey<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode_chat("Hey").unwrap();
    assert_eq!(ids[0], 257);
    assert_eq!(*ids.last().unwrap(), 10);
}

/// Reference AdamW in f64 (PyTorch semantics).
#[allow(clippy::too_many_arguments)]
fn ref_adamw(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    t: i32,
    lr: f64,
    wd: f64,
    scale: f64,
) {
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    for i in 0..p.len() {
        let g = g[i] * scale;
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let mh = m[i] / (1.0 - b1.powi(t));
        let vh = v[i] / (1.0 - b2.powi(t));
        p[i] -= lr * mh / (vh.sqrt() + eps);
    }
}

#[test]
fn adamw_matches_hand_computed_update() {
    adamw_matches_hand_computed(false);
}

/// The tensor-op path (CUDA and bf16 parameters take it; moments on the parameter's device)
/// against the same hand-computed updates.
#[test]
fn adamw_tensor_op_path_matches_hand_computed_update() {
    adamw_matches_hand_computed(true);
}

fn adamw_matches_hand_computed(tensor_ops: bool) {
    let dev = Device::Cpu;
    let w0 = vec![0.5f32, -1.0, 2.0, 0.25, -3.0, 1e-3];
    let c = vec![1.0f32, 1.0, -1.0, 0.0, 2.0, 0.5];
    let w = Var::from_tensor(&Tensor::from_vec(w0.clone(), (2, 3), &dev).unwrap()).unwrap();
    let n = Var::from_tensor(&Tensor::from_vec(vec![1.0f32, 2.0], 2, &dev).unwrap()).unwrap();
    let vars = vec![
        ("w".to_string(), w.clone()),
        ("norm.weight".to_string(), n.clone()),
    ];
    let (lr, wd) = (0.1, 0.01);
    let mut opt = AdamW::new(&vars, lr, wd);
    if tensor_ops {
        opt.use_tensor_ops();
    }
    let ct = Tensor::from_vec(c.clone(), (2, 3), &dev).unwrap();
    let mut pw: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    let mut pn = vec![1.0f64, 2.0];
    let (mut mw, mut vw, mut mn, mut vn) = (vec![0.0; 6], vec![0.0; 6], vec![0.0; 2], vec![0.0; 2]);
    for step in 1..=3 {
        // L = sum((w - c)^2) + sum(n^2) * 0.5  => dL/dw = 2 (w - c), dL/dn = n.
        let loss = (w
            .as_tensor()
            .sub(&ct)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            + (n.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let gw: Vec<f64> = pw
            .iter()
            .zip(&c)
            .map(|(p, c)| 2.0 * (p - *c as f64))
            .collect();
        let gn_: Vec<f64> = pn.clone();
        let norm = grad_norm(&grads, &vars).unwrap();
        let want_norm = (gw.iter().chain(&gn_).map(|x| x * x).sum::<f64>()).sqrt();
        assert!(
            (norm - want_norm).abs() < 1e-4 * want_norm,
            "{norm} vs {want_norm}"
        );
        let scale = if step == 2 { 0.5 } else { 1.0 };
        opt.step(&grads, &vars, scale as f32).unwrap();
        ref_adamw(&mut pw, &gw, &mut mw, &mut vw, step, lr, wd, scale);
        ref_adamw(&mut pn, &gn_, &mut mn, &mut vn, step, lr, 0.0, scale); // 1-D: no decay
        let got = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in got.iter().zip(&pw) {
            assert!((*a as f64 - b).abs() < 1e-5, "step {step}: {a} vs {b}");
        }
        let got = n.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&pn) {
            assert!((*a as f64 - b).abs() < 1e-5, "step {step}: {a} vs {b}");
        }
    }
    assert_eq!(opt.step_count(), 3);
    // Step 1 sanity: |update| == lr (Adam's first step is sign-like), plus decay.
    let first = 0.5 * (1.0 - lr * wd) - lr * (2.0 * (0.5 - 1.0) / (2.0f64 * 0.5).abs());
    assert!((first - (0.5 * (1.0 - 0.001) + 0.1)).abs() < 1e-12);
}

/// Whole-model AdamW steps on the tensor-op path track the CPU kernel, and its moments
/// (kept as tensors) save and resume on the kernel path.
#[test]
fn adamw_tensor_op_path_tracks_the_kernel_and_resumes_on_it() {
    let tm = tiny(4).unwrap();
    let dev = Device::Cpu;
    let mk = TrainableModel::new(&tm.config, &tm.weights, &dev).unwrap();
    let mt = TrainableModel::new(&tm.config, &tm.weights, &dev).unwrap();
    let ps = pairs();
    let mut ok = AdamW::new(mk.vars(), 1e-3, 0.1);
    let mut ot = AdamW::new(mt.vars(), 1e-3, 0.1);
    ot.use_tensor_ops();
    let close = |a: &Weights, b: &Weights, what: &str| {
        for (n, t) in &a.tensors {
            let d = (t - &b.tensors[n])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            // f32 rounding of the two paths, relative to the tensor's own size.
            let size = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6 + 1e-5 * size, "{what} {n}: {d} (max |x| {size})");
        }
    };
    for step in 0..3 {
        let scale = if step == 1 { 0.5 } else { 1.0 };
        let g = loss_of(&mk, &ps).backward().unwrap();
        ok.step(&g, mk.vars(), scale).unwrap();
        let g = loss_of(&mt, &ps).backward().unwrap();
        ot.step(&g, mt.vars(), scale).unwrap();
        close(&mk.weights().unwrap(), &mt.weights().unwrap(), "params");
    }
    assert!(
        (mk.weights().unwrap().to_safetensors_bytes().unwrap()
            != TrainableModel::new(&tm.config, &tm.weights, &dev)
                .unwrap()
                .weights()
                .unwrap()
                .to_safetensors_bytes()
                .unwrap()),
        "the steps moved the parameters"
    );
    // The tensor-path moments, saved, equal the kernel's within rounding.
    let saved = |o: &AdamW| {
        Weights::from_safetensors_bytes(&o.state_to_safetensors().unwrap(), &dev).unwrap()
    };
    let (sk, st) = (saved(&ok), saved(&ot));
    assert_eq!(sk.tensors.len(), 2 * mk.vars().len());
    close(&sk, &st, "moments");
    // Resume the tensor-path state on the kernel path: the next step matches too.
    let mut resumed = AdamW::new(mt.vars(), 1e-3, 0.1);
    resumed
        .load_state(&ot.state_to_safetensors().unwrap())
        .unwrap();
    assert_eq!(resumed.step_count(), 3);
    let g = loss_of(&mk, &ps).backward().unwrap();
    ok.step(&g, mk.vars(), 1.0).unwrap();
    let g = loss_of(&mt, &ps).backward().unwrap();
    resumed.step(&g, mt.vars(), 1.0).unwrap();
    close(
        &mk.weights().unwrap(),
        &mt.weights().unwrap(),
        "resumed params",
    );
}

#[test]
fn adamw_state_round_trip() {
    let tm = tiny(4).unwrap();
    let dev = Device::Cpu;
    let m1 = TrainableModel::new(&tm.config, &tm.weights, &dev).unwrap();
    let m2 = TrainableModel::new(&tm.config, &tm.weights, &dev).unwrap();
    let ps = pairs();
    let mut o1 = AdamW::new(m1.vars(), 1e-3, 0.1);
    for _ in 0..2 {
        let g = loss_of(&m1, &ps).backward().unwrap();
        o1.step(&g, m1.vars(), 1.0).unwrap();
    }
    // The no-copy writers give the same bytes as the copying ones.
    let copied = m1.weights().unwrap().to_safetensors_bytes().unwrap();
    assert_eq!(
        m1.weights_view().unwrap().to_safetensors_bytes().unwrap(),
        copied
    );
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("optimizer.safetensors");
    o1.save_state(&state_file).unwrap();
    let state = std::fs::read(&state_file).unwrap();
    assert_eq!(state, o1.state_to_safetensors().unwrap());
    // A view shares the parameters: it sees the next step, a copy does not.
    let view = m1.weights_view().unwrap();
    let kept = m1.weights().unwrap();
    let g = loss_of(&m1, &ps).backward().unwrap();
    o1.step(&g, m1.vars(), 1.0).unwrap();
    assert_ne!(view.to_safetensors_bytes().unwrap(), copied);
    assert_eq!(
        view.to_safetensors_bytes().unwrap(),
        m1.weights().unwrap().to_safetensors_bytes().unwrap()
    );
    assert_eq!(kept.to_safetensors_bytes().unwrap(), copied);
    // Load model 2 from the state of model 1 before that step, then replay it on both.
    m2.set_weights(&Weights::from_safetensors_bytes(&copied, &dev).unwrap())
        .unwrap();
    let mut o2 = AdamW::new(m2.vars(), 1e-3, 0.1);
    o2.load_state(&state).unwrap();
    let g2 = loss_of(&m2, &ps).backward().unwrap();
    o2.step(&g2, m2.vars(), 1.0).unwrap();
    assert_eq!(o2.step_count(), 3);
    let g1 = loss_of(&m1, &ps).backward().unwrap();
    let g2 = loss_of(&m2, &ps).backward().unwrap();
    o1.step(&g1, m1.vars(), 0.7).unwrap();
    o2.step(&g2, m2.vars(), 0.7).unwrap();
    assert_eq!(
        m1.weights().unwrap().to_safetensors_bytes().unwrap(),
        m2.weights().unwrap().to_safetensors_bytes().unwrap()
    );
    assert_eq!(
        o1.state_to_safetensors().unwrap(),
        o2.state_to_safetensors().unwrap()
    );
}

#[test]
fn training_reduces_loss_tiny() {
    let tm = tiny(6).unwrap();
    let m = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
    let ps = pairs();
    let mut opt = AdamW::new(m.vars(), 3e-3, 0.0);
    let nll = |m: &TrainableModel| {
        let (lp, mask) = m.response_logprobs(&ps).unwrap();
        (lp.sum_all().unwrap().neg().unwrap()
            / mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
            .unwrap()
    };
    let l0 = nll(&m).to_scalar::<f32>().unwrap();
    for _ in 0..20 {
        let loss = nll(&m);
        let g = loss.backward().unwrap();
        let norm = grad_norm(&g, m.vars()).unwrap();
        let scale = if norm > 1.0 { (1.0 / norm) as f32 } else { 1.0 };
        opt.step(&g, m.vars(), scale).unwrap();
    }
    let l1 = nll(&m).to_scalar::<f32>().unwrap();
    eprintln!("tiny training: nll {l0} -> {l1}");
    assert!(l1 < l0 * 0.7, "{l0} -> {l1}");
}

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Sampler>();
    assert_send_sync::<TrainableModel>();
    assert_send_sync::<ChatTokenizer>();
    assert_send_sync::<LoadedModel>();
    assert_send_sync::<AdamW>();
    assert_send_sync::<Weights>();
}
