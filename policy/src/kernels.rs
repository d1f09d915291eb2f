//! The CPU kernel of generation: [`matmul_t`], `y = x @ w^T` for the engine's projections,
//! with `w` in f32 or bf16 ([`Mat`]). Each task owns a block of weight rows and runs it
//! against every input row in 4 x 4 register tiles (AVX-512 when the CPU has it,
//! runtime-detected; a portable 16-lane path otherwise). Every output element is
//! accumulated the same way in every tile shape (16 lanes, ascending `k`, one fixed
//! horizontal sum), so a row's result does not depend on which other rows share the call
//! (batch invariance).

use rayon::prelude::*;

use crate::storage::F32Buf;

/// Weight storage of a `[n, k]` row-major matrix used by [`matmul_t`].
pub enum MatData {
    /// f32 rows in one or more parts of whole rows, in order: a fused projection (q/k/v,
    /// gate/up) is kept as the separate tensors it was given as, wherever they lie (a mapped
    /// file, see [`crate::storage`]), instead of being copied into one buffer.
    F32(Vec<F32Buf>),
    /// bf16 bit patterns (upper 16 bits of the f32), rounded to nearest even.
    Bf16(Vec<u16>),
}

/// A `[n, k]` weight matrix (n output rows of k inputs).
pub struct Mat {
    data: MatData,
    n: usize,
    k: usize,
    /// The first row of every part of `MatData::F32` after the first (empty for bf16).
    part_starts: Vec<usize>,
}

/// f32 -> bf16 with round-to-nearest-even (NaN kept quiet).
pub fn f32_to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

impl Mat {
    pub fn f32(data: Vec<f32>, n: usize, k: usize) -> Self {
        Self::f32_parts(vec![F32Buf::from(data)], n, k)
    }

    /// The rows of `parts` one after the other, without copying them; every part holds
    /// whole rows of `k` values.
    pub fn f32_parts(parts: Vec<F32Buf>, n: usize, k: usize) -> Self {
        let mut part_starts = Vec::with_capacity(parts.len().saturating_sub(1));
        let mut rows = 0;
        for (i, p) in parts.iter().enumerate() {
            assert!(
                k > 0 && p.len() % k == 0,
                "Mat::f32_parts: part {i} ({} values) is not whole rows of {k}",
                p.len()
            );
            if i > 0 {
                part_starts.push(rows);
            }
            rows += p.len() / k.max(1);
        }
        assert_eq!(rows, n, "Mat::f32_parts: parts hold {rows} rows, not {n}");
        Self {
            data: MatData::F32(parts),
            n,
            k,
            part_starts,
        }
    }

    pub fn bf16_from_f32(data: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(data.len(), n * k, "Mat::bf16_from_f32: data is not [n, k]");
        Self::bf16_from_parts(&[data], n, k)
    }

    /// The rows of `parts` one after the other, rounded to bf16 (one copy).
    pub fn bf16_from_parts(parts: &[&[f32]], n: usize, k: usize) -> Self {
        let data: Vec<u16> = parts
            .iter()
            .flat_map(|p| p.iter().map(|&v| f32_to_bf16(v)))
            .collect();
        assert_eq!(
            data.len(),
            n * k,
            "Mat::bf16_from_parts: data is not [n, k]"
        );
        Self {
            data: MatData::Bf16(data),
            n,
            k,
            part_starts: Vec::new(),
        }
    }

    /// Output rows (n).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Inputs per row (k).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes of weight storage (mapped parts included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatData::F32(parts) => parts.iter().map(|p| p.len() * 4).sum(),
            MatData::Bf16(v) => v.len() * 2,
        }
    }

    /// Whether every part of the weights lies in a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(&self.data, MatData::F32(parts) if parts.iter().all(F32Buf::is_mapped))
    }

    /// Row `j` of f32 weights: its part and the row within it.
    #[inline(always)]
    fn f32_row_of(&self, j: usize) -> (usize, usize) {
        let mut part = 0;
        let mut first = 0;
        for (i, &s) in self.part_starts.iter().enumerate() {
            if j < s {
                break;
            }
            part = i + 1;
            first = s;
        }
        (part, j - first)
    }

    /// Where row `j` starts (`j < n`).
    #[inline(always)]
    fn row_ptr(&self, j: usize) -> *const u8 {
        match &self.data {
            MatData::F32(parts) => {
                let (p, r) = self.f32_row_of(j);
                parts[p][r * self.k..].as_ptr().cast()
            }
            MatData::Bf16(v) => v[j * self.k..].as_ptr().cast(),
        }
    }

    /// Row `j` as f32 (for the portable path and tests).
    fn row_f32(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.data {
            MatData::F32(parts) => {
                let (p, r) = self.f32_row_of(j);
                out.copy_from_slice(&parts[p][r * k..(r + 1) * k])
            }
            MatData::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[j * k..(j + 1) * k]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
        }
    }
}

/// Weight rows per parallel task in [`matmul_t`].
const MT_ROWS: usize = 16;
/// Register tile: weight rows x input rows.
const TW: usize = 4;
const TX: usize = 4;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements of the output (distinct weight-row columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// AVX-512F present (and not disabled by `HINDSIGHT_NO_AVX512`).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("HINDSIGHT_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX2 and FMA present (and not disabled by `HINDSIGHT_NO_AVX2`).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("HINDSIGHT_NO_AVX2").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| has_avx512() && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[m, n] = x[m, k] @ w[n, k]^T`, parallel over blocks of weight rows.
///
/// With bf16 weights the inputs are rounded to bf16 too (a bf16 x bf16 product is exact
/// in f32) and the products are summed in f32: on CPUs with AVX512-BF16 by
/// `vdpbf16ps` (two products per lane per instruction), elsewhere by f32 FMAs.
pub fn matmul_t(x: &[f32], m: usize, w: &Mat, y: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "matmul_t: x is not [m, k]");
    assert_eq!(y.len(), m * n, "matmul_t: y is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let out = OutPtr(y.as_mut_ptr());
    if let MatData::Bf16(wd) = &w.data {
        let xb: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        if has_avx512_bf16() && k % 32 == 0 {
            (0..n.div_ceil(MT_ROWS)).into_par_iter().for_each(|blk| {
                let j0 = blk * MT_ROWS;
                let j1 = (j0 + MT_ROWS).min(n);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: avx512f + avx512bf16 are present, k % 32 == 0, indices in
                // bounds, and this task writes only columns j0..j1 of `y`.
                unsafe {
                    avx512::block_dp(&xb, m, wd, k, j0, j1, out.get(), n)
                };
            });
            return;
        }
        let xr: Vec<f32> = xb
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect();
        return matmul_t_f32_paths(&xr, m, w, out, true);
    }
    matmul_t_f32_paths(x, m, w, out, true)
}

/// The f32-FMA paths: AVX-512 (when `allow_avx512` and present), else AVX2 + FMA, else
/// portable.
fn matmul_t_f32_paths(x: &[f32], m: usize, w: &Mat, out: OutPtr, allow_avx512: bool) {
    let (n, k) = (w.n, w.k);
    let avx = allow_avx512 && has_avx512() && k % 16 == 0;
    let avx2 = !avx && has_avx2_fma() && k % 8 == 0;
    (0..n.div_ceil(MT_ROWS)).into_par_iter().for_each(|blk| {
        let j0 = blk * MT_ROWS;
        let j1 = (j0 + MT_ROWS).min(n);
        #[cfg(target_arch = "x86_64")]
        if avx {
            // SAFETY: avx512f is present (checked above), k % 16 == 0, indices in bounds,
            // and this task writes only columns j0..j1 of `y`.
            unsafe { avx512::block(x, m, w, j0, j1, out.get(), n) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: avx2 + fma are present (checked above), k % 8 == 0, indices in
            // bounds, and this task writes only columns j0..j1 of `y`.
            unsafe { avx2::block(x, m, w, j0, j1, out.get(), n) };
            return;
        }
        let _ = (avx, avx2);
        portable_block(x, m, w, j0, j1, out.get(), n);
    });
}

fn portable_block(x: &[f32], m: usize, w: &Mat, j0: usize, j1: usize, out: *mut f32, n: usize) {
    let k = w.k;
    let mut row = vec![0f32; k];
    for j in j0..j1 {
        w.row_f32(j, &mut row);
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; 16];
            let (cw, cx) = (row.chunks_exact(16), xi.chunks_exact(16));
            let (rw, rx) = (cw.remainder(), cx.remainder());
            for (a, b) in cw.zip(cx) {
                for l in 0..16 {
                    acc[l] = a[l].mul_add(b[l], acc[l]);
                }
            }
            let mut s = 0f32;
            for (a, b) in rw.iter().zip(rx) {
                s += a * b;
            }
            let mut wdt = 16;
            while wdt > 1 {
                wdt /= 2;
                for l in 0..wdt {
                    acc[l] += acc[l + wdt];
                }
            }
            // SAFETY: (i, j) is in bounds and owned by this task.
            unsafe { *out.add(i * n + j) = acc[0] + s };
        }
    }
}

/// The dot-product register tiles of [`matmul_t`], generic over the SIMD width: `RW`
/// weight rows x `RX` inputs per tile, one accumulator per pair, summed over `k` in the
/// same order whatever the tile shape, so every output is the same whatever the batch.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod tiles {
    use super::TX;

    /// One SIMD width's operations (all `#[inline(always)]`: they are compiled with the
    /// target features of the `block_t` that calls them).
    pub(super) trait Lanes {
        type V: Copy;
        /// f32 lanes per vector.
        const W: usize;
        unsafe fn zero() -> Self::V;
        /// `W` weights from element `c` of a row (f32, or bf16 widened when `BF`).
        unsafe fn load_w<const BF: bool>(p: *const u8, c: usize) -> Self::V;
        unsafe fn load_x(p: *const f32) -> Self::V;
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// Fixed-order sum of the lanes.
        unsafe fn sum(v: Self::V) -> f32;
    }

    #[inline(always)]
    unsafe fn tile<L: Lanes, const RW: usize, const RX: usize, const BF: bool>(
        wp: [*const u8; RW],
        xp: [*const f32; RX],
        k: usize,
        out: *mut f32,
        j: usize,
        i: usize,
        n: usize,
    ) {
        let mut acc = [[L::zero(); RX]; RW];
        let mut c = 0;
        while c < k {
            let mut wv = [L::zero(); RW];
            for r in 0..RW {
                wv[r] = L::load_w::<BF>(wp[r], c);
            }
            for q in 0..RX {
                let xv = L::load_x(xp[q].add(c));
                for r in 0..RW {
                    acc[r][q] = L::fma(wv[r], xv, acc[r][q]);
                }
            }
            c += L::W;
        }
        for r in 0..RW {
            for q in 0..RX {
                *out.add((i + q) * n + j + r) = L::sum(acc[r][q]);
            }
        }
    }

    #[inline(always)]
    unsafe fn rows_block<L: Lanes, const RW: usize, const BF: bool>(
        x: &[f32],
        m: usize,
        k: usize,
        wp: [*const u8; RW],
        out: *mut f32,
        j: usize,
        n: usize,
    ) {
        let xr = |i: usize| x.as_ptr().add(i * k);
        let mut i = 0;
        while i + TX <= m {
            tile::<L, RW, TX, BF>(wp, std::array::from_fn(|q| xr(i + q)), k, out, j, i, n);
            i += TX;
        }
        match m - i {
            0 => {}
            1 => tile::<L, RW, 1, BF>(wp, [xr(i)], k, out, j, i, n),
            2 => tile::<L, RW, 2, BF>(wp, [xr(i), xr(i + 1)], k, out, j, i, n),
            _ => tile::<L, RW, 3, BF>(wp, [xr(i), xr(i + 1), xr(i + 2)], k, out, j, i, n),
        }
    }

    /// Columns `j0..j1` of `y`, `RW` weight rows at a time (then one by one), each row read
    /// where it lies ([`super::Mat::row_ptr`]); bf16 weights with `BF`.
    #[inline(always)]
    pub(super) unsafe fn block_body<L: Lanes, const RW: usize, const BF: bool>(
        x: &[f32],
        m: usize,
        w: &super::Mat,
        j0: usize,
        j1: usize,
        out: *mut f32,
        n: usize,
    ) {
        let k = w.k;
        let wr = |j: usize| w.row_ptr(j);
        let mut j = j0;
        while j + RW <= j1 {
            rows_block::<L, RW, BF>(x, m, k, std::array::from_fn(|r| wr(j + r)), out, j, n);
            j += RW;
        }
        while j < j1 {
            rows_block::<L, 1, BF>(x, m, k, [wr(j)], out, j, n);
            j += 1;
        }
    }

    /// The f32 / bf16-weight entry of one ISA's module.
    #[inline(always)]
    pub(super) unsafe fn block_mat<L: Lanes, const RW: usize>(
        x: &[f32],
        m: usize,
        w: &super::Mat,
        j0: usize,
        j1: usize,
        out: *mut f32,
        n: usize,
    ) {
        match &w.data {
            super::MatData::F32(_) => block_body::<L, RW, false>(x, m, w, j0, j1, out, n),
            super::MatData::Bf16(_) => block_body::<L, RW, true>(x, m, w, j0, j1, out, n),
        }
    }
}

/// The AVX-512 path of [`matmul_t`]: 4 weight rows x 4 inputs per tile (16 accumulators of
/// 16 lanes), and the AVX512-BF16 `vdpbf16ps` tiles for bf16 inputs and weights.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod avx512 {
    use super::tiles::{block_mat, Lanes};
    use super::{Mat, TW, TX};
    use std::arch::x86_64::*;

    struct Avx512;

    impl Lanes for Avx512 {
        type V = __m512;
        const W: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_w<const BF: bool>(p: *const u8, c: usize) -> __m512 {
            if BF {
                let h = _mm256_loadu_si256((p as *const u16).add(c) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_loadu_ps((p as *const f32).add(c))
            }
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    /// `RW` bf16 weight rows x `RX` bf16 inputs with `vdpbf16ps` (32 products per step).
    #[inline(always)]
    unsafe fn tile_dp<const RW: usize, const RX: usize>(
        wp: [*const u16; RW],
        xp: [*const u16; RX],
        k: usize,
        out: *mut f32,
        j: usize,
        i: usize,
        n: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); RX]; RW];
        let mut c = 0;
        while c < k {
            let mut wv = [_mm512_setzero_si512(); RW];
            for r in 0..RW {
                wv[r] = _mm512_loadu_si512(wp[r].add(c) as *const __m512i);
            }
            for q in 0..RX {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(xp[q].add(c) as *const __m512i));
                for r in 0..RW {
                    acc[r][q] = _mm512_dpbf16_ps(
                        acc[r][q],
                        std::mem::transmute::<__m512i, __m512bh>(wv[r]),
                        xv,
                    );
                }
            }
            c += 32;
        }
        for r in 0..RW {
            for q in 0..RX {
                *out.add((i + q) * n + j + r) = _mm512_reduce_add_ps(acc[r][q]);
            }
        }
    }

    #[inline(always)]
    unsafe fn rows_block_dp<const RW: usize>(
        x: &[u16],
        m: usize,
        k: usize,
        wp: [*const u16; RW],
        out: *mut f32,
        j: usize,
        n: usize,
    ) {
        let xr = |i: usize| x.as_ptr().add(i * k);
        let mut i = 0;
        while i + TX <= m {
            tile_dp::<RW, TX>(
                wp,
                [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)],
                k,
                out,
                j,
                i,
                n,
            );
            i += TX;
        }
        match m - i {
            0 => {}
            1 => tile_dp::<RW, 1>(wp, [xr(i)], k, out, j, i, n),
            2 => tile_dp::<RW, 2>(wp, [xr(i), xr(i + 1)], k, out, j, i, n),
            _ => tile_dp::<RW, 3>(wp, [xr(i), xr(i + 1), xr(i + 2)], k, out, j, i, n),
        }
    }

    /// Columns `j0..j1` of `y = x @ w^T` for bf16 `x` and `w` (see `matmul_t`).
    ///
    /// # Safety
    /// avx512f and avx512bf16 must be available, `k % 32 == 0`, `out` must point to `[m, n]`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block_dp(
        x: &[u16],
        m: usize,
        w: &[u16],
        k: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
        n: usize,
    ) {
        let wr = |j: usize| w.as_ptr().add(j * k);
        let mut j = j0;
        while j + TW <= j1 {
            rows_block_dp::<TW>(x, m, k, [wr(j), wr(j + 1), wr(j + 2), wr(j + 3)], out, j, n);
            j += TW;
        }
        while j < j1 {
            rows_block_dp::<1>(x, m, k, [wr(j)], out, j, n);
            j += 1;
        }
    }

    /// Computes columns `j0..j1` of `y` (see `matmul_t`).
    ///
    /// # Safety
    /// avx512f must be available, `w.k % 16 == 0`, and `out` must point to `[m, n]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        x: &[f32],
        m: usize,
        w: &Mat,
        j0: usize,
        j1: usize,
        out: *mut f32,
        n: usize,
    ) {
        block_mat::<Avx512, TW>(x, m, w, j0, j1, out, n)
    }
}

/// The AVX2 + FMA path of [`matmul_t`] (CPUs without AVX-512): 3 weight rows x 4 inputs
/// per tile (12 accumulators of 8 lanes, which with the loads fills the 16 registers).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::tiles::{block_mat, Lanes};
    use super::Mat;
    use std::arch::x86_64::*;

    struct Avx2;

    impl Lanes for Avx2 {
        type V = __m256;
        const W: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_w<const BF: bool>(p: *const u8, c: usize) -> __m256 {
            if BF {
                let h = _mm_loadu_si128((p as *const u16).add(c) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_loadu_ps((p as *const f32).add(c))
            }
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    /// Computes columns `j0..j1` of `y` (see `matmul_t`).
    ///
    /// # Safety
    /// avx2 and fma must be available, `w.k % 8 == 0`, and `out` must point to `[m, n]`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: &[f32],
        m: usize,
        w: &Mat,
        j0: usize,
        j1: usize,
        out: *mut f32,
        n: usize,
    ) {
        block_mat::<Avx2, 3>(x, m, w, j0, j1, out, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference; with bf16 weights the inputs are rounded to bf16 first, as
    /// `matmul_t` documents.
    fn reference(x: &[f32], m: usize, w: &Mat) -> Vec<f64> {
        let bf = matches!(w.data, MatData::Bf16(_));
        let x: Vec<f32> = x
            .iter()
            .map(|&v| {
                if bf {
                    f32::from_bits((f32_to_bf16(v) as u32) << 16)
                } else {
                    v
                }
            })
            .collect();
        let mut row = vec![0f32; w.cols()];
        let mut y = vec![0f64; m * w.rows()];
        for j in 0..w.rows() {
            w.row_f32(j, &mut row);
            for i in 0..m {
                y[i * w.rows() + j] = (0..w.cols())
                    .map(|c| row[c] as f64 * x[i * w.cols() + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matmul_t_matches_f64_reference_for_every_tile_shape() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // k = 64 / 96 take the AVX-512 (and AVX512-BF16) paths where present, k = 48 the
        // AVX-512 f32 path for bf16 weights, k = 37 the portable one; m and n cover every
        // register-tile remainder.
        for (m, k, n) in [
            (1, 48, 5),
            (7, 48, 37),
            (13, 64, 100),
            (6, 37, 9),
            (33, 96, 17),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let wd: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            for w in [Mat::f32(wd.clone(), n, k), Mat::bf16_from_f32(&wd, n, k)] {
                let mut y = vec![0f32; m * n];
                matmul_t(&x, m, &w, &mut y);
                let r = reference(&x, m, &w);
                for (a, b) in y.iter().zip(&r) {
                    assert!((*a as f64 - b).abs() < 1e-4, "({m},{k},{n}): {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn matmul_t_rows_do_not_depend_on_the_batch() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let (m, k, n) = (11, 64, 40);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let wd: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        for w in [Mat::f32(wd.clone(), n, k), Mat::bf16_from_f32(&wd, n, k)] {
            let mut all = vec![0f32; m * n];
            matmul_t(&x, m, &w, &mut all);
            for i in 0..m {
                let mut one = vec![0f32; n];
                matmul_t(&x[i * k..(i + 1) * k], 1, &w, &mut one);
                assert_eq!(&all[i * n..(i + 1) * n], &one[..], "row {i}");
            }
        }
    }

    /// The AVX2 + FMA path, forced even on AVX-512 machines (the portable path where the
    /// CPU has no AVX2): f64 reference for every tile remainder, and batch invariance.
    #[test]
    fn avx2_path_matches_reference_and_does_not_depend_on_the_batch() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (m, k, n) in [(1, 8, 1), (5, 24, 7), (9, 64, 16), (14, 96, 35)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let wd: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            for w in [Mat::f32(wd.clone(), n, k), Mat::bf16_from_f32(&wd, n, k)] {
                let xin: Vec<f32> = match w.data {
                    MatData::Bf16(_) => x
                        .iter()
                        .map(|&v| f32::from_bits((f32_to_bf16(v) as u32) << 16))
                        .collect(),
                    MatData::F32(_) => x.clone(),
                };
                let mut y = vec![0f32; m * n];
                matmul_t_f32_paths(&xin, m, &w, OutPtr(y.as_mut_ptr()), false);
                let r = reference(&x, m, &w);
                for (a, b) in y.iter().zip(&r) {
                    assert!((*a as f64 - b).abs() < 1e-4, "({m},{k},{n}): {a} vs {b}");
                }
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    matmul_t_f32_paths(
                        &xin[i * k..(i + 1) * k],
                        1,
                        &w,
                        OutPtr(one.as_mut_ptr()),
                        false,
                    );
                    assert_eq!(&y[i * n..(i + 1) * n], &one[..], "({m},{k},{n}) row {i}");
                }
            }
        }
    }

    /// A matrix given in parts (as a fused projection from a mapped file is) multiplies
    /// bit for bit like the same rows in one buffer, on every path, part boundaries falling
    /// inside and between register tiles and task blocks.
    #[test]
    fn rows_in_parts_multiply_like_one_buffer() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for (m, k, split) in [
            (5, 64, vec![3, 14, 2]),
            (9, 37, vec![1, 1, 20]),
            (4, 48, vec![33]),
        ] {
            let n: usize = split.iter().sum();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let wd: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut parts = Vec::new();
            let mut at = 0;
            for rows in &split {
                parts.push(F32Buf::from(wd[at * k..(at + rows) * k].to_vec()));
                at += rows;
            }
            let (whole, pieces) = (Mat::f32(wd.clone(), n, k), Mat::f32_parts(parts, n, k));
            assert_eq!(pieces.bytes(), whole.bytes());
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_t(&x, m, &whole, &mut a);
            matmul_t(&x, m, &pieces, &mut b);
            assert_eq!(a, b, "({m},{k},{split:?})");
            matmul_t_f32_paths(&x, m, &whole, OutPtr(a.as_mut_ptr()), false);
            matmul_t_f32_paths(&x, m, &pieces, OutPtr(b.as_mut_ptr()), false);
            assert_eq!(a, b, "({m},{k},{split:?}) without AVX-512");
            let mut row = vec![0f32; k];
            for j in 0..n {
                pieces.row_f32(j, &mut row);
                assert_eq!(&row[..], &wd[j * k..(j + 1) * k], "row {j}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "not whole rows")]
    fn parts_must_hold_whole_rows() {
        Mat::f32_parts(vec![F32Buf::from(vec![0.0; 5])], 1, 4);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    }
}
