//! Separable resampling that reproduces the reference libraries bit for bit (or to float
//! rounding): Pillow's `Image.resize` on 8-bit images (used by the HF image processors) and
//! torch's `F.interpolate(mode="bicubic")` with and without `antialias` (used by HF to resize
//! position embeddings).
//!
//! Both are "precompute 1-D weights per output index, apply horizontally then vertically".
//! Pillow: `libImaging/Resample.c` (`precompute_coeffs`, 22-bit fixed point, clip to u8 after
//! each pass). torch: `UpSampleKernel.cpp` (cubic A = -0.75 without antialias; with antialias
//! the Pillow scheme with A = -0.5).
//!
//! ```text
//! let m = interp_matrix(37, 16, Kernel::TorchBicubic);   // [16, 37], rows sum to 1
//! let small = pil_resize_rgb8(&rgb, (w, h), (nw, nh), Kernel::AntialiasBicubic);
//! ```

/// A 1-D resampling kernel and its index convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// torch `interpolate(mode="bicubic", align_corners=False, antialias=False)`: A = -0.75,
    /// 4 taps, border indices clamped.
    TorchBicubic,
    /// torch `interpolate(mode="bicubic", antialias=True)` and Pillow `BICUBIC`: A = -0.5,
    /// support widened by the downscale factor.
    AntialiasBicubic,
    /// Pillow `BILINEAR` (triangle filter, support widened by the downscale factor).
    AntialiasBilinear,
}

fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Per output index: first input index and the weights (normalised to sum 1).
fn coeffs(in_size: usize, out_size: usize, kernel: Kernel) -> Vec<(usize, Vec<f64>)> {
    coeffs_scaled(
        in_size,
        out_size,
        kernel,
        in_size as f64 / out_size as f64,
        0..out_size,
    )
}

/// [`coeffs`] with the source step `scale` (input pixels per output pixel) given, as torch
/// uses it when `interpolate` is called with a `scale_factor` (`scale` = 1 / scale_factor).
/// Only the outputs in `outs` are computed (each output's weights depend on its index alone).
fn coeffs_scaled(
    in_size: usize,
    out_size: usize,
    kernel: Kernel,
    scale: f64,
    outs: std::ops::Range<usize>,
) -> Vec<(usize, Vec<f64>)> {
    debug_assert!(outs.end <= out_size);
    match kernel {
        Kernel::TorchBicubic => outs
            .map(|i| {
                // Taps at floor(src)-1 .. floor(src)+2, clamped; fold clamped taps together.
                let src = scale * (i as f64 + 0.5) - 0.5;
                let x0 = src.floor();
                let t = src - x0;
                let w = [
                    cubic(t + 1.0, -0.75),
                    cubic(t, -0.75),
                    cubic(1.0 - t, -0.75),
                    cubic(2.0 - t, -0.75),
                ];
                let mut dense = vec![0.0; in_size];
                for (k, wk) in w.iter().enumerate() {
                    let idx = (x0 as i64 - 1 + k as i64).clamp(0, in_size as i64 - 1) as usize;
                    dense[idx] += wk;
                }
                let first = dense.iter().position(|&v| v != 0.0).unwrap_or(0);
                let last = dense.iter().rposition(|&v| v != 0.0).unwrap_or(0);
                (first, dense[first..=last].to_vec())
            })
            .collect(),
        Kernel::AntialiasBicubic | Kernel::AntialiasBilinear => {
            let (support0, filter): (f64, fn(f64) -> f64) = match kernel {
                Kernel::AntialiasBicubic => (2.0, |x| cubic(x, -0.5)),
                _ => (1.0, triangle),
            };
            let filterscale = scale.max(1.0);
            let support = support0 * filterscale;
            let ss = 1.0 / filterscale;
            outs.map(|i| {
                let center = (i as f64 + 0.5) * scale;
                // C casts truncate toward zero; negative values are clamped to 0 anyway.
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let mut w: Vec<f64> = (xmin..xmax)
                    .map(|x| filter((x as f64 - center + 0.5) * ss))
                    .collect();
                let total: f64 = w.iter().sum();
                if total != 0.0 {
                    w.iter_mut().for_each(|v| *v /= total);
                }
                (xmin, w)
            })
            .collect()
        }
    }
}

/// The dense `[out_size, in_size]` row-major matrix `M` with `out = M · in` along one axis.
pub fn interp_matrix(in_size: usize, out_size: usize, kernel: Kernel) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    for (i, (first, w)) in coeffs(in_size, out_size, kernel).into_iter().enumerate() {
        for (j, wj) in w.into_iter().enumerate() {
            m[i * in_size + first + j] = wj as f32;
        }
    }
    m
}

/// [`interp_matrix`] for torch's non-antialiased bicubic called with a `scale_factor`: the
/// source coordinate is `(i + 0.5) · in_per_out − 0.5` (the original DINOv2 resizes its position
/// embeddings with `scale_factor = (n + 0.1) / G`, so `in_per_out = G / (n + 0.1)`).
pub fn interp_matrix_scaled(in_size: usize, out_size: usize, in_per_out: f64) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    for (i, (first, w)) in coeffs_scaled(
        in_size,
        out_size,
        Kernel::TorchBicubic,
        in_per_out,
        0..out_size,
    )
    .into_iter()
    .enumerate()
    {
        for (j, wj) in w.into_iter().enumerate() {
            m[i * in_size + first + j] = wj as f32;
        }
    }
    m
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's fixed-point weights for one axis, for the outputs in `outs`.
fn fixed_coeffs(
    in_size: usize,
    out_size: usize,
    kernel: Kernel,
    outs: std::ops::Range<usize>,
) -> Vec<(usize, Vec<i32>)> {
    coeffs_scaled(
        in_size,
        out_size,
        kernel,
        in_size as f64 / out_size as f64,
        outs,
    )
    .into_iter()
    .map(|(first, w)| {
        let fixed = w
            .into_iter()
            .map(|k| {
                let v = k * f64::from(1u32 << PRECISION_BITS);
                if k < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                }
            })
            .collect();
        (first, fixed)
    })
    .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an interleaved RGB8 image like Pillow's `Image.resize((out_w, out_h), filter)`:
/// horizontal pass, then vertical, each rounded and clipped to u8.
///
/// # Shapes
/// `rgb`: `[in_h, in_w, 3]` row-major; returns `[out_h, out_w, 3]`.
pub fn pil_resize_rgb8(
    rgb: &[u8],
    (in_w, in_h): (usize, usize),
    (out_w, out_h): (usize, usize),
    kernel: Kernel,
) -> Vec<u8> {
    pil_resize_rgb8_window(
        rgb,
        (in_w, in_h),
        (out_w, out_h),
        kernel,
        0..out_w,
        0..out_h,
    )
}

/// The pixels `xs × ys` of [`pil_resize_rgb8`]'s output, computed alone: the same bytes (each
/// output pixel depends only on its own taps), without the rest — what a centre crop keeps.
/// Only the input rows the window's taps reach are resized horizontally, so an image with an
/// extreme aspect ratio never makes its whole, huge, resized intermediate.
///
/// # Shapes
/// `rgb`: `[in_h, in_w, 3]` row-major; returns `[ys.len(), xs.len(), 3]`.
pub fn pil_resize_rgb8_window(
    rgb: &[u8],
    (in_w, in_h): (usize, usize),
    (out_w, out_h): (usize, usize),
    kernel: Kernel,
    xs: std::ops::Range<usize>,
    ys: std::ops::Range<usize>,
) -> Vec<u8> {
    debug_assert_eq!(rgb.len(), in_w * in_h * 3);
    debug_assert!(xs.end <= out_w && ys.end <= out_h);
    let half = 1i64 << (PRECISION_BITS - 1);
    let nx = xs.len();
    // Vertical taps of the window's rows, and the input rows they read.
    let ch = (in_h != out_h).then(|| fixed_coeffs(in_h, out_h, kernel, ys.clone()));
    let rows = match &ch {
        None => ys.clone(),
        Some(c) => {
            let lo = c.iter().map(|(f, _)| *f).min().unwrap_or(0);
            let hi = c.iter().map(|(f, w)| f + w.len()).max().unwrap_or(0);
            lo..hi.max(lo)
        }
    };
    // Horizontal pass over those rows, the window's columns only (skipped when the width does
    // not change, as Pillow does).
    let cw = (in_w != out_w).then(|| fixed_coeffs(in_w, out_w, kernel, xs.clone()));
    let mut tmp = vec![0u8; rows.len() * nx * 3];
    for (r, y) in rows.clone().enumerate() {
        let row = &rgb[y * in_w * 3..(y + 1) * in_w * 3];
        let dst = &mut tmp[r * nx * 3..(r + 1) * nx * 3];
        match &cw {
            None => dst.copy_from_slice(&row[xs.start * 3..xs.end * 3]),
            Some(cw) => {
                for (x, (first, w)) in cw.iter().enumerate() {
                    for c in 0..3 {
                        let mut ss = half;
                        for (j, &k) in w.iter().enumerate() {
                            ss += i64::from(row[(first + j) * 3 + c]) * i64::from(k);
                        }
                        dst[x * 3 + c] = clip8(ss);
                    }
                }
            }
        }
    }
    let Some(ch) = ch else {
        return tmp;
    };
    let mut out = vec![0u8; ys.len() * nx * 3];
    for (y, (first, w)) in ch.iter().enumerate() {
        for x in 0..nx * 3 {
            let mut ss = half;
            for (j, &k) in w.iter().enumerate() {
                ss += i64::from(tmp[(first + j - rows.start) * nx * 3 + x]) * i64::from(k);
            }
            out[y * nx * 3 + x] = clip8(ss);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_when_sizes_match() {
        for k in [
            Kernel::TorchBicubic,
            Kernel::AntialiasBicubic,
            Kernel::AntialiasBilinear,
        ] {
            let m = interp_matrix(5, 5, k);
            for i in 0..5 {
                for j in 0..5 {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((m[i * 5 + j] - want).abs() < 1e-7, "{k:?} {i} {j}");
                }
            }
        }
    }

    #[test]
    fn rows_sum_to_one() {
        for k in [
            Kernel::TorchBicubic,
            Kernel::AntialiasBicubic,
            Kernel::AntialiasBilinear,
        ] {
            for (n_in, n_out) in [(37, 16), (16, 37), (7, 3)] {
                let m = interp_matrix(n_in, n_out, k);
                for i in 0..n_out {
                    let s: f32 = m[i * n_in..(i + 1) * n_in].iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{k:?} {n_in}->{n_out} row {i}: {s}");
                }
            }
        }
    }

    #[test]
    fn torch_bicubic_upsample_2x_closed_form() {
        // Output 1 of a 2x upsample sits at src = 0.25: weights cubic(1.25), cubic(0.25),
        // cubic(0.75), cubic(1.75) with A = -0.75 on taps -1 (clamped to 0), 0, 1, 2.
        let m = interp_matrix(4, 8, Kernel::TorchBicubic);
        let w = [-0.10546875f32, 0.87890625, 0.26171875, -0.03515625];
        // Row 1 of the [8, 4] matrix is m[4..8].
        assert!((m[4] - (w[0] + w[1])).abs() < 1e-7);
        assert!((m[5] - w[2]).abs() < 1e-7);
        assert!((m[6] - w[3]).abs() < 1e-7);
        assert_eq!(m[7], 0.0);
    }

    #[test]
    fn pil_constant_image_stays_constant() {
        let img = vec![77u8; 10 * 6 * 3];
        let out = pil_resize_rgb8(&img, (10, 6), (4, 9), Kernel::AntialiasBicubic);
        assert!(out.iter().all(|&v| v == 77));
    }

    /// A window of the resize is the same bytes as that window of the whole resize, up- and
    /// down-sampling, both kernels, windows touching the edges.
    #[test]
    fn a_window_is_the_same_bytes_as_the_whole_resize() {
        let (w, h) = (23usize, 17usize);
        let img: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        for k in [Kernel::AntialiasBicubic, Kernel::AntialiasBilinear] {
            for (ow, oh) in [(40, 31), (9, 6), (23, 30), (11, 17)] {
                let full = pil_resize_rgb8(&img, (w, h), (ow, oh), k);
                for (xs, ys) in [(0..ow, 0..oh), (2..ow - 1, 1..oh - 2), (0..3, oh - 2..oh)] {
                    let win =
                        pil_resize_rgb8_window(&img, (w, h), (ow, oh), k, xs.clone(), ys.clone());
                    for (r, y) in ys.clone().enumerate() {
                        assert_eq!(
                            &win[r * xs.len() * 3..(r + 1) * xs.len() * 3],
                            &full[(y * ow + xs.start) * 3..(y * ow + xs.end) * 3],
                            "{k:?} {ow}x{oh} window {xs:?}×{ys:?} row {y}"
                        );
                    }
                }
            }
        }
    }
}
