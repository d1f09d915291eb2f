//! Fused AdamW: decoupled weight decay + bias correction, updating each f32 CPU
//! parameter in place in a single pass over raw slices (rayon over chunks) via a
//! candle in-place op, and any other parameter (CUDA, bf16) with tensor ops on its own
//! device, moments kept there (no host round trip); plus global gradient L2 norm for
//! clipping, and optimizer state (de)serialisation for checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use hindsight_policy::weights::{
    f32_from_safetensors, safetensors_bytes, safetensors_to_file, SaveView,
};

const CHUNK: usize = 1 << 14;

/// Runs `f` on the contiguous f32 CPU data of `t` without copying, if possible.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (st, layout) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::F32(data)) => {
            let (a, b) = layout.contiguous_offsets()?;
            Some(f(&data[a..b]))
        }
        _ => None,
    }
}

/// Global L2 norm of the gradients of `vars` (vars without a gradient are skipped).
pub fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> anyhow::Result<f64> {
    let mut total = 0f64;
    for (_, v) in vars {
        let Some(g) = grads.get(v.as_tensor()) else {
            continue;
        };
        let fast = with_cpu_f32(g, |s| {
            s.par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum::<f64>()
        });
        total += match fast {
            Some(x) => x,
            None => g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(total.sqrt())
}

#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2_sqrt: f32,
    grad_scale: f32,
}

impl Hyper {
    #[inline(always)]
    fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let keep = 1.0 - self.lr * self.decay;
        let step_size = self.lr / self.bc1;
        let (b1, b2) = (self.beta1, self.beta2);
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * self.grad_scale;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / self.bc2_sqrt + self.eps;
            *p = *p * keep - step_size * *m / denom;
        }
    }
}

struct AdamWKernel<'a> {
    hyper: Hyper,
    state: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl candle_core::InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused-adamw: f32 parameters and gradients required")
        };
        let (Some((pa, pb)), Some((ga, gb))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused-adamw: contiguous parameters and gradients required")
        };
        let (p, g) = (&mut p[pa..pb], &g[ga..gb]);
        let mut st = self.state.lock().unwrap();
        let (m, v) = &mut *st;
        if p.len() != g.len() || p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("fused-adamw: size mismatch")
        }
        let h = self.hyper;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| h.update(p, g, m, v));
        Ok(())
    }
}

/// Fused AdamW (PyTorch semantics: `p *= 1 - lr*wd; m,v EMA; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`).
/// Weight decay applies to every parameter except 1-D ones (norm weights) unless `decay_1d` is set.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Also decay 1-D parameters (RMSNorm weights). Default false (HF Trainer convention).
    pub decay_1d: bool,
    step: u64,
    state: BTreeMap<String, Moments>,
    /// Tests: update CPU f32 parameters with the tensor-op path too.
    tensor_ops: bool,
}

/// One parameter's first and second moments (f32, flattened): host vectors for the fused CPU
/// kernel, tensors on the parameter's device for the tensor-op path. They move to where their
/// parameter is updated on first use (a resumed state arrives on the host).
enum Moments {
    Host(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

impl Moments {
    fn len(&self) -> usize {
        match self {
            Moments::Host(m, _) => m.len(),
            Moments::Device(m, _) => m.elem_count(),
        }
    }

    fn zeros(var: &Var, on_device: bool) -> anyhow::Result<Self> {
        let n = var.elem_count();
        Ok(if on_device {
            let z = Tensor::zeros(n, DType::F32, var.device())?;
            Moments::Device(z.clone(), z)
        } else {
            Moments::Host(vec![0f32; n], vec![0f32; n])
        })
    }

    fn host(&mut self) -> anyhow::Result<(&mut Vec<f32>, &mut Vec<f32>)> {
        if let Moments::Device(m, v) = self {
            *self = Moments::Host(m.to_vec1::<f32>()?, v.to_vec1::<f32>()?);
        }
        match self {
            Moments::Host(m, v) => Ok((m, v)),
            Moments::Device(..) => unreachable!("moved to the host above"),
        }
    }

    fn device(
        &mut self,
        device: &candle_core::Device,
    ) -> anyhow::Result<(&mut Tensor, &mut Tensor)> {
        match self {
            Moments::Host(m, v) => {
                let to = |x: &mut Vec<f32>| {
                    let n = x.len();
                    Tensor::from_vec(std::mem::take(x), n, &candle_core::Device::Cpu)
                        .and_then(|t| t.to_device(device))
                };
                let (m, v) = (to(m)?, to(v)?);
                *self = Moments::Device(m, v);
            }
            Moments::Device(m, v) if !m.device().same_device(device) => {
                let (m2, v2) = (m.to_device(device)?, v.to_device(device)?);
                *self = Moments::Device(m2, v2);
            }
            Moments::Device(..) => {}
        }
        match self {
            Moments::Device(m, v) => Ok((m, v)),
            Moments::Host(..) => unreachable!("moved to the device above"),
        }
    }
}

/// The CPU kernel applies to contiguous f32 CPU parameters.
fn kernel_path(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

impl AdamW {
    /// Betas 0.9/0.999, eps 1e-8; zero moments for every var.
    pub fn new(vars: &[(String, Var)], lr: f64, weight_decay: f64) -> Self {
        // Host zeros cannot fail; a device allocation that fails here is retried (and its
        // error reported) at the first step.
        let state = vars
            .iter()
            .filter_map(|(n, v)| {
                Moments::zeros(v, !kernel_path(v.as_tensor()))
                    .ok()
                    .map(|m| (n.clone(), m))
            })
            .collect();
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decay_1d: false,
            step: 0,
            state,
            tensor_ops: false,
        }
    }

    /// Tests: run the tensor-op path (the one CUDA and bf16 parameters take) on CPU too.
    #[cfg(test)]
    pub(crate) fn use_tensor_ops(&mut self) {
        self.tensor_ops = true;
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every var that has a gradient; gradients are multiplied by `grad_scale`.
    pub fn step(
        &mut self,
        grads: &GradStore,
        vars: &[(String, Var)],
        grad_scale: f32,
    ) -> anyhow::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let n = var.elem_count();
            let pt = var.as_tensor();
            let on_kernel = kernel_path(pt) && !self.tensor_ops;
            let moments = match self.state.entry(name.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(Moments::zeros(var, !on_kernel)?)
                }
            };
            anyhow::ensure!(moments.len() == n, "adamw: state size mismatch for {name}");
            let decay = if var.rank() >= 2 || self.decay_1d {
                self.weight_decay
            } else {
                0.0
            };
            let hyper = Hyper {
                lr: self.lr as f32,
                beta1: self.beta1 as f32,
                beta2: self.beta2 as f32,
                eps: self.eps as f32,
                decay: decay as f32,
                bc1: bc1 as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                grad_scale,
            };
            if on_kernel {
                let (m, v) = moments.host()?;
                let g = g.to_dtype(DType::F32)?.contiguous()?;
                let kernel = AdamWKernel {
                    hyper,
                    state: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                };
                pt.inplace_op2(&g, &kernel)?;
            } else {
                // The same math with tensor ops on the parameter's device, in f32.
                let (m, v) = moments.device(pt.device())?;
                let h = hyper;
                let g = g.to_dtype(DType::F32)?.flatten_all()?;
                let g = g.affine(h.grad_scale as f64, 0.0)?;
                let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
                let m_new = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
                let v_new = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
                let denom = v_new
                    .sqrt()?
                    .affine(1.0 / h.bc2_sqrt as f64, h.eps as f64)?;
                let keep = 1.0 - h.lr as f64 * h.decay as f64;
                let step_size = h.lr as f64 / h.bc1 as f64;
                let p = pt.to_dtype(DType::F32)?.flatten_all()?;
                let p_new = (p.affine(keep, 0.0)? - (m_new.affine(step_size, 0.0)? / denom)?)?;
                var.set(&p_new.reshape(pt.shape())?.to_dtype(pt.dtype())?)?;
                *m = m_new;
                *v = v_new;
            }
        }
        Ok(())
    }

    /// Serialises step, hyper-parameters (metadata key `adamw`, JSON) and first/second moments
    /// (`m.{name}`, `v.{name}` tensors) as safetensors.
    pub fn state_to_safetensors(&self) -> anyhow::Result<Vec<u8>> {
        safetensors_bytes(self.state_views(), Some(self.state_metadata()))
    }

    /// [`AdamW::state_to_safetensors`] streamed straight into the file `path`, without
    /// a copy of the moments in memory.
    pub fn save_state(&self, path: &std::path::Path) -> anyhow::Result<()> {
        safetensors_to_file(self.state_views(), Some(self.state_metadata()), path)
    }

    /// The moments as borrowed views (`m.{name}`, `v.{name}`).
    fn state_views(&self) -> Vec<(String, SaveView<'_>)> {
        let mut items = Vec::with_capacity(self.state.len() * 2);
        for (n, moments) in &self.state {
            match moments {
                Moments::Host(m, v) => {
                    items.push((format!("m.{n}"), SaveView::Slice(vec![m.len()], m)));
                    items.push((format!("v.{n}"), SaveView::Slice(vec![v.len()], v)));
                }
                // Copied to the host one tensor at a time, as the writer reaches it.
                Moments::Device(m, v) => {
                    items.push((format!("m.{n}"), SaveView::f32(m)));
                    items.push((format!("v.{n}"), SaveView::f32(v)));
                }
            }
        }
        items
    }

    /// One metadata key, so the serialised bytes are deterministic.
    fn state_metadata(&self) -> HashMap<String, String> {
        let info = serde_json::json!({
            "step": self.step, "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2,
            "eps": self.eps, "weight_decay": self.weight_decay, "decay_1d": self.decay_1d,
        });
        HashMap::from([("adamw".to_string(), info.to_string())])
    }

    /// Restores step and moments saved by [`AdamW::state_to_safetensors`]
    /// (hyper-parameters stay as configured on `self`).
    pub fn load_state(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("safetensors: {e}"))?;
        let info: serde_json::Value = serde_json::from_str(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("adamw"))
                .ok_or_else(|| anyhow::anyhow!("optimizer state has no `adamw` metadata"))?,
        )?;
        let step = info["step"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("optimizer state has no step"))?;
        let tensors = f32_from_safetensors(bytes)?;
        let mut state: BTreeMap<String, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
        for (k, (_, data)) in tensors {
            if let Some(n) = k.strip_prefix("m.") {
                state.entry(n.to_string()).or_default().0 = data;
            } else if let Some(n) = k.strip_prefix("v.") {
                state.entry(n.to_string()).or_default().1 = data;
            }
        }
        for (n, (m, v)) in &state {
            anyhow::ensure!(
                m.len() == v.len(),
                "optimizer state for {n}: m/v size mismatch"
            );
        }
        self.state = state
            .into_iter()
            .map(|(n, (m, v))| (n, Moments::Host(m, v)))
            .collect();
        self.step = step;
        Ok(())
    }
}
