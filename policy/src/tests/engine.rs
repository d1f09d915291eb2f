//! The CPU engine behind `Sampler`: continuous batching (slots refilled as sequences
//! finish, results independent of the batch size and of admission order), bf16 weights
//! (close to f32, and the actor-vs-learner log-prob mismatch they cause on SmolLM2).

use candle_core::Device;

use crate::*;

fn tiny_prompts(tm: &LoadedModel) -> Vec<Vec<u32>> {
    let texts = [
        "abc",
        "The quick brown fox",
        "jumps over",
        "a",
        "lazy dog, twice: lazy dog",
        "hello world",
        "zz",
    ];
    texts
        .iter()
        .map(|t| tm.tokenizer.encode(t).unwrap())
        .collect()
}

fn params(max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens,
        seed: 3,
    }
}

#[test]
fn generations_do_not_depend_on_the_batch_size() {
    let tm = tiny(11).unwrap();
    let ps = tiny_prompts(&tm);
    for precision in [Precision::F32, Precision::Bf16] {
        let mut s = Sampler::with_precision(
            &tm.config,
            &tm.weights,
            tm.tokenizer.stop_token_ids(),
            &Device::Cpu,
            precision,
        )
        .unwrap();
        let mut reference = None;
        for max_batch in [1, 2, 3, 7, 64] {
            s.set_max_batch(max_batch);
            let gens = s.generate(&ps, &params(16)).unwrap();
            assert_eq!(gens.len(), ps.len());
            match &reference {
                None => reference = Some(gens),
                // Bit-identical: same tokens, log-probs and entropies.
                Some(r) => assert_eq!(r, &gens, "{precision}: max_batch {max_batch}"),
            }
        }
        // A one-token prefill budget forces prompts to be admitted one step at a time.
        s.set_max_batch(4);
        s.set_max_prefill_tokens(1);
        let gens = s.generate(&ps, &params(16)).unwrap();
        assert_eq!(
            reference.as_ref().unwrap(),
            &gens,
            "{precision}: prefill budget 1"
        );
        s.set_max_prefill_tokens(2048);
    }
}

#[test]
fn continuous_batching_refills_free_slots_and_streams_results() {
    let tm = tiny(12).unwrap();
    let ps = tiny_prompts(&tm);
    let mut s = Sampler::new(&tm.config, &tm.weights, &[], &Device::Cpu).unwrap();
    s.set_max_batch(3);
    // Different lengths, so sequences finish at different steps.
    let mut pulled = 0usize;
    let finished = std::cell::RefCell::new(Vec::new());
    let mut max_in_flight = 0usize;
    let prompts = ps.clone();
    let p = params(6);
    // Every result arrives through `done` as soon as it ends, and `next` is only asked
    // when a slot is free.
    s.generate_stream(
        &p,
        &mut || {
            if pulled == prompts.len() {
                return None;
            }
            pulled += 1;
            max_in_flight = max_in_flight.max(pulled - finished.borrow().len());
            Some((pulled - 1, prompts[pulled - 1].clone()))
        },
        &mut |key, g| {
            assert_eq!(g.token_ids.len(), 6);
            assert!(!g.finished, "no stop tokens were given");
            finished.borrow_mut().push(key);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(pulled, ps.len());
    assert!(max_in_flight <= 3, "{max_in_flight} sequences in flight");
    let mut sorted = finished.into_inner();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..ps.len()).collect::<Vec<_>>());
    // The streamed results equal the batch API's.
    let batch = s.generate(&ps, &p).unwrap();
    s.set_max_batch(1);
    assert_eq!(batch, s.generate(&ps, &p).unwrap());
}

#[test]
fn stop_tokens_free_the_slot_early() {
    let tm = tiny(13).unwrap();
    let ps = tiny_prompts(&tm);
    let mut s = Sampler::new(&tm.config, &tm.weights, &[], &Device::Cpu).unwrap();
    let free = s.generate(&ps, &params(12)).unwrap();
    // Make the 3rd token of the first sequence a stop token: that sequence ends there,
    // the others are unchanged unless they sample it too.
    let stop = free[0].token_ids[2];
    s.set_stop_token_ids(&[stop]);
    s.set_max_batch(2);
    let stopped = s.generate(&ps, &params(12)).unwrap();
    for (a, b) in free.iter().zip(&stopped) {
        let cut = a.token_ids.iter().position(|&t| t == stop);
        match cut {
            Some(i) => {
                assert!(b.finished);
                assert_eq!(b.token_ids, a.token_ids[..=i]);
                assert_eq!(b.logprobs, a.logprobs[..=i]);
            }
            None => assert_eq!(a.token_ids, b.token_ids),
        }
    }
    assert!(stopped[0].finished && stopped[0].token_ids.len() == 3);
}

#[test]
fn bad_prompts_are_refused_with_a_message() {
    let tm = tiny(14).unwrap();
    let mut s = Sampler::new(&tm.config, &tm.weights, &[], &Device::Cpu).unwrap();
    let e = s.generate(&[vec![]], &params(4)).unwrap_err().to_string();
    assert!(e.contains("empty prompt"), "{e}");
    let e = s
        .generate(&[vec![1, 100_000]], &params(4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of vocabulary"), "{e}");
    assert!("fp8".parse::<Precision>().is_err());
    assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
}

#[test]
fn bf16_logits_stay_close_to_f32() {
    let tm = tiny(15).unwrap();
    let toks = tm.tokenizer.encode("The quick brown fox jumps").unwrap();
    let f = Sampler::new(&tm.config, &tm.weights, &[], &Device::Cpu).unwrap();
    let b = Sampler::with_precision(&tm.config, &tm.weights, &[], &Device::Cpu, Precision::Bf16)
        .unwrap();
    let d = (f.logits(&toks).unwrap() - b.logits(&toks).unwrap())
        .and_then(|x| x.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap();
    // bf16 weights and inputs keep 8 significant bits: visibly different, still close
    // (the tiny model's logits are of magnitude ~10).
    assert!(d > 0.0 && d < 0.2, "max |f32 - bf16| logit difference {d}");
}

/// Weights mapped from a file (as co-located actors take the learner's versions) generate
/// exactly what the same weights sent as bytes generate, for every tiny architecture and
/// both precisions; in f32 the engine holds none of them in its own memory, in bf16 all but
/// the embedding table.
#[test]
fn an_engine_on_mapped_weights_generates_what_one_on_copied_weights_does() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
        let tm = tiny_kind(kind, 31).unwrap();
        let bytes = tm.weights.to_safetensors_bytes().unwrap();
        let path = dir.path().join(format!("{kind:?}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let ps = tiny_prompts(&tm);
        let stops = tm.tokenizer.stop_token_ids();
        for precision in [Precision::F32, Precision::Bf16] {
            let generate = |prepared: PreparedWeights| {
                let mut s =
                    Sampler::from_prepared(&tm.config, stops, &Device::Cpu, precision, prepared)
                        .unwrap();
                s.set_max_batch(3);
                s.generate(&ps, &params(12)).unwrap()
            };
            let copied =
                Sampler::prepare_safetensors(&tm.config, &Device::Cpu, precision, &bytes).unwrap();
            let mapped = Sampler::prepare_safetensors_file(
                &tm.config,
                &Device::Cpu,
                precision,
                &path,
                Some(bytes.len() as u64),
            )
            .unwrap();
            let (in_file, total) = mapped.mapped_bytes().unwrap();
            assert!(total > 0);
            match precision {
                Precision::F32 => assert_eq!(in_file, total, "{kind:?}: f32 copies nothing"),
                // The matrices are rounded into memory; the f32 embedding table (the token
                // lookup) stays where it is.
                Precision::Bf16 => assert_eq!(
                    in_file,
                    tm.config.vocab_size * tm.config.hidden_size * 4,
                    "{kind:?}: bf16 keeps only the embedding mapped"
                ),
            }
            assert_eq!(copied.mapped_bytes().unwrap(), (0, total), "{kind:?}");
            assert_eq!(
                generate(copied),
                generate(mapped),
                "{kind:?} {precision}: mapped vs copied"
            );
        }
        // A file of another size than the manifest says, or without a tensor the model
        // needs, is refused before anything is built.
        let err = Sampler::prepare_safetensors_file(
            &tm.config,
            &Device::Cpu,
            Precision::F32,
            &path,
            Some(bytes.len() as u64 + 1),
        )
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("the manifest says"), "{err:#}");
        let mut fewer = tm.weights.clone();
        fewer.tensors.remove("model.norm.weight");
        std::fs::write(&path, fewer.to_safetensors_bytes().unwrap()).unwrap();
        let err = Sampler::prepare_safetensors_file(
            &tm.config,
            &Device::Cpu,
            Precision::F32,
            &path,
            None,
        )
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("missing weight tensor model.norm.weight"),
            "{err:#}"
        );
    }
}
