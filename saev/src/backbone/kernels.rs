//! Fused, parallel CPU kernels for the ViT's element-wise work.
//!
//! candle runs `gelu_erf` single-threaded through libm's scalar `erff` — measured at a fifth of a
//! DINOv2 forward on 2 cores. Here bias-add + activation is one parallel pass with vectorisable
//! `exp`/`erf` approximations (max error ~2e-7 absolute on GELU, well inside the HF-parity
//! tolerance), and softmax over the last axis is one parallel pass too. Other devices and dtypes
//! fall back to candle's own ops.
//!
//! ```text
//! let h = bias_act(&(x @ w_t), &bias, HiddenAct::Gelu)?;   // gelu(x Wᵀ + b)
//! let p = softmax_last_dim(&scores)?;
//! ```

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::util::simd::{has_avx2_fma, has_avx512};

use super::config::HiddenAct;

const ROWS_PER_TASK: usize = 16;

/// `a·b + c`: a fused multiply-add where the caller was compiled with FMA (`F = true`), plain
/// arithmetic otherwise (a software `fmaf` call would be 10× slower than both).
#[inline(always)]
fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for f32, ~1 ulp on [-87, 88]; written so LLVM vectorises it.
#[inline(always)]
fn exp_fast<const F: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Cody–Waite split of ln 2: HI has 9 significant bits, so n·HI is exact for |n| < 2^15.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0);
    let t = madd::<F>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = madd::<F>(n, -LN2_LO, madd::<F>(n, -LN2_HI, x));
    let p = 1.0 / 720.0f32;
    let p = madd::<F>(p, r, 1.0 / 120.0);
    let p = madd::<F>(p, r, 1.0 / 24.0);
    let p = madd::<F>(p, r, 1.0 / 6.0);
    let p = madd::<F>(p, r, 0.5);
    let p = madd::<F>(p, r, 1.0);
    let p = madd::<F>(p, r, 1.0);
    let bits = (t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(bits as u32)
}

/// `ln2^k / k!`, k = 0..=6: the Taylor polynomial of `2^f`, `|f| ≤ ½` (relative error ≤ 1.2e-7),
/// in the vector exponentials.
const EXP2_TAYLOR: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
];

/// Abramowitz & Stegun 7.1.26's coefficients, highest first: `1 − erf(a) = poly(t)·t·e^{−a²}`,
/// `t = 1 / (1 + 0.3275911·a)`.
const ERF_AS: [f32; 5] = [
    1.061_405_4,
    -1.453_152_1,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];

/// erf(x), Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7). `|x|` is capped at 9, where
/// erf is 1 in f32 already: past it the tail term would be subnormal (a microcode assist each).
#[inline(always)]
fn erf_fast<const F: bool>(x: f32) -> f32 {
    let a = x.abs().min(9.0);
    let t = 1.0 / madd::<F>(0.327_591_1f32, a, 1.0);
    let y = 1.061_405_4f32;
    let y = madd::<F>(y, t, -1.453_152_1);
    let y = madd::<F>(y, t, 1.421_413_8);
    let y = madd::<F>(y, t, -0.284_496_74);
    let y = madd::<F>(y, t, 0.254_829_6);
    let e = 1.0 - y * t * exp_fast::<F>(-a * a);
    e.copysign(x)
}

#[inline(always)]
fn act<const F: bool>(x: f32, a: HiddenAct) -> f32 {
    match a {
        HiddenAct::Gelu => 0.5 * x * (1.0 + erf_fast::<F>(x * std::f32::consts::FRAC_1_SQRT_2)),
        HiddenAct::GeluTanh => {
            // 0.5 x (1 + tanh(u)) = x · sigmoid(2u), u = √(2/π)(x + 0.044715 x³)
            let u = 0.797_884_6 * madd::<F>(x, 0.044_715 * x * x, x);
            x / (1.0 + exp_fast::<F>(-2.0 * u))
        }
        HiddenAct::QuickGelu => x / (1.0 + exp_fast::<F>(-1.702 * x)),
        HiddenAct::Silu => x / (1.0 + exp_fast::<F>(-x)),
    }
}

#[inline(always)]
fn bias_act_rows<const F: bool>(o: &mut [f32], x: &[f32], b: &[f32], a: HiddenAct) {
    for (orow, xrow) in o.chunks_exact_mut(b.len()).zip(x.chunks_exact(b.len())) {
        for ((ov, &xv), &bv) in orow.iter_mut().zip(xrow).zip(b) {
            *ov = act::<F>(xv + bv, a);
        }
    }
}

/// Lanes of the reductions below: independent accumulators, so the compiler vectorises them
/// (one serial `max` / `+` chain would not be: float reassociation is not allowed).
const LANES: usize = 16;

/// Softmax of one row in place: max, `exp(x − max)` with its sum, scale — each a lane-wise pass.
#[inline(always)]
fn softmax_row<const F: bool>(row: &mut [f32]) {
    let inv = 1.0 / exp_row::<F>(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The unnormalised softmax of one row in place, `exp(x − max(x))`; returns its sum (a caller
/// that rounds the row anyway folds the `1 / sum` into that pass).
#[inline(always)]
pub(super) fn exp_row<const F: bool>(row: &mut [f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .chain(&mx)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp_fast::<F>(c[i] - m);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_fast::<F>(*v - m);
        sum += *v;
    }
    for a in acc {
        sum += a;
    }
    sum
}

#[inline(always)]
fn softmax_rows<const F: bool>(o: &mut [f32], x: &[f32], n: usize) {
    o.copy_from_slice(x);
    for row in o.chunks_exact_mut(n) {
        softmax_row::<F>(row);
    }
}

/// In place: `v = act(v + b) + r` over rows of `b.len()` (or `n`) values (`r`, the residual,
/// as long as `v`).
#[inline(always)]
fn epilogue_rows<const F: bool>(
    v: &mut [f32],
    n: usize,
    b: Option<&[f32]>,
    a: Option<HiddenAct>,
    r: Option<&[f32]>,
) {
    // Plain loops, no closures: everything must inline into the caller's target features
    // (a closure compiled without FMA turns each `mul_add` into a libm call).
    for (i, row) in v.chunks_exact_mut(n).enumerate() {
        if let Some(b) = b {
            for (x, &bv) in row.iter_mut().zip(b) {
                *x += bv;
            }
        }
        // One loop per activation (the match hoisted by hand: with it inside, the loop body is
        // too big for the compiler to unswitch, and it stays scalar).
        match a {
            Some(HiddenAct::Gelu) => row
                .iter_mut()
                .for_each(|x| *x = act::<F>(*x, HiddenAct::Gelu)),
            Some(HiddenAct::GeluTanh) => row
                .iter_mut()
                .for_each(|x| *x = act::<F>(*x, HiddenAct::GeluTanh)),
            Some(HiddenAct::QuickGelu) => row
                .iter_mut()
                .for_each(|x| *x = act::<F>(*x, HiddenAct::QuickGelu)),
            Some(HiddenAct::Silu) => row
                .iter_mut()
                .for_each(|x| *x = act::<F>(*x, HiddenAct::Silu)),
            None => {}
        }
        if let Some(r) = r {
            for (x, &rv) in row.iter_mut().zip(&r[i * n..(i + 1) * n]) {
                *x += rv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn epilogue_rows_avx2(
    v: &mut [f32],
    n: usize,
    b: Option<&[f32]>,
    a: Option<HiddenAct>,
    r: Option<&[f32]>,
) {
    if a != Some(HiddenAct::Gelu) {
        return epilogue_rows::<true>(v, n, b, a, r);
    }
    // As on AVX-512: bias and GELU in one explicit pass, then the residual (the epilogues were
    // 4.6% of an f32 DINOv2-S/14 forward on a Zen 3 with the generic loop, 3.9% with this).
    // SAFETY: AVX2 and FMA are enabled on this function.
    unsafe { gelu_rows(v, n, b, r, bias_gelu_row_avx2) }
}

/// Rows of `n` values: `row = gelu(row + b)` by `row_kernel`, then the residual `r` added.
///
/// # Safety
/// `row_kernel`'s target features are available.
#[inline(always)]
unsafe fn gelu_rows(
    v: &mut [f32],
    n: usize,
    b: Option<&[f32]>,
    r: Option<&[f32]>,
    row_kernel: unsafe fn(&mut [f32], Option<&[f32]>),
) {
    for (i, row) in v.chunks_exact_mut(n).enumerate() {
        // SAFETY: the caller's promise.
        unsafe { row_kernel(row, b) };
        if let Some(r) = r {
            for (x, &rv) in row.iter_mut().zip(&r[i * n..(i + 1) * n]) {
                *x += rv;
            }
        }
    }
}

/// `row = gelu(row + bias)` as [`bias_gelu_row_avx512`], 8 lanes at a time: the reciprocal by
/// `vrcpps` and two Newton steps (no division), `e^{−a²}` as `2^y` by a degree-6 polynomial for
/// `2^f`, `|f| ≤ ½`, scaled by adding `n` to the exponent bits, and zero below 2⁻¹⁰⁰ (never a
/// subnormal). The last `n mod 8` values go through the same lanes from a padded copy.
///
/// # Safety
/// AVX2 and FMA are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_gelu_row_avx2(row: &mut [f32], bias: Option<&[f32]>) {
    use std::arch::x86_64::*;
    let n = row.len();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: lanes i..i + 8 are inside `row` (and `bias`, as long as the row).
        unsafe {
            let mut x = _mm256_loadu_ps(row.as_ptr().add(i));
            if let Some(b) = bias {
                x = _mm256_add_ps(x, _mm256_loadu_ps(b.as_ptr().add(i)));
            }
            _mm256_storeu_ps(row.as_mut_ptr().add(i), gelu_avx2(x));
        }
        i += 8;
    }
    if i < n {
        let mut buf = [0f32; 8];
        for (k, v) in row[i..].iter().enumerate() {
            buf[k] = v + bias.map_or(0.0, |b| b[i + k]);
        }
        // SAFETY: `buf` holds 8 values.
        unsafe {
            let y = gelu_avx2(_mm256_loadu_ps(buf.as_ptr()));
            _mm256_storeu_ps(buf.as_mut_ptr(), y);
        }
        row[i..].copy_from_slice(&buf[..n - i]);
    }
}

/// The exact (erf) GELU of 8 lanes: Abramowitz & Stegun 7.1.26 as [`erf_fast`].
///
/// # Safety
/// AVX2 and FMA are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn gelu_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let one = _mm256_set1_ps(1.0);
    let two = _mm256_set1_ps(2.0);
    let sign = _mm256_set1_ps(-0.0);
    let a = _mm256_andnot_ps(
        sign,
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2)),
    );
    let den = _mm256_fmadd_ps(_mm256_set1_ps(0.327_591_1), a, one);
    let mut t = _mm256_rcp_ps(den);
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(den, t, two));
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(den, t, two));
    let mut y = _mm256_set1_ps(ERF_AS[0]);
    for &k in &ERF_AS[1..] {
        y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(k));
    }
    y = _mm256_mul_ps(y, t);
    // e^{−a²} = 2^{−a²·log2 e}: zero below 2⁻¹⁰⁰.
    let z = _mm256_mul_ps(
        _mm256_mul_ps(a, a),
        _mm256_set1_ps(-std::f32::consts::LOG2_E),
    );
    let floor = _mm256_set1_ps(-100.0);
    let live = _mm256_cmp_ps::<_CMP_GE_OQ>(z, floor);
    let z = _mm256_max_ps(z, floor);
    let nf = _mm256_round_ps::<NEAREST>(z);
    let f = _mm256_sub_ps(z, nf);
    let mut q = _mm256_set1_ps(EXP2_TAYLOR[6]);
    for &c in EXP2_TAYLOR[..6].iter().rev() {
        q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(c));
    }
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(nf),
        _mm256_set1_epi32(127),
    )));
    let e = _mm256_and_ps(live, _mm256_mul_ps(q, scale));
    // 1 − erf(|z|) = y·e^{−a²}; Φ = 1 − ½(1 − erf) for x ≥ 0, ½(1 − erf) below.
    let h = _mm256_mul_ps(_mm256_set1_ps(0.5), _mm256_mul_ps(y, e));
    let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
    let phi = _mm256_blendv_ps(_mm256_sub_ps(one, h), h, neg);
    _mm256_mul_ps(x, phi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn epilogue_rows_avx512(
    v: &mut [f32],
    n: usize,
    b: Option<&[f32]>,
    a: Option<HiddenAct>,
    r: Option<&[f32]>,
) {
    if a != Some(HiddenAct::Gelu) {
        return epilogue_rows::<true>(v, n, b, a, r);
    }
    // The ViTs' MLP activation: bias and GELU in one explicit pass (the generic loop, at 1.9
    // cycles an element, was 11% of a bf16 DINOv2-S/14 forward: its division, and subnormal
    // intermediates on pre-activations below about −13, each a microcode assist); then the
    // residual, if any.
    // SAFETY: AVX-512F is enabled on this function.
    unsafe { gelu_rows(v, n, b, r, bias_gelu_row_avx512) }
}

/// `2^y` in the lanes of `keep` where `y ≥ −100`, zero elsewhere: `y = n + f` (`n` an integer,
/// `|f| ≤ ½`), `2^f` by its degree-6 Taylor polynomial (relative error ≤ 1.2e-7), scaled by
/// `2^n` with `vscalefps`. Below 2⁻¹⁰⁰ the callers' terms are lost next to theirs of order 1,
/// and no subnormal is ever made (each one a microcode assist without flush-to-zero, which
/// saev does not impose).
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn exp2_avx512(
    keep: std::arch::x86_64::__mmask16,
    y: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let floor = _mm512_set1_ps(-100.0);
    let live = keep & _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, floor);
    let y = _mm512_max_ps(y, floor);
    let n = _mm512_roundscale_ps::<NEAREST>(y);
    let f = _mm512_sub_ps(y, n);
    let mut q = _mm512_set1_ps(EXP2_TAYLOR[6]);
    for &ck in EXP2_TAYLOR[..6].iter().rev() {
        q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(ck));
    }
    _mm512_maskz_scalef_ps(live, q, n)
}

/// `row = gelu(row + bias)` with the exact (erf) GELU, 16 lanes at a time: `erf` by Abramowitz
/// & Stegun 7.1.26 as [`erf_fast`] (`1 − poly(t)·e^{−a²}`, `t = 1 / (1 + p·a)`), the reciprocal
/// by `vrcp14ps` and one Newton step (relative error ~2⁻²⁸, no division), `e^{−a²}` as `2^y`
/// with `vscalefps` and a degree-6 polynomial for `2^f`, `|f| ≤ ½`, taken as zero below 2⁻¹⁰⁰.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn bias_gelu_row_avx512(row: &mut [f32], bias: Option<&[f32]>) {
    use std::arch::x86_64::*;
    let n = row.len();
    let one = _mm512_set1_ps(1.0);
    let two = _mm512_set1_ps(2.0);
    let half = _mm512_set1_ps(0.5);
    let inv_sqrt2 = _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2);
    let p = _mm512_set1_ps(0.327_591_1);
    let neg_log2e = _mm512_set1_ps(-std::f32::consts::LOG2_E);
    let mut i = 0;
    while i < n {
        let m: __mmask16 = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        // SAFETY: masked to the lanes inside `row` (and `bias`, as long as the row).
        unsafe {
            let mut x = _mm512_maskz_loadu_ps(m, row.as_ptr().add(i));
            if let Some(b) = bias {
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)));
            }
            let a = _mm512_abs_ps(_mm512_mul_ps(x, inv_sqrt2));
            let den = _mm512_fmadd_ps(p, a, one);
            let r0 = _mm512_rcp14_ps(den);
            let t = _mm512_mul_ps(r0, _mm512_fnmadd_ps(den, r0, two));
            let mut y = _mm512_set1_ps(ERF_AS[0]);
            for &k in &ERF_AS[1..] {
                y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(k));
            }
            y = _mm512_mul_ps(y, t);
            // e^{-a²} = 2^{-a²·log2 e}
            let e = exp2_avx512(0xffff, _mm512_mul_ps(_mm512_mul_ps(a, a), neg_log2e));
            // 1 − erf(|z|) = y·e^{−a²}; Φ = 1 − ½(1 − erf) for x ≥ 0, ½(1 − erf) below.
            let h = _mm512_mul_ps(half, _mm512_mul_ps(y, e));
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
            let phi = _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, h), h);
            _mm512_mask_storeu_ps(row.as_mut_ptr().add(i), m, _mm512_mul_ps(x, phi));
        }
        i += 16;
    }
}

/// In place on whole rows of `n` values (the caller parallelises): add `bias`, apply `act`,
/// add the residual `r` (the same rows of the residual stream, as long as `v`).
pub(crate) fn bias_act_in_place(
    v: &mut [f32],
    n: usize,
    b: Option<&[f32]>,
    a: Option<HiddenAct>,
    r: Option<&[f32]>,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked at run time).
        return unsafe { epilogue_rows_avx512(v, n, b, a, r) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { epilogue_rows_avx2(v, n, b, a, r) };
    }
    epilogue_rows::<false>(v, n, b, a, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bias_act_rows_avx2(o: &mut [f32], x: &[f32], b: &[f32], a: HiddenAct) {
    bias_act_rows::<true>(o, x, b, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_rows_avx2(o: &mut [f32], x: &[f32], n: usize) {
    softmax_rows::<true>(o, x, n)
}

fn bias_act_dispatch(o: &mut [f32], x: &[f32], b: &[f32], a: HiddenAct) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { bias_act_rows_avx2(o, x, b, a) };
    }
    bias_act_rows::<false>(o, x, b, a)
}

fn softmax_dispatch(o: &mut [f32], x: &[f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { softmax_rows_avx2(o, x, n) };
    }
    softmax_rows::<false>(o, x, n)
}

struct BiasAct(HiddenAct);

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "saev-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bias_act: f32 only");
        };
        let (Some((xs, xe)), Some((bs, be))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias_act: contiguous inputs only");
        };
        let (x, b) = (&x[xs..xe], &b[bs..be]);
        let n = b.len();
        let a = self.0;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(o, xi)| bias_act_dispatch(o, xi, b, a));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `act(x + bias)` with `bias` broadcast over the last axis.
///
/// # Shapes
/// `x`: `[..., N]`, `bias`: `[N]` → `[..., N]`.
pub(crate) fn bias_act(x: &Tensor, bias: &Tensor, a: HiddenAct) -> candle_core::Result<Tensor> {
    let fused = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && bias.dtype() == candle_core::DType::F32
        && x.is_contiguous()
        && bias.is_contiguous()
        && bias.rank() == 1
        && x.dims().last() == Some(&bias.dim(0)?);
    if fused {
        return x.apply_op2_no_bwd(bias, &BiasAct(a));
    }
    let y = x.broadcast_add(bias)?;
    match a {
        HiddenAct::Gelu => y.gelu_erf(),
        HiddenAct::GeluTanh => y.gelu(),
        HiddenAct::QuickGelu => y.mul(&candle_nn::ops::sigmoid(&(&y * 1.702)?)?),
        HiddenAct::Silu => y.silu(),
    }
}

struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "saev-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("softmax: f32 only");
        };
        let Some((xs, xe)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax: contiguous input only");
        };
        let x = &x[xs..xe];
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(o, xi)| softmax_dispatch(o, xi, n));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Softmax over the last axis.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        return x.apply_op1_no_bwd(&SoftmaxLast);
    }
    candle_nn::ops::softmax_last_dim(x)
}

/// `C = A·B` (`a_mk` `[m, k]`, `b_kn` `[k, n]`, row-major, f32) by the f32 GEMM written into a
/// fresh buffer (no zeroing pass), then `epilogue(first_row, rows)` on bands of 32 rows in
/// parallel: the backbone's bias, activation and residual add in one pass over `C`.
pub(crate) fn gemm_f32_then(
    a_mk: &[f32],
    m: usize,
    b_kn: &[f32],
    n: usize,
    epilogue: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    let k = a_mk.len().checked_div(m).unwrap_or(0);
    if m == 0 || n == 0 || k == 0 || b_kn.len() != k * n {
        let mut c = vec![0f32; m * n];
        if n > 0 {
            c.par_chunks_mut(32 * n)
                .enumerate()
                .for_each(|(i, rows)| epilogue(i * 32, rows));
        }
        return c;
    }
    let mut c: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(m * n);
    // SAFETY: MaybeUninit needs no initialisation; the GEMM below writes every element of the
    // m × n destination (read_dst false: it is never read), through a raw pointer; the inputs
    // hold m·k and k·n elements with the strides given.
    let mut c = unsafe {
        c.set_len(m * n);
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr() as *mut f32,
            1,
            n as isize,
            false,
            a_mk.as_ptr(),
            1,
            k as isize,
            b_kn.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
        let mut c = std::mem::ManuallyDrop::new(c);
        Vec::from_raw_parts(c.as_mut_ptr() as *mut f32, c.len(), c.capacity())
    };
    c.par_chunks_mut(32 * n)
        .enumerate()
        .for_each(|(i, rows)| epilogue(i * 32, rows));
    c
}

/// Softmax of each row of `s` in place (rows of `n`).
fn softmax_in_place(s: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked at run time).
        return unsafe { softmax_in_place_avx512(s, n) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { softmax_in_place_avx2(s, n) };
    }
    for row in s.chunks_exact_mut(n) {
        softmax_row::<false>(row);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_in_place_avx2(s: &mut [f32], n: usize) {
    // A plain loop, not `for_each(softmax_row)`: the row function must inline here, where
    // FMA is enabled (through a closure it is compiled without, and `mul_add` calls libm).
    for row in s.chunks_exact_mut(n) {
        softmax_row::<true>(row);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_in_place_avx512(s: &mut [f32], n: usize) {
    // A plain loop, not `for_each(softmax_row)`: the row function must inline here, where
    // FMA is enabled (through a closure it is compiled without, and `mul_add` calls libm).
    for row in s.chunks_exact_mut(n) {
        softmax_row::<true>(row);
    }
}

/// Multi-head self-attention straight from the fused projection `qkv` (`[B, T, 3·D]`, the
/// q, k, v blocks side by side): per (image, head) one task computes `softmax(q kᵀ/√hd) v`
/// with two strided GEMMs and an in-place softmax, reading the heads where they lie and
/// writing each head's output into its columns — no head transposes, no score tensor, no
/// copies (candle's path makes five). The result is `[B, T, D]`, heads concatenated.
pub(crate) fn self_attention_qkv(qkv: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let hd = d / n_heads;
    if d3 != 3 * d || hd * n_heads != d {
        candle_core::bail!("self_attention_qkv: [B, T, {d3}] is not 3 × {n_heads} heads");
    }
    let (storage, layout) = qkv.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((s0, s1))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("self_attention_qkv: a contiguous f32 CPU tensor only");
    };
    let x = &v[s0..s1];
    let scale = (hd as f32).powf(-0.5);
    let mut out = vec![0f32; b * t * d];
    // One task per (image, head); each writes its head's columns of its image's rows. The
    // raw pointer crosses threads as an address: every task's columns are disjoint.
    let out_addr = out.as_mut_ptr() as usize;
    (0..b * n_heads).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |scores, task| {
            let (img, h) = (task / n_heads, task % n_heads);
            let base = img * t * d3;
            let q = x[base + h * hd..].as_ptr();
            let k = x[base + d + h * hd..].as_ptr();
            let vv = x[base + 2 * d + h * hd..].as_ptr();
            // SAFETY: q, k, v point inside `x` and are read as t rows of hd values with row
            // stride 3·D (the last row ends before the image's end); `scores` is t × t;
            // the output head block is t rows of hd values with row stride D inside `out`,
            // disjoint from every other task's.
            unsafe {
                gemm::gemm(
                    t,
                    t,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    t as isize,
                    false,
                    q,
                    1,
                    d3 as isize,
                    k,
                    d3 as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                softmax_in_place(scores, t);
                let o = (out_addr as *mut f32).add(img * t * d + h * hd);
                gemm::gemm(
                    t,
                    hd,
                    t,
                    o,
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    t as isize,
                    vv,
                    1,
                    d3 as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    drop(storage);
    Tensor::from_vec(out, (b, t, d), qkv.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's own ops: heads split and transposed, scores, softmax, weighted sum.
    #[test]
    fn fused_self_attention_matches_the_textbook_ops() {
        let dev = Device::Cpu;
        let (b, t, h, hd) = (2, 13, 3, 8);
        let d = h * hd;
        let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &dev).unwrap();
        let got = self_attention_qkv(&qkv, h).unwrap();
        let split = |i: usize| {
            qkv.narrow(2, i * d, d)
                .unwrap()
                .reshape((b, t, h, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let want = p
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, d))
            .unwrap();
        let diff: f32 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn exp_fast_is_accurate() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            for (a, b) in [
                (exp_fast::<true>(x), x.exp()),
                (exp_fast::<false>(x), x.exp()),
            ] {
                assert!(((a - b) / b).abs() < 4e-7, "exp({x}): {a} vs {b}");
            }
        }
    }

    /// The epilogue's own GELU (bias fused; AVX-512 or AVX2, whichever this processor takes)
    /// against candle's `gelu_erf`, on values across the range where the tails matter (|x| up
    /// to ~12) and off the 16- and 8-lane edges.
    #[test]
    fn avx512_bias_gelu_matches_candle() {
        if !has_avx512() && !has_avx2_fma() {
            eprintln!("neither AVX-512 nor AVX2 here: the GELU kernels do not run");
            return;
        }
        let dev = Device::Cpu;
        let (rows, n) = (7, 53);
        let x = Tensor::randn(0f32, 4.0, (rows, n), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (rows, n), &dev).unwrap();
        let want = (x.broadcast_add(&b).unwrap().gelu_erf().unwrap() + &r).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let mut got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let bias: Vec<f32> = b.to_vec1().unwrap();
        let res: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        let x0 = got.clone();
        bias_act_in_place(&mut got, n, Some(&bias), Some(HiddenAct::Gelu), Some(&res));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 2e-6 * (1.0 + w.abs()), "{i}: {g} vs {w}");
        }
        // The AVX2 kernel by name (an AVX-512 processor dispatches to its own).
        if has_avx2_fma() {
            let mut g2 = x0;
            // SAFETY: AVX2 and FMA checked just above.
            unsafe {
                epilogue_rows_avx2(&mut g2, n, Some(&bias), Some(HiddenAct::Gelu), Some(&res))
            };
            for (i, (g, w)) in g2.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 2e-6 * (1.0 + w.abs()),
                    "AVX2 {i}: {g} vs {w}"
                );
            }
        }
        // Closed forms: gelu(0) = 0, gelu(1) = Φ(1) = 0.841_344_7, gelu(−1) = −0.158_655_25.
        let mut v = vec![0.0f32, 1.0, -1.0, -30.0, 30.0];
        bias_act_in_place(&mut v, 5, None, Some(HiddenAct::Gelu), None);
        for (g, w) in v
            .iter()
            .zip([0.0f32, 0.841_344_7, -0.158_655_25, 0.0, 30.0])
        {
            assert!((g - w).abs() < 3e-7, "{g} vs {w}");
        }
        // Far in the negative tail the result is zero or a normal number, never a subnormal
        // (each one a microcode assist, in this pass and in whatever reads it) — here and in
        // the generic loop (processors without AVX-512).
        let xs: Vec<f32> = (0..4000).map(|i| -40.0 + i as f32 * 0.01).collect();
        let mut tail = xs.clone();
        bias_act_in_place(&mut tail, 4000, None, Some(HiddenAct::Gelu), None);
        let mut generic = xs.clone();
        epilogue_rows::<false>(&mut generic, 4000, None, Some(HiddenAct::Gelu), None);
        for ((v, g), x) in tail.iter().zip(&generic).zip(&xs) {
            assert!(*v == 0.0 || v.is_normal(), "gelu({x}) = {v:e}");
            assert!(*g == 0.0 || g.is_normal(), "generic gelu({x}) = {g:e}");
        }
    }

    #[test]
    fn erf_fast_is_accurate() {
        // Closed-form reference values of erf.
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (-1.5, -0.966_105_1),
        ] {
            for got in [erf_fast::<true>(x), erf_fast::<false>(x)] {
                assert!((got - want).abs() < 3e-7, "erf({x}) = {got} vs {want}");
            }
        }
    }

    #[test]
    fn fused_matches_candle() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (37, 50), &dev).unwrap())
            .contiguous()
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, 50, &dev).unwrap();
        let y = x.broadcast_add(&b).unwrap();
        for (a, want) in [
            (HiddenAct::Gelu, y.gelu_erf().unwrap()),
            (HiddenAct::GeluTanh, y.gelu().unwrap()),
            (
                HiddenAct::QuickGelu,
                y.mul(&candle_nn::ops::sigmoid(&(&y * 1.702).unwrap()).unwrap())
                    .unwrap(),
            ),
        ] {
            let got = bias_act(&x, &b, a).unwrap();
            let d: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(1)
                .unwrap()
                .max(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 2e-6, "{a:?}: {d}");
        }
        let s = Tensor::randn(0f32, 4.0, (3, 5, 257), &dev).unwrap();
        let d: f32 = (softmax_last_dim(&s).unwrap()
            - candle_nn::ops::softmax_last_dim(&s).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
        assert!(d < 2e-6, "softmax: {d}");
    }
}
