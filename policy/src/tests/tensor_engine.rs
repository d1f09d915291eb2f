//! The tensor engine (the generator of CUDA devices) run on the CPU against the CPU engine:
//! the same model must give the same tokens, log-probs, entropies and logits, so the GPU
//! path is held to the engine the CPU tests check, on a machine without a GPU.

use candle_core::Device;

use crate::*;

fn prompts(tm: &LoadedModel) -> Vec<Vec<u32>> {
    [
        "abc",
        "The quick brown fox",
        "a",
        "lazy dog, twice: lazy dog",
        "zz",
    ]
    .iter()
    .map(|t| tm.tokenizer.encode(t).unwrap())
    .collect()
}

fn run(
    g: &dyn Generator,
    ps: &[Vec<u32>],
    params: &SamplingParams,
    stops: &[u32],
    max_batch: usize,
) -> Vec<Generation> {
    let mut out: Vec<Option<Generation>> = vec![None; ps.len()];
    let mut it = ps.iter().cloned().enumerate();
    g.generate_stream(
        params,
        stops,
        max_batch,
        2048,
        &mut || it.next(),
        &mut |k, gen| {
            assert!(out[k].replace(gen).is_none(), "sequence {k} finished twice");
            Ok(())
        },
    )
    .unwrap();
    out.into_iter()
        .map(|g| g.expect("every prompt generated"))
        .collect()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max difference {worst} > {tol}");
}

fn assert_same_generations(what: &str, cpu: &[Generation], tensor: &[Generation]) {
    for (i, (c, t)) in cpu.iter().zip(tensor).enumerate() {
        assert_eq!(c.token_ids, t.token_ids, "{what}: sequence {i} tokens");
        assert_eq!(c.finished, t.finished, "{what}: sequence {i} finished");
        assert_close(
            &format!("{what}: sequence {i} log-probs"),
            &c.logprobs,
            &t.logprobs,
            1e-4,
        );
        assert_close(
            &format!("{what}: sequence {i} entropies"),
            &c.entropies,
            &t.entropies,
            1e-4,
        );
    }
}

#[test]
fn the_tensor_engine_generates_what_the_cpu_engine_generates() {
    for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
        let tm = tiny_kind(kind, 21).unwrap();
        let ps = prompts(&tm);
        let cpu = CpuEngine::new(&tm.config, &tm.weights, Precision::F32).unwrap();
        let tensor = TensorEngine::new(&tm.config, &tm.weights, &Device::Cpu).unwrap();

        let toks = &ps[3];
        let (lc, lt) = (cpu.logits(toks).unwrap(), tensor.logits(toks).unwrap());
        assert_eq!(lc.len(), toks.len() * tm.config.vocab_size);
        assert_close(&format!("{kind:?}: logits"), &lc, &lt, 1e-4);

        for temperature in [0.0, 1.0] {
            let params = SamplingParams {
                temperature,
                top_p: if temperature > 0.0 { 0.9 } else { 1.0 },
                max_new_tokens: 12,
                seed: 5,
            };
            let free = run(&cpu, &ps, &params, &[], 8);
            // A stop token that ends the first sequence early: the tensor engine then drops
            // finished rows from its batch and compacts the KV cache mid-generation.
            let stop = free[0].token_ids[2];
            let what = format!("{kind:?}, temperature {temperature}");
            let c = run(&cpu, &ps, &params, &[stop], 8);
            let cut = free[0].token_ids.iter().position(|&t| t == stop).unwrap();
            assert!(c[0].finished && c[0].token_ids.len() == cut + 1, "{what}");
            // Batches of 2 (left-padded, ragged prompts) and one batch of all five.
            for max_batch in [2, 5] {
                let t = run(&tensor, &ps, &params, &[stop], max_batch);
                assert_same_generations(&format!("{what}, batch {max_batch}"), &c, &t);
            }
        }
    }
}

#[test]
fn a_refused_weight_buffer_leaves_the_current_weights_in_place() {
    let tm = tiny(22).unwrap();
    let mut s = Sampler::new(&tm.config, &tm.weights, &[], &Device::Cpu).unwrap();
    assert!(s.has_weights());
    // A buffer that is not safetensors is refused before anything is freed.
    assert!(s.load_safetensors(b"not safetensors".to_vec()).is_err());
    assert!(s.has_weights());
    let toks = tm.tokenizer.encode("abc").unwrap();
    assert!(s.logits(&toks).is_ok());
}
