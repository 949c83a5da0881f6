//! The encoder's selection (TopK, ReLU) from a bfloat16 screen, exact: a bf16 GEMM finds the
//! few entries of each row that could be selected, and only those are computed in f32.
//!
//! The encoder pass `pre = (x − b_dec)·W_encᵀ + b_enc` is the one dense GEMM of a sparse SAE
//! step — half of a TopK step at d_sae = 16·d. Only its selection is used: the top `k` positive
//! entries of each row (TopK) or its positive entries (ReLU). On AMX, which multiplies bfloat16
//! at ~3× the f32 rate here, the GEMM runs on the operands rounded to bf16 (`x̃`, `w̃`), and
//! each estimate `ê` is within a proven bound `B` of the exact `e = x·w` (Higham, *Accuracy
//! and Stability of Numerical Algorithms*, §3.1), the smaller of ([`Bounds`]):
//!
//! ```text
//! ‖x − x̃‖₂‖w‖₂ + ‖x̃‖₂‖w − w̃‖₂ + 2γ_d‖x̃‖₂‖w̃‖₂     (x·w − x̃·w̃ = (x − x̃)·w + x̃·(w − w̃)),
//! (2u + u² + 2γ_d) min(‖x‖₂ max‖w‖₂, ‖x‖₁ max‖w‖∞, ‖x‖∞ max‖w‖₁)   (worst-case rounding),
//! u = 2⁻⁸ (bf16's unit roundoff), γ_d = d 2⁻²⁴ / (1 − d 2⁻²⁴) (each side's f32 sum),
//! ```
//!
//! per row and latent (the first with the latent's own norms and the operands' actual rounding
//! residuals), plus `(d + 2 + ‖x‖₁ + ‖w‖₁) 2⁻¹²⁶` for the subnormals that AMX flushes and the
//! f32 roundings of the bias additions. An entry can be among the exact top `k` only if its
//! upper bound `ê + b + B` reaches the `k`-th largest lower bound `ê + b − B` of its row, and
//! can be positive only if its upper bound is. Those candidates — 48.5 per row for k = 32 and
//! 98.6 for k = 64 on the quickstart's trained TopK SAE (d 384, d_sae 6144; 95 and 169 with
//! the worst-case bound alone) — are recomputed in f32 (`linalg::dot`, a fixed order), and the
//! selection runs on them: the result is the selection of the pre-activations computed in f32,
//! for every input — no tolerance, no sampling. A band of 32 rows with more candidates than
//! 1/8 of its entries (a dense ReLU early in training) is computed by the f32 GEMM instead.
//! The estimates of a band are screened while in cache and never stored.
//!
//! ```text
//! let f = screen::select(&xc, n, &w_enc, &b_enc, Rule::TopK(32)); // Some(Csr) where it pays
//! ```

use rayon::prelude::*;

use super::linalg::{gemm, Csr, Mat};
use super::row_select::{above_row_biased, topk_row_biased};
use crate::backbone::amx::{bf16_kernel, map_bands, Bf16Kernel, PackedB};

/// Which entries of a row the encoder keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// The `k` largest positive values (ties: lower id first).
    TopK(usize),
    /// Every positive value.
    Positive,
}

/// Whether [`select`] runs on this machine for these sizes: on a bf16 kernel — AMX (measured,
/// alternating in one sitting: TopK step +28–43%, ReLU +26–39% at d 384, d_sae 6144, batch
/// 4096) or AMD Zen 4's AVX-512-BF16 (twice its f32 rate: TopK +31–48%, ReLU +22–32%, AuxK
/// +13–39%, BatchTopK unchanged, 2026-12-07) — and a GEMM big enough to repay packing `W_enc`.
/// `SAEV_SAE_SCREEN=off` turns it off (to compare); on Intel cores without AMX it runs only
/// where `SAEV_BF16_KERNEL=avx512bf16` asks for that kernel (slower than the f32 GEMM there).
pub(crate) fn pays(n: usize, d: usize, s: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("SAEV_SAE_SCREEN").as_deref() == Ok("off"));
    !off && bf16_kernel() != Bf16Kernel::F32 && d >= 64 && n >= 256 && s >= 512
}

/// The rows of `xc·W_encᵀ + b_enc` selected by `rule`, each as (id, f32 value) by id; `xc` is
/// `[n, d]`, `w_enc` `[s, d]`. None when an input is not finite (the caller's f32 path then
/// meets it as usual).
pub(crate) fn select(
    xc: &[f32],
    n: usize,
    w_enc: &[f32],
    b_enc: &[f32],
    rule: Rule,
) -> Option<Csr> {
    let s = b_enc.len();
    let d = w_enc.len() / s.max(1);
    assert_eq!(xc.len(), n * d, "screen::select: xc is not [{n}, {d}]");
    let bounds = bounds(xc, d, w_enc)?;
    let packed = PackedB::from_rows(w_enc, s, d);
    let bands = map_bands(xc, n, &packed, &|row0, est: &mut [f32]| {
        screen_band(xc, d, w_enc, b_enc, rule, row0, est, &bounds)
    });
    let rows: Vec<Screened> = bands.into_iter().flatten().collect();
    let cands: Vec<&[u32]> = rows
        .iter()
        .map(|r| match r {
            Screened::Candidates(ids) => ids.as_slice(),
            Screened::Selected(_) => &[],
        })
        .collect();
    let values = exact_values(xc, d, w_enc, &cands);
    Some(Csr::from_rows(
        rows.into_par_iter()
            .zip(values)
            .map(|(row, vals)| match row {
                Screened::Candidates(ids) => {
                    let cand = ids
                        .iter()
                        .zip(vals)
                        .map(|(&j, v)| (j, v + b_enc[j as usize]))
                        .collect();
                    keep(cand, rule)
                }
                Screened::Selected(selected) => selected,
            })
            .collect(),
    ))
}

/// A row after the screen.
enum Screened {
    /// The latents that could be selected (their f32 values decide).
    Candidates(Vec<u32>),
    /// The selection itself (a band too dense to screen went through the f32 GEMM).
    Selected(Vec<(u32, f32)>),
}

/// Rows whose candidates are computed together, latent by latent: their `x` rows (768 KiB at
/// d = 384) stay in L2 while each candidate latent's `W_enc` row is read once per group, where
/// row by row it would be fetched once per candidate (≈ 50 × 1.5 KiB per row from L3).
const GROUP_ROWS: usize = 512;

/// `xc[i] · w_enc[j]` for each candidate `j` of each row `i` (see [`GROUP_ROWS`]).
fn exact_values(xc: &[f32], d: usize, w_enc: &[f32], cands: &[&[u32]]) -> Vec<Vec<f32>> {
    let s = w_enc.len() / d.max(1);
    cands
        .par_chunks(GROUP_ROWS)
        .enumerate()
        .flat_map_iter(|(g, rows)| {
            let x = &xc[g * GROUP_ROWS * d..];
            // Counting sort of the group's (row, slot) pairs by latent.
            let mut start = vec![0u32; s + 1];
            for &j in rows.iter().copied().flatten() {
                start[j as usize + 1] += 1;
            }
            for j in 0..s {
                start[j + 1] += start[j];
            }
            let mut next = start.clone();
            let mut pairs = vec![(0u32, 0u32); start[s] as usize];
            for (r, row) in rows.iter().enumerate() {
                for (slot, &j) in row.iter().enumerate() {
                    pairs[next[j as usize] as usize] = (r as u32, slot as u32);
                    next[j as usize] += 1;
                }
            }
            let mut vals: Vec<Vec<f32>> = rows.iter().map(|r| vec![0f32; r.len()]).collect();
            for j in 0..s {
                let w = &w_enc[j * d..(j + 1) * d];
                for &(r, slot) in &pairs[start[j] as usize..start[j + 1] as usize] {
                    let r = r as usize;
                    vals[r][slot as usize] = exact(&x[r * d..(r + 1) * d], w);
                }
            }
            vals
        })
        .collect()
}

/// One band of rows: each row's candidates, from the estimates `est` (`[rows, s]`, no bias) —
/// or, for a band too dense to screen, its selection on the f32 GEMM's values.
#[allow(clippy::too_many_arguments)]
fn screen_band(
    xc: &[f32],
    d: usize,
    w_enc: &[f32],
    b_enc: &[f32],
    rule: Rule,
    row0: usize,
    est: &mut [f32],
    bounds: &Bounds,
) -> Vec<Screened> {
    let s = b_enc.len();
    let rows = est.len() / s;
    let (mut lo, mut hi) = (vec![0f32; s], vec![0f32; s]);
    let candidates: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            let row = &est[r * s..(r + 1) * s];
            bounds.fill(row0 + r, b_enc, &mut lo, &mut hi);
            above_row_biased(row, &hi, threshold(row, &lo, rule))
                .into_iter()
                .map(|e| e.0)
                .collect()
        })
        .collect();
    if candidates.iter().map(Vec::len).sum::<usize>() * 8 <= rows * s {
        return candidates.into_iter().map(Screened::Candidates).collect();
    }
    let x_rows = &xc[row0 * d..(row0 + rows) * d];
    gemm(
        rows,
        s,
        d,
        est,
        0,
        s,
        Mat::rows(x_rows, d),
        Mat::t(w_enc, d),
        false,
    );
    (0..rows)
        .map(|r| {
            let row = &est[r * s..(r + 1) * s];
            Screened::Selected(match rule {
                Rule::TopK(k) => topk_row_biased(row, b_enc, k),
                Rule::Positive => above_row_biased(row, b_enc, 0.0),
            })
        })
        .collect()
}

/// The value an entry's upper bound (`est + hi`) must exceed to be a candidate of its row,
/// given the lower bounds `est + lo`.
fn threshold(est: &[f32], lo: &[f32], rule: Rule) -> f32 {
    // An entry whose upper bound is < 0 is ≤ 0 exactly: never kept.
    let floor = -f32::MIN_POSITIVE;
    match rule {
        Rule::Positive => floor,
        Rule::TopK(k) => {
            let top = topk_row_biased(est, lo, k);
            match top.iter().map(|e| e.1).reduce(f32::min) {
                // k lower bounds ≥ kth > 0: an entry whose upper bound is below kth is below k
                // others exactly (2⁻¹⁹: the roundings of the two sums).
                Some(kth) if top.len() == k => kth * (1.0 - 2f32.powi(-19)),
                // Fewer than k: the k-th largest value may be ≤ 0, so positivity decides.
                _ => floor,
            }
        }
    }
}

/// The selection among a row's candidates (by id, with their f32 values).
fn keep(mut cand: Vec<(u32, f32)>, rule: Rule) -> Vec<(u32, f32)> {
    cand.retain(|&(_, v)| v > 0.0);
    if let Rule::TopK(k) = rule {
        if cand.len() > k {
            cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
            cand.sort_unstable_by_key(|&(i, _)| i);
        }
    }
    cand
}

/// The bound for row `i` and latent `j`, the smaller of two:
/// - from the operands' actual rounding residuals (`x − x̃` and `w − w̃` are known):
///   `x·w − x̃·w̃ = (x − x̃)·w + x̃·(w − w̃)`, so by Cauchy–Schwarz
///   `|e − ê| ≤ ‖x − x̃‖‖w‖ + ‖x̃‖‖w − w̃‖` (plus both f32 sums' `γ_d ‖x̃‖‖w̃‖`) — per latent,
///   and about half the worst case, as residuals are not all half a step;
/// - the module docs' row-wide bound (worst-case rounding, the best Hölder pair over all
///   latents).
///
/// With `t_i` the subnormals' term; all rounded up. (On a trained SAE, whose encoder rows
/// differ 3× in norm, the per-latent form admits half the candidates of the row-wide one.)
struct Bounds {
    /// `[‖w_j‖₂, ‖w_j − w̃_j‖₂]` per latent.
    cols: Vec<[f32; 2]>,
    /// `[‖x − x̃‖ + 2γ_d‖x̃‖(1 + 2⁻⁸), ‖x̃‖, t, row-wide B]` per row.
    rows: Vec<[f32; 4]>,
}

impl Bounds {
    /// `lo_j = b_j − B_ij`, `hi_j = b_j + B_ij` for row `i`, each widened by the f32 roundings
    /// of the additions (2⁻²⁰ of the bound, 2⁻²² of the bias).
    fn fill(&self, i: usize, bias: &[f32], lo: &mut [f32], hi: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::util::simd::has_avx512() {
            // SAFETY: the processor has AVX-512F (checked at run time).
            return unsafe { self.fill_avx512(i, bias, lo, hi) };
        }
        self.fill_plain(i, bias, lo, hi)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn fill_avx512(&self, i: usize, bias: &[f32], lo: &mut [f32], hi: &mut [f32]) {
        self.fill_plain(i, bias, lo, hi)
    }

    #[inline(always)]
    fn fill_plain(&self, i: usize, bias: &[f32], lo: &mut [f32], hi: &mut [f32]) {
        let [dx, xt, t, b_row] = self.rows[i];
        let it = lo.iter_mut().zip(hi.iter_mut()).zip(bias).zip(&self.cols);
        for (((l, h), &b), &[w, dw]) in it {
            let cs = dx * w + xt * dw + t;
            let bij = if cs < b_row { cs } else { b_row };
            let bij = bij * (1.0 + 2f32.powi(-20)) + b.abs() * 2f32.powi(-22);
            (*l, *h) = (b - bij, b + bij);
        }
    }
}

/// The [`Bounds`] of `xc` (`[n, d]`) against `w_enc` (`[s, d]`); None when an input or a
/// bound is not finite.
fn bounds(xc: &[f32], d: usize, w_enc: &[f32]) -> Option<Bounds> {
    let w_norms: Vec<[f64; 4]> = w_enc.par_chunks(d).map(norms).collect();
    // A NaN row must not vanish in the max: the check below sees it.
    let finite = w_norms.iter().flatten().all(|v| v.is_finite());
    let w_max = w_norms.iter().fold([0f64; 3], |a, b| {
        [a[0].max(b[0]), a[1].max(b[1]), a[2].max(b[2])]
    });
    // bf16 keeps 8 significant bits: round to nearest errs by at most 2⁻⁸ relative.
    let (u, eps) = (2f64.powi(-8), 2f64.powi(-24));
    let gamma = d as f64 * eps / (1.0 - d as f64 * eps);
    let c = 2.0 * u + u * u + 2.0 * gamma;
    let tiny = 2f64.powi(-126);
    // Past the f32 sums' error (≤ γ_d each, x's and w's) and the casts.
    let up = 1.0 + 2.0 * (d as f64 + 2.0) * 2f64.powi(-22);
    let rows: Vec<[f32; 4]> = xc
        .par_chunks(d)
        .map(|x| {
            let [l2, l1, inf, res] = norms(x);
            let sum_abs = (l2 * w_max[0]).min(l1 * w_max[2]).min(inf * w_max[1]);
            let t = (d as f64 + 2.0 + l1 + w_max[1]) * tiny;
            let xt = l2 + res;
            [
                ((res + 2.0 * gamma * xt * (1.0 + u)) * up) as f32,
                (xt * up) as f32,
                (t * up) as f32,
                ((c * sum_abs + t) * up) as f32,
            ]
        })
        .collect();
    let cols = w_norms
        .iter()
        .map(|n| [(n[0] * up) as f32, (n[3] * up) as f32])
        .collect();
    (finite
        && rows
            .iter()
            .all(|r| r.iter().all(|v| v.is_finite() && *v * 8.0 < f32::MAX)))
    .then_some(Bounds { cols, rows })
}

/// `(‖v‖₂, ‖v‖₁, ‖v‖∞, ‖v − ṽ‖₂)` with `ṽ` = `v` rounded to bf16: f32 sums in 16 lanes,
/// each within `γ_d` of its value (covered by [`bounds`]' rounding up). NaN anywhere makes
/// `‖v‖₁` NaN (the max alone would skip it).
fn norms(v: &[f32]) -> [f64; 4] {
    #[cfg(target_arch = "x86_64")]
    if crate::util::simd::has_avx512() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { norms_avx512(v) };
    }
    norms_plain(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn norms_avx512(v: &[f32]) -> [f64; 4] {
    norms_plain(v)
}

#[inline(always)]
fn norms_plain(v: &[f32]) -> [f64; 4] {
    let (mut l2, mut l1, mut inf, mut res) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let mut lanes = |c: &[f32]| {
        for t in 0..c.len() {
            let (x, a) = (c[t], c[t].abs());
            // Round to nearest even on the bits, as the packing rounds.
            let b = x.to_bits();
            let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
            l2[t] += a * a;
            l1[t] += a;
            inf[t] = if a > inf[t] { a } else { inf[t] };
            res[t] += (x - r) * (x - r);
        }
    };
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        lanes(c);
    }
    lanes(tail);
    let sum = |l: [f32; 16]| l.iter().map(|&v| f64::from(v)).sum::<f64>();
    [
        sum(l2).sqrt(),
        sum(l1),
        inf.iter().fold(0f64, |m, &v| m.max(f64::from(v))),
        sum(res).sqrt(),
    ]
}

/// `x · w` in f32 (linalg's fixed-order dot): the value a candidate is selected on.
fn exact(x: &[f32], w: &[f32]) -> f32 {
    super::linalg::dot(x, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::amx::tests::rnd;

    /// The selection of every entry computed as the screen computes a candidate.
    fn reference(xc: &[f32], n: usize, w: &[f32], b: &[f32], rule: Rule) -> Vec<Vec<(u32, f32)>> {
        let (s, d) = (b.len(), xc.len() / n);
        (0..n)
            .map(|i| {
                let all: Vec<(u32, f32)> = (0..s)
                    .map(|j| {
                        (
                            j as u32,
                            exact(&xc[i * d..(i + 1) * d], &w[j * d..(j + 1) * d]) + b[j],
                        )
                    })
                    .collect();
                keep(all, rule)
            })
            .collect()
    }

    fn rows(c: &Csr) -> Vec<Vec<(u32, f32)>> {
        (0..c.n_rows())
            .map(|r| {
                let (i, v) = c.row(r);
                i.iter().copied().zip(v.iter().copied()).collect()
            })
            .collect()
    }

    /// Equal to the selection of all entries, bit for bit — on random rows, and on latents made
    /// near-duplicates of one another (their values closer than the bf16 error, so the order
    /// among them is decided only by the f32 values), whatever kernel this processor runs.
    #[test]
    fn selects_what_the_exact_values_select() {
        let (n, d, s) = (600, 96, 640);
        let xc = rnd(n * d, 1);
        let mut w = rnd(s * d, 2);
        // Latents 0..160: 16 clusters of 10 near-copies, 1e-4 apart (bf16 resolves 4e-3).
        for j in 0..160 {
            let (base, twin) = (j / 10 * 10, j % 10);
            for t in 0..d {
                w[j * d + t] = w[base * d + t] * (1.0 + 1e-4 * twin as f32);
            }
        }
        let b: Vec<f32> = rnd(s, 3).iter().map(|v| v * 0.5).collect();
        // (Values have std ≈ 3.3: ReLU with b − 6 keeps about 3% of them.)
        let b_sparse: Vec<f32> = b.iter().map(|v| v - 6.0).collect();
        for (rule, b) in [
            (Rule::TopK(32), &b),
            (Rule::TopK(5), &b),
            (Rule::TopK(1), &b_sparse),
            (Rule::Positive, &b_sparse),
        ] {
            let got = select(&xc, n, &w, b, rule).expect("finite inputs");
            let want = reference(&xc, n, &w, b, rule);
            assert_eq!(rows(&got), want, "{rule:?}");
            assert!(want.iter().any(|r| !r.is_empty()));
        }
        // A ReLU row band too dense to screen (bias +3: most entries positive) goes through
        // the f32 GEMM: the same selection up to its own f32 rounding.
        let b_dense = vec![3f32; s];
        let got = rows(&select(&xc, n, &w, &b_dense, Rule::Positive).expect("finite inputs"));
        let want = reference(&xc, n, &w, &b_dense, Rule::Positive);
        for (g, w) in got.iter().zip(&want) {
            let (g, w): (
                std::collections::HashMap<u32, f32>,
                std::collections::HashMap<_, _>,
            ) = (g.iter().copied().collect(), w.iter().copied().collect());
            // Entries within f32 rounding (≈1e-6 of the terms, |x·w| ≲ 20) of zero may differ;
            // every other one is the same.
            for (j, v) in w.iter().filter(|e| *e.1 > 1e-4) {
                assert!((g[j] - v).abs() <= 1e-4, "latent {j}: {} vs {v}", g[j]);
            }
            assert!(g.iter().all(|(j, v)| *v <= 1e-4 || w.contains_key(j)));
            assert!(g.len() * 2 > s);
        }
    }

    /// Where every operand rounds down by almost half a bf16 step (x = w = 1 + 2⁻⁸ − 2⁻²⁰ all
    /// become 1), the estimate's error reaches 2⁻⁷ Σ|x w|: the bound covers it, and is attained
    /// to within 1% (a bound built on half of bf16's unit roundoff would fail here).
    #[test]
    fn the_bound_covers_errors_that_all_align() {
        let d = 64;
        let v = 1.0 + 2f32.powi(-8) - 2f32.powi(-20);
        let (xc, mut w) = (vec![v; d], vec![v; 2 * d]);
        w[d..].fill(0.5);
        let b = bounds(&xc, d, &w).expect("finite");
        let packed = PackedB::from_rows(&w, 2, d);
        let est = map_bands(&xc, 1, &packed, &|_, band: &mut [f32]| band[0]);
        let exact = d as f64 * f64::from(v) * f64::from(v);
        let err = (exact - f64::from(est[0])).abs();
        let (mut lo, mut hi) = (vec![0f32; 2], vec![0f32; 2]);
        b.fill(0, &[0.0, 0.0], &mut lo, &mut hi);
        let bound = f64::from(hi[0]);
        assert!(err <= bound, "error {err} above the bound {bound}");
        assert!(err >= 0.99 * bound, "error {err}, bound {bound}");
    }

    #[test]
    fn non_finite_inputs_are_left_to_the_f32_path() {
        let (n, d, s) = (4, 64, 32);
        let (xc, w) = (rnd(n * d, 1), rnd(s * d, 2));
        assert!(select(&xc, n, &w, &vec![0.0; s], Rule::Positive).is_some());
        for (at_x, v) in [(true, f32::NAN), (false, f32::NAN), (true, f32::INFINITY)] {
            let (mut xc, mut w) = (xc.clone(), w.clone());
            *if at_x { &mut xc[5] } else { &mut w[70] } = v;
            assert!(select(&xc, n, &w, &vec![0.0; s], Rule::Positive).is_none());
        }
    }
}
