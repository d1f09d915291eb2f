//! The whole-model training pass (`crate::fused`) against the differentiable primitives of
//! `crate::primitives`: forward values, gradients of every input (f32), and f64 gradients
//! against central finite differences. Shapes are deliberately not multiples of the
//! vector width.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fused;
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

/// The polynomial `exp` of the f32 kernels against f64 over the range the softmax and
/// log-sum-exp kernels feed it (arguments after max subtraction: at most 0).
#[test]
fn fast_exp_is_accurate() {
    let mut worst = 0f64;
    for i in 0..=20_000 {
        let x = -87.0 + 87.0 * i as f32 / 20_000.0;
        let got = fused::exp_f32(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 1e-5, "max relative error {worst:e}");
    assert_eq!(fused::exp_f32(0.0), 1.0);
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
        prim.set_whole(false);
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
    prim.set_whole(false);
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
