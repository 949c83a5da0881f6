//! Activations kept in bfloat16 A tiles between the backbone's layers on AMX or AVX-512-BF16: a LayerNorm
//! writes its rows straight into the tiles of the GEMM that reads them, and the MLP's first
//! GEMM rounds each finished 32 × 32 block (bias and activation applied, in L1) into the tiles
//! of the second — no f32 copy of `[B·T, 4·D]` written, read back and packed again.
//!
//! The tiles and their padding are [`super::amx`]'s (`[m_pad / 16][k / 32]` of 16 × 32 bf16,
//! zeros past `m` and `k`, one spare tile); the values are exactly what
//! [`super::amx::gemm_bf16`] would round them to, so the results are the same numbers.
//!
//! ```text
//! let h = norm.pack(&x)?;                                  // PackedA [B·T, D]
//! let a = gemm_to_packed(&h, &fc1, &|col0, block| gelu);  // PackedA [B·T, 4·D]
//! let y = gemm_packed(&a, &fc2, &|row0, band| residual);  // AlignedVec [B·T, D]
//! ```

use rayon::prelude::*;

use super::aligned::{Aligned, AlignedVec};
use super::amx::{
    assume_written, bf16_kernel, fallback_gemm, round_row, uninit_tiles, Bf16Kernel, PackedB, TILE,
    TK, TN,
};

/// `[m, k]` activations rounded to bf16 in A tiles.
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    tiles: Aligned<u16>,
}

impl std::fmt::Debug for PackedA {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedA([{}, {}] bf16)", self.m, self.k)
    }
}

type Epilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

impl PackedA {
    /// Rows made band by band: `fill(first_row, band)` writes up to 32 rows of `k` values into
    /// `band` (a per-thread scratch, in cache), which are then rounded into their tiles.
    pub(crate) fn from_fn(m: usize, k: usize, fill: Epilogue<'_>) -> Self {
        let kb = k.div_ceil(TK);
        let mb = m.div_ceil(2 * TN) * 2;
        let mut tiles = uninit_tiles(mb * kb);
        let body = &mut tiles[..mb * kb * TILE];
        body.par_chunks_mut(2 * kb * TILE)
            .enumerate()
            .for_each_init(
                || Aligned::filled(2 * TN * k, 0f32),
                |scratch, (band, tiles)| {
                    let rows = (m - 2 * TN * band).min(2 * TN);
                    fill(2 * TN * band, &mut scratch[..rows * k]);
                    let dst = tiles.as_mut_ptr() as *mut u16;
                    for r in 0..2 * TN {
                        let src: &[f32] = if r < rows {
                            &scratch[r * k..(r + 1) * k]
                        } else {
                            &[]
                        };
                        // SAFETY: row r % 16 of tile row r / 16 of this band: kb tiles inside
                        // `tiles` (2 · kb tiles long).
                        unsafe {
                            round_row(src, kb, dst.add((r / TN) * kb * TILE + (r % TN) * TK))
                        };
                    }
                },
            );
        // SAFETY: every band's 32 tile rows were written (values or zeros).
        let tiles = unsafe { assume_written(tiles) };
        Self { m, k, tiles }
    }

    /// `[m, k]`.
    #[cfg(test)]
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// The rounded values, `[m, k]` row-major (the path without AMX, and tests).
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let kb = self.k.div_ceil(TK);
        let mut out = vec![0f32; self.m * self.k];
        for (i, row) in out.chunks_exact_mut(self.k.max(1)).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                let at = ((i / TN) * kb + c / TK) * TILE + (i % TN) * TK + c % TK;
                *v = f32::from_bits(u32::from(self.tiles[at]) << 16);
            }
        }
        out
    }
}

/// `A·B`, then `epilogue(first_row, band)` on each band of 32 rows while in cache: `[m, n]`.
///
/// # Panics
/// If `A`'s `k` is not `B`'s (a caller's bug).
pub(crate) fn gemm_packed(a: &PackedA, b: &PackedB, epilogue: Epilogue<'_>) -> AlignedVec {
    let (k, n) = b.dims();
    assert_eq!(a.k, k, "gemm_packed: A is [{}, {}], B [{k}, {n}]", a.m, a.k);
    let m = a.m;
    if bf16_kernel() == Bf16Kernel::F32 || m == 0 || n == 0 || k == 0 {
        return AlignedVec::from_vec(fallback_gemm(&a.to_f32(), m, b, epilogue));
    }
    let write = |c: &mut [std::mem::MaybeUninit<f32>]| {
        c.par_chunks_mut(2 * TN * n)
            .enumerate()
            .for_each(|(band, rows)| {
                let cp = rows.as_mut_ptr() as *mut f32;
                // SAFETY: a bf16 kernel is available (bf16_kernel); `a.tiles` holds every
                // band's tiles and the spare; the band is rows.len() / n rows of n, written before the
                // epilogue.
                unsafe {
                    tile_band_dispatch(a, b, band, cp, rows.len() / n);
                    epilogue(
                        band * 2 * TN,
                        std::slice::from_raw_parts_mut(cp, rows.len()),
                    );
                }
            })
    };
    // SAFETY: tile_band writes every element of each band.
    unsafe { AlignedVec::new_with(m * n, write) }
}

/// A block epilogue: `f(first_column, block)` on a 32 × 32 block of `C` (rows of 32, columns
/// `first_column..first_column + 32`, those past `n` zero).
pub(crate) type BlockEpilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// `A·B` with `epilogue` on each 32 × 32 block of `C` while it is in L1, each block then rounded
/// straight into the A tiles of the next GEMM: `[m, n]` packed. No f32 `C` is stored, not even
/// a band (the MLP's `[B·T, 4·D]` activations: their band was 196 KB, in L2, written, re-read
/// by the activation and read again by the rounding).
///
/// # Panics
/// If `A`'s `k` is not `B`'s (a caller's bug).
pub(crate) fn gemm_to_packed(a: &PackedA, b: &PackedB, epilogue: BlockEpilogue<'_>) -> PackedA {
    let (k, n) = b.dims();
    assert_eq!(
        a.k, k,
        "gemm_to_packed: A is [{}, {}], B [{k}, {n}]",
        a.m, a.k
    );
    let m = a.m;
    let blk = 2 * TN;
    // The epilogue's output with the padding contract of PackedA restored: zeros past n and m.
    let finish = |c0: usize, rows: usize, block: &mut [f32]| {
        epilogue(c0, block);
        let w = (n - c0).min(blk);
        for (r, row) in block.chunks_exact_mut(blk).enumerate() {
            if r >= rows {
                row.fill(0.0);
            } else {
                row[w..].fill(0.0);
            }
        }
    };
    if bf16_kernel() == Bf16Kernel::F32 || m == 0 || n == 0 || k == 0 {
        let c = gemm_packed(a, b, &|_, _| {});
        return PackedA::from_fn(m, n, &|row0, band| {
            let rows = band.len() / n.max(1);
            let mut block = vec![0f32; blk * blk];
            for c0 in (0..n).step_by(blk) {
                let w = (n - c0).min(blk);
                for r in 0..rows {
                    block[r * blk..r * blk + w]
                        .copy_from_slice(&c[(row0 + r) * n + c0..(row0 + r) * n + c0 + w]);
                }
                finish(c0, rows, &mut block);
                for r in 0..rows {
                    band[r * n + c0..r * n + c0 + w].copy_from_slice(&block[r * blk..r * blk + w]);
                }
            }
        });
    }
    let kb = n.div_ceil(TK);
    let mb = m.div_ceil(blk) * 2;
    let mut tiles = uninit_tiles(mb * kb);
    tiles[..mb * kb * TILE]
        .par_chunks_mut(2 * kb * TILE)
        .enumerate()
        .for_each(|(band, out)| {
            let rows = (m - blk * band).min(blk);
            let dst = out.as_mut_ptr() as *mut u16;
            // SAFETY: a bf16 kernel is available (bf16_kernel); `a.tiles` holds every band's
            // tiles and the spare. Block `c0` of row r goes to row r % 16 of k tile c0 / 32 of tile row r / 16
            // of this band: inside `out` (2 · kb tiles), each of its 32 · 32 values written once.
            unsafe {
                tile_band_blocks_dispatch(a, b, band, &mut |c0, block| {
                    finish(c0, rows, block);
                    for (r, row) in block.chunks_exact(blk).enumerate() {
                        let at = ((r / TN) * kb + c0 / TK) * TILE + (r % TN) * TK;
                        round_row(row, 1, dst.add(at));
                    }
                });
            }
        });
    // SAFETY: every tile of every band was written (values and padding zeros).
    let tiles = unsafe { assume_written(tiles) };
    PackedA { m, k: n, tiles }
}

/// # Safety
/// As [`super::amx::tile_band_blocks`]'s.
unsafe fn tile_band_blocks_dispatch(
    a: &PackedA,
    b: &PackedB,
    band: usize,
    f: &mut dyn FnMut(usize, &mut [f32]),
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller guarantees.
    unsafe {
        super::amx::tile_band_blocks(&a.tiles, b, band, f)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 tiles on a processor that is not x86-64: {a:?} {b:?} {band} {f:?}")
}

/// # Safety
/// As [`super::amx::tile_band`]'s.
unsafe fn tile_band_dispatch(a: &PackedA, b: &PackedB, band: usize, c: *mut f32, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller guarantees.
    unsafe {
        super::amx::tile_band(bf16_kernel(), &a.tiles, b, band, c, rows)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 tiles on a processor that is not x86-64: {a:?} {b:?} {band} {c:?} {rows}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::amx::tests::rnd;
    use crate::backbone::amx::{gemm_bf16, round_bf16};

    /// Packed once and chained (norm-like fill → GEMM → packed → GEMM), the numbers are those
    /// of the unpacked path, on shapes off the tile edges.
    #[test]
    fn chained_packed_gemms_give_the_unpacked_numbers() {
        for (m, k, n1, n2) in [(37, 70, 45, 19), (64, 384, 96, 32), (1, 3, 2, 5)] {
            let x = rnd(m * k, m as u64);
            let a = PackedA::from_fn(m, k, &|row0, band| {
                band.copy_from_slice(&x[row0 * k..row0 * k + band.len()])
            });
            assert_eq!(a.dims(), (m, k));
            let rounded: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            assert_eq!(a.to_f32(), rounded);
            let (w1, w2) = (rnd(k * n1, 5), rnd(n1 * n2, 6));
            let (b1, b2) = (PackedB::new(&w1, k, n1), PackedB::new(&w2, n1, n2));
            let relu = |_: usize, band: &mut [f32]| band.iter_mut().for_each(|v| *v = v.max(0.0));
            let h = gemm_to_packed(&a, &b1, &relu);
            let mut want_h = gemm_bf16(&x, m, &b1, None);
            relu(0, &mut want_h);
            let want_h_rounded: Vec<f32> = want_h.iter().map(|&v| round_bf16(v)).collect();
            let got_h = h.to_f32();
            for (g, w) in got_h.iter().zip(&want_h_rounded) {
                // Summation order may move a value across a rounding boundary (1 bf16 ulp).
                assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "{g} vs {w}");
            }
            // Each block's epilogue gets its first column; the padding past m and n1 stays zero
            // whatever the epilogue makes of it.
            let plain = gemm_bf16(&x, m, &b1, None);
            let shift = |c0: usize, block: &mut [f32]| {
                for (i, v) in block.iter_mut().enumerate() {
                    *v += (c0 + i % 32) as f32;
                }
            };
            let hs = gemm_to_packed(&a, &b1, &shift);
            for (i, g) in hs.to_f32().iter().enumerate() {
                let w = round_bf16(plain[i] + (i % n1) as f32);
                assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "{i}: {g} vs {w}");
            }
            let kb1 = n1.div_ceil(TK);
            for (at, &v) in hs.tiles.iter().enumerate() {
                let tile = at / TILE;
                let row = (tile / kb1) * TN + (at % TILE) / TK;
                let col = (tile % kb1) * TK + at % TK;
                assert!(
                    row < m && col < n1 || v == 0,
                    "padding [{row}, {col}] = {v:#x}"
                );
            }
            let y = gemm_packed(&h, &b2, &|row0, band| {
                band.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v += (row0 * n2 + i) as f32)
            });
            let want_y = gemm_bf16(&got_h, m, &b2, None);
            for (i, (g, w)) in y.iter().zip(want_y.iter()).enumerate() {
                let w = w + i as f32;
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{i}: {g} vs {w}");
            }
        }
    }
}
