//! CPU kernels for SAE training: dense GEMM through the `gemm` crate (AVX-512 microkernels,
//! rayon), the sparse code `f` as compressed rows ([`Csr`]) and their transpose, and the
//! selections that make `f` sparse (ReLU / threshold, per-row top-k, batch top-k).
//!
//! Everything is deterministic: parallel loops write disjoint outputs, reductions run in a
//! fixed order.
//!
//! ```text
//! gemm(m, n, k, out, 0, n, Mat::rows(a, k), Mat::t(b, k), false);  // out = a · bᵀ
//! let f = select_topk(&pre_bs, s, 32);                           // ≤ 32 entries per row
//! ```

use rayon::prelude::*;

use super::row_select::{above_row_biased, topk_row, topk_row_biased};
use crate::util::simd::{has_avx2_fma, has_avx512};

/// A matrix operand: `data[off + i·rs + j·cs]` is element `(i, j)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `[rows, cols]` as stored (`cols` = row stride).
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            off: 0,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a stored row-major matrix with `cols` columns.
    pub fn t(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            off: 0,
            rs: 1,
            cs: cols,
        }
    }
    /// Shift the origin by `off` elements (a sub-block).
    pub fn at(mut self, off: usize) -> Self {
        self.off += off;
        self
    }
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || self.off + (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `out[m, n] (+)= a[m, k] · b[k, n]`; `out` is row-major with row stride `out_rs` from
/// element `out_off`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    out_off: usize,
    out_rs: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
) {
    assert!(
        a.fits(m, k)
            && b.fits(k, n)
            && (m == 0 || n == 0 || out_off + (m - 1) * out_rs + n <= out.len()),
        "gemm operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                out[out_off + i * out_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    // SAFETY: the assert above bounds every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(out_off),
            1,
            out_rs as isize,
            accumulate,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// Sparse rows: row `r` holds `idx[ptr[r]..ptr[r+1]]` (ascending latent ids) and their values.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Csr {
    pub ptr: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

impl Csr {
    pub fn n_rows(&self) -> usize {
        self.ptr.len().saturating_sub(1)
    }
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.ptr[r], self.ptr[r + 1]);
        (&self.idx[a..b], &self.val[a..b])
    }

    /// Build from per-row lists (already sorted by latent id).
    pub(crate) fn from_rows(rows: Vec<Vec<(u32, f32)>>) -> Self {
        let mut ptr = Vec::with_capacity(rows.len() + 1);
        ptr.push(0);
        let nnz: usize = rows.iter().map(Vec::len).sum();
        let (mut idx, mut val) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
        for r in rows {
            for (i, v) in r {
                idx.push(i);
                val.push(v);
            }
            ptr.push(idx.len());
        }
        Self { ptr, idx, val }
    }

    /// Dense `[rows, n_cols]` copy.
    pub fn to_dense(&self, n_cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n_rows() * n_cols];
        out.par_chunks_mut(n_cols.max(1))
            .enumerate()
            .for_each(|(r, o)| {
                let (ix, vs) = self.row(r);
                for (&i, &v) in ix.iter().zip(vs) {
                    o[i as usize] = v;
                }
            });
        out
    }

    /// Column view: for latent `s`, `entries[cptr[s]..cptr[s+1]]` are positions into this
    /// matrix's `idx`/`val` (rows ascending).
    pub fn transpose(&self, n_cols: usize) -> Transposed {
        let mut cptr = vec![0usize; n_cols + 1];
        for &i in &self.idx {
            cptr[i as usize + 1] += 1;
        }
        for s in 0..n_cols {
            cptr[s + 1] += cptr[s];
        }
        let mut fill = cptr.clone();
        let mut rows = vec![0u32; self.nnz()];
        let mut pos = vec![0u32; self.nnz()];
        for r in 0..self.n_rows() {
            for p in self.ptr[r]..self.ptr[r + 1] {
                let s = self.idx[p] as usize;
                rows[fill[s]] = r as u32;
                pos[fill[s]] = p as u32;
                fill[s] += 1;
            }
        }
        Transposed { cptr, rows, pos }
    }
}

/// The column (per-latent) view of a [`Csr`].
pub(crate) struct Transposed {
    pub cptr: Vec<usize>,
    pub rows: Vec<u32>,
    pub pos: Vec<u32>,
}

/// Rows of `pre` (`[n, s]`) kept where `value > threshold` (ReLU: threshold 0).
pub(crate) fn select_above(pre: &[f32], s: usize, threshold: f32) -> Csr {
    let rows = pre
        .par_chunks(s)
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, &v)| v > threshold)
                .map(|(i, &v)| (i as u32, v))
                .collect::<Vec<_>>()
        })
        .collect();
    Csr::from_rows(rows)
}

/// [`select_above`] (threshold 0) of `pre + bias` per row, for a `pre` computed without the
/// encoder bias: the bias is added as the rows are scanned, 16 values at a time.
pub(crate) fn select_above_biased(pre: &[f32], s: usize, bias: &[f32]) -> Csr {
    Csr::from_rows(
        pre.par_chunks(s)
            .map(|row| above_row_biased(row, bias, 0.0))
            .collect(),
    )
}

/// [`select_topk`] of `pre + bias` per row (see [`select_above_biased`]).
pub(crate) fn select_topk_biased(pre: &[f32], s: usize, k: usize, bias: &[f32]) -> Csr {
    Csr::from_rows(
        pre.par_chunks(s)
            .map(|r| topk_row_biased(r, bias, k))
            .collect(),
    )
}

/// Per row, the latents whose value exceeds their own threshold (`thresholds[i]`, JumpReLU).
pub(crate) fn select_above_each(pre: &[f32], s: usize, thresholds: &[f32]) -> Csr {
    let rows = pre
        .par_chunks(s)
        .map(|row| {
            row.iter()
                .zip(thresholds)
                .enumerate()
                .filter(|(_, (&v, &t))| v > t)
                .map(|(i, (&v, _))| (i as u32, v))
                .collect::<Vec<_>>()
        })
        .collect();
    Csr::from_rows(rows)
}

/// Which entries of `row` a TopK(k) code keeps (top k positive values, ties by lower id).
pub(crate) fn topk_keep_mask(row: &[f32], k: usize) -> Vec<bool> {
    let mut keep = vec![false; row.len()];
    for (i, _) in topk_row(row, k, None) {
        keep[i as usize] = true;
    }
    keep
}

/// Per-row top-k of `pre` (`[n, s]`), ReLU'd.
pub(crate) fn select_topk(pre: &[f32], s: usize, k: usize) -> Csr {
    Csr::from_rows(pre.par_chunks(s).map(|r| topk_row(r, k, None)).collect())
}

/// Per-row top-k of `pre` among latents with `mask[i]` (AuxK over dead latents), ReLU'd.
pub(crate) fn select_topk_masked(pre: &[f32], s: usize, k: usize, mask: &[bool]) -> Csr {
    Csr::from_rows(
        pre.par_chunks(s)
            .map(|r| topk_row(r, k, Some(mask)))
            .collect(),
    )
}

/// Batch top-k: the `k_total` largest positive values of the whole `[n, s]` matrix (ties at
/// the boundary kept by lowest flat index). Returns them and the smallest kept value.
///
/// One pass in the common case: a strided sample of the values gives a threshold low enough
/// that (with a wide margin) more than `k_total` values reach it; one pass collects those per
/// row, and the exact cut is chosen among them. When the sample misjudges (fewer than
/// `k_total` reach it), the exact radix selection runs: the result is the same either way.
pub(crate) fn select_batch_topk(pre: &[f32], s: usize, k_total: usize) -> (Csr, f32) {
    const STRIDE: usize = 61;
    if k_total == 0 || pre.len() < 64 * STRIDE {
        return select_batch_topk_exact(pre, s, k_total);
    }
    let mut sample: Vec<f32> = pre
        .iter()
        .step_by(STRIDE)
        .copied()
        .filter(|&v| v > 0.0)
        .collect();
    // The sample rank of the k_total-th value, with a margin of 25% + 4σ + 16.
    let expect = k_total as f64 * pre.len().div_ceil(STRIDE) as f64 / pre.len() as f64;
    let rank = (expect * 1.25 + 4.0 * expect.sqrt() + 16.0) as usize;
    if rank >= sample.len() {
        return select_batch_topk_exact(pre, s, k_total);
    }
    let (_, t_lo, _) = sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a));
    let t_lo = *t_lo;
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(s)
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, &v)| v >= t_lo && v > 0.0)
                .map(|(i, &v)| (i as u32, v))
                .collect()
        })
        .collect();
    let total: usize = rows.iter().map(Vec::len).sum();
    if total < k_total {
        return select_batch_topk_exact(pre, s, k_total);
    }
    // The exact cut among the candidates: value descending, then flat index ascending.
    let mut cand: Vec<(f32, usize)> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, row)| row.iter().map(move |&(i, v)| (v, r * s + i as usize)))
        .collect();
    let by = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let (_, &mut (cut_v, cut_i), _) = cand.select_nth_unstable_by(k_total - 1, by);
    let rows = rows
        .into_par_iter()
        .enumerate()
        .map(|(r, row)| {
            row.into_iter()
                .filter(|&(i, v)| v > cut_v || (v == cut_v && r * s + i as usize <= cut_i))
                .collect()
        })
        .collect();
    (Csr::from_rows(rows), cut_v)
}

/// [`select_batch_topk`] by radix selection on the values' bit patterns (three passes).
fn select_batch_topk_exact(pre: &[f32], s: usize, k_total: usize) -> (Csr, f32) {
    // Radix select on the bit patterns of positive floats (monotone in value): histogram the
    // top 16 bits, find the bin holding the k-th largest, then resolve inside that bin.
    const BINS: usize = 1 << 16;
    let chunk = pre
        .len()
        .div_ceil(4 * rayon::current_num_threads())
        .max(1 << 16);
    let hist = pre
        .par_chunks(chunk)
        .map(|c| {
            let mut h = vec![0u32; BINS];
            for &v in c {
                if v > 0.0 {
                    h[(v.to_bits() >> 16) as usize] += 1;
                }
            }
            h
        })
        .reduce(
            || vec![0u32; BINS],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        );
    let n_pos: usize = hist.iter().map(|&c| c as usize).sum();
    let k_total = k_total.min(n_pos);
    if k_total == 0 {
        let n = pre.len() / s.max(1);
        return (Csr::from_rows(vec![Vec::new(); n]), 0.0);
    }
    let (mut above, mut bin) = (0usize, BINS - 1);
    loop {
        if above + hist[bin] as usize >= k_total {
            break;
        }
        above += hist[bin] as usize;
        bin -= 1;
    }
    // Values in the boundary bin: take the (k_total − above) largest, ties by flat index.
    let need = k_total - above;
    let mut cand: Vec<(f32, usize)> = pre
        .par_chunks(chunk)
        .enumerate()
        .flat_map_iter(|(c, vs)| {
            vs.iter()
                .enumerate()
                .filter(|(_, &v)| v > 0.0 && (v.to_bits() >> 16) as usize == bin)
                .map(move |(i, &v)| (v, c * chunk + i))
                .collect::<Vec<_>>()
        })
        .collect();
    cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let (cut_v, cut_i) = (cand[need - 1].0, cand[need - 1].1);
    let keep = |v: f32, flat: usize| {
        let b = (v.to_bits() >> 16) as usize;
        v > 0.0 && (b > bin || (b == bin && (v > cut_v || (v == cut_v && flat <= cut_i))))
    };
    let rows = pre
        .par_chunks(s)
        .enumerate()
        .map(|(r, row)| {
            row.iter()
                .enumerate()
                .filter(|(i, &v)| keep(v, r * s + i))
                .map(|(i, &v)| (i as u32, v))
                .collect::<Vec<_>>()
        })
        .collect();
    (Csr::from_rows(rows), cut_v)
}

/// `out[r] += Σ_{(i, v) in row r} v · w[i]` for `w` `[s, d]` (`out` `[n, d]`).
pub(crate) fn sparse_rows_times(f: &Csr, vals: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
        let (a, b) = (f.ptr[r], f.ptr[r + 1]);
        for (&i, &v) in f.idx[a..b].iter().zip(&vals[a..b]) {
            let i = i as usize;
            axpy(v, &w[i * d..(i + 1) * d], o);
        }
    });
}

/// `y += a · x`.
#[inline]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { axpy_avx512(a, x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the processor has AVX2 and FMA (checked at run time).
        return unsafe { axpy_avx2(a, x, y) };
    }
    axpy_plain(a, x, y)
}

#[inline(always)]
fn axpy_plain(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn axpy_avx512(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_plain(a, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_plain(a, x, y)
}

/// `x · y`, accumulated in 8 lanes (vectorises; fixed order, deterministic: the same sums
/// whichever instruction set runs them).
#[inline]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the processor has AVX2 and FMA (checked at run time).
        return unsafe { dot_avx2(x, y) };
    }
    dot_plain(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    dot_plain(x, y)
}

#[inline(always)]
fn dot_plain(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for j in 0..8 {
            acc[j] += a[j] * b[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xr.iter().zip(yr) {
        s += a * b;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut o = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
            }
        }
        o
    }

    fn transpose(r: usize, c: usize, a: &[f32]) -> Vec<f32> {
        let mut t = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    #[test]
    fn gemm_layouts_match_naive() {
        let (m, n, k) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(m, n, k, &a, &b);
        let (at, bt) = (transpose(m, k, &a), transpose(k, n, &b));
        for am in [Mat::rows(&a, k), Mat::t(&at, m)] {
            for bm in [Mat::rows(&b, n), Mat::t(&bt, k)] {
                let mut o = vec![1f32; m * n];
                gemm(m, n, k, &mut o, 0, n, am, bm, true);
                for (x, y) in o.iter().zip(&want) {
                    assert!((x - (y + 1.0)).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn topk_and_batch_topk_known_cases() {
        let pre = [0.5, -1.0, 3.0, 2.0, 0.1, 0.0, 4.0, 1.0];
        let f = select_topk(&pre, 4, 2);
        assert_eq!(f.idx, vec![2, 3, 2, 3]);
        assert_eq!(f.val, vec![3.0, 2.0, 4.0, 1.0]);
        // Negative/zero values are never kept, even when k allows it.
        let f = select_topk(&[-1.0, 0.0, -2.0, 5.0], 4, 3);
        assert_eq!((f.idx.clone(), f.val.clone()), (vec![3], vec![5.0]));
        let (f, thr) = select_batch_topk(&pre, 4, 3);
        assert_eq!(
            (f.ptr.clone(), f.idx.clone()),
            (vec![0, 2, 3], vec![2, 3, 2])
        );
        assert_eq!(thr, 2.0);
        // Ties at the boundary: lowest flat index wins.
        let (f, thr) = select_batch_topk(&[1.0, 1.0, 1.0, 2.0], 2, 2);
        assert_eq!((f.idx, thr), (vec![0, 1], 1.0));
        // The sampled one-pass selection against the exact radix selection, on a matrix big
        // enough for the sample (with ties, negatives and a heavy tail).
        let (n, s_w) = (300, 257);
        let big: Vec<f32> = (0..n * s_w)
            .map(|i| {
                let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
                ((h % 2000) as f32 - 1000.0) / 100.0 * if h.is_multiple_of(7) { 3.0 } else { 1.0 }
            })
            .collect();
        for k in [1, 3, 32, 100, 5000] {
            let (a, ta) = select_batch_topk(&big, s_w, k);
            let (b, tb) = select_batch_topk_exact(&big, s_w, k);
            assert_eq!(
                (a.ptr, a.idx, a.val, ta),
                (b.ptr, b.idx, b.val, tb),
                "k {k}"
            );
        }
        let f = select_topk_masked(&pre, 4, 1, &[true, true, false, true]);
        assert_eq!(f.idx, vec![3, 3]);
        // Every path (AVX-512 where the processor has it) against sorting: value descending, id
        // ascending among ties, positive values only; rows with ragged tails and many ties.
        // (The first chunks' lower bound of the k-th value is exercised by the long rows: on
        // ties, on distinct values, and where it is ≤ 0.)
        let rows = [
            (6144, 32, 0),
            (100, 7, 0),
            (37, 48, 0),
            (15, 3, 0),
            (16, 16, 0),
        ]
        .into_iter()
        .chain([(6144, 32, 1), (3000, 20, 1), (6144, 32, 2), (6144, 32, 3)]);
        for (len, k, kind) in rows {
            let row: Vec<f32> = (0..len)
                .map(|i| match kind {
                    0 => ((i * 7919 + len) % 41) as f32 - 20.0,
                    1 => (i as f32 * 0.618).sin() * (1.0 + (i % 7) as f32),
                    2 => -1.0 - (i % 13) as f32,
                    _ => ((i * 31) % 97) as f32 / 97.0 - 0.995,
                })
                .collect();
            assert_eq!(
                topk_row(&row, k, None),
                crate::sae::row_select::tests::topk_by_sorting(&row, k),
                "len {len}, k {k}, kind {kind}"
            );
        }
        // The large-k path (AuxK's: compressed positive candidates, then a selection) against
        // sorting, with a mask, ragged tails and ties.
        for (len, k) in [(6144, 192), (1000, 60), (37, 50), (70, 49)] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 + len) % 211) as f32 / 10.0 - 10.0)
                .collect();
            let mask: Vec<bool> = (0..len).map(|i| i % 3 != 1).collect();
            let mut want: Vec<(u32, f32)> = (0..len)
                .filter(|&i| row[i] > 0.0 && mask[i])
                .map(|i| (i as u32, row[i]))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(k);
            want.sort_unstable_by_key(|&(i, _)| i);
            assert_eq!(topk_row(&row, k, Some(&mask)), want, "len {len}, k {k}");
        }
        // The large-k path (selection) agrees with the small-k path (insertion).
        let row: Vec<f32> = (0..500)
            .map(|i| ((i * 7919) % 503) as f32 - 100.0)
            .collect();
        let mask: Vec<bool> = (0..500).map(|i| i % 3 != 0).collect();
        let big = topk_row(&row, 60, Some(&mask));
        assert_eq!(big.len(), 60);
        assert!(topk_row(&row, 48, Some(&mask))
            .iter()
            .all(|e| big.contains(e)));
        let min_kept = big.iter().map(|e| e.1).fold(f32::INFINITY, f32::min);
        assert!((0..500)
            .filter(|&i| mask[i] && !big.iter().any(|e| e.0 == i as u32))
            .all(|i| row[i] <= min_kept));
    }

    /// The selections that add the encoder bias while scanning give the selections of the
    /// biased matrix, on every path (ties, ragged tails, k above the insertion path's).
    #[test]
    fn biased_selections_are_the_selections_of_the_sum() {
        for (n, s, k) in [(5, 6144, 32), (7, 100, 7), (3, 37, 60), (4, 15, 3)] {
            let pre: Vec<f32> = (0..n * s)
                .map(|i| ((i * 7919) % 83) as f32 / 10.0 - 4.0)
                .collect();
            let bias: Vec<f32> = (0..s)
                .map(|i| ((i * 31) % 17) as f32 / 20.0 - 0.5)
                .collect();
            let sum: Vec<f32> = pre
                .chunks_exact(s)
                .flat_map(|r| r.iter().zip(&bias).map(|(v, b)| v + b))
                .collect();
            let (a, b) = (
                select_topk_biased(&pre, s, k, &bias),
                select_topk(&sum, s, k),
            );
            assert_eq!(
                (a.ptr, a.idx, a.val),
                (b.ptr, b.idx, b.val),
                "topk [{n}, {s}] k {k}"
            );
            let (a, b) = (
                select_above_biased(&pre, s, &bias),
                select_above(&sum, s, 0.0),
            );
            assert_eq!(
                (a.ptr, a.idx, a.val),
                (b.ptr, b.idx, b.val),
                "above [{n}, {s}]"
            );
        }
    }

    #[test]
    fn transpose_lists_each_column() {
        let f = select_above(&[1.0, 0.0, 2.0, 0.0, 3.0, 4.0], 3, 0.0);
        let t = f.transpose(3);
        assert_eq!(t.cptr, vec![0, 1, 2, 4]);
        assert_eq!(t.rows, vec![0, 1, 0, 1]);
        let vals: Vec<f32> = t.pos.iter().map(|&p| f.val[p as usize]).collect();
        assert_eq!(vals, vec![1.0, 3.0, 2.0, 4.0]);
    }
}
