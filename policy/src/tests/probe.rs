use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;
use crate::*;

#[test]
#[ignore]
fn probe() {
    let dev = Device::Cpu;
    eprintln!("rayon threads {} candle threads {}", rayon::current_num_threads(), candle_core::utils::get_num_threads());
    let n = 30_000_000usize;
    let v = Var::from_tensor(&Tensor::ones(n, DType::F32, &dev).unwrap()).unwrap();
    let vars = vec![("p".to_string(), v.clone())];
    let loss = (v.as_tensor() * 2.0).unwrap().sum_all().unwrap();
    let t = Instant::now();
    let g = loss.backward().unwrap();
    eprintln!("backward {:.3}", t.elapsed().as_secs_f64());
    let mut opt = AdamW::new(&vars, 1e-3, 0.0);
    for _ in 0..3 {
        let t = Instant::now();
        opt.step(&g, &vars, 1.0).unwrap();
        eprintln!("adamw 30M step {:.3}", t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let gn = grad_norm(&g, &vars).unwrap();
    eprintln!("gradnorm {gn} {:.3}", t.elapsed().as_secs_f64());
    let w = Tensor::randn(0f32, 1.0, (49152, 576), &dev).unwrap();
    for m in [32usize, 64] {
        let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
        let _ = x.matmul(&w.t().unwrap()).unwrap();
        let t = Instant::now();
        for _ in 0..5 { let _ = x.matmul(&w.t().unwrap()).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / 5.0;
        eprintln!("lm_head m={m}: {:.4}s  {:.1} GFLOPS", dt, 2.0 * m as f64 * 576.0 * 49152.0 / dt / 1e9);
        let t = Instant::now();
        for _ in 0..5 { let _ = crate::kernels::linear_small_m(&x, &w).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / 5.0;
        eprintln!("lm_head (kernel) m={m}: {:.4}s  {:.1} GFLOPS", dt, 2.0 * m as f64 * 576.0 * 49152.0 / dt / 1e9);
    }
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &dev).unwrap();
    for m in [32usize, 64] {
        let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
        let t = Instant::now();
        for _ in 0..20 { let _ = x.matmul(&w.t().unwrap()).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / 20.0;
        eprintln!("ffn m={m}: {:.5}s  {:.1} GFLOPS", dt, 2.0 * m as f64 * 576.0 * 1536.0 / dt / 1e9);
        let t = Instant::now();
        for _ in 0..20 { let _ = crate::kernels::linear_small_m(&x, &w).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / 20.0;
        eprintln!("ffn (kernel) m={m}: {:.5}s  {:.1} GFLOPS", dt, 2.0 * m as f64 * 576.0 * 1536.0 / dt / 1e9);
    }
}

#[test]
#[ignore]
fn probe_adamw_real() {
    let dev = Device::Cpu;
    let m = load(fetch_smollm2(&default_cache_dir()).unwrap().to_str().unwrap(), &default_cache_dir(), &dev).unwrap();
    let tm = TrainableModel::new(&m.config, &m.weights, &dev).unwrap();
    let pairs = vec![(m.tokenizer.encode_chat("What is 2+2?").unwrap(), m.tokenizer.encode("The answer is 4.<|im_end|>").unwrap())];
    let mut opt = AdamW::new(tm.vars(), 1e-5, 0.0);
    for _ in 0..3 {
        let t = Instant::now();
        let (lp, _) = tm.response_logprobs(&pairs).unwrap();
        let loss = lp.sum_all().unwrap();
        let f = t.elapsed().as_secs_f64();
        let g = loss.backward().unwrap();
        let b = t.elapsed().as_secs_f64() - f;
        let mut nc = 0;
        for (_, v) in tm.vars() { if !g.get(v.as_tensor()).unwrap().is_contiguous() { nc += 1; } }
        let t = Instant::now();
        opt.step(&g, tm.vars(), 1.0).unwrap();
        eprintln!("fwd {f:.3} bwd {b:.3} adamw {:.3} noncontig grads {nc}", t.elapsed().as_secs_f64());
    }
}

#[test]
#[ignore]
fn probe_generate() {
    let dev = Device::Cpu;
    let m = load(fetch_smollm2(&default_cache_dir()).unwrap().to_str().unwrap(), &default_cache_dir(), &dev).unwrap();
    let mut s = Sampler::new(&m.config, &m.weights, &[], &dev).unwrap();
    let qs = ["What is 2+2?", "Name a fruit.", "Say hello in French.", "What color is the sky?", "Count to five.", "Give me a synonym for happy.", "What is the capital of Italy?", "Write a haiku about rain."];
    let ps: Vec<Vec<u32>> = qs.iter().map(|q| m.tokenizer.encode_chat(q).unwrap()).collect();
    for (b, n) in [(8usize, 1usize), (8, 33)] {
        let params = SamplingParams { temperature: 0.7, top_p: 0.95, max_new_tokens: n, seed: 1 };
        let t = Instant::now();
        let g = s.generate(&ps[..b], &params).unwrap();
        let tot: usize = g.iter().map(|g| g.token_ids.len()).sum();
        eprintln!("batch {b} new {n}: {:.3}s ({tot} tokens)", t.elapsed().as_secs_f64());
    }
    let toks = vec![1u32; 8];
    for flat in [false, true] {
    let logits: Vec<f32> = (0..49152usize).map(|i| if flat { (i % 97) as f32 * 0.01 } else { -2.0 * (1.0 + ((i * 7919) % 49152) as f32).ln() }).collect();
    let t = Instant::now();
    for _ in 0..1000 {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let _ = crate::sampler::sample_row(&logits, &SamplingParams { temperature: 0.7, top_p: 0.95, max_new_tokens: 1, seed: 0 }, &mut rng);
    }
    eprintln!("sample_row top_p (flat {flat}): {:.3} ms each {}", t.elapsed().as_secs_f64(), toks.len());
    }
}
