//! `Weights`: a named set of f32 tensors in Hugging Face Llama naming, with
//! safetensors (de)serialisation used for export, checkpoints and weight sync.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};

use hindsight_model::ModelConfig;

/// Model parameters, f32, HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...).
/// With tied embeddings there is no `lm_head.weight` entry.
#[derive(Clone, Debug)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

/// One tensor handed to a safetensors writer, turned into bytes only when the writer reaches
/// it: an f32 slice is written as is (no copy), a tensor is converted to the stored dtype
/// then. Writing a whole model this way holds at most one tensor's bytes beside the output,
/// not a second copy of the model.
pub enum SaveView<'a> {
    /// f32 values, stored as f32.
    Slice(Vec<usize>, &'a [f32]),
    /// A tensor, stored as the given dtype (F32, BF16 or F16).
    Tensor(Tensor, safetensors::Dtype),
}

impl SaveView<'_> {
    /// `t` as f32 bytes.
    pub fn f32(t: &Tensor) -> SaveView<'static> {
        SaveView::Tensor(t.clone(), safetensors::Dtype::F32)
    }
}

/// Little-endian bytes of `t` (any float dtype, any device) stored as `dtype`.
pub(crate) fn tensor_bytes(t: &Tensor, dtype: safetensors::Dtype) -> anyhow::Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(match dtype {
        safetensors::Dtype::F32 => f32_bytes(&v).into_owned(),
        safetensors::Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        safetensors::Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        other => bail!("cannot store a tensor as {other:?}"),
    })
}

/// The little-endian bytes of `v`: borrowed on little-endian targets.
fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and every bit pattern is a valid u8; u8 has alignment 1,
        // and the length covers exactly the same bytes.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

impl safetensors::View for SaveView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            SaveView::Slice(..) => safetensors::Dtype::F32,
            SaveView::Tensor(_, d) => *d,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            SaveView::Slice(s, _) => s,
            SaveView::Tensor(t, _) => t.dims(),
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            SaveView::Slice(_, v) => f32_bytes(v),
            // The View trait cannot fail; a tensor that cannot be read (a device error) is a
            // bug of the caller, which validated the tensors beforehand.
            SaveView::Tensor(t, d) => std::borrow::Cow::Owned(
                tensor_bytes(t, *d).expect("reading a tensor to serialise it"),
            ),
        }
    }

    fn data_len(&self) -> usize {
        let n: usize = self.shape().iter().product();
        n * self.dtype().bitsize() / 8
    }
}

/// Serialises named tensors into one safetensors buffer (the only full-size allocation).
pub fn safetensors_bytes<'a>(
    items: impl IntoIterator<Item = (String, SaveView<'a>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    safetensors::serialize(items, metadata)
        .map_err(|e| anyhow::anyhow!("safetensors serialize: {e}"))
}

/// Streams named tensors into a safetensors file at `path` (one tensor in memory at a time).
pub fn safetensors_to_file<'a>(
    items: impl IntoIterator<Item = (String, SaveView<'a>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    safetensors::serialize_to_file(items, metadata, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// `name -> (shape, f32 data)`.
pub type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads every tensor of a safetensors buffer as `(shape, f32 data)`; f16/bf16/f64 are converted.
pub fn f32_from_safetensors(bytes: &[u8]) -> anyhow::Result<F32Tensors> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("safetensors: {e}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let v = view_to_f32(&name, &view)?;
        out.insert(name.to_string(), (view.shape().to_vec(), v));
    }
    Ok(out)
}

/// Little-endian f32 bytes as values: one copy (a `memcpy` on little-endian targets).
fn f32_from_le(data: &[u8]) -> Vec<f32> {
    let n = data.len() / 4;
    #[cfg(target_endian = "little")]
    {
        let mut v: Vec<f32> = Vec::with_capacity(n);
        // SAFETY: the copy fills the `4 * n` bytes of the first `n` elements of the
        // allocation (every bit pattern is a valid f32) before the length covers them.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), v.as_mut_ptr().cast::<u8>(), 4 * n);
            v.set_len(n);
        }
        v
    }
    #[cfg(not(target_endian = "little"))]
    {
        data.chunks_exact(4)
            .take(n)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

/// Refuses a tensor whose dtype [`view_to_f32`] cannot read (f32, f64, f16 and bf16 only).
pub(crate) fn ensure_readable(name: &str, dtype: safetensors::Dtype) -> anyhow::Result<()> {
    use safetensors::Dtype::{BF16, F16, F32, F64};
    ensure!(
        matches!(dtype, F32 | F64 | F16 | BF16),
        "tensor {name}: unsupported safetensors dtype {dtype:?}"
    );
    Ok(())
}

/// Converts one safetensors tensor (f32/f64/f16/bf16) to f32 values.
pub(crate) fn view_to_f32(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> anyhow::Result<Vec<f32>> {
    ensure_readable(name, view.dtype())?;
    let data = view.data();
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => f32_from_le(data),
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
    /// Serialises all tensors (as f32) into a safetensors buffer, converting one tensor at a
    /// time (no second copy of the model).
    pub fn to_safetensors_bytes(&self) -> anyhow::Result<Vec<u8>> {
        for (n, t) in &self.tensors {
            ensure!(
                t.dtype().is_float(),
                "tensor {n} has dtype {:?}, not a float",
                t.dtype()
            );
        }
        safetensors_bytes(
            self.tensors
                .iter()
                .map(|(n, t)| (n.clone(), SaveView::f32(t))),
            None,
        )
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

    /// Checks, without copying anything, that a safetensors buffer holds every tensor
    /// `config` needs with the right shape, and only tensors of a float dtype
    /// [`Weights::from_safetensors_bytes`] reads: after this, parsing it can only fail for
    /// lack of memory.
    pub fn validate_safetensors(bytes: &[u8], config: &ModelConfig) -> anyhow::Result<()> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("safetensors: {e}"))?;
        for (name, view) in st.tensors() {
            ensure_readable(&name, view.dtype())?;
        }
        for (name, shape) in config.parameter_shapes() {
            let view = st
                .tensor(&name)
                .map_err(|_| anyhow::anyhow!("missing weight tensor {name}"))?;
            ensure!(
                view.shape() == shape.as_slice(),
                "tensor {name}: shape {:?}, expected {shape:?}",
                view.shape()
            );
        }
        Ok(())
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

/// Largest safetensors header accepted from a chunked payload.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Reads a safetensors payload held as consecutive chunks (as it arrives from the network,
/// never assembled into one buffer) into `(shape, f32 data)` per tensor, tensor by tensor in
/// file order, freeing each chunk as soon as it is passed: the peak is the tensors read so far
/// plus the chunks not yet read. Refuses a malformed header, tensors that overlap or lie
/// outside the payload, and dtypes other than f32/f64/f16/bf16.
pub fn f32_tensors_from_chunks<B: AsRef<[u8]>>(
    chunks: impl IntoIterator<Item = B>,
) -> anyhow::Result<F32Tensors> {
    let mut reader = ChunkReader {
        chunks: chunks.into_iter().collect(),
        used: 0,
        offset: 0,
    };
    let total: u64 = reader.chunks.iter().map(|c| c.as_ref().len() as u64).sum();
    let mut len = [0u8; 8];
    reader.read(&mut len)?;
    let n = u64::from_le_bytes(len);
    ensure!(
        n <= MAX_HEADER_BYTES && 8 + n <= total,
        "safetensors: header of {n} bytes does not fit a {total}-byte payload"
    );
    let mut header = vec![0u8; n as usize];
    reader.read(&mut header)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).context("safetensors: malformed header")?;
    struct Entry {
        name: String,
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        begin: u64,
        end: u64,
    }
    let mut entries = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => safetensors::Dtype::F32,
            Some("F64") => safetensors::Dtype::F64,
            Some("F16") => safetensors::Dtype::F16,
            Some("BF16") => safetensors::Dtype::BF16,
            other => bail!("tensor {name}: unsupported safetensors dtype {other:?}"),
        };
        let shape: Vec<usize> = serde_json::from_value(v.get("shape").cloned().unwrap_or_default())
            .with_context(|| format!("tensor {name}: bad shape"))?;
        let offsets: [u64; 2] =
            serde_json::from_value(v.get("data_offsets").cloned().unwrap_or_default())
                .with_context(|| format!("tensor {name}: bad data_offsets"))?;
        let elems = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .with_context(|| format!("tensor {name}: shape overflows"))?;
        let bytes = elems
            .checked_mul(dtype.bitsize() as u64 / 8)
            .with_context(|| format!("tensor {name}: size overflows"))?;
        let [begin, end] = offsets;
        ensure!(
            begin <= end && end - begin == bytes && 8 + n + end <= total,
            "tensor {name}: data_offsets {begin}..{end} do not fit its shape {shape:?} or the payload"
        );
        entries.push(Entry {
            name,
            dtype,
            shape,
            begin: 8 + n + begin,
            end: 8 + n + end,
        });
    }
    entries.sort_by_key(|e| e.begin);
    let mut out = BTreeMap::new();
    for e in entries {
        ensure!(
            e.begin >= reader.offset,
            "tensor {}: overlaps the tensor before it",
            e.name
        );
        reader.skip(e.begin - reader.offset)?;
        let bytes = (e.end - e.begin) as usize;
        let data = if e.dtype == safetensors::Dtype::F32 {
            let mut v: Vec<f32> = vec![0.0; bytes / 4];
            // SAFETY: the f32 buffer is viewed as its own bytes (alignment 1, same length);
            // every byte pattern is a valid f32.
            let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), bytes) };
            reader.read(dst)?;
            #[cfg(not(target_endian = "little"))]
            for x in v.iter_mut() {
                *x = f32::from_le_bytes(x.to_ne_bytes());
            }
            v
        } else {
            let mut raw = vec![0u8; bytes];
            reader.read(&mut raw)?;
            match e.dtype {
                safetensors::Dtype::F64 => raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                safetensors::Dtype::F16 => raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                _ => raw
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            }
        };
        out.insert(e.name, (e.shape, data));
    }
    Ok(out)
}

/// Sequential reads over a list of chunks, dropping each one once read past.
struct ChunkReader<B> {
    chunks: std::collections::VecDeque<B>,
    /// Bytes of the front chunk already read.
    used: usize,
    /// Payload offset of the next byte.
    offset: u64,
}

impl<B: AsRef<[u8]>> ChunkReader<B> {
    /// The unread part of the front chunk, dropping chunks read to their end.
    fn front(&mut self) -> anyhow::Result<&[u8]> {
        while self
            .chunks
            .front()
            .is_some_and(|c| c.as_ref().len() <= self.used)
        {
            self.chunks.pop_front();
            self.used = 0;
        }
        match self.chunks.front() {
            Some(c) => Ok(&c.as_ref()[self.used..]),
            None => bail!("safetensors: payload ends early"),
        }
    }

    fn read(&mut self, mut dst: &mut [u8]) -> anyhow::Result<()> {
        while !dst.is_empty() {
            let avail = self.front()?;
            let n = avail.len().min(dst.len());
            dst[..n].copy_from_slice(&avail[..n]);
            dst = &mut dst[n..];
            self.used += n;
            self.offset += n as u64;
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> anyhow::Result<()> {
        while n > 0 {
            let k = (self.front()?.len() as u64).min(n) as usize;
            n -= k as u64;
            self.used += k;
            self.offset += k as u64;
        }
        Ok(())
    }
}
