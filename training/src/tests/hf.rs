//! Hugging Face checkpoint tests on tiny random Llama / Llama-3 / Qwen2 models:
//! save (single file, sharded with an index, bf16) -> load round trips, sampler
//! and trainer agreement on the loaded model, generation, tokenizer files, and
//! chat-template rendering (Qwen2.5 and Llama-3 style templates).

use candle_core::{Device, Tensor};

use super::max_abs_diff;
use hindsight_model::tokenizer::{LLAMA3_STYLE_CHAT_TEMPLATE, QWEN25_CHAT_TEMPLATE};
use hindsight_policy::*;

use crate::*;

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Loads `dir`, checks config/weights against `want` (weights rounded by `round`),
/// sampler vs trainer logits, and that generation runs.
fn check_loaded(
    dir: &std::path::Path,
    want: &LoadedModel,
    round: impl Fn(f32) -> f32,
) -> LoadedModel {
    let dev = Device::Cpu;
    let m = load(dir.to_str().unwrap(), dir, &dev).unwrap();
    assert_eq!(m.config, want.config);
    assert_eq!(
        m.weights.tensors.len(),
        want.config.parameter_shapes().len()
    );
    for (n, t) in &want.weights.tensors {
        let got = m.weights.get(n).unwrap();
        assert_eq!(got.dims(), t.dims(), "{n}");
        let w: Vec<f32> = values(t).into_iter().map(&round).collect();
        assert_eq!(values(got), w, "{n}");
    }
    let tok = &m.tokenizer;
    assert_eq!(tok.chat_template(), want.tokenizer.chat_template());
    assert_eq!(tok.special_tokens(), want.tokenizer.special_tokens());
    assert_eq!(tok.eos_token_id(), want.tokenizer.eos_token_id());
    let prompt = "Name three colors, please.";
    assert_eq!(tok.chat_prompt(prompt), want.tokenizer.chat_prompt(prompt));
    let ids = tok.encode_chat(prompt).unwrap();
    assert_eq!(ids, want.tokenizer.encode_chat(prompt).unwrap());

    let mut s = Sampler::new(&m.config, &m.weights, tok.stop_token_ids(), &dev).unwrap();
    let tm = TrainableModel::new(&m.config, &m.weights, &dev).unwrap();
    let a = s.logits(&ids).unwrap();
    let b = tm.logits(&ids).unwrap();
    assert_eq!(a.dims(), &[ids.len(), m.config.vocab_size]);
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "{}: sampler vs trainer {d}", m.name);
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        max_new_tokens: 8,
        seed: 3,
    };
    let gens = s
        .generate(&[ids.clone(), ids[3..].to_vec()], &params)
        .unwrap();
    assert_eq!(gens.len(), 2);
    for g in &gens {
        assert!(!g.token_ids.is_empty() && g.token_ids.len() <= 8);
        assert_eq!(g.logprobs.len(), g.token_ids.len());
        assert!(g.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
    // The trainer reproduces the sampler's log-probs (biases and untied head included).
    let (lp, _) = tm
        .response_logprobs_t(&[(ids.clone(), gens[0].token_ids.clone())], 0.8)
        .unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    for (j, l) in gens[0].logprobs.iter().enumerate() {
        assert!((lp[0][j] - l).abs() < 1e-4, "{j}: {} vs {l}", lp[0][j]);
    }
    m
}

#[test]
fn tiny_llama_checkpoint_round_trip_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tiny(7).unwrap();
    save_hf_checkpoint(tmp.path(), &want.config, &want.weights, &want.tokenizer).unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(tmp.path().join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 257);
    assert_eq!(cfg["eos_token_id"], 258);
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(
        tc["chat_template"],
        hindsight_model::tokenizer::SMOLLM2_CHAT_TEMPLATE
    );
    let m = check_loaded(tmp.path(), &want, |x| x);
    // Bit-identical logits to the in-memory model.
    let dev = Device::Cpu;
    let ids = want.tokenizer.encode_chat("hello").unwrap();
    let a = Sampler::new(&want.config, &want.weights, &[], &dev)
        .unwrap()
        .logits(&ids)
        .unwrap();
    let b = Sampler::new(&m.config, &m.weights, &[], &dev)
        .unwrap()
        .logits(&ids)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // The tokenizer-only path reads the same files.
    let t2 = load_tokenizer(tmp.path().to_str().unwrap(), tmp.path()).unwrap();
    assert_eq!(t2.stop_token_ids(), m.tokenizer.stop_token_ids());
}

#[test]
fn tiny_qwen2_sharded_checkpoint_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tiny_kind(TinyKind::Qwen2, 4).unwrap();
    assert!(want.config.qkv_bias && !want.config.tie_word_embeddings);
    let opts = SaveOptions {
        dtype: SaveDtype::F32,
        shards: 2,
    };
    save_hf_checkpoint_with(
        tmp.path(),
        &want.config,
        &want.weights,
        &want.tokenizer,
        &opts,
    )
    .unwrap();
    assert!(tmp
        .path()
        .join("model-00001-of-00002.safetensors")
        .is_file());
    assert!(tmp
        .path()
        .join("model-00002-of-00002.safetensors")
        .is_file());
    assert!(!tmp.path().join("model.safetensors").exists());
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        idx["weight_map"]["lm_head.weight"],
        "model-00002-of-00002.safetensors"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(cfg["rope_theta"], 1e6);
    let m = check_loaded(tmp.path(), &want, |x| x);
    assert!(m
        .weights
        .get("model.layers.1.self_attn.v_proj.bias")
        .is_ok());
    // The biases matter: zeroing them changes the logits.
    let mut nob = m.weights.clone();
    for (n, t) in nob.tensors.iter_mut() {
        if n.ends_with(".bias") {
            *t = t.zeros_like().unwrap();
        }
    }
    let ids = m.tokenizer.encode_chat("hi").unwrap();
    let dev = Device::Cpu;
    let a = Sampler::new(&m.config, &m.weights, &[], &dev)
        .unwrap()
        .logits(&ids)
        .unwrap();
    let b = Sampler::new(&m.config, &nob, &[], &dev)
        .unwrap()
        .logits(&ids)
        .unwrap();
    assert!(max_abs_diff(&a, &b) > 1e-2);
    assert_eq!(
        m.tokenizer.chat_prompt("hi"),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn tiny_llama3_bf16_sharded_checkpoint_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tiny_kind(TinyKind::Llama3, 9).unwrap();
    let opts = SaveOptions {
        dtype: SaveDtype::Bf16,
        shards: 2,
    };
    save_hf_checkpoint_with(
        tmp.path(),
        &want.config,
        &want.weights,
        &want.tokenizer,
        &opts,
    )
    .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["rope_scaling"]["rope_type"], "llama3");
    let st = std::fs::read(tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() == safetensors::Dtype::BF16));
    check_loaded(tmp.path(), &want, |x| half::bf16::from_f32(x).to_f32());
}

#[test]
fn hf_config_parsing_defaults_and_rope_scaling() {
    // A Llama-3.2-1B-style config.json (as published, trimmed).
    let llama = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "tie_word_embeddings": true,
        "attention_bias": false, "mlp_bias": false, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    });
    let c = ModelConfig::from_hf_config(&llama).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert!(!c.qkv_bias && c.tie_word_embeddings);
    let inv = c.rope_inv_freqs();
    let plain = ModelConfig {
        rope_scaling: None,
        ..c.clone()
    }
    .rope_inv_freqs();
    assert_eq!(inv.len(), 32);
    // High frequencies (wavelength < 8192/4) unchanged; low ones (> 8192) divided by 32;
    // the band in between interpolated.
    let tau = 2.0 * std::f32::consts::PI;
    for (a, p) in inv.iter().zip(&plain) {
        let wl = tau / p;
        if wl < 2048.0 {
            assert_eq!(a, p);
        } else if wl > 8192.0 {
            assert_eq!(*a, p / 32.0);
        } else {
            assert!(*a < *p && *a > p / 32.0, "{a} {p}");
        }
    }
    assert!(inv.iter().zip(&plain).any(|(a, p)| a != p));
    // Round trip through our own writer.
    let back = ModelConfig::from_hf_config(&c.to_hf_config(&SpecialTokenIds::default())).unwrap();
    assert_eq!(back, c);

    // Qwen2.5-0.5B-Instruct-style config: biases implied, defaults applied.
    let qwen = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 32768,
        "max_window_layers": 21, "rope_scaling": null, "torch_dtype": "bfloat16"
    });
    let q = ModelConfig::from_hf_config(&qwen).unwrap();
    assert_eq!(q.architecture, Architecture::Qwen2);
    assert!(q.qkv_bias && q.rope_scaling.is_none());
    assert!(q.parameter_shapes().contains(&(
        "model.layers.3.self_attn.k_proj.bias".to_string(),
        vec![128]
    )));
    // transformers-5 style `rope_parameters`.
    let mut v5 = qwen.clone();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1000000.0});
    assert_eq!(ModelConfig::from_hf_config(&v5).unwrap(), q);
    // Unsupported things fail loudly.
    let mut bad = qwen.clone();
    bad["model_type"] = serde_json::json!("mistral");
    assert!(ModelConfig::from_hf_config(&bad).is_err());
    let mut bad = llama.clone();
    bad["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    assert!(ModelConfig::from_hf_config(&bad).is_err());
}

#[test]
fn qwen25_template_from_tokenizer_config() {
    // A checkpoint whose tokenizer_config.json carries Qwen2.5's template and tokens
    // as AddedToken dicts.
    let tmp = tempfile::tempdir().unwrap();
    let tm = tiny(0).unwrap();
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        tm.tokenizer.inner().to_string(false).unwrap(),
    )
    .unwrap();
    let tc = serde_json::json!({
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "eos_token": {"content": "<|im_end|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "pad_token": "<|endoftext|>",
        "bos_token": null,
        "model_max_length": 131072,
    });
    std::fs::write(tmp.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    std::fs::write(
        tmp.path().join("generation_config.json"),
        r#"{"eos_token_id": [258, 256], "pad_token_id": 256}"#,
    )
    .unwrap();
    let tok = tokenizer_from_hf_dir(tmp.path()).unwrap();
    assert_eq!(tok.model_max_length(), Some(131072));
    assert_eq!(tok.eos_token_id(), 258);
    assert!(tok.stop_token_ids().contains(&256));
    assert_eq!(
        tok.chat_prompt("What is 2+2?"),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        tok.chat_prompt_with_system(Some("Be brief."), "Hi"),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        tok.apply_chat_template(&[("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")], false)
            .unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
    // chat_template.jinja is the fallback when tokenizer_config.json has none.
    std::fs::write(tmp.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{{ bos_token }}[{{ messages[0].content }}]",
    )
    .unwrap();
    let tok = tokenizer_from_hf_dir(tmp.path()).unwrap();
    assert_eq!(tok.chat_prompt("x"), "[x]");
}

#[test]
fn llama3_style_template_renders_bos_date_and_trim() {
    let tok = tiny_tokenizer(TinyKind::Llama3).unwrap();
    assert_eq!(tok.chat_template(), Some(LLAMA3_STYLE_CHAT_TEMPLATE));
    let p = tok.chat_prompt("  Hi there \n");
    let head = "<|endoftext|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ";
    assert!(p.starts_with(head), "{p:?}");
    let date = &p[head.len()..p[head.len()..].find('\n').unwrap() + head.len()];
    // "%d %b %Y", e.g. "26 Jul 2024".
    assert_eq!(date.len(), 11, "{date:?}");
    assert!(p.ends_with("\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), "{p:?}");
}
