//! One row's selections for the SAE's sparse code — the values above a threshold (ReLU), the
//! top k positive values (TopK, AuxK) — scanned 16 values at a time with AVX-512 or AVX2 (chosen
//! at run time, [`Isa::best`]), and a scalar path for other processors. Every path returns the
//! same entries: `(id, value)` by id, ties at the k-th value broken by the lower id.
//!
//! The vector paths share one algorithm per selection; an instruction set only supplies "which of
//! these 16 values beat `t`" (one AVX-512 compare, or two AVX2 compares and a `movemask`), "the 16
//! values" and "the lane-wise maximum over a run of chunks". A chunk none of whose values beats
//! the current cut costs one compare, so after the first chunks of a row almost nothing else runs.
//!
//! ```text
//! let kept = topk_row_biased(&pre_row, &b_enc, 32);      // ≤ 32 (id, pre + b), by id
//! let fired = above_row_biased(&pre_row, &b_enc, 0.0);  // ReLU's support
//! ```

/// The vector instruction set a selection runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Scalar Rust (any processor).
    Plain,
    /// AVX2 and FMA (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512F (Skylake-SP, Zen 4 and later).
    Avx512,
}

impl Isa {
    /// The widest this processor has.
    pub(crate) fn best() -> Self {
        if crate::util::simd::has_avx512() {
            Isa::Avx512
        } else if crate::util::simd::has_avx2_fma() {
            Isa::Avx2
        } else {
            Isa::Plain
        }
    }

    /// Every path this processor can run (for tests that hold each to the scalar one).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        [Isa::Plain, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| match i {
                Isa::Plain => true,
                Isa::Avx2 => crate::util::simd::has_avx2_fma(),
                Isa::Avx512 => crate::util::simd::has_avx512(),
            })
            .collect()
    }
}

/// Above this k the top-k is a selection among the positive values instead of an insertion into
/// a sorted list.
const INSERTION_MAX_K: usize = 48;

/// The `(id, row[i] + bias[i])` of one row whose value exceeds `threshold`, by id.
pub(crate) fn above_row_biased(row: &[f32], bias: &[f32], threshold: f32) -> Vec<(u32, f32)> {
    above_on(Isa::best(), row, bias, threshold)
}

fn above_on(isa: Isa, row: &[f32], bias: &[f32], threshold: f32) -> Vec<(u32, f32)> {
    let n = row.len().min(bias.len());
    let (row, bias) = (&row[..n], &bias[..n]);
    match isa {
        // SAFETY (both): the processor has the instruction set (Isa::best / available).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::above_avx512(row, bias, threshold) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::above_avx2(row, bias, threshold) },
        _ => row
            .iter()
            .zip(bias)
            .enumerate()
            .map(|(i, (&v, &b))| (i as u32, v + b))
            .filter(|&(_, v)| v > threshold)
            .collect(),
    }
}

/// The top `k` positive values of one row of `row + bias` (as [`topk_row`]).
pub(crate) fn topk_row_biased(row: &[f32], bias: &[f32], k: usize) -> Vec<(u32, f32)> {
    topk_on(Isa::best(), row, Some(bias), k, None)
}

/// Top `k` of one row by value (ties: lower id first), as (id, value) sorted by id; only
/// positive values are kept (TopK then ReLU). `mask`: only latents with `mask[i]` compete.
pub(crate) fn topk_row(row: &[f32], k: usize, mask: Option<&[bool]>) -> Vec<(u32, f32)> {
    topk_on(Isa::best(), row, None, k, mask)
}

fn topk_on(
    isa: Isa,
    row: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    mask: Option<&[bool]>,
) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    if let Some(b) = bias.filter(|b| b.len() != row.len() || k > INSERTION_MAX_K) {
        // Rare shapes: add the bias first.
        let biased: Vec<f32> = row.iter().zip(b).map(|(v, b)| v + b).collect();
        return topk_on(isa, &biased, None, k, mask);
    }
    if k > INSERTION_MAX_K {
        // Large k (AuxK): select among the candidates, then order by id. The comparator is a
        // total order (value desc, id asc), so the result is deterministic.
        let mut cand = positive_on(isa, row, mask);
        let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if cand.len() > k {
            cand.select_nth_unstable_by(k - 1, by);
            cand.truncate(k);
        }
        cand.sort_unstable_by_key(|&(i, _)| i);
        return cand;
    }
    match (isa, mask) {
        // SAFETY (both): the processor has the instruction set; the bias is as long as the row.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, None) => unsafe { x86::topk_avx512(row, bias, k) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, None) => unsafe { x86::topk_avx2(row, bias, k) },
        _ => topk_plain(row, bias, k, mask),
    }
}

/// The scalar top-k: a list kept sorted descending by value; `thr` is its smallest value once
/// full.
fn topk_plain(
    row: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    mask: Option<&[bool]>,
) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut thr = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        let v = v + bias.map_or(0.0, |b| b[i]);
        // (Written so that NaN is skipped, as the vector paths' `>` compares skip it.)
        if !(v > thr && v > 0.0 && mask.is_none_or(|m| m[i])) {
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
fn positive_on(isa: Isa, row: &[f32], mask: Option<&[bool]>) -> Vec<(u32, f32)> {
    let vector = mask.is_none_or(|m| m.len() == row.len());
    match isa {
        // SAFETY (both): the processor has the instruction set; the mask is as long as the row.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if vector => unsafe { x86::positive_avx512(row, mask) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if vector => unsafe { x86::positive_avx2(row, mask) },
        _ => row
            .iter()
            .enumerate()
            .filter(|&(i, &v)| v > 0.0 && mask.is_none_or(|m| m[i]))
            .map(|(i, &v)| (i as u32, v))
            .collect(),
    }
}

/// The largest float below `x` (`f32::MAX` for +∞); `x` itself for −∞ and NaN.
fn next_down(x: f32) -> f32 {
    if x == f32::INFINITY {
        return f32::MAX;
    }
    if !x.is_finite() || x == 0.0 {
        return if x == 0.0 { -f32::from_bits(1) } else { x };
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b - 1 } else { b + 1 })
}

/// What a vector path supplies over a row's chunks of 16 values (value `i` = `row[i]` plus the
/// bias, if any): `gt(c, t)` has bit `j` set iff value `16c + j > t`; `lanes(c)` are the 16
/// values; `max(c0, c1)` is, per lane, the largest over chunks `c0..c1`.
struct Chunks<G, L, M> {
    gt: G,
    lanes: L,
    max: M,
}

impl<G, L, M> Chunks<G, L, M>
where
    G: Fn(usize, f32) -> u32,
    L: Fn(usize) -> [f32; 16],
    M: Fn(usize, usize) -> [f32; 16],
{
    /// The `(id, value)` of the values above `threshold` in the first `16·chunks`.
    #[inline(always)]
    fn above(&self, chunks: usize, threshold: f32, out: &mut Vec<(u32, f32)>) {
        for c in 0..chunks {
            let mut m = (self.gt)(c, threshold);
            if m != 0 {
                let lanes = (self.lanes)(c);
                while m != 0 {
                    let j = m.trailing_zeros() as usize;
                    out.push(((16 * c + j) as u32, lanes[j]));
                    m &= m - 1;
                }
            }
        }
    }

    /// The top `k` positive values of a row of `len` values, `value(i)` for the ragged tail.
    /// A chunk is skipped unless one of its values beats the current cut; its candidates are
    /// offered in id order, as the scalar loop does, so ties resolve the same way.
    #[inline(always)]
    fn topk(&self, len: usize, k: usize, value: impl Fn(usize) -> f32) -> Vec<(u32, f32)> {
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        // Kept iff v > cut: cut = max(smallest kept value once full, 0). It starts just below a
        // lower bound of the k-th largest value (so almost only the final winners are offered,
        // instead of every new maximum of the first chunks).
        let mut cut = self
            .kth_lower_bound(len, k)
            .map_or(0.0, |b| next_down(b).max(0.0));
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
        for c in 0..len / 16 {
            let mut m = (self.gt)(c, cut);
            if m != 0 {
                let lanes = (self.lanes)(c);
                while m != 0 {
                    let j = m.trailing_zeros() as usize;
                    offer(16 * c + j, lanes[j], &mut cut);
                    // The later lanes that still beat the (possibly raised) cut.
                    m &= m.wrapping_sub(1) & (self.gt)(c, cut);
                }
            }
        }
        for i in len / 16 * 16..len {
            let v = value(i);
            if v > cut {
                offer(i, v, &mut cut);
            }
        }
        best.sort_unstable_by_key(|&(i, _)| i);
        best
    }

    /// A value ≤ the `k`-th largest of a row of `len` values: the lanes of each of `g` runs of
    /// chunks are `16·g` disjoint sets, and the `k`-th largest of their maxima has at least `k`
    /// values of the row at or above it. None when the row is too short for `16·g ≥ 4k` sets.
    #[inline(always)]
    fn kth_lower_bound(&self, len: usize, k: usize) -> Option<f32> {
        let chunks = len / 16;
        let g = (4 * k).div_ceil(16).max(1);
        if k == 0 || chunks < 2 * g {
            return None;
        }
        let mut maxima = Vec::with_capacity(16 * g);
        for run in 0..g {
            maxima.extend((self.max)(run * chunks / g, (run + 1) * chunks / g));
        }
        // A NaN maximum stands for no value of its set (a lane set without one still bounds).
        maxima
            .iter_mut()
            .filter(|m| m.is_nan())
            .for_each(|m| *m = f32::NEG_INFINITY);
        let (_, kth, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        Some(*kth)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 and AVX2 front-ends of [`super::Chunks`] and the positive-value compressor.

    use std::arch::x86_64::*;

    use super::Chunks;

    /// The lanes of each 8-bit mask, packed to the front (AVX2 has no compress instruction).
    static COMPRESS: [[u32; 8]; 256] = {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut j, mut n) = (0, 0);
            while j < 8 {
                if m >> j & 1 == 1 {
                    t[m][n] = j as u32;
                    n += 1;
                }
                j += 1;
            }
            m += 1;
        }
        t
    };

    /// The 16 values of `row (+ bias)` from `at` (unaligned loads). Caller: 16 values from `at`
    /// lie inside the row (and the bias, as long).
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(row: &[f32], bias: Option<&[f32]>, at: usize) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            let x = _mm512_loadu_ps(row.as_ptr().add(at));
            match bias {
                Some(b) => _mm512_add_ps(x, _mm512_loadu_ps(b.as_ptr().add(at))),
                None => x,
            }
        }
    }

    /// [`load16`] as two halves of 8.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8x2(row: &[f32], bias: Option<&[f32]>, at: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            let (p, q) = (row.as_ptr().add(at), row.as_ptr().add(at + 8));
            let (x, y) = (_mm256_loadu_ps(p), _mm256_loadu_ps(q));
            match bias {
                Some(b) => [
                    _mm256_add_ps(x, _mm256_loadu_ps(b.as_ptr().add(at))),
                    _mm256_add_ps(y, _mm256_loadu_ps(b.as_ptr().add(at + 8))),
                ],
                None => [x, y],
            }
        }
    }

    macro_rules! chunks_avx512 {
        ($row:expr, $bias:expr) => {{
            let (row, bias): (&[f32], Option<&[f32]>) = ($row, $bias);
            // SAFETY (each closure): chunk c < len / 16 lies inside the row and the bias.
            Chunks {
                gt: move |c: usize, t: f32| unsafe {
                    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(load16(row, bias, 16 * c), _mm512_set1_ps(t))
                        as u32
                },
                lanes: move |c: usize| unsafe {
                    let mut l = [0f32; 16];
                    _mm512_storeu_ps(l.as_mut_ptr(), load16(row, bias, 16 * c));
                    l
                },
                max: move |c0: usize, c1: usize| unsafe {
                    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                    for c in c0..c1 {
                        m = _mm512_max_ps(m, load16(row, bias, 16 * c));
                    }
                    let mut l = [0f32; 16];
                    _mm512_storeu_ps(l.as_mut_ptr(), m);
                    l
                },
            }
        }};
    }

    macro_rules! chunks_avx2 {
        ($row:expr, $bias:expr) => {{
            let (row, bias): (&[f32], Option<&[f32]>) = ($row, $bias);
            // SAFETY (each closure): chunk c < len / 16 lies inside the row and the bias.
            Chunks {
                gt: move |c: usize, t: f32| unsafe {
                    let [x, y] = load8x2(row, bias, 16 * c);
                    let t = _mm256_set1_ps(t);
                    let lo = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, t)) as u32;
                    let hi = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(y, t)) as u32;
                    lo | hi << 8
                },
                lanes: move |c: usize| unsafe {
                    let [x, y] = load8x2(row, bias, 16 * c);
                    let mut l = [0f32; 16];
                    _mm256_storeu_ps(l.as_mut_ptr(), x);
                    _mm256_storeu_ps(l.as_mut_ptr().add(8), y);
                    l
                },
                max: move |c0: usize, c1: usize| unsafe {
                    let (mut a, mut b) = (
                        _mm256_set1_ps(f32::NEG_INFINITY),
                        _mm256_set1_ps(f32::NEG_INFINITY),
                    );
                    for c in c0..c1 {
                        let [x, y] = load8x2(row, bias, 16 * c);
                        (a, b) = (_mm256_max_ps(a, x), _mm256_max_ps(b, y));
                    }
                    let mut l = [0f32; 16];
                    _mm256_storeu_ps(l.as_mut_ptr(), a);
                    _mm256_storeu_ps(l.as_mut_ptr().add(8), b);
                    l
                },
            }
        }};
    }

    /// The values above `threshold` from the chunks, then the ragged tail.
    #[inline(always)]
    fn above_with<G, L, M>(
        ch: Chunks<G, L, M>,
        row: &[f32],
        bias: &[f32],
        threshold: f32,
    ) -> Vec<(u32, f32)>
    where
        G: Fn(usize, f32) -> u32,
        L: Fn(usize) -> [f32; 16],
        M: Fn(usize, usize) -> [f32; 16],
    {
        let mut out = Vec::new();
        ch.above(row.len() / 16, threshold, &mut out);
        for i in row.len() / 16 * 16..row.len() {
            let v = row[i] + bias[i];
            if v > threshold {
                out.push((i as u32, v));
            }
        }
        out
    }

    /// Caller: AVX-512F present; `bias` as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn above_avx512(
        row: &[f32],
        bias: &[f32],
        threshold: f32,
    ) -> Vec<(u32, f32)> {
        above_with(chunks_avx512!(row, Some(bias)), row, bias, threshold)
    }

    /// Caller: AVX2 and FMA present; `bias` as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn above_avx2(row: &[f32], bias: &[f32], threshold: f32) -> Vec<(u32, f32)> {
        above_with(chunks_avx2!(row, Some(bias)), row, bias, threshold)
    }

    /// Caller: AVX-512F present; `bias`, if any, as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn topk_avx512(
        row: &[f32],
        bias: Option<&[f32]>,
        k: usize,
    ) -> Vec<(u32, f32)> {
        let value = |i: usize| row[i] + bias.map_or(0.0, |b| b[i]);
        chunks_avx512!(row, bias).topk(row.len(), k, value)
    }

    /// Caller: AVX2 and FMA present; `bias`, if any, as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn topk_avx2(row: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<(u32, f32)> {
        let value = |i: usize| row[i] + bias.map_or(0.0, |b| b[i]);
        chunks_avx2!(row, bias).topk(row.len(), k, value)
    }

    /// The row's positive values (among the mask's) 16 at a time, without branches: each
    /// chunk's kept lanes are compressed into the output (a scalar filter mispredicts on every
    /// other value of a row whose signs are random, as AuxK's dead latents' are).
    /// Caller: AVX-512F present; `mask`, if any, as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn positive_avx512(row: &[f32], mask: Option<&[bool]>) -> Vec<(u32, f32)> {
        let len = row.len();
        let (mut ids, mut vals) = (vec![0u32; len + 16], vec![0f32; len + 16]);
        let mut m = 0;
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for c in 0..len / 16 {
            // SAFETY: 16 values (and mask bytes) from 16c lie inside the row (and the mask);
            // the stores write at most 16 values from m ≤ 16c inside the len + 16 buffers.
            unsafe {
                let x = _mm512_loadu_ps(row.as_ptr().add(16 * c));
                let mut keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
                if let Some(mask) = mask {
                    let bytes = _mm_loadu_si128(mask.as_ptr().add(16 * c) as *const __m128i);
                    keep &=
                        _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(1));
                }
                let at = _mm512_add_epi32(iota, _mm512_set1_epi32((16 * c) as i32));
                _mm512_mask_compressstoreu_ps(vals.as_mut_ptr().add(m) as *mut _, keep, x);
                _mm512_mask_compressstoreu_epi32(ids.as_mut_ptr().add(m) as *mut _, keep, at);
                m += keep.count_ones() as usize;
            }
        }
        positive_tail(row, mask, len / 16 * 16, ids, vals, m)
    }

    /// [`positive_avx512`] 8 values at a time, compressing through a permutation table.
    /// Caller: AVX2 and FMA present; `mask`, if any, as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn positive_avx2(row: &[f32], mask: Option<&[bool]>) -> Vec<(u32, f32)> {
        let len = row.len();
        let (mut ids, mut vals) = (vec![0u32; len + 16], vec![0f32; len + 16]);
        let mut m = 0;
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for c in 0..len / 8 {
            // SAFETY: 8 values (and mask bytes) from 8c lie inside the row (and the mask); the
            // stores write 8 values from m ≤ 8c inside the len + 16 buffers.
            unsafe {
                let x = _mm256_loadu_ps(row.as_ptr().add(8 * c));
                let mut keep =
                    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_setzero_ps()));
                if let Some(mask) = mask {
                    let bytes = _mm_loadl_epi64(mask.as_ptr().add(8 * c) as *const __m128i);
                    let on =
                        _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256());
                    keep &= _mm256_movemask_ps(_mm256_castsi256_ps(on));
                }
                let perm = _mm256_loadu_si256(COMPRESS[keep as usize].as_ptr() as *const __m256i);
                let at = _mm256_add_epi32(iota, _mm256_set1_epi32((8 * c) as i32));
                _mm256_storeu_ps(vals.as_mut_ptr().add(m), _mm256_permutevar8x32_ps(x, perm));
                _mm256_storeu_si256(
                    ids.as_mut_ptr().add(m) as *mut __m256i,
                    _mm256_permutevar8x32_epi32(at, perm),
                );
                m += keep.count_ones() as usize;
            }
        }
        positive_tail(row, mask, len / 8 * 8, ids, vals, m)
    }

    /// The scalar tail from `from`, then the `(id, value)` pairs of the first `m` + tail.
    #[inline(always)]
    fn positive_tail(
        row: &[f32],
        mask: Option<&[bool]>,
        from: usize,
        mut ids: Vec<u32>,
        mut vals: Vec<f32>,
        mut m: usize,
    ) -> Vec<(u32, f32)> {
        for i in from..row.len() {
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The top `k` positive values by sorting (value descending, id ascending among ties), by
    /// id: the reference every top-k path is held to.
    pub(crate) fn topk_by_sorting(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut want: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0)
            .map(|(i, &v)| (i as u32, v))
            .collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        want.truncate(k);
        want.sort_unstable_by_key(|&(i, _)| i);
        want
    }

    /// Rows with ties, negatives, long runs below the cut, ragged tails and special values.
    fn rows() -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        for len in [0, 5, 15, 16, 17, 37, 100, 257, 3000, 6144] {
            for kind in 0..5 {
                rows.push(
                    (0..len)
                        .map(|i| match kind {
                            0 => ((i * 7919 + len) % 41) as f32 - 20.0,
                            1 => (i as f32 * 0.618).sin() * (1.0 + (i % 7) as f32),
                            2 => -1.0 - (i % 13) as f32,
                            3 => ((i * 31) % 97) as f32 / 97.0 - 0.995,
                            _ => match i % 29 {
                                0 => f32::NAN,
                                1 => f32::INFINITY,
                                2 => -0.0,
                                3 => f32::from_bits(1),
                                _ => ((i * 13) % 23) as f32 - 11.0,
                            },
                        })
                        .collect(),
                );
            }
        }
        rows
    }

    /// Each vector path this processor has gives exactly the scalar path's entries, for every
    /// selection, with and without bias and mask.
    #[test]
    fn every_instruction_set_selects_what_the_scalar_path_selects() {
        let isas = Isa::available();
        for row in rows() {
            let len = row.len();
            let bias: Vec<f32> = (0..len)
                .map(|i| ((i * 31) % 17) as f32 / 20.0 - 0.5)
                .collect();
            let mask: Vec<bool> = (0..len).map(|i| i % 3 != 1).collect();
            for &isa in &isas {
                for t in [0.0, 1.5, -2.0] {
                    assert_eq!(
                        above_on(isa, &row, &bias, t),
                        above_on(Isa::Plain, &row, &bias, t),
                        "{isa:?} above {t}, len {len}"
                    );
                }
                for m in [None, Some(&mask[..])] {
                    assert_eq!(
                        positive_on(isa, &row, m),
                        positive_on(Isa::Plain, &row, m),
                        "{isa:?} positive, len {len}, mask {}",
                        m.is_some()
                    );
                    for k in [1, 3, 16, 32, 48, 49, 192] {
                        for b in [None, Some(&bias[..])] {
                            let (got, want) = (
                                topk_on(isa, &row, b, k, m),
                                topk_on(Isa::Plain, &row, b, k, m),
                            );
                            assert_eq!(
                                got,
                                want,
                                "{isa:?} top {k}, len {len}, bias {}, mask {}",
                                b.is_some(),
                                m.is_some()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The scalar path against sorting (value descending, id ascending among ties, positive
    /// values only): the reference the vector paths are held to above.
    #[test]
    fn the_scalar_top_k_is_the_sorted_prefix() {
        for row in rows() {
            for k in [1, 7, 32] {
                assert_eq!(
                    topk_plain(&row, None, k, None),
                    topk_by_sorting(&row, k),
                    "len {}, k {k}",
                    row.len()
                );
            }
        }
    }
}
