//! Fused training ops (`crate::fused`) against the differentiable primitives of
//! `crate::primitives`: forward values, gradients of every input (f32), and f64 gradients
//! against central finite differences. Shapes are deliberately not multiples of the
//! vector width.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fused;
use crate::primitives as ops;
use hindsight_policy::{tiny_kind, TinyKind};

fn rand_t(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

type Op = dyn Fn(&[Tensor]) -> Tensor;

/// `sum(f(inputs) * r)` for a fixed random `r` (so no symmetric cancellation hides errors).
fn weighted_loss(f: &Op, inputs: &[Tensor], seed: u64) -> Tensor {
    let y = f(inputs);
    let r = rand_t(y.dims(), seed, y.dtype());
    (y * r).unwrap().sum_all().unwrap()
}

/// Fused vs primitive in f32: forward values and the gradient of every input.
fn check_against_primitive(name: &str, fused: &Op, prim: &Op, shapes: &[&[usize]], tol: f64) {
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Var::from_tensor(&rand_t(s, 100 + i as u64, DType::F32)).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yp) = (fused(&ts), prim(&ts));
    let d = max_diff(&yf, &yp);
    eprintln!(
        "{name}: forward max |diff| {d:e} (max |y| {:.3})",
        max_abs(&yp)
    );
    assert!(d < tol * (1.0 + max_abs(&yp)), "{name} forward: {d}");
    let gf = weighted_loss(fused, &ts, 7).backward().unwrap();
    let gp = weighted_loss(prim, &ts, 7).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = gf
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no fused gradient for input {i}"));
        let b = gp.get(v.as_tensor()).unwrap();
        let d = max_diff(a, b);
        eprintln!(
            "{name}: grad {i} max |diff| {d:e} (max |g| {:.3})",
            max_abs(b)
        );
        assert!(max_abs(a) > 0.0, "{name}: zero gradient for input {i}");
        assert!(d < tol * (1.0 + max_abs(b)), "{name} grad {i}: {d}");
    }
}

/// f64 gradients of the fused op against central finite differences (a few entries of
/// each input, including the largest-gradient one).
fn check_finite_differences(name: &str, fused: &Op, shapes: &[&[usize]]) {
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Var::from_tensor(&rand_t(s, 200 + i as u64, DType::F64)).unwrap())
        .collect();
    let ts = || -> Vec<Tensor> { vars.iter().map(|v| v.as_tensor().clone()).collect() };
    let grads = weighted_loss(fused, &ts(), 9).backward().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let eps = 1e-6;
    let mut worst = 0f64;
    for (vi, var) in vars.iter().enumerate() {
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
        let mut idxs: Vec<usize> = (0..6).map(|_| rng.random_range(0..orig.len())).collect();
        idxs.push(
            (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap(),
        );
        for i in idxs {
            let eval = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                weighted_loss(fused, &ts(), 9).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), shape.clone(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (fd - g[i]).abs() / (1e-4 + fd.abs().max(g[i].abs()));
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "{name} input {vi}[{i}]: autograd {} vs finite difference {fd} (rel err {err:e})",
                g[i]
            );
        }
    }
    eprintln!("{name}: finite differences worst relative error {worst:e}");
}

#[test]
fn fused_rms_norm_matches_primitive_and_finite_differences() {
    let eps = 1e-5;
    let f = move |x: &[Tensor]| fused::rms_norm(&x[0], &x[1], eps).unwrap();
    let p = move |x: &[Tensor]| ops::rms_norm_diff(&x[0], &x[1], eps).unwrap();
    check_against_primitive("rms_norm", &f, &p, &[&[2, 5, 37], &[37]], 1e-5);
    check_against_primitive("rms_norm", &f, &p, &[&[70, 576], &[576]], 1e-5);
    check_finite_differences("rms_norm", &f, &[&[3, 4, 21], &[21]]);
}

#[test]
fn fused_linear_matches_primitive_and_finite_differences() {
    let f = |x: &[Tensor]| fused::linear(&x[0], &x[1]).unwrap();
    let p = |x: &[Tensor]| x[0].matmul(&x[1].t().unwrap()).unwrap();
    check_against_primitive("linear", &f, &p, &[&[37, 19], &[23, 19]], 1e-5);
    check_finite_differences("linear", &f, &[&[5, 7], &[3, 7]]);
}

fn cos_sin(t: usize, hd: usize, dtype: DType) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / hd as f32))
        .collect();
    let pos: Vec<usize> = (0..t).collect();
    hindsight_policy::ops::rope_cos_sin_inv(&pos, &inv, dtype, &Device::Cpu).unwrap()
}

#[test]
fn fused_rope_matches_primitive_and_finite_differences() {
    for (b, t, h, hd) in [(2, 7, 3, 10), (1, 33, 2, 64)] {
        let f = move |x: &[Tensor]| {
            let (cos, sin) = cos_sin(t, hd, x[0].dtype());
            fused::rope(&x[0], &cos, &sin, b, h).unwrap()
        };
        let p = move |x: &[Tensor]| {
            let (cos, sin) = cos_sin(t, hd, x[0].dtype());
            let xt = x[0]
                .reshape((b, t, h, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            ops::rope_half_diff(&xt, &cos, &sin).unwrap()
        };
        check_against_primitive("rope", &f, &p, &[&[b, t, h * hd]], 1e-5);
        check_finite_differences("rope", &f, &[&[b, t, h * hd]]);
    }
}

/// The primitive attention the trainable model used before (and still uses off-CPU).
fn attention_primitive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (b, h, t, hd) = q.dims4().unwrap();
    let kv = k.dim(1).unwrap();
    let n_rep = h / kv;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap();
    let qg = q.reshape((b, kv, n_rep * t, hd)).unwrap();
    let att = (qg.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let att = att
        .reshape((b, kv, n_rep, t, t))
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let att = ops::softmax_diff(&att)
        .unwrap()
        .reshape((b, kv, n_rep * t, t))
        .unwrap();
    att.matmul(v)
        .unwrap()
        .reshape((b, h, t, hd))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b * t, h * hd))
        .unwrap()
}

#[test]
fn fused_attention_matches_primitive_and_finite_differences() {
    for (b, h, kv, t, hd) in [(2, 6, 2, 7, 8), (1, 3, 3, 19, 16), (2, 4, 1, 5, 4)] {
        let scale = 1.0 / (hd as f64).sqrt();
        let f = move |x: &[Tensor]| fused::causal_attention(&x[0], &x[1], &x[2], scale).unwrap();
        let p = move |x: &[Tensor]| attention_primitive(&x[0], &x[1], &x[2], scale);
        let shapes: [&[usize]; 3] = [&[b, h, t, hd], &[b, kv, t, hd], &[b, kv, t, hd]];
        check_against_primitive("attention", &f, &p, &shapes, 1e-5);
        check_finite_differences("attention", &f, &shapes);
    }
}

#[test]
fn fused_swiglu_matches_primitive_and_finite_differences() {
    let f = |x: &[Tensor]| fused::swiglu(&(&x[0] * 4.0).unwrap(), &x[1]).unwrap();
    let p = |x: &[Tensor]| ((&x[0] * 4.0).unwrap().silu().unwrap() * &x[1]).unwrap();
    check_against_primitive("swiglu", &f, &p, &[&[3, 41], &[3, 41]], 1e-5);
    check_finite_differences("swiglu", &f, &[&[3, 41], &[3, 41]]);
}

/// `log softmax(h w^T / T)` gathered at the targets, from primitives.
fn logprob_primitive(h: &Tensor, w: &Tensor, targets: &[u32], inv_t: f64) -> Tensor {
    let logits = (h.matmul(&w.t().unwrap()).unwrap() * inv_t).unwrap();
    let tg = Tensor::new(targets, &Device::Cpu).unwrap();
    let tgt = logits
        .gather(&tg.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let lse = ops::logsumexp_diff(&logits)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap();
    (tgt - lse).unwrap()
}

#[test]
fn fused_target_logprobs_match_primitive_and_finite_differences() {
    let (n, d, vocab) = (11, 13, 300);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    for (inv_t, vc, keep) in [
        (1.0, 300, false),
        (1.0, 64, false),
        (1.0 / 0.7, 97, false),
        (1.0, 1000, false),
        (1.0, 300, true),
        (1.0 / 0.7, 97, true),
    ] {
        let tg = targets.clone();
        let f = move |x: &[Tensor]| {
            // Scale the weights so the softmax is far from uniform.
            let w = (&x[1] * 3.0).unwrap();
            fused::target_logprobs_chunked(&x[0], &w, &tg, inv_t, vc, keep).unwrap()
        };
        let tg = targets.clone();
        let p = move |x: &[Tensor]| {
            let w = (&x[1] * 3.0).unwrap();
            logprob_primitive(&x[0], &w, &tg, inv_t)
        };
        let shapes: [&[usize]; 2] = [&[n, d], &[vocab, d]];
        check_against_primitive("target_logprobs", &f, &p, &shapes, 1e-5);
        check_finite_differences("target_logprobs", &f, &shapes);
    }
    // The default chunking on a realistic shape (several vocabulary chunks).
    let h = rand_t(&[1100, 64], 1, DType::F32);
    let w = rand_t(&[20000, 64], 2, DType::F32);
    let targets: Vec<u32> = (0..1100).map(|_| rng.random_range(0..20000u32)).collect();
    let a = fused::target_logprobs(&h, &w, &targets, 1.0).unwrap();
    let b = logprob_primitive(&h, &w, &targets, 1.0);
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
    // Out-of-vocabulary targets are refused.
    assert!(fused::target_logprobs(&h, &w, &vec![20000; 1100], 1.0).is_err());
}

#[test]
fn fast_exp_is_accurate() {
    // Through the softmax op: a row of one live entry has probability exactly 1 only if
    // exp(0) == 1; compare a long row's log-sum-exp against f64.
    let x: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.043).collect();
    let h = Tensor::from_vec(vec![1f32], (1, 1), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(x.clone(), (4000, 1), &Device::Cpu).unwrap();
    for tgt in [0u32, 1999, 3999] {
        let got = fused::target_logprobs(&h, &w, &[tgt], 1.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        let want = x[tgt as usize] as f64 - lse;
        assert!(
            (got - want).abs() < 2e-5 * (1.0 + want.abs()),
            "{got} vs {want}"
        );
    }
}

/// The whole trainable forward: fused path vs primitive path, log-probs and the gradient
/// of every parameter (Llama, Qwen2 with biases and untied head, Llama-3 rope scaling).
#[test]
fn fused_trainable_matches_primitive_trainable() {
    use crate::TrainableModel;
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![257, 72, 105, 10], vec![104, 101, 108, 108, 111, 258]),
        (vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], vec![200, 201]),
        (vec![42], vec![7, 8, 9, 10]),
    ];
    for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
        let tm = tiny_kind(kind, 2).unwrap();
        let fused_m = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
        assert!(fused_m.is_fused());
        let mut prim_m = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
        prim_m.set_fused(false);
        assert!(!prim_m.is_fused());
        for temp in [1.0, 0.7] {
            let run = |m: &TrainableModel| {
                let (lp, mask) = m.response_logprobs_t(&pairs, temp).unwrap();
                let w = rand_t(lp.dims(), 4, DType::F32);
                let loss = ((&lp * w).unwrap() * &mask).unwrap().sum_all().unwrap();
                (lp, mask, loss.backward().unwrap())
            };
            let (lf, mf, gf) = run(&fused_m);
            let (lp, mp, gp) = run(&prim_m);
            assert_eq!(mf.to_vec2::<f32>().unwrap(), mp.to_vec2::<f32>().unwrap());
            let d = max_diff(&lf, &lp);
            eprintln!("{kind:?} T={temp}: fused vs primitive log-probs max |diff| {d:e}");
            assert!(d < 1e-4, "{d}");
            for ((name, vf), (_, vp)) in fused_m.vars().iter().zip(prim_m.vars()) {
                let a = gf
                    .get(vf.as_tensor())
                    .unwrap_or_else(|| panic!("no grad {name}"));
                let b = gp.get(vp.as_tensor()).unwrap();
                let d = max_diff(a, b);
                assert!(
                    d < 1e-4 * (1.0 + max_abs(b)),
                    "{kind:?} {name}: fused vs primitive gradient max |diff| {d}"
                );
            }
        }
    }
}

/// Pairs for the whole-model pass tests: one sequence longer than an attention block
/// (64 query rows), ragged responses, a one-token prompt.
fn whole_pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    let long: Vec<u32> = (0..75).map(|i| (i * 37 % 250) as u32 + 3).collect();
    vec![
        (vec![257, 72, 105, 10], vec![104, 101, 108, 108, 111, 258]),
        (long, (0..23).map(|i| (i * 11 % 200) as u32 + 5).collect()),
        (vec![42], vec![7, 8, 9, 10]),
    ]
}

/// The hand-written whole-model pass (`forward_train` + `param_grads`) against candle's
/// autograd over the primitive ops: log-probs, mask and every parameter's gradient, for
/// Llama, Qwen2 (q/k/v biases, untied head) and Llama-3 rope scaling, at two temperatures.
#[test]
fn whole_pass_matches_autograd_for_every_parameter() {
    use crate::TrainableModel;
    let pairs = whole_pairs();
    for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
        let tm = tiny_kind(kind, 2).unwrap();
        let whole = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
        assert!(whole.is_whole());
        let mut prim = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
        prim.set_fused(false);
        assert!(!prim.is_whole());
        for temp in [1.0, 0.7] {
            let run = |m: &TrainableModel| {
                let fw = m.forward_train(&pairs, temp).unwrap();
                let w = rand_t(fw.logp.dims(), 4, DType::F32);
                let loss = ((&fw.logp * w).unwrap() * &fw.mask)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let store = loss.backward().unwrap();
                let lp = fw.logp.detach();
                let mask = fw.mask.clone();
                (lp, mask, fw.param_grads(m, &store).unwrap())
            };
            let (lw, mw, gw) = run(&whole);
            let (lp, mp, gp) = run(&prim);
            assert_eq!(mw.to_vec2::<f32>().unwrap(), mp.to_vec2::<f32>().unwrap());
            let d = max_diff(&lw, &lp);
            eprintln!("{kind:?} T={temp}: whole vs primitive log-probs max |diff| {d:e}");
            assert!(d < 1e-4, "{d}");
            assert_eq!(gw.len(), whole.vars().len());
            for ((name, _), (a, b)) in whole.vars().iter().zip(gw.iter().zip(&gp)) {
                let a = a
                    .as_ref()
                    .unwrap_or_else(|| panic!("whole: no grad {name}"));
                let b = b
                    .as_ref()
                    .unwrap_or_else(|| panic!("primitive: no grad {name}"));
                assert_eq!(a.dims(), b.dims(), "{name}");
                assert!(max_abs(a) > 0.0, "{kind:?} {name}: zero gradient");
                let d = max_diff(a, b);
                assert!(
                    d < 1e-4 * (1.0 + max_abs(b)),
                    "{kind:?} {name}: whole vs primitive gradient max |diff| {d}"
                );
            }
        }
    }
}

/// Gradient accumulation: micro-batches summed into one [`crate::GradSums`] (the whole-model
/// pass writing into the running sums in place) give the gradient of the whole batch, as
/// candle's autograd over the primitive ops computes it in one pass.
#[test]
fn accumulated_micro_batches_match_one_primitive_pass() {
    use crate::{GradSums, TrainableModel};
    let pairs = whole_pairs();
    let tm = tiny_kind(TinyKind::Qwen2, 5).unwrap();
    let whole = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
    let mut prim = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
    prim.set_fused(false);
    // Per-sequence loss weights, so each micro-batch's loss is its part of the batch loss.
    let weight = |i: usize, len: usize| -> Tensor {
        let v: Vec<f32> = (0..len)
            .map(|j| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5)
            .collect();
        Tensor::from_vec(v, (1, len), &Device::Cpu).unwrap()
    };
    let loss_of = |fw: &crate::TrainForward, first: usize| -> Tensor {
        let (rows, width) = fw.logp.dims2().unwrap();
        let w = Tensor::cat(
            &(0..rows)
                .map(|r| weight(first + r, width))
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        // Padding columns differ between a micro-batch and the whole batch: the mask zeroes them.
        ((&fw.logp * w).unwrap() * &fw.mask)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let mut sums = GradSums::new(&whole);
    for (c, chunk) in pairs.chunks(2).enumerate() {
        let fw = whole.forward_train(chunk, 0.9).unwrap();
        let store = loss_of(&fw, c * 2).backward().unwrap();
        fw.accumulate(&whole, &store, &mut sums).unwrap();
    }
    let got = sums.into_tensors(&whole).unwrap();
    let fw = prim.forward_train(&pairs, 0.9).unwrap();
    let store = loss_of(&fw, 0).backward().unwrap();
    let want = fw.param_grads(&prim, &store).unwrap();
    for ((name, _), (a, b)) in whole.vars().iter().zip(got.iter().zip(&want)) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(max_abs(a) > 0.0, "{name}: zero gradient");
        let d = max_diff(a, b);
        assert!(
            d < 1e-4 * (1.0 + max_abs(b)),
            "{name}: accumulated vs one pass {d}"
        );
    }
}

/// The whole-model pass in f64 against central finite differences of the loss, for
/// elements of every kind of parameter (embedding, norms, q/k/v with biases, o, MLP,
/// untied head).
#[test]
fn whole_pass_gradients_match_finite_differences() {
    use crate::TrainableModel;
    let pairs = whole_pairs();
    let tm = tiny_kind(TinyKind::Qwen2, 2).unwrap();
    let model =
        TrainableModel::new_with_dtype(&tm.config, &tm.weights, &Device::Cpu, DType::F64).unwrap();
    assert!(model.is_whole());
    let temp = 0.8;
    let weights = |dims: &[usize]| rand_t(dims, 9, DType::F64);
    let loss_of = |m: &TrainableModel| -> f64 {
        let fw = m.forward_train(&pairs, temp).unwrap();
        let w = weights(fw.logp.dims());
        ((&fw.logp * w).unwrap() * &fw.mask)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let fw = model.forward_train(&pairs, temp).unwrap();
    let w = weights(fw.logp.dims());
    let loss = ((&fw.logp * w).unwrap() * &fw.mask)
        .unwrap()
        .sum_all()
        .unwrap();
    let store = loss.backward().unwrap();
    let grads = fw.param_grads(&model, &store).unwrap();
    let eps = 1e-5;
    let mut checked = 0;
    for (pi, (name, var)) in model.vars().iter().enumerate() {
        if !(name.contains("layers.1.")
            || name.starts_with("model.embed")
            || name.starts_with("lm_head")
            || name == "model.norm.weight")
        {
            continue;
        }
        let g = grads[pi]
            .as_ref()
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
        // The largest-gradient element and one fixed element (the embedding row of a
        // prompt token, so it is used).
        let big = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let fixed = if name.starts_with("model.embed") {
            42 * tm.config.hidden_size + 3
        } else {
            g.len() / 3
        };
        for e in [big, fixed] {
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[e] += delta;
                var.set(
                    &Tensor::from_vec(v, var.as_tensor().shape().clone(), &Device::Cpu).unwrap(),
                )
                .unwrap();
                loss_of(&model)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(
                &Tensor::from_vec(orig.clone(), var.as_tensor().shape().clone(), &Device::Cpu)
                    .unwrap(),
            )
            .unwrap();
            let err = (fd - g[e]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * g[e].abs().max(fd.abs()),
                "{name}[{e}]: analytic {} vs finite difference {fd}",
                g[e]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "checked only {checked} elements");
}

/// Training with the whole-model pass moves the loss the same way as candle's autograd:
/// three AdamW steps on the same batch give the same parameters.
#[test]
fn whole_pass_training_steps_match_autograd() {
    use crate::{AdamW, TrainableModel};
    let pairs = whole_pairs();
    let tm = tiny_kind(TinyKind::Llama, 2).unwrap();
    let mut out = Vec::new();
    for whole in [true, false] {
        let mut m = TrainableModel::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();
        m.set_whole(whole);
        let mut opt = AdamW::new(m.vars(), 1e-3, 0.01);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let fw = m.forward_train(&pairs, 1.0).unwrap();
            let loss = (fw.logp.sum_all().unwrap() * -1.0).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let mut store = loss.backward().unwrap();
            for (g, (_, v)) in fw
                .param_grads(&m, &store)
                .unwrap()
                .into_iter()
                .zip(m.vars())
            {
                store.insert(v.as_tensor(), g.unwrap());
            }
            opt.step(&store, m.vars(), 1.0).unwrap();
        }
        assert!(losses[2] < losses[0], "{losses:?}");
        out.push((losses, m.weights().unwrap()));
    }
    let (lw, ww) = &out[0];
    let (la, wa) = &out[1];
    for (a, b) in lw.iter().zip(la) {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{lw:?} vs {la:?}");
    }
    for (name, t) in &ww.tensors {
        let d = max_diff(t, &wa.tensors[name]);
        // Adam normalises each step to ~lr (1e-3) per element, so a few 1e-4 is rounding.
        assert!(d < 5e-4, "{name}: {d}");
    }
}
