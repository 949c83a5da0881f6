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

/// The `(id, row[i] + bias[i])` of one row whose value exceeds `threshold`, by id.
pub(crate) fn above_row_biased(row: &[f32], bias: &[f32], threshold: f32) -> Vec<(u32, f32)> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { above_biased_avx512(row, bias, threshold) };
    }
    row.iter()
        .zip(bias)
        .enumerate()
        .map(|(i, (&v, &b))| (i as u32, v + b))
        .filter(|&(_, v)| v > threshold)
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn above_biased_avx512(row: &[f32], bias: &[f32], threshold: f32) -> Vec<(u32, f32)> {
    use std::arch::x86_64::*;
    let mut out = Vec::new();
    let n = row.len().min(bias.len());
    let thr = _mm512_set1_ps(threshold);
    for c in 0..n / 16 {
        // SAFETY: 16 values from 16c lie inside both slices; unaligned loads.
        let x = unsafe {
            _mm512_add_ps(
                _mm512_loadu_ps(row.as_ptr().add(16 * c)),
                _mm512_loadu_ps(bias.as_ptr().add(16 * c)),
            )
        };
        let mut m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, thr);
        if m != 0 {
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), x) };
            while m != 0 {
                let j = m.trailing_zeros() as usize;
                out.push(((16 * c + j) as u32, lanes[j]));
                m &= m - 1;
            }
        }
    }
    for i in n / 16 * 16..n {
        let v = row[i] + bias[i];
        if v > threshold {
            out.push((i as u32, v));
        }
    }
    out
}

/// [`select_topk`] of `pre + bias` per row (see [`select_above_biased`]).
pub(crate) fn select_topk_biased(pre: &[f32], s: usize, k: usize, bias: &[f32]) -> Csr {
    Csr::from_rows(
        pre.par_chunks(s)
            .map(|r| topk_row_biased(r, bias, k))
            .collect(),
    )
}

/// The top `k` positive values of one row of `row + bias` (as [`topk_row`]).
pub(crate) fn topk_row_biased(row: &[f32], bias: &[f32], k: usize) -> Vec<(u32, f32)> {
    #[cfg(target_arch = "x86_64")]
    if k <= 48 && has_avx512() && bias.len() == row.len() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { topk_row_avx512(row, Some(bias), k) };
    }
    let biased: Vec<f32> = row.iter().zip(bias).map(|(v, b)| v + b).collect();
    topk_row(&biased, k, None)
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

/// Top `k` of one row by value (ties: lower id first), as (id, value) sorted by id; only
/// positive values are kept (TopK then ReLU). `mask`: only latents with `mask[i]` compete.
fn topk_row(row: &[f32], k: usize, mask: Option<&[bool]>) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let allowed = |i: usize| mask.is_none_or(|m| m[i]);
    if k > 48 {
        // Large k (AuxK): select among the candidates, then order by id. The comparator is a
        // total order (value desc, id asc), so the result is deterministic.
        let mut cand = positive_allowed(row, mask);
        let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if cand.len() > k {
            cand.select_nth_unstable_by(k - 1, by);
            cand.truncate(k);
        }
        cand.sort_unstable_by_key(|&(i, _)| i);
        return cand;
    }
    #[cfg(target_arch = "x86_64")]
    if mask.is_none() && has_avx512() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { topk_row_avx512(row, None, k) };
    }
    // Kept sorted descending by value; `thr` is the smallest kept value once full.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut thr = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v <= thr || v <= 0.0 || !allowed(i) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        if best.len() > k {
            best.pop();
        }
        if best.len() == k {
            thr = best[k - 1].1;
        }
    }
    best.sort_unstable_by_key(|&(i, _)| i);
    best
}

/// The `(id, value)` of a row's positive values (among `mask`'s latents), by id.
fn positive_allowed(row: &[f32], mask: Option<&[bool]>) -> Vec<(u32, f32)> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && mask.is_none_or(|m| m.len() == row.len()) {
        // SAFETY: the processor has AVX-512F (checked at run time); the mask is as long.
        return unsafe { positive_allowed_avx512(row, mask) };
    }
    row.iter()
        .enumerate()
        .filter(|&(i, &v)| v > 0.0 && mask.is_none_or(|m| m[i]))
        .map(|(i, &v)| (i as u32, v))
        .collect()
}

/// [`positive_allowed`] 16 values at a time, without branches: each chunk's kept lanes are
/// compressed into the output (the scalar filter mispredicts on every other value of a row
/// whose signs are random, as AuxK's dead latents' are).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn positive_allowed_avx512(row: &[f32], mask: Option<&[bool]>) -> Vec<(u32, f32)> {
    use std::arch::x86_64::*;
    let len = row.len();
    let (mut ids, mut vals) = (vec![0u32; len + 16], vec![0f32; len + 16]);
    let mut m = 0;
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for c in 0..len / 16 {
        // SAFETY: 16 values (and mask bytes) from 16c lie inside the row (and the mask); the
        // stores write at most 16 values from m ≤ 16c inside the len + 16 buffers.
        unsafe {
            let x = _mm512_loadu_ps(row.as_ptr().add(16 * c));
            let mut keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
            if let Some(mask) = mask {
                let bytes = _mm_loadu_si128(mask.as_ptr().add(16 * c) as *const __m128i);
                keep &= _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(1));
            }
            let at = _mm512_add_epi32(iota, _mm512_set1_epi32((16 * c) as i32));
            _mm512_mask_compressstoreu_ps(vals.as_mut_ptr().add(m) as *mut _, keep, x);
            _mm512_mask_compressstoreu_epi32(ids.as_mut_ptr().add(m) as *mut _, keep, at);
            m += keep.count_ones() as usize;
        }
    }
    for i in len / 16 * 16..len {
        if row[i] > 0.0 && mask.is_none_or(|mk| mk[i]) {
            (ids[m], vals[m]) = (i as u32, row[i]);
            m += 1;
        }
    }
    ids[..m]
        .iter()
        .copied()
        .zip(vals[..m].iter().copied())
        .collect()
}

/// [`topk_row`] without a mask, 16 values at a time: a chunk is skipped unless one of its values
/// beats the current cut (after the first few chunks, almost none does); its candidates are
/// inserted in id order, as the scalar loop does, so ties resolve the same way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn topk_row_avx512(row: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<(u32, f32)> {
    use std::arch::x86_64::*;
    // The values are `row + bias` (the encoder's b_enc added here instead of in the GEMM).
    let load = |at: usize| {
        // SAFETY: callers pass 16 values from `at` inside the row (and the bias, as long).
        unsafe {
            let x = _mm512_loadu_ps(row.as_ptr().add(at));
            match bias {
                Some(b) => _mm512_add_ps(x, _mm512_loadu_ps(b.as_ptr().add(at))),
                None => x,
            }
        }
    };
    let value = |i: usize| row[i] + bias.map_or(0.0, |b| b[i]);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    // Kept iff v > cut: cut = max(smallest kept value once full, 0). It starts just below a
    // lower bound of the k-th largest value (so almost only the final winners are offered,
    // instead of every new maximum of the first chunks).
    let mut cut =
        topk_lower_bound_avx512(row.len(), &load, k).map_or(0.0, |b| next_down(b).max(0.0));
    let mut offer = |i: usize, v: f32, cut: &mut f32| {
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        if best.len() > k {
            best.pop();
        }
        if best.len() == k {
            *cut = best[k - 1].1.max(0.0);
        }
    };
    let base = row.len() / 16 * 16;
    for c in 0..row.len() / 16 {
        let x = load(16 * c);
        let mut m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(cut));
        if m != 0 {
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), x) };
            while m != 0 {
                let j = m.trailing_zeros() as usize;
                offer(c * 16 + j, lanes[j], &mut cut);
                // The later lanes that still beat the (possibly raised) cut.
                m &= m.wrapping_sub(1) & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(cut));
            }
        }
    }
    for i in base..row.len() {
        let v = value(i);
        if v > cut {
            offer(i, v, &mut cut);
        }
    }
    best.sort_unstable_by_key(|&(i, _)| i);
    best
}

/// A value ≤ the `k`-th largest of a row of `len` values (`load(at)`: the 16 from `at`): the lanes of each of `g` runs of 16-value chunks
/// are `16·g` disjoint sets, and the `k`-th largest of their maxima has at least `k` values of
/// the row at or above it. None when the row is too short for `16·g ≥ 4k` sets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn topk_lower_bound_avx512(
    len: usize,
    load: &impl Fn(usize) -> std::arch::x86_64::__m512,
    k: usize,
) -> Option<f32> {
    use std::arch::x86_64::*;
    let chunks = len / 16;
    let g = (4 * k).div_ceil(16).max(1);
    if k == 0 || chunks < 2 * g {
        return None;
    }
    let mut maxima = vec![f32::NEG_INFINITY; 16 * g];
    for (run, out) in maxima.chunks_exact_mut(16).enumerate() {
        let (c0, c1) = (run * chunks / g, (run + 1) * chunks / g);
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in c0..c1 {
            m = _mm512_max_ps(m, load(16 * c));
        }
        // SAFETY: `out` holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), m) };
    }
    let (_, kth, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    Some(*kth)
}

/// The largest float below `x` (finite `x`); `x` itself otherwise.
fn next_down(x: f32) -> f32 {
    if !x.is_finite() || x == 0.0 {
        return if x == 0.0 { -f32::from_bits(1) } else { x };
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b - 1 } else { b + 1 })
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
            let mut want: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > 0.0)
                .map(|(i, &v)| (i as u32, v))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(k);
            want.sort_unstable_by_key(|&(i, _)| i);
            assert_eq!(
                topk_row(&row, k, None),
                want,
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
