//! `Weights`: a named set of f32 tensors in Hugging Face Llama naming, with
//! safetensors (de)serialisation used for export, checkpoints and weight sync.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;

/// Model parameters, f32, HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...).
/// With tied embeddings there is no `lm_head.weight` entry.
#[derive(Clone, Debug)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

/// Serialises `(name, shape, f32 data)` triples into a safetensors buffer.
pub(crate) fn f32_safetensors_bytes(
    items: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    let bytes: Vec<(&str, &[usize], Vec<u8>)> = items
        .iter()
        .map(|(n, s, d)| {
            let mut b = Vec::with_capacity(d.len() * 4);
            for x in d {
                b.extend_from_slice(&x.to_le_bytes());
            }
            (n.as_str(), s.as_slice(), b)
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.to_vec(), b)
                .map(|v| (*n, v))
                .map_err(|e| anyhow::anyhow!("safetensors view {n}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| anyhow::anyhow!("safetensors serialize: {e}"))
}

/// `name -> (shape, f32 data)`.
pub(crate) type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every tensor of a safetensors buffer as `(shape, f32 data)`; f16/bf16/f64 are converted.
pub(crate) fn f32_from_safetensors(bytes: &[u8]) -> anyhow::Result<F32Tensors> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("safetensors: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let v = view_to_f32(&name, &view)?;
        out.insert(name.to_string(), (view.shape().to_vec(), v));
    }
    Ok(out)
}

/// Converts one safetensors tensor (f32/f64/f16/bf16) to f32 values.
pub(crate) fn view_to_f32(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> anyhow::Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("tensor {name}: unsupported safetensors dtype {other:?}"),
    })
}

impl Weights {
    /// Serialises all tensors (as f32) into a safetensors buffer.
    pub fn to_safetensors_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let items = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok((n.clone(), t.dims().to_vec(), data))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        f32_safetensors_bytes(&items, None)
    }

    /// Parses a safetensors buffer (f32/f16/bf16/f64 tensors) into f32 tensors on `device`.
    pub fn from_safetensors_bytes(bytes: &[u8], device: &Device) -> anyhow::Result<Self> {
        let mut tensors = BTreeMap::new();
        for (name, (shape, data)) in f32_from_safetensors(bytes)? {
            let t =
                Tensor::from_vec(data, shape, device).with_context(|| format!("tensor {name}"))?;
            tensors.insert(name, t);
        }
        Ok(Self { tensors })
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// Fetches a tensor by name with a helpful error.
    pub fn get(&self, name: &str) -> anyhow::Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("missing weight tensor {name}"))
    }

    /// Checks that every tensor `config` needs is present with the right shape.
    pub fn validate(&self, config: &ModelConfig) -> anyhow::Result<()> {
        for (name, shape) in config.parameter_shapes() {
            let t = self.get(&name)?;
            anyhow::ensure!(
                t.dims() == shape.as_slice(),
                "tensor {name}: shape {:?}, expected {:?}",
                t.dims(),
                shape
            );
        }
        Ok(())
    }

    /// The output projection: `lm_head.weight`, or the embedding when tied.
    pub fn lm_head(&self, config: &ModelConfig) -> anyhow::Result<&Tensor> {
        if config.tie_word_embeddings {
            self.get("model.embed_tokens.weight")
        } else {
            self.get("lm_head.weight")
        }
    }

    /// Copies every tensor to `device` (and dtype f32).
    pub fn to_device(&self, device: &Device) -> anyhow::Result<Self> {
        let mut tensors = BTreeMap::new();
        for (n, t) in &self.tensors {
            tensors.insert(n.clone(), t.to_dtype(DType::F32)?.to_device(device)?);
        }
        Ok(Self { tensors })
    }
}
