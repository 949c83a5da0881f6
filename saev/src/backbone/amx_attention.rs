//! Multi-head self-attention in bfloat16 on AMX tiles (or AVX-512-BF16 on the same tiles), for the backbone's bf16 mode
//! ([`super::LinearMode::PackedBf16`]): `softmax(q kᵀ / √hd) v` per (image, head), straight
//! from the fused `[B, T, 3·D]` projection, as torch's bfloat16 `scaled_dot_product_attention`
//! computes it on the CPU (its flash-attention kernel) — `q`, `k`, `v` rounded to bfloat16, the
//! scores `q·k` summed in f32 and scaled by `1/√hd` in f32, the unnormalised probabilities
//! `exp(s − max s)` rounded to bfloat16, each output row divided by the f32 sum of its
//! exponentials.
//!
//! # Layout
//! Per task, the operands are packed into [`super::amx`]'s tiles, zero-padded to `T_pad`
//! (`T` rounded up to 32) and `hd_pad` (`hd` rounded up to 32): `q` as A tiles
//! (`[T_pad / 16][hd_pad / 32]`), `kᵀ` as B tiles (each tile a 16 × 16 transpose of `k`'s
//! bf16 pairs), the scores `[T_pad, T_pad]` in f32, the probabilities as A tiles
//! (`[T_pad / 16][T_pad / 32]`, zero past `T`), `v` as B tiles (pairs of key rows interleaved).
//! Padded keys have zero probability and zero values; padded queries are computed and dropped.
//!
//! ```text
//! let att = self_attention_qkv_bf16(&qkv_btd3, n_heads)?;   // [B, T, D], heads concatenated
//! ```

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use super::aligned::Aligned;
use super::amx::{TILE, TK, TN};

/// Whether [`self_attention_qkv_bf16`] runs here: a bf16 kernel (AMX tiles, or AVX-512-BF16
/// where it is the processor's bf16 kernel: AMD Zen 4) and the AVX-512-BF16 conversion the
/// packing uses (which every AMX processor has).
pub(crate) fn available() -> bool {
    super::amx::bf16_kernel() != super::amx::Bf16Kernel::F32 && super::amx::has_avx512_bf16()
}

/// Per-thread buffers for one (image, head) task; their padding stays zero across tasks.
struct Scratch {
    /// `q` as A tiles, `[T_pad / 16][kq]`.
    q: Aligned<u16>,
    /// `k` rounded, `[T_pad, hd_pad]` row-major.
    k_rows: Vec<u16>,
    /// `kᵀ` as B tiles, `[T_pad / 16][kq]`.
    k_t: Aligned<u16>,
    /// One block of 32 query rows of scores, `[32, T_pad]`.
    s: Aligned<f32>,
    /// Their probabilities as A tiles, `[2][kp]`.
    p: Aligned<u16>,
    /// `v` as B tiles, `[hd_pad / 16][kp]`.
    v: Aligned<u16>,
    /// The block's output, `[32, hd_pad]`.
    o: Aligned<f32>,
}

/// Sizes shared by every task of one call.
#[derive(Clone, Copy)]
struct Geometry {
    t: usize,
    d: usize,
    hd: usize,
    /// `T` rounded up to 32.
    tp: usize,
    /// `hd` rounded up to 32.
    hdp: usize,
    /// k tiles of `q`/`k` (`hd_pad / 32`), of the probabilities (`T_pad / 32`).
    kq: usize,
    kp: usize,
    scale: f32,
}

/// Attention in bf16 on AMX from the fused projection `qkv` (`[B, T, 3·D]`, f32, contiguous):
/// `[B, T, D]`, heads concatenated. Call only where [`available`] says so.
pub(crate) fn self_attention_qkv_bf16(qkv: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let hd = d / n_heads;
    if d3 != 3 * d || hd * n_heads != d || t == 0 || hd == 0 {
        candle_core::bail!("self_attention_qkv_bf16: [B, T, {d3}] is not 3 × {n_heads} heads");
    }
    if !available() {
        candle_core::bail!("self_attention_qkv_bf16: no bf16 kernel on this processor");
    }
    let (storage, layout) = qkv.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(v)), Some((s0, s1))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("self_attention_qkv_bf16: a contiguous f32 CPU tensor only");
    };
    let x = &v[s0..s1];
    let tp = t.div_ceil(2 * TN) * 2 * TN;
    let kq = hd.div_ceil(TK);
    let g = Geometry {
        t,
        d,
        hd,
        tp,
        hdp: kq * TK,
        kq,
        kp: tp / TK,
        scale: (hd as f32).powf(-0.5),
    };
    let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(b * t * d);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { out.set_len(b * t * d) };
    // The raw pointer crosses threads as an address: every task writes its own head's
    // columns of its own image's rows, disjoint from every other task's.
    let out_addr = out.as_mut_ptr() as usize;
    (0..b * n_heads).into_par_iter().for_each_init(
        || Scratch {
            // One spare tile at the end of each tile buffer: the pipelined loads read one past.
            q: Aligned::filled((tp / TN * kq + 1) * TILE, 0),
            k_rows: vec![0; tp * g.hdp],
            k_t: Aligned::filled((tp / TN * kq + 1) * TILE, 0),
            s: Aligned::filled(2 * TN * tp, 0.0),
            p: Aligned::filled((2 * g.kp + 1) * TILE, 0),
            v: Aligned::filled((g.hdp / TN * g.kp + 1) * TILE, 0),
            o: Aligned::filled(2 * TN * g.hdp, 0.0),
        },
        |sc, task| {
            let (img, h) = (task / n_heads, task % n_heads);
            let x_head = &x[img * t * d3 + h * hd..];
            // SAFETY: available() checked the bf16 kernel and AVX-512F/BW/BF16; `out` holds b · t · d values of
            // which this task writes its head's columns of its image's rows.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let o = (out_addr as *mut f32).add(img * t * d + h * hd);
                attend_head(x_head, g, sc, o)
            };
        },
    );
    drop(storage);
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: every element was written (each task its head's columns of its image's rows;
    // the tasks cover every (image, head)); MaybeUninit<f32> and f32 share their layout.
    let out =
        unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut f32, b * t * d, out.capacity()) };
    Tensor::from_vec(out, (b, t, d), qkv.device())
}

/// One (image, head): `x` starts at the head's `q` columns of the image's first token (row
/// stride `3·D`, `k` at `+D`, `v` at `+2·D`); the output goes to `out` (row stride `D`).
///
/// # Safety
/// A bf16 kernel ([`available`]), AVX-512F/BW/BF16, AVX2 and FMA are available; `x` holds
/// the image's `T` rows; `out` is valid for `T` rows of `hd` writes at stride `D`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn attend_head(x: &[f32], g: Geometry, sc: &mut Scratch, out: *mut f32) {
    use super::amx::{round_32_cvt, round_pair_cvt, round_row_cvt, BlockKernel};
    let Geometry {
        t,
        d,
        hd,
        tp,
        hdp,
        kq,
        kp,
        scale,
    } = g;
    let row = |n: usize, part: usize| &x[n * 3 * d + part * d..][..hd];
    // SAFETY (the whole body): the tile buffers hold their documented tile counts plus a spare
    // tile, every write below stays inside its buffer, and `kernel` is the bf16 kernel (AMX
    // tiles configured while it lives).
    unsafe {
        // q and k, rounded (pads stay zero from the scratch's creation); 1/√hd scales the f32
        // scores, as torch's flash kernel does. The rows are
        // 3·D apart (past a page at D = 384, where the hardware prefetcher stops): q, k and v
        // of the row 8 ahead are prefetched, so v's packing below finds them in cache too.
        for n in 0..t {
            if n + 8 < t {
                for part in 0..3 {
                    let ahead = row(n + 8, part).as_ptr();
                    for line in (0..hd).step_by(16) {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                            ahead.add(line) as *const i8,
                        );
                    }
                }
            }
            let at = ((n / TN) * kq) * TILE + (n % TN) * TK;
            round_row_cvt(row(n, 0), 1.0, kq, sc.q.as_mut_ptr().add(at));
            let k = row(n, 1);
            for p in 0..kq {
                let src = &k[p * TK..((p + 1) * TK).min(hd)];
                round_32_cvt(src, 1.0, sc.k_rows.as_mut_ptr().add(n * hdp + p * TK));
            }
        }
        transpose_k(&sc.k_rows, &mut sc.k_t, tp, kq);
        // v: each B tile row interleaves two keys' 16 values; zeros past T (rewritten every
        // task) and past hd (never written).
        for jc in 0..hd.div_ceil(TN) {
            let (c0, c1) = (jc * TN, ((jc + 1) * TN).min(hd));
            for p in 0..kp {
                let tile = sc.v.as_mut_ptr().add((jc * kp + p) * TILE);
                for r in 0..TK / 2 {
                    let n0 = p * TK + 2 * r;
                    let a: &[f32] = if n0 < t { &row(n0, 2)[c0..c1] } else { &[] };
                    let b: &[f32] = if n0 + 1 < t {
                        &row(n0 + 1, 2)[c0..c1]
                    } else {
                        &[]
                    };
                    round_pair_cvt(a, b, tile.add(r * TK));
                }
            }
        }
        let kernel = BlockKernel::enter(super::amx::bf16_kernel());
        let (q, k_t, vt) = (sc.q.as_ptr(), sc.k_t.as_ptr(), sc.v.as_ptr());
        // 32 query rows at a time: scores, softmax, probabilities, output, all in cache.
        for bi in 0..tp / 32 {
            let a = [q.add(2 * bi * kq * TILE), q.add((2 * bi + 1) * kq * TILE)];
            let s = sc.s.as_mut_ptr();
            for bj in 0..tp / 32 {
                let b = [
                    k_t.add(2 * bj * kq * TILE),
                    k_t.add((2 * bj + 1) * kq * TILE),
                ];
                kernel.block_32x32(a, b, kq, [s.add(32 * bj), s.add(TN * tp + 32 * bj)], 4 * tp);
            }
            // Unnormalised probabilities in bf16 (as torch's CPU flash attention rounds them);
            // each output row is divided by its sum of the f32 exponentials below.
            let mut inv_sum = [0f32; 2 * TN];
            for (r, inv) in inv_sum.iter_mut().enumerate() {
                let n = 32 * bi + r;
                let dst = sc.p.as_mut_ptr().add((r / TN) * kp * TILE + (r % TN) * TK);
                if n < t {
                    *inv = 1.0 / exp_row_to_tiles(&sc.s[r * tp..r * tp + t], scale, kp, dst);
                } else {
                    round_row_cvt(&[], 1.0, kp, dst);
                }
            }
            let (p, o) = (sc.p.as_ptr(), sc.o.as_mut_ptr());
            for bj in 0..hdp / 32 {
                let b = [vt.add(2 * bj * kp * TILE), vt.add((2 * bj + 1) * kp * TILE)];
                kernel.block_32x32(
                    [p, p.add(kp * TILE)],
                    b,
                    kp,
                    [o.add(32 * bj), o.add(TN * hdp + 32 * bj)],
                    4 * hdp,
                );
            }
            for (r, &inv) in inv_sum.iter().enumerate().take(t.saturating_sub(32 * bi)) {
                let n = 32 * bi + r;
                let o_row = &sc.o[r * hdp..r * hdp + hd];
                for (c, &v) in o_row.iter().enumerate() {
                    *out.add(n * d + c) = v * inv;
                }
            }
        }
    }
}

/// `e_j = exp((s_j − max s)·scale)` for the raw scores `s` of one query (`T` of them; `scale`
/// `= 1/√hd > 0`, applied here in f32 as torch applies it), rounded to bf16 into
/// its row of the probabilities' A tiles (`kp` tiles of 32 keys at `dst + p · TILE`, zeros
/// past `T`); returns `Σ e_j` of the unrounded values. `e = 2^y`, `y = (s − max)·scale·log₂e`
/// by [`super::kernels::exp2_avx512`] (relative error ≤ 1.2e-7, far below bf16's 2⁻⁹; zero
/// below `y = −100`, where next to the maximum's 1 it is lost in any f32 sum).
///
/// # Safety
/// AVX-512F/BW/BF16 are available; `dst` is valid for 32 u16 writes at each of the `kp` tile
/// offsets; `kp · 32 ≥ T`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn exp_row_to_tiles(s: &[f32], scale: f32, kp: usize, dst: *mut u16) -> f32 {
    use std::arch::x86_64::*;
    let t = s.len();
    let lanes = |i: usize| -> __mmask16 {
        let n = t.saturating_sub(i).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    // SAFETY: every load is masked to the lanes inside `s`; the stores are the caller's.
    unsafe {
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut mx = neg_inf;
        for i in (0..t).step_by(16) {
            mx = _mm512_max_ps(
                mx,
                _mm512_mask_loadu_ps(neg_inf, lanes(i), s.as_ptr().add(i)),
            );
        }
        let max = _mm512_reduce_max_ps(mx);
        let log2e = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
        let shift = _mm512_set1_ps(-max * scale * std::f32::consts::LOG2_E);
        let mut sum = _mm512_setzero_ps();
        for p in 0..kp {
            let mut half = [_mm512_setzero_ps(); 2];
            for (h, e) in half.iter_mut().enumerate() {
                let i = p * TK + h * 16;
                let m = lanes(i);
                if m == 0 {
                    continue;
                }
                let x = _mm512_maskz_loadu_ps(m, s.as_ptr().add(i));
                *e = super::kernels::exp2_avx512(m, _mm512_fmadd_ps(x, log2e, shift));
                sum = _mm512_add_ps(sum, *e);
            }
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(half[1], half[0]));
            _mm512_storeu_si512(dst.add(p * TILE) as *mut _, both);
        }
        _mm512_reduce_add_ps(sum)
    }
}

/// `kᵀ` as B tiles: tile `(j, p)` (keys `16j..16j+16`, dims `32p..32p+32`) holds in row `r`,
/// column `c` the bf16 pair (dims `32p + 2r`, `32p + 2r + 1`) of key `16j + c` — a 16 × 16
/// transpose of the rows' 32-bit pairs.
fn transpose_k(k_rows: &[u16], k_t: &mut [u16], tp: usize, kq: usize) {
    let hdp = kq * TK;
    for j in 0..tp / TN {
        for p in 0..kq {
            let tile = &mut k_t[(j * kq + p) * TILE..(j * kq + p + 1) * TILE];
            for c in 0..TN {
                let key = (j * TN + c) * hdp + p * TK;
                for r in 0..TK / 2 {
                    tile[r * TK + 2 * c] = k_rows[key + 2 * r];
                    tile[r * TK + 2 * c + 1] = k_rows[key + 2 * r + 1];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::amx::round_bf16;
    use candle_core::Device;

    /// Against attention in f64 on the bf16-rounded `q`, `k`, `v` and probabilities, on
    /// shapes off every tile edge (T not a multiple of 16 or 32, hd not a multiple of 32), and
    /// against saev's f32 attention within bf16's precision.
    #[test]
    fn matches_attention_on_rounded_operands() {
        if !available() {
            eprintln!("no bf16 kernel here: the bf16 attention does not run on this processor");
            return;
        }
        // The last shape's scores spread over hundreds: most e_j fall below the 2⁻¹⁰⁰ floor.
        for (b, t, heads, hd, amp) in [
            (2, 37, 2, 40, 1.0f32),
            (1, 257, 2, 64, 1.0),
            (1, 5, 1, 16, 1.0),
            (1, 45, 1, 32, 6.0),
        ] {
            let d = heads * hd;
            let qkv = Tensor::randn(0f32, amp, (b, t, 3 * d), &Device::Cpu).unwrap();
            let got: Vec<f32> = self_attention_qkv_bf16(&qkv, heads)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let f32_att: Vec<f32> = super::super::kernels::self_attention_qkv(&qkv, heads)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let x: Vec<f32> = qkv.flatten_all().unwrap().to_vec1().unwrap();
            let scale = (hd as f32).powf(-0.5);
            for img in 0..b {
                for h in 0..heads {
                    let at = |n: usize, part: usize, c: usize| {
                        x[img * t * 3 * d + n * 3 * d + part * d + h * hd + c]
                    };
                    for i in 0..t {
                        // Scores from the bf16 q and k, scaled by 1/√hd afterwards (torch's
                        // flash kernel scales the f32 scores, not q).
                        let s: Vec<f64> = (0..t)
                            .map(|j| {
                                (0..hd)
                                    .map(|c| {
                                        round_bf16(at(i, 0, c)) as f64
                                            * round_bf16(at(j, 1, c)) as f64
                                    })
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let max = s.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                        let z: f64 = e.iter().sum();
                        // As torch's CPU flash attention computes it: the unnormalised e_j
                        // rounded to bf16, the output divided by Σ e_j (torch 2.15's bf16
                        // `scaled_dot_product_attention` matched this model in 86–95% of its
                        // outputs bit for bit, the one rounding the normalised p_j in ~50%:
                        // scripts/check_torch_sdpa_rounding.py).
                        let e_rounded: Vec<f64> =
                            e.iter().map(|&v| round_bf16(v as f32) as f64).collect();
                        for c in 0..hd {
                            let want: f64 = (0..t)
                                .map(|j| e_rounded[j] * round_bf16(at(j, 2, c)) as f64)
                                .sum::<f64>()
                                / z;
                            let idx = img * t * d + i * d + h * hd + c;
                            let g = got[idx] as f64;
                            // An e_j may round the other way from f32 (1 bf16 ulp, times a
                            // value v_j, which scales with amp).
                            assert!(
                                (g - want).abs() < 1e-3 * amp as f64 + 4e-3 * want.abs(),
                                "[{b}, {t}, {heads}×{hd}] img {img} head {h} row {i} col {c}: {g} vs {want}"
                            );
                            let f = f32_att[idx] as f64;
                            // (At amp 6 bf16's rounding of q and k moves scores by more than
                            // 1, so f32 attention is no reference there.)
                            assert!(amp > 1.0 || (g - f).abs() < 3e-2, "vs f32: {g} vs {f}");
                        }
                    }
                }
            }
        }
    }
}
