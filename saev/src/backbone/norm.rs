//! LayerNorm over the last axis (`torch.nn.LayerNorm`: `(x - mean) / sqrt(var + eps) · w + b`,
//! biased variance), with the checkpoint's `weight` / `bias` keys.
//!
//! On CPU f32 tensors a two-pass kernel (mean, then the centred sum of squares: no
//! cancellation when a token's mean is large against its spread, as in DINOv2's high-norm
//! tokens) runs 16 lanes at a time, rows in parallel; elsewhere candle's `layer_norm` op.
//!
//! ```
//! # use candle_core::{Device, Module, Tensor};
//! # use saev::backbone::norm::Norm;
//! let norm = Norm::new(Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?,
//!                      Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?, 1e-6);
//! let y = norm.forward(&Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu)?)?;
//! let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
//! assert!((y[0] + 1.341_64).abs() < 1e-4 && (y[3] - 1.341_64).abs() < 1e-4);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, DType, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::amx_packed::PackedA;
use crate::util::simd::{has_avx2_fma, has_avx512};

/// LayerNorm with an affine weight and bias.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    /// From `weight` and `bias` (`[D]`).
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// `weight` and `bias` under `vb`.
    pub(crate) fn load(vb: VarBuilder, d: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self::new(vb.get(d, "weight")?, vb.get(d, "bias")?, eps))
    }

    /// `f(rows, weight, bias, d)` on an f32 CPU tensor's rows read in place; None elsewhere.
    fn on_cpu_rows<R>(
        &self,
        x: &Tensor,
        f: impl FnOnce(&[f32], &[f32], &[f32], usize) -> R,
    ) -> candle_core::Result<Option<R>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 || !x.is_contiguous() {
            return Ok(None);
        }
        let d = x.dim(candle_core::D::Minus1)?;
        let w: Vec<f32> = self.weight.to_dtype(DType::F32)?.to_vec1()?;
        let b: Vec<f32> = self.bias.to_dtype(DType::F32)?.to_vec1()?;
        if w.len() != d || b.len() != d || d == 0 {
            return Ok(None);
        }
        let (storage, layout) = x.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(v)), Some((s0, s1))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        Ok(Some(f(&v[s0..s1], &w, &b, d)))
    }

    fn forward_cpu(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let eps = self.eps as f32;
        let out = self.on_cpu_rows(x, |src, w, b, d| {
            let mut out = vec![0f32; src.len()];
            // Bands of rows per task (a row of 384 floats is too little work for one).
            out.par_chunks_mut(16 * d)
                .zip(src.par_chunks(16 * d))
                .for_each(|(o, s)| norm_rows(o, s, w, b, eps));
            out
        })?;
        out.map(|out| Tensor::from_vec(out, x.shape(), x.device()))
            .transpose()
    }

    /// The normalised rows of an f32 CPU tensor rounded straight into bf16 A tiles (the input
    /// of the GEMM after the norm in the bf16 mode); None elsewhere.
    pub(crate) fn pack(&self, x: &Tensor) -> candle_core::Result<Option<PackedA>> {
        let eps = self.eps as f32;
        self.on_cpu_rows(x, |src, w, b, d| {
            PackedA::from_fn(src.len() / d, d, &|row0, band| {
                norm_rows(band, &src[row0 * d..row0 * d + band.len()], w, b, eps)
            })
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Both kernels read rows in place (a no-op for a contiguous tensor).
        let x = x.contiguous()?;
        if let Some(y) = self.forward_cpu(&x)? {
            return Ok(y);
        }
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)
    }
}

fn norm_rows(o: &mut [f32], s: &[f32], w: &[f32], b: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512F, AVX2 and FMA (checked at run time).
        return unsafe { norm_rows_avx512(o, s, w, b, eps) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { norm_rows_avx2(o, s, w, b, eps) };
    }
    norm_rows_plain(o, s, w, b, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn norm_rows_avx512(o: &mut [f32], s: &[f32], w: &[f32], b: &[f32], eps: f32) {
    norm_rows_plain(o, s, w, b, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn norm_rows_avx2(o: &mut [f32], s: &[f32], w: &[f32], b: &[f32], eps: f32) {
    norm_rows_plain(o, s, w, b, eps)
}

/// 16 independent partial sums (vectorised by the compiler at whatever width the caller was
/// compiled for), then their total.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(v);
    }
    acc.iter().sum()
}

#[inline(always)]
fn norm_rows_plain(o: &mut [f32], s: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let d = w.len();
    for (o, x) in o.chunks_exact_mut(d).zip(s.chunks_exact(d)) {
        let mean = lane_sum(x, |v| v) / d as f32;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
            *o = (x - mean) * inv * w + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the textbook formula in f64, on rows with a large mean against their spread
    /// (where `E[x²] - E[x]²` in f32 loses every digit) and widths off the 16-lane grid.
    #[test]
    fn matches_the_f64_formula_even_for_offset_rows() {
        let dev = Device::Cpu;
        for (rows, d, offset) in [(37, 384, 0.0f32), (5, 50, 3000.0), (3, 7, -1e4)] {
            let x = (Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap() + offset as f64).unwrap();
            let w = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let got: Vec<f32> = Norm::new(w.clone(), b.clone(), 1e-6)
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (xv, wv, bv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                x.flatten_all().unwrap().to_vec1().unwrap(),
                w.to_vec1().unwrap(),
                b.to_vec1().unwrap(),
            );
            for r in 0..rows {
                let row: Vec<f64> = xv[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    let want = (row[j] - mean) / (var + 1e-6).sqrt() * wv[j] as f64 + bv[j] as f64;
                    let g = got[r * d + j] as f64;
                    // f32 inputs near 1e4 carry 1e-3 of rounding of their own.
                    let tol = if offset == 0.0 { 1e-5 } else { 1e-2 };
                    assert!(
                        (g - want).abs() < tol * (1.0 + want.abs()),
                        "row {r} col {j}: {g} vs {want} (offset {offset})"
                    );
                }
            }
        }
    }
}
