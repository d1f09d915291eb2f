//! CPU kernel for the sampler's decode-time projections: `y = x @ w^T` with few
//! rows in `x` (one per sequence in the batch). The generic gemm is
//! compute-inefficient at small `m`; this kernel streams each weight row once
//! and dots it against all `m` inputs (kept in L1), using AVX2+FMA when the CPU
//! has it (runtime-detected) and a portable 16-lane fallback otherwise.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

/// Largest row count routed to [`linear_small_m`] by the sampler.
pub const SMALL_M_MAX: usize = 64;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    // Pairwise reduction of the lanes.
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + s
}

#[inline(always)]
fn fma8<const FMA: bool>(acc: &mut [f32; 8], a: &[f32], b: &[f32]) {
    for l in 0..8 {
        acc[l] = if FMA {
            a[l].mul_add(b[l], acc[l])
        } else {
            acc[l] + a[l] * b[l]
        };
    }
}

#[inline(always)]
fn hsum(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// 2 weight rows x 4 inputs register tile: each 8-lane step does 6 loads for 8 FMAs.
#[inline(always)]
fn tile_2x4<const FMA: bool>(w0: &[f32], w1: &[f32], x: [&[f32]; 4], out: &mut [[f32; 4]; 2]) {
    let k = w0.len();
    let k8 = k / 8 * 8;
    let mut acc = [[[0f32; 8]; 4]; 2];
    let mut c = 0;
    while c < k8 {
        let (a0, a1) = (&w0[c..c + 8], &w1[c..c + 8]);
        for i in 0..4 {
            let xi = &x[i][c..c + 8];
            fma8::<FMA>(&mut acc[0][i], a0, xi);
            fma8::<FMA>(&mut acc[1][i], a1, xi);
        }
        c += 8;
    }
    for i in 0..4 {
        let (mut t0, mut t1) = (hsum(&acc[0][i]), hsum(&acc[1][i]));
        for cc in k8..k {
            t0 += w0[cc] * x[i][cc];
            t1 += w1[cc] * x[i][cc];
        }
        out[0][i] = t0;
        out[1][i] = t1;
    }
}

/// `out_t[j * m + i] = dot(w[j], x[i])` for the weight rows in `w`.
#[inline(always)]
fn block<const FMA: bool>(w: &[f32], x: &[f32], k: usize, m: usize, out_t: &mut [f32]) {
    let rows = w.len() / k;
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let m4 = m / 4 * 4;
    let r2 = rows / 2 * 2;
    let mut j = 0;
    while j < r2 {
        let (w0, w1) = (&w[j * k..(j + 1) * k], &w[(j + 1) * k..(j + 2) * k]);
        let mut i = 0;
        while i < m4 {
            let mut o = [[0f32; 4]; 2];
            tile_2x4::<FMA>(w0, w1, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)], &mut o);
            for ii in 0..4 {
                out_t[j * m + i + ii] = o[0][ii];
                out_t[(j + 1) * m + i + ii] = o[1][ii];
            }
            i += 4;
        }
        for i in m4..m {
            out_t[j * m + i] = dot::<FMA>(w0, xr(i));
            out_t[(j + 1) * m + i] = dot::<FMA>(w1, xr(i));
        }
        j += 2;
    }
    for j in r2..rows {
        for i in 0..m {
            out_t[j * m + i] = dot::<FMA>(&w[j * k..(j + 1) * k], xr(i));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(w: &[f32], x: &[f32], k: usize, m: usize, out_t: &mut [f32]) {
    block::<true>(w, x, k, m, out_t)
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Raw `y[m, n] = x[m, k] @ w[n, k]^T` on slices.
pub fn matmul_t_small(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let mut out_t = vec![0f32; n * m];
    let avx = has_avx2_fma();
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(o, wb)| {
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: the CPU supports avx2 and fma (checked at runtime above).
                unsafe { block_avx2(wb, x, k, m, o) };
                return;
            }
            let _ = avx;
            block::<false>(wb, x, k, m, o)
        });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

/// `x [m, k] @ w [n, k]^T` via [`matmul_t_small`] when both are f32 CPU tensors
/// and `w` is contiguous; `None` otherwise (caller falls back to candle's matmul).
pub fn linear_small_m(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || x.rank() != 2
        || w.rank() != 2
    {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 || m > SMALL_M_MAX {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xd)), Storage::Cpu(CpuStorage::F32(wd))) = (&*xs, &*ws)
    else {
        return Ok(None);
    };
    let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
    else {
        return Ok(None);
    };
    let out = matmul_t_small(&xd[xa..xb], &wd[wa..wb], m, k, n);
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn small_m_matches_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 64, 259), (3, 576, 100), (8, 37, 1000), (16, 128, 33)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let a = linear_small_m(&x, &w).unwrap().unwrap();
            let b = x.matmul(&w.t().unwrap()).unwrap();
            let d = crate::tests::max_abs_diff(&a, &b);
            assert!(d < 1e-4, "({m},{k},{n}): {d}");
        }
    }
}
