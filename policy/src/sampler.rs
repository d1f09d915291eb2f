//! The inference front end: [`Sampler`] holds a model's [`Generator`] (the CPU engine on the
//! CPU, the tensor engine elsewhere; see [`crate::generator`]) with the generation settings
//! (stop tokens, batch size, prefill budget, precision), and swaps weight versions in
//! without ever holding two full sets: an actor prepares the next version while it
//! generates with the current one and installs it between two batches.
//!
//! Sampling and its log-prob convention are [`crate::sampling`].

use candle_core::{Device, Tensor};

use crate::engine::{CpuEngine, Precision};
use crate::generator::Generator;
use crate::tensor_engine::TensorEngine;
use crate::weights::Weights;
use hindsight_model::ModelConfig;

pub use crate::sampling::{Generation, SamplingParams};

/// Generates from one model: settings and the weight swap over a [`Generator`].
pub struct Sampler {
    config: ModelConfig,
    device: Device,
    /// None only after a weight swap failed part-way.
    generator: Option<Box<dyn Generator>>,
    stops: Vec<u32>,
    interleaved_rope: bool,
    precision: Precision,
    /// Sequences in flight at once.
    max_batch: usize,
    /// Prompt tokens prefilled per engine step (at least one whole prompt).
    max_prefill_tokens: usize,
}

/// Weights ready to be installed in a [`Sampler`] ([`Sampler::prepare_safetensors`]).
pub struct PreparedWeights(Prepared);

enum Prepared {
    /// The CPU engine, built.
    Cpu(Box<CpuEngine>),
    /// f32 host tensors, copied to the device by [`Sampler::install`].
    Other(Weights),
}

impl PreparedWeights {
    /// For the CPU engine: bytes of its weights that lie in a mapped file, and of all of them
    /// ([`CpuEngine::mapped_bytes`]); `None` on other devices.
    pub fn mapped_bytes(&self) -> Option<(usize, usize)> {
        match &self.0 {
            Prepared::Cpu(engine) => Some(engine.mapped_bytes()),
            Prepared::Other(_) => None,
        }
    }
}

const NO_WEIGHTS: &str = "the sampler holds no weights: the last weight swap failed part-way";

/// Default number of sequences generated at once.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Default prompt-token budget of one engine step.
pub const DEFAULT_MAX_PREFILL_TOKENS: usize = 2048;

impl Sampler {
    /// Builds the engine from HF-layout weights (half-rotation rope).
    pub fn new(
        config: &ModelConfig,
        weights: &Weights,
        tokenizer_stops: &[u32],
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::with_precision(config, weights, tokenizer_stops, device, Precision::F32)
    }

    /// A sampler with no weights yet (the constructors load or install them).
    fn empty(
        config: &ModelConfig,
        tokenizer_stops: &[u32],
        device: &Device,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(
            device.is_cpu() || precision == Precision::F32,
            "{precision} generation is implemented by the CPU engine only; use f32 on {device:?}"
        );
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            generator: None,
            stops: tokenizer_stops.to_vec(),
            interleaved_rope: false,
            precision,
            max_batch: DEFAULT_MAX_BATCH,
            max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS,
        })
    }

    /// As [`Sampler::new`], with the generation weights stored in `precision`
    /// (bf16 is implemented by the CPU engine; other devices refuse it).
    pub fn with_precision(
        config: &ModelConfig,
        weights: &Weights,
        tokenizer_stops: &[u32],
        device: &Device,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        let mut s = Self::empty(config, tokenizer_stops, device, precision)?;
        s.load_weights(weights)?;
        Ok(s)
    }

    /// Test hook: treat q/k weights as GGUF-permuted and use interleaved rope (`rope_i`).
    pub fn set_interleaved_rope(&mut self, interleaved: bool) {
        self.interleaved_rope = interleaved;
        if let Some(g) = &mut self.generator {
            g.set_interleaved_rope(interleaved);
        }
    }

    /// Precision of the generation weights.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sequences generated at once (continuous batching refills finished slots).
    pub fn set_max_batch(&mut self, n: usize) {
        self.max_batch = n.max(1);
    }

    /// Sequences generated at once.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Prompt tokens prefilled per engine step (CPU engine; at least one prompt a step).
    pub fn set_max_prefill_tokens(&mut self, n: usize) {
        self.max_prefill_tokens = n.max(1);
    }

    /// The stop token ids generation ends on.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stops
    }

    /// Replaces the stop tokens.
    pub fn set_stop_token_ids(&mut self, stops: &[u32]) {
        self.stops = stops.to_vec();
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Swaps in a weight version sent as safetensors bytes (same config), never holding
    /// two full weight sets: the buffer is checked first (an error then leaves the current
    /// weights in place), then the current generator is freed before the buffer is parsed
    /// and the buffer before the new generator is built. Peak: buffer + parsed weights, or
    /// parsed weights + generator. Should building fail after that (out of memory), the
    /// sampler has no weights ([`Sampler::has_weights`]) and refuses to generate.
    pub fn load_safetensors(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        Weights::validate_safetensors(&bytes, &self.config)?;
        self.generator = None;
        let weights = Weights::from_safetensors_bytes(&bytes, &Device::Cpu)?;
        drop(bytes);
        self.load_weights(&weights)
    }

    /// Turns a weight version sent as safetensors bytes into what a sampler of this
    /// `config`, `device` and `precision` generates with, without touching any sampler: on
    /// the CPU the whole engine is built here, so an actor can do it while it generates with
    /// the current version and then [`Sampler::install`] it between two batches in O(1).
    /// The buffer is validated first.
    pub fn prepare_safetensors(
        config: &ModelConfig,
        device: &Device,
        precision: Precision,
        bytes: &[u8],
    ) -> anyhow::Result<PreparedWeights> {
        if device.is_cpu() {
            let engine = CpuEngine::from_safetensors(config, bytes, precision)?;
            return Ok(PreparedWeights(Prepared::Cpu(Box::new(engine))));
        }
        Weights::validate_safetensors(bytes, config)?;
        let weights = Weights::from_safetensors_bytes(bytes, &Device::Cpu)?;
        Ok(PreparedWeights(Prepared::Other(weights)))
    }

    /// As [`Sampler::prepare_safetensors`], for a payload held as the chunks it arrived in
    /// (never assembled): each chunk is freed once read, so the peak is about one copy of the
    /// weights beside the sampler's current ones.
    pub fn prepare_safetensors_chunks<B: AsRef<[u8]>>(
        config: &ModelConfig,
        device: &Device,
        precision: Precision,
        chunks: impl IntoIterator<Item = B>,
    ) -> anyhow::Result<PreparedWeights> {
        let tensors = crate::weights::f32_tensors_from_chunks(chunks)?;
        if device.is_cpu() {
            let engine = CpuEngine::from_f32_tensors(config, tensors, precision)?;
            return Ok(PreparedWeights(Prepared::Cpu(Box::new(engine))));
        }
        let mut map = std::collections::BTreeMap::new();
        for (name, (shape, data)) in tensors {
            map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        let weights = Weights { tensors: map };
        weights.validate(config)?;
        Ok(PreparedWeights(Prepared::Other(weights)))
    }

    /// As [`Sampler::prepare_safetensors`], for a version in a file this process maps
    /// ([`crate::storage::MappedSafetensors`]; `expected_len` its size when known): on the
    /// CPU in f32 the engine reads the weights where they lie in the mapping, so preparing
    /// copies nothing and every process mapping the file shares one copy.
    pub fn prepare_safetensors_file(
        config: &ModelConfig,
        device: &Device,
        precision: Precision,
        path: &std::path::Path,
        expected_len: Option<u64>,
    ) -> anyhow::Result<PreparedWeights> {
        let file = crate::storage::MappedSafetensors::open(path, expected_len)?;
        if device.is_cpu() {
            let engine = CpuEngine::from_mapped(config, &file, precision)?;
            return Ok(PreparedWeights(Prepared::Cpu(Box::new(engine))));
        }
        Self::prepare_safetensors(config, device, precision, file.bytes())
    }

    /// A sampler generating with prepared weights (see [`Sampler::prepare_safetensors`]).
    pub fn from_prepared(
        config: &ModelConfig,
        tokenizer_stops: &[u32],
        device: &Device,
        precision: Precision,
        prepared: PreparedWeights,
    ) -> anyhow::Result<Self> {
        let mut s = Self::empty(config, tokenizer_stops, device, precision)?;
        s.install(prepared)?;
        Ok(s)
    }
    /// Swaps in prepared weights. On the CPU this only replaces the engine (the old one is
    /// freed); elsewhere the old weights are freed and the new ones copied to the device.
    pub fn install(&mut self, prepared: PreparedWeights) -> anyhow::Result<()> {
        match prepared.0 {
            Prepared::Cpu(engine) if self.device.is_cpu() => {
                self.set_generator(engine);
                Ok(())
            }
            Prepared::Other(weights) if !self.device.is_cpu() => self.load_weights(&weights),
            _ => anyhow::bail!("weights prepared for another device"),
        }
    }

    /// Whether the sampler holds weights (false only after a failed
    /// [`Sampler::load_safetensors`]).
    pub fn has_weights(&self) -> bool {
        self.generator.is_some()
    }

    /// Swaps in a new weight version (same config), freeing the old one first so that two
    /// full weight sets never coexist. The weights are checked before anything is freed (the
    /// generators check again: they are built on their own elsewhere), so a mismatch leaves
    /// the current version in place.
    pub fn load_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        weights.validate(&self.config)?;
        self.generator = None;
        if self.device.is_cpu() {
            let engine = CpuEngine::new(&self.config, weights, self.precision)?;
            self.set_generator(Box::new(engine));
        } else {
            let engine = TensorEngine::new(&self.config, weights, &self.device)?;
            self.set_generator(Box::new(engine));
        }
        Ok(())
    }

    fn set_generator(&mut self, mut generator: Box<dyn Generator>) {
        generator.set_interleaved_rope(self.interleaved_rope);
        self.generator = Some(generator);
    }

    fn generator(&self) -> anyhow::Result<&dyn Generator> {
        self.generator
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("{NO_WEIGHTS}"))
    }

    /// Full-sequence forward without cache: logits `[T, vocab]` (f32, on the CPU whatever
    /// the sampler's device).
    pub fn logits(&self, tokens: &[u32]) -> anyhow::Result<Tensor> {
        anyhow::ensure!(!tokens.is_empty(), "logits: empty token sequence");
        let values = self.generator()?.logits(tokens)?;
        Ok(Tensor::from_vec(
            values,
            (tokens.len(), self.config.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// Generates continuations for prompts (token ids, any lengths >= 1), at most
    /// [`Sampler::max_batch`] in flight. Each sequence draws from its own ChaCha8 stream
    /// (seed, stream = index in `prompts`), so results are seed-deterministic; on CPU they
    /// also do not depend on the batch size.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> anyhow::Result<Vec<Generation>> {
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        let mut it = prompts.iter().cloned().enumerate();
        self.generate_stream(params, &mut || it.next(), &mut |i, g| {
            out[i] = Some(g);
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("every prompt generated"))
            .collect())
    }

    /// Continuous batching: pulls `(key, prompt)` pairs from `next` whenever a slot is free
    /// (at most [`Sampler::max_batch`] sequences in flight) and hands every finished
    /// sequence to `done` as soon as it ends. `key` picks the sequence's random stream
    /// (`seed`, stream = key), so a sequence's tokens do not depend on when it was
    /// admitted. On non-CPU devices, prompts are pulled and run `max_batch` at a time.
    pub fn generate_stream(
        &mut self,
        params: &SamplingParams,
        next: &mut dyn FnMut() -> Option<(usize, Vec<u32>)>,
        done: &mut dyn FnMut(usize, Generation) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.generator()?.generate_stream(
            params,
            &self.stops,
            self.max_batch,
            self.max_prefill_tokens,
            next,
            done,
        )
    }
}
