//! Gradients summed on the GPU (`--features nccl`): every parameter's gradient that any rank
//! has goes into one flat f32 buffer on the compute stream, in [`TrainableModel::vars`]
//! order (zeros where this rank's shard gave none), which NCCL reduces in place in one call;
//! the sums are then cut back into the parameters' shapes and dtype. The host never sees a
//! gradient, and one large all-reduce runs at NCCL's bandwidth instead of one small call per
//! parameter.
//!
//! Ordering: candle's device runs on one stream per thread, and cudarc's events are inactive
//! there, so the backward, this reduction and what reads its result are ordered only because
//! one thread issues them all (the whole step runs in one blocking section); the reduction
//! waits for its own completion before it returns.

use std::cell::RefCell;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use hindsight_collective::nccl::NcclCollective;
use hindsight_collective::Collective;
use hindsight_training::TrainableModel;

/// The in-place all-reduce as a candle op (candle hands it the tensor's CUDA buffer).
struct AllReduce<'a> {
    nccl: RefCell<&'a mut NcclCollective>,
}

impl InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the NCCL all-reduce takes CUDA tensors, not CPU ones")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let n = layout.shape().elem_count();
        if !layout.is_contiguous() || layout.start_offset() != 0 || slice.len() != n {
            candle_core::bail!(
                "the NCCL all-reduce needs a whole contiguous buffer ({n} of {} elements from {})",
                slice.len(),
                layout.start_offset()
            );
        }
        self.nccl
            .borrow_mut()
            .all_reduce_device(slice)
            .map_err(candle_core::Error::wrap)
    }
}

/// Sums `grads` (this rank's, in `model.vars()` order, `None`: no gradient) over the ranks on
/// the GPU; returns the summed gradients and their global norm. Every rank gets the same bits.
pub fn reduce_gradients(
    nccl: &mut NcclCollective,
    model: &TrainableModel,
    grads: Vec<Option<Tensor>>,
) -> Result<(GradStore, f64)> {
    let device = model.device().clone();
    ensure!(
        matches!(device, Device::Cuda(_)),
        "gradients on the GPU need a CUDA model"
    );
    ensure!(
        grads.len() == model.vars().len(),
        "gradients for {} parameters, the model has {}",
        grads.len(),
        model.vars().len()
    );
    // Which parameters got a gradient anywhere (a rank with an empty shard has none).
    let mut present: Vec<f64> = grads
        .iter()
        .map(|g| if g.is_some() { 1.0 } else { 0.0 })
        .collect();
    nccl.all_reduce_f64(&mut present)
        .context("all-reducing which parameters have gradients")?;
    let mut parts = Vec::new();
    let mut kept = Vec::new();
    for (i, (g, (_, v))) in grads.into_iter().zip(model.vars()).enumerate() {
        if present[i] == 0.0 {
            continue;
        }
        let flat = match g {
            Some(g) => g.to_device(&device)?.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(v.elem_count(), DType::F32, &device)?,
        };
        parts.push(flat);
        kept.push(i);
    }
    ensure!(!parts.is_empty(), "no rank computed a gradient");
    // A fresh contiguous buffer, so that reducing it in place touches nothing else: `cat`
    // copies several parts, but one part it returns as it is (sharing the gradient's
    // storage, perhaps a view into a larger one), so that one is copied here.
    let flat = if parts.len() == 1 {
        parts[0].affine(1.0, 0.0)?
    } else {
        Tensor::cat(&parts, 0)?
    };
    drop(parts);
    flat.inplace_op1(&AllReduce {
        nccl: RefCell::new(nccl),
    })
    .context("all-reducing the gradients with NCCL")?;
    // The backward of a constant is the way to get an empty store.
    let mut store = Tensor::zeros((), DType::F32, &Device::Cpu)?.backward()?;
    let mut offset = 0;
    for i in kept {
        let v = &model.vars()[i].1;
        let n = v.elem_count();
        let g = flat
            .narrow(0, offset, n)?
            .reshape(v.as_tensor().shape())?
            .to_dtype(v.dtype())?;
        offset += n;
        store.insert(v.as_tensor(), g);
    }
    let norm = hindsight_training::grad_norm(&store, model.vars())?;
    Ok((store, norm))
}
