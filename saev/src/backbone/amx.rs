//! bfloat16 GEMM for the backbone's linear layers: `C = A·B (+ bias)` with `A` and `B` rounded
//! to bfloat16 (round to nearest even) and products summed in f32 — on Intel AMX tiles
//! (`tdpbf16ps`, Sapphire Rapids and later) when the processor and the kernel allow it.
//!
//! Without AMX, AVX-512-BF16 (`vdpbf16ps`: AMD Zen 4, Intel Cooper Lake and later) computes the
//! same products on the same packed tiles; without either, an f32 GEMM on the rounded values (a
//! bf16 × bf16 product is exact in f32, so only the summation order differs). [`bf16_kernel`]
//! says which runs.
//!
//! # Layout
//! `B` (`[k, n]`, row-major, the weights) is packed once ([`PackedB::new`]) into 1 KiB tiles of
//! 32 `k` × 16 `n` in AMX's VNNI order (pairs of consecutive `k` side by side), ordered
//! `[n / 16][k / 32]`; `A` (`[m, k]`, the activations) is packed per call into 16 × 32 tiles
//! ordered `[m / 16][k / 32]`. Edges are zero-padded to 32 rows / columns, so one kernel — a
//! 32 × 32 block of `C` in four accumulator tiles — covers every shape.
//!
//! ```
//! use saev::backbone::amx::{gemm_bf16, PackedB};
//! let b = PackedB::new(&[1.0, 2.0, 3.0, 4.0], 2, 2); // [[1, 2], [3, 4]]
//! let c = gemm_bf16(&[1.0, 1.0], 1, &b, Some(&[0.5, 0.0]));
//! assert_eq!(&*c, &[4.5, 6.0]);
//! ```

use rayon::prelude::*;

use super::aligned::Aligned;
pub use super::aligned::AlignedVec;

/// bf16 elements per tile row (64 bytes), rows per tile.
pub(super) const TK: usize = 32;
pub(super) const TN: usize = 16;
pub(super) const TILE: usize = TK * TN; // 512 bf16 = 1 KiB

/// Round to bfloat16, nearest even (NaN stays NaN).
#[inline]
pub(super) fn to_bf16(x: f32) -> u16 {
    // Branch-free (a select), so the packing loops vectorise.
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        0x7fc0
    } else {
        rounded
    }
}

#[inline]
fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded to bfloat16 and back.
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Whether this process runs [`gemm_bf16`] on AMX tiles: an x86-64 processor with AMX-TILE and
/// AMX-BF16 whose kernel granted the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
/// Linux ≥ 5.16). Checked once.
pub fn amx_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unused_unsafe)] // cpuid is a safe fn from Rust 1.87, unsafe before
fn detect() -> bool {
    // SAFETY: cpuid leaf 7 exists on every x86-64 processor that reports max leaf ≥ 7.
    let max = unsafe { std::arch::x86_64::__cpuid(0) }.eax;
    if max < 7 {
        return false;
    }
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    let (bf16, tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
    if !(bf16 && tile) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it only changes this process's permission.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `B` (`[k, n]`) rounded to bfloat16 and packed for [`gemm_bf16`] (see the module docs).
#[derive(Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// k blocks of 32.
    kb: usize,
    /// n blocks of 16 (even).
    nb: usize,
    tiles: Aligned<u16>,
    /// The rounded `B` in f32, row-major, for the path without AMX.
    rounded: Vec<f32>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB([{}, {}] bf16)", self.k, self.n)
    }
}

impl PackedB {
    /// Pack `b_kn` (`[k, n]`, row-major).
    ///
    /// # Panics
    /// If `b_kn.len() != k * n` (a caller's bug; the backbone passes its own weights).
    pub fn new(b_kn: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b_kn.len(), k * n, "PackedB::new: [k, n] = [{k}, {n}]");
        let kb = k.div_ceil(TK);
        let nb = n.div_ceil(2 * TN) * 2;
        // One spare zero tile at the end: the kernel's pipelined loads read one past.
        let mut tiles = Aligned::filled((nb * kb + 1) * TILE, 0u16);
        tiles
            .par_chunks_mut(kb * TILE)
            .enumerate()
            .for_each(|(j, col)| {
                for (p, tile) in col.chunks_mut(TILE).enumerate() {
                    for r in 0..TK / 2 {
                        for c in 0..TN {
                            for h in 0..2 {
                                let (kk, nn) = (p * TK + 2 * r + h, j * TN + c);
                                if kk < k && nn < n {
                                    tile[r * 2 * TN + 2 * c + h] = to_bf16(b_kn[kk * n + nn]);
                                }
                            }
                        }
                    }
                }
            });
        Self {
            k,
            n,
            kb,
            nb,
            tiles,
            rounded: b_kn.iter().map(|&v| round_bf16(v)).collect(),
        }
    }

    /// Pack `B = w_nkᵀ` from `w_nk` (`[n, k]`, row-major: a linear layer's `[out, in]` weight,
    /// an SAE's `W_enc`) — the tiles of [`PackedB::new`] on the transpose, without making it.
    /// [`pack_a`] lays `w_nk` out as 16 rows × 16 bf16 pairs per tile; a B tile holds the same
    /// pairs with rows and pair columns swapped, so each tile is transposed as 16 × 16 `u32`.
    ///
    /// # Panics
    /// If `w_nk.len() != n * k` (a caller's bug).
    pub fn from_rows(w_nk: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w_nk.len(), n * k, "PackedB::from_rows: [n, k] = [{n}, {k}]");
        let kb = k.div_ceil(TK);
        let nb = n.div_ceil(2 * TN) * 2;
        let mut tiles = pack_a(w_nk, n, k, kb);
        tiles[..nb * kb * TILE].par_chunks_mut(TILE).for_each(|t| {
            for r in 0..TN {
                for c in r + 1..TN {
                    let (a, b) = (2 * (r * TN + c), 2 * (c * TN + r));
                    t.swap(a, b);
                    t.swap(a + 1, b + 1);
                }
            }
        });
        // Only the f32 kernel reads the rounded copy.
        let rounded = if bf16_kernel() == Bf16Kernel::F32 {
            let mut r = vec![0f32; k * n];
            for (j, row) in w_nk.chunks_exact(k.max(1)).enumerate() {
                for (t, &v) in row.iter().enumerate() {
                    r[t * n + j] = round_bf16(v);
                }
            }
            r
        } else {
            Vec::new()
        };
        Self {
            k,
            n,
            kb,
            nb,
            tiles,
            rounded,
        }
    }

    /// `[k, n]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// `A·B (+ bias)` for `a_mk` (`[m, k]`, row-major) against a packed `B`; returns `[m, n]`
/// (on a 64-byte boundary, as the tiles store it; `into_vec` for a `Vec`).
///
/// # Panics
/// If `a_mk.len() != m * k` or `bias` is not `n` long (a caller's bug).
pub fn gemm_bf16(a_mk: &[f32], m: usize, b: &PackedB, bias: Option<&[f32]>) -> AlignedVec {
    if let Some(bias) = bias {
        assert_eq!(bias.len(), b.n, "gemm_bf16: bias is not [{}]", b.n);
    }
    let n = b.n;
    gemm_bf16_then(a_mk, m, b, &|_, rows: &mut [f32]| {
        if let Some(bias) = bias {
            for row in rows.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
    })
}

/// [`gemm_bf16`] with an epilogue run on each band of whole rows of `C` right after it is
/// computed (while in cache), given the band's first row: the backbone's bias, activation and
/// residual add.
pub(crate) fn gemm_bf16_then(
    a_mk: &[f32],
    m: usize,
    b: &PackedB,
    epilogue: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> AlignedVec {
    let (k, n) = (b.k, b.n);
    assert_eq!(a_mk.len(), m * k, "gemm_bf16: A is not [{m}, {k}]");
    if m > 0 && n > 0 && k > 0 && bf16_kernel() != Bf16Kernel::F32 {
        return tile_gemm(bf16_kernel(), a_mk, m, b, epilogue);
    }
    AlignedVec::from_vec(fallback_gemm(a_mk, m, b, epilogue))
}

/// `f(first_row, band)` on each band of up to 32 whole rows of `C = A·B` (`a_mk`: `[m, k]`),
/// in order; returns the results. Each band is computed into a per-thread scratch that is
/// reused while in cache, so `C` (`[m, n]`) is never stored: a consumer that reduces each band
/// (a selection) pays no `m · n` array. (The f32 kernel computes `C` whole, then maps it.)
///
/// # Panics
/// If `a_mk.len() != m * k` (a caller's bug).
pub(crate) fn map_bands<T: Send>(
    a_mk: &[f32],
    m: usize,
    b: &PackedB,
    f: &(dyn Fn(usize, &mut [f32]) -> T + Sync),
) -> Vec<T> {
    let (k, n) = (b.k, b.n);
    assert_eq!(a_mk.len(), m * k, "map_bands: A is not [{m}, {k}]");
    let band_rows = 2 * TN;
    #[cfg(target_arch = "x86_64")]
    if bf16_kernel() != Bf16Kernel::F32 && n > 0 && k > 0 {
        let a = pack_a(a_mk, m, k, b.kb);
        return (0..m.div_ceil(band_rows))
            .into_par_iter()
            .map_init(
                || Aligned::filled(band_rows * n, 0f32),
                |scratch, band| {
                    let rows = (m - band * band_rows).min(band_rows);
                    let c = scratch.as_mut_ptr();
                    // SAFETY: the kernel's instructions are present (bf16_kernel); `a` holds
                    // the band's 2 × kb tiles and the spare; `scratch` is 32 rows of n.
                    unsafe { tile_band(bf16_kernel(), &a, b, band, c, rows) };
                    f(band * band_rows, &mut scratch[..rows * n])
                },
            )
            .collect();
    }
    let mut c = gemm_bf16_then(a_mk, m, b, &|_, _| {});
    c.par_chunks_mut((band_rows * n).max(1))
        .enumerate()
        .map(|(band, rows)| f(band * band_rows, rows))
        .collect()
}

/// Which code computes [`gemm_bf16`] in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`): Intel Sapphire Rapids and later.
    Amx,
    /// AVX-512-BF16 (`vdpbf16ps`, 16 lanes of bf16 pairs): the default on AMD Zen 4 and
    /// later; on Intel cores it is slower than the f32 GEMM (only by request).
    Avx512Bf16,
    /// The f32 GEMM on the rounded values (the same numbers at f32 speed).
    F32,
}

/// The best [`Bf16Kernel`] this processor has; `SAEV_BF16_KERNEL=amx|avx512bf16|f32` picks a
/// lesser one (to compare them on one machine). Checked once.
pub fn bf16_kernel() -> Bf16Kernel {
    static KERNEL: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let dp = has_avx512_bf16();
        // VDPBF16PS does twice the flops of an f32 FMA per cycle on AMD Zen 4 (one 512-bit
        // instruction per cycle either way), but half of the two FMA ports' on Intel cores
        // (measured: 212 against 385 GFLOP/s on a Sapphire Rapids, 2 threads): there, without
        // AMX, the f32 GEMM on the rounded values is faster.
        let best = if amx_available() {
            Bf16Kernel::Amx
        } else if dp && is_amd() {
            Bf16Kernel::Avx512Bf16
        } else {
            Bf16Kernel::F32
        };
        match std::env::var("SAEV_BF16_KERNEL").as_deref() {
            Ok("f32") => Bf16Kernel::F32,
            Ok("avx512bf16") if dp => Bf16Kernel::Avx512Bf16,
            _ => best,
        }
    })
}

#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // cpuid is a safe fn from Rust 1.87, unsafe before
fn is_amd() -> bool {
    // SAFETY: cpuid leaf 0 exists on every x86-64 processor.
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &v == b"AuthenticAMD"
}

#[cfg(not(target_arch = "x86_64"))]
fn is_amd() -> bool {
    false
}

/// One 32 × 32 block of `C = A·B` on AVX-512-BF16, from the same tiles and into the same
/// places as [`amx_block_32x32`]: four blocks of 8 rows × 32 columns, each 16 zmm accumulators
/// (a `B` tile row of 16 column pairs is one register, each row's pair of `A` one broadcast).
///
/// # Safety
/// The processor has AVX-512F and AVX-512-BF16; each operand pointer is valid for `kb` tiles of
/// reads; each `c[i]` for 16 rows of 32 f32 writes at `stride` bytes.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn dp_block_32x32(
    a: [*const u16; 2],
    b: [*const u16; 2],
    kb: usize,
    c: [*mut f32; 2],
    stride: usize,
) {
    let ldc = stride / 4;
    for (at, ct) in a.into_iter().zip(c) {
        for r0 in [0, 8] {
            // SAFETY: rows r0..r0 + 8 of the A tiles and of C's 16 rows, as the caller
            // guarantees.
            unsafe { dpbf16_block(at.add(r0 * TK), b, kb, ct.add(r0 * ldc), ldc) };
        }
    }
}

/// `C[8, 32] = Σ_k-blocks A·B` for 8 rows of an A tile band and two B column tiles.
///
/// # Safety
/// The processor has AVX-512F and AVX-512-BF16; `a` points at the first of 8 rows of the first
/// of `kb` consecutive A tiles (tile stride `TILE`), `b[0]`/`b[1]` at the first of `kb` B tiles
/// each; `c` at 8 rows (stride `ldc` f32) of 32 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16_block(a: *const u16, b: [*const u16; 2], kb: usize, c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm512_setzero_ps(); 8];
    let mut acc1 = [_mm512_setzero_ps(); 8];
    // SAFETY (the body): every read is inside the tiles the caller vouches for, every write
    // inside C's 8 × 32 block.
    unsafe {
        for t in 0..kb {
            let (at, bt0, bt1) = (a.add(t * TILE), b[0].add(t * TILE), b[1].add(t * TILE));
            for p in 0..TK / 2 {
                let vb0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(bt0.add(p * 2 * TN) as *const _));
                let vb1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(bt1.add(p * 2 * TN) as *const _));
                for r in 0..8 {
                    let pair = (at.add(r * TK + 2 * p) as *const i32).read_unaligned();
                    let va: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    acc0[r] = _mm512_dpbf16_ps(acc0[r], va, vb0);
                    acc1[r] = _mm512_dpbf16_ps(acc1[r], va, vb1);
                }
            }
        }
        for r in 0..8 {
            _mm512_storeu_ps(c.add(r * ldc), acc0[r]);
            _mm512_storeu_ps(c.add(r * ldc + TN), acc1[r]);
        }
    }
}

/// The same rounded products summed in f32 by the f32 GEMM, then the epilogue.
pub(super) fn fallback_gemm(
    a_mk: &[f32],
    m: usize,
    b: &PackedB,
    epilogue: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    let a: Vec<f32> = a_mk.par_iter().map(|&v| round_bf16(v)).collect();
    super::kernels::gemm_f32_then(&a, m, &b.rounded, b.n, epilogue)
}

/// A packed into `[m_pad / 16][kb]` tiles of 16 rows × 32 bf16.
pub(super) fn pack_a(a_mk: &[f32], m: usize, k: usize, kb: usize) -> Aligned<u16> {
    let mb = m.div_ceil(2 * TN) * 2;
    let mut tiles = uninit_tiles(mb * kb);
    let body = &mut tiles[..mb * kb * TILE];
    body.par_chunks_mut(kb * TILE)
        .enumerate()
        .for_each(|(i, rows)| {
            let dst = rows.as_mut_ptr() as *mut u16;
            for r in 0..TN {
                let row = i * TN + r;
                let src: &[f32] = if row < m {
                    &a_mk[row * k..(row + 1) * k]
                } else {
                    &[]
                };
                // SAFETY: row r of each of the band's kb tiles lies inside `rows`.
                unsafe { round_row(src, kb, dst.add(r * TK)) };
            }
        });
    // SAFETY: every tile was written above (values and padding zeros).
    unsafe { assume_written(tiles) }
}

/// A buffer for `n_tiles` tiles and one spare zero tile after them (the kernel's pipelined
/// loads read one past): the tiles uninitialised, for a packer that writes every element of
/// them (values and padding zeros) — no zeroing pass first.
pub(super) fn uninit_tiles(n_tiles: usize) -> Aligned<std::mem::MaybeUninit<u16>> {
    let mut tiles = Aligned::<u16>::uninit((n_tiles + 1) * TILE);
    tiles[n_tiles * TILE..].fill(std::mem::MaybeUninit::new(0));
    tiles
}

/// The tiles of [`uninit_tiles`] once written.
///
/// # Safety
/// Every element has been written.
pub(super) unsafe fn assume_written(tiles: Aligned<std::mem::MaybeUninit<u16>>) -> Aligned<u16> {
    // SAFETY: the caller's promise.
    unsafe { tiles.assume_init() }
}

/// One row of A into its tiles: chunk `p` of 32 values (rounded, zeros past the row) to
/// `dst + p · TILE`, for `p < kb`.
///
/// # Safety
/// `dst` is valid for 32 u16 writes at each of the `kb` offsets.
pub(super) unsafe fn round_row(row: &[f32], kb: usize, dst: *mut u16) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: AVX-512F/BW/BF16 are present; the caller vouches for dst.
        return unsafe { round_row_cvt(row, 1.0, kb, dst) };
    }
    // (Every processor that packs A on a hot path — AMX, AVX-512-BF16 — has the conversion.)
    for p in 0..kb {
        for i in 0..TK {
            let v = row.get(p * TK + i).map_or(0, |&v| to_bf16(v));
            // SAFETY: the caller vouches for dst.
            unsafe { dst.add(p * TILE + i).write(v) };
        }
    }
}

/// AVX-512-BF16 with AVX-512F/BW (every processor with AMX has it; AMD from Zen 4): the
/// `vdpbf16ps` GEMM and the packing's conversion. Checked once.
pub(super) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `scale · src[lo..lo + 16]`, zeros past the end of `src`.
///
/// # Safety
/// AVX-512F is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load_scaled(src: &[f32], lo: usize, scale: f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let v = if src.len() >= lo + 16 {
        // SAFETY: the 16 values from `lo` lie inside `src`.
        unsafe { _mm512_loadu_ps(src.as_ptr().add(lo)) }
    } else {
        let c = src.len().saturating_sub(lo);
        let mask = ((1u32 << c) - 1) as __mmask16;
        // SAFETY: masked-off lanes are not read; the others lie inside `src`.
        unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_add(lo)) }
    };
    if scale == 1.0 {
        v
    } else {
        _mm512_mul_ps(v, _mm512_set1_ps(scale))
    }
}

/// `to_bf16(scale · src[i])` into 32 u16 at `dst`, zeros past `src.len() ≤ 32`, by the
/// processor's own conversion (`vcvtne2ps2bf16`: round to nearest even like [`to_bf16`], one
/// instruction for 32 values, but subnormal inputs become ±0 and a
/// NaN keeps its sign and payload — neither occurs in a ViT's activations).
///
/// # Safety
/// AVX-512F/BW and AVX-512-BF16 are available; `dst` is valid for 32 u16 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
pub(super) unsafe fn round_32_cvt(src: &[f32], scale: f32, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller guarantees.
    unsafe {
        let lo = load_scaled(src, 0, scale);
        let hi = load_scaled(src, 16, scale);
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst as *mut _, both);
    }
}

/// Two rows' 16 values rounded and interleaved (`a[0], b[0], a[1], b[1], …`: one row of a
/// VNNI B tile) into 32 u16 at `dst`, zeros past either's end (`≤ 16` each), by the
/// processor's conversion (see [`round_32_cvt`]).
///
/// # Safety
/// AVX-512F/BW and AVX-512-BF16 are available; `dst` is valid for 32 u16 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
pub(super) unsafe fn round_pair_cvt(a: &[f32], b: &[f32], dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller guarantees.
    unsafe {
        let lo = load_scaled(a, 0, 1.0);
        let hi = load_scaled(b, 0, 1.0);
        // [a0 … a15 | b0 … b15] → a0 b0 a1 b1 …
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_storeu_si512(dst as *mut _, _mm512_permutexvar_epi16(idx, both));
    }
}

/// One row of A into its tiles by [`round_32_cvt`]: chunk `p` of 32 values to
/// `dst + p · TILE`, `kb` chunks (zeros past the row).
///
/// # Safety
/// As [`round_32_cvt`]'s, at each of the `kb` offsets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
pub(super) unsafe fn round_row_cvt(row: &[f32], scale: f32, kb: usize, dst: *mut u16) {
    for p in 0..kb {
        // SAFETY: as the caller guarantees.
        unsafe { round_32_cvt(tile_chunk(row, p), scale, dst.add(p * TILE)) };
    }
}

/// The up-to-32 values of `row` in k tile `p` (empty past its end).
#[inline(always)]
fn tile_chunk(row: &[f32], p: usize) -> &[f32] {
    &row[(p * TK).min(row.len())..((p + 1) * TK).min(row.len())]
}

/// 64-byte tile configuration (palette 1): tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn all_16x64() -> Self {
        let mut cfg = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        cfg
    }
}

/// The AMX tile configuration of this thread (eight 16 × 64-byte tiles) while it lives; the
/// tile state is released when it drops.
#[cfg(target_arch = "x86_64")]
pub(super) struct Tiles(());

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// # Safety
    /// [`amx_available`] returned true in this process (it obtained the tile-data permission).
    pub(super) unsafe fn configure() -> Self {
        let cfg = TileConfig::all_16x64();
        // SAFETY: the caller guarantees AMX; the config is 64-byte aligned and lives across
        // the instruction.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig) };
        Self(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure` on this thread.
        unsafe { std::arch::asm!("tilerelease") };
    }
}

/// The bf16 block kernel of this thread while it lives: AMX tiles (configured here, released
/// when it drops) or AVX-512-BF16, as [`BlockKernel::enter`] is told — one 32 × 32 block of
/// `C` from the same packed tiles into the same places either way.
#[cfg(target_arch = "x86_64")]
pub(super) struct BlockKernel {
    amx: Option<Tiles>,
}

#[cfg(target_arch = "x86_64")]
impl BlockKernel {
    /// # Safety
    /// `kind` is [`Bf16Kernel::Amx`] with [`amx_available`], or [`Bf16Kernel::Avx512Bf16`] with
    /// [`has_avx512_bf16`].
    pub(super) unsafe fn enter(kind: Bf16Kernel) -> Self {
        let amx = (kind == Bf16Kernel::Amx)
            // SAFETY: amx_available found AMX and its permission (the caller's promise).
            .then(|| unsafe { Tiles::configure() });
        Self { amx }
    }

    /// One 32 × 32 block of `C = A·B`: `kb` steps over two 16-row A tile columns (`a[0]`,
    /// `a[1]`, each `kb` consecutive 1 KiB tiles) and two 16-column B tile rows (`b[0]`,
    /// `b[1]`); rows 0–15 are stored at `c[0]`, rows 16–31 at `c[1]`, columns 0–15 then
    /// 16–31, with a row stride of `stride` bytes.
    ///
    /// # Safety
    /// `kb ≥ 1`; each operand pointer is valid for `kb + 1` tiles of reads (AMX's pipelined
    /// loads read one tile past: the buffers carry a spare tile); each `c[i]` is valid for 16
    /// rows of 32 f32 writes at `stride` bytes.
    #[inline]
    pub(super) unsafe fn block_32x32(
        &self,
        a: [*const u16; 2],
        b: [*const u16; 2],
        kb: usize,
        c: [*mut f32; 2],
        stride: usize,
    ) {
        // SAFETY: the tiles are configured (AMX) or AVX-512-BF16 is present (enter's promise);
        // the operands are the caller's.
        unsafe {
            if self.amx.is_some() {
                amx_block_32x32(a, b, kb, c, stride)
            } else {
                dp_block_32x32(a, b, kb, c, stride)
            }
        }
    }
}

/// [`BlockKernel::block_32x32`] on AMX tiles (`tdpbf16ps` into four accumulator tiles).
///
/// # Safety
/// A [`Tiles`] configuration is live on this thread; the operands are as
/// [`BlockKernel::block_32x32`] requires.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn amx_block_32x32(
    a: [*const u16; 2],
    b: [*const u16; 2],
    kb: usize,
    c: [*mut f32; 2],
    stride: usize,
) {
    // Software-pipelined: each operand tile is reloaded (for the next k block) as soon as the
    // products reading it have issued, so loads overlap the tile multiplies.
    // SAFETY: as the caller guarantees.
    unsafe {
        std::arch::asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "dec {kb}",
            "jnz 2b",
            "tilestored [{lo} + {sc}*1], tmm0",
            "tilestored [{lo} + {sc}*1 + 64], tmm1",
            "tilestored [{hi} + {sc}*1], tmm2",
            "tilestored [{hi} + {sc}*1 + 64], tmm3",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            kb = inout(reg) kb => _,
            lo = in(reg) c[0],
            hi = in(reg) c[1],
            sc = in(reg) stride,
            s = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// [`gemm_bf16_then`] on the tile kernel `kind` (the f32 GEMM where this processor lacks it):
/// bands of 32 rows of `C`, each written whole, then its epilogue.
#[cfg(target_arch = "x86_64")]
fn tile_gemm(
    kind: Bf16Kernel,
    a_mk: &[f32],
    m: usize,
    b: &PackedB,
    epilogue: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> AlignedVec {
    let present = match kind {
        Bf16Kernel::Amx => amx_available(),
        Bf16Kernel::Avx512Bf16 => has_avx512_bf16(),
        Bf16Kernel::F32 => false,
    };
    if !present {
        return AlignedVec::from_vec(fallback_gemm(a_mk, m, b, epilogue));
    }
    let (k, n, kb) = (b.k, b.n, b.kb);
    let a = pack_a(a_mk, m, k, kb);
    let write = |c: &mut [std::mem::MaybeUninit<f32>]| {
        c.par_chunks_mut(2 * TN * n)
            .enumerate()
            .for_each(|(band, c_rows)| {
                let rows = c_rows.len() / n;
                let cp = c_rows.as_mut_ptr() as *mut f32;
                // SAFETY: the kernel is present (checked above); `a` holds the band's 2 × kb
                // tiles and the spare; c_rows is `rows` rows of n. Every element
                // of the band is written before the epilogue reads it.
                unsafe {
                    tile_band(kind, &a, b, band, cp, rows);
                    epilogue(
                        band * 2 * TN,
                        std::slice::from_raw_parts_mut(cp, c_rows.len()),
                    );
                }
            })
    };
    // SAFETY: C is written once, by the tile stores (no zeroing pass): every band, whole.
    unsafe { AlignedVec::new_with(m * n, write) }
}

/// One 32-row band of `C = A·B` on the bf16 kernel (AMX or AVX-512-BF16): A's tile rows `2·band` and `2·band + 1` (`kb` tiles
/// each, `a` packed as [`pack_a`] packs) against every B column pair, into `c` (`rows ≤ 32`
/// rows of `n`). The band's A tiles (2 × kb KiB) stay in cache while B streams past.
///
/// # Safety
/// [`bf16_kernel`] is not [`Bf16Kernel::F32`]; `a` holds at least `2·band + 2` tile rows of
/// `b.kb` tiles plus the spare tile; `c` is valid for `rows · n` f32 writes.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn tile_band(
    kind: Bf16Kernel,
    a: &[u16],
    b: &PackedB,
    band: usize,
    c: *mut f32,
    rows: usize,
) {
    let n = b.n;
    // A 32 × 32 block for the edges of C (its four tiles side by side, stride 128 B).
    let mut acc = Block32([0f32; 4 * TN * TN]);
    let acc = &mut acc.0;
    // SAFETY: the operands are as for_each_pair documents. A block wholly inside C is stored
    // straight into its 32 rows × 32 columns (row stride 4n bytes); an edge block goes to
    // `acc` (32 × 32, stride 128 bytes) and its part inside C is copied.
    unsafe {
        for_each_pair(kind, a, b, band, &mut |kernel, q, a_pair, b_pair| {
            let c0 = q * 2 * TN;
            let inside = rows == 2 * TN && c0 + 2 * TN <= n;
            let (lo, hi, stride) = if inside {
                (c.add(c0), c.add(TN * n + c0), 4 * n)
            } else {
                let p = acc.as_mut_ptr();
                (p, p.add(TN * 2 * TN), 4 * 2 * TN)
            };
            kernel.block_32x32(a_pair, b_pair, b.kb, [lo, hi], stride);
            if !inside && c0 < n {
                let w = (2 * TN).min(n - c0);
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(
                        acc.as_ptr().add(r * 2 * TN),
                        c.add(r * n + c0),
                        w,
                    );
                }
            }
        });
    }
}

/// A 32 × 32 block of f32 on a cache line (tile stores into it are whole lines).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Block32([f32; 4 * TN * TN]);

/// What [`for_each_pair`] calls: `(kernel, q, a tile rows, b tile columns)`.
#[cfg(target_arch = "x86_64")]
type PairFn<'a> = dyn FnMut(&BlockKernel, usize, [*const u16; 2], [*const u16; 2]) + 'a;

/// With this thread's [`BlockKernel`], `f(kernel, q, a, b)` for each column pair `q` of `B`:
/// the band's two A tile rows and the pair's two B tile columns (`kb` tiles each, plus the
/// spare).
///
/// # Safety
/// [`bf16_kernel`] is not [`Bf16Kernel::F32`]; `a` holds at least `2·band + 2` tile rows of `b.kb` tiles
/// plus the spare tile.
#[cfg(target_arch = "x86_64")]
unsafe fn for_each_pair(kind: Bf16Kernel, a: &[u16], b: &PackedB, band: usize, f: &mut PairFn<'_>) {
    let kb = b.kb;
    let a_pair = [
        a[(2 * band) * kb * TILE..].as_ptr(),
        a[(2 * band + 1) * kb * TILE..].as_ptr(),
    ];
    // SAFETY: the caller guarantees a bf16 kernel (AMX's tiles stay configured while `f` runs).
    let kernel = unsafe { BlockKernel::enter(kind) };
    for q in 0..b.nb / 2 {
        let b_pair = [
            b.tiles[(2 * q) * kb * TILE..].as_ptr(),
            b.tiles[(2 * q + 1) * kb * TILE..].as_ptr(),
        ];
        f(&kernel, q, a_pair, b_pair);
    }
}

/// [`tile_band`] handing each 32 × 32 block of the band to `f(first_column, block)` (32 rows of
/// 32 at stride 32, in an L1-resident buffer) instead of storing it into `C`: an epilogue that
/// turns blocks into something else (the next GEMM's bf16 tiles) never writes or re-reads an
/// f32 band.
///
/// # Safety
/// As [`tile_band`]'s for `a`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn tile_band_blocks(
    a: &[u16],
    b: &PackedB,
    band: usize,
    f: &mut dyn FnMut(usize, &mut [f32]),
) {
    let mut blk = Block32([0f32; 4 * TN * TN]);
    // SAFETY: as in tile_band; the block buffer is 32 × 32 at stride 128 bytes.
    unsafe {
        for_each_pair(
            bf16_kernel(),
            a,
            b,
            band,
            &mut |kernel, q, a_pair, b_pair| {
                let p = blk.0.as_mut_ptr();
                kernel.block_32x32(a_pair, b_pair, b.kb, [p, p.add(TN * 2 * TN)], 4 * 2 * TN);
                f(q * 2 * TN, &mut blk.0);
            },
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn tile_gemm(
    _kind: Bf16Kernel,
    a_mk: &[f32],
    m: usize,
    b: &PackedB,
    epilogue: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> AlignedVec {
    AlignedVec::from_vec(fallback_gemm(a_mk, m, b, epilogue))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Uniform values in [-1, 1), reproducible from `seed`.
    pub(crate) fn rnd(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let z = crate::util::rng::splitmix64(seed.wrapping_mul(1_000_003) + i as u64);
                ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// Packing `[n, k]` rows gives the tiles of packing their transpose, and the bands of
    /// `map_bands` are the rows of the GEMM, in order.
    #[test]
    fn packed_rows_and_bands_are_the_transposes_and_the_product() {
        for (m, k, n) in [(37, 70, 45), (64, 384, 96), (5, 1, 1), (70, 33, 130)] {
            let w = rnd(n * k, 5 + k as u64);
            let mut w_t = vec![0f32; k * n];
            for j in 0..n {
                for t in 0..k {
                    w_t[t * n + j] = w[j * k + t];
                }
            }
            let (from_rows, new) = (PackedB::from_rows(&w, n, k), PackedB::new(&w_t, k, n));
            assert_eq!(&*from_rows.tiles, &*new.tiles, "[{n}, {k}]");
            let a = rnd(m * k, 9);
            let want = gemm_bf16(&a, m, &new, None);
            let bands = map_bands(&a, m, &from_rows, &|row0, band: &mut [f32]| {
                (row0, band.to_vec())
            });
            let mut at = 0;
            for (row0, band) in bands {
                assert_eq!(row0 * n, at);
                assert_eq!(
                    band,
                    want[at..at + band.len()],
                    "[{m}, {k}, {n}] from row {row0}"
                );
                at += band.len();
            }
            assert_eq!(at, m * n);
        }
    }

    /// Against a plain triple loop over the bf16-rounded inputs in f64, on shapes with every
    /// kind of edge (m, n, k not multiples of the tiles; one row; k below one tile).
    #[test]
    fn matches_the_rounded_product_on_every_edge() {
        for (m, k, n) in [
            (1, 3, 2),
            (37, 70, 45),
            (64, 384, 96),
            (33, 32, 17),
            (5, 1, 1),
        ] {
            let a = rnd(m * k, 1 + m as u64);
            let b = rnd(k * n, 2 + n as u64);
            let bias = rnd(n, 3);
            let packed = PackedB::new(&b, k, n);
            let c = gemm_bf16(&a, m, &packed, Some(&bias));
            // The path without AMX too (the one above ran on AMX where the processor has it),
            // and AVX-512-BF16's where the processor has it.
            let plain = fallback_gemm(&a, m, &packed, &|_, _| {});
            if has_avx512_bf16() {
                let dp = tile_gemm(Bf16Kernel::Avx512Bf16, &a, m, &packed, &|_, _| {});
                for (x, y) in plain.iter().zip(dp.iter()) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()) * (k as f32).sqrt());
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let (x, y) = (plain[i * n + j] + bias[j], c[i * n + j]);
                    assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()) * (k as f32).sqrt());
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = bias[j] as f64
                        + (0..k)
                            .map(|p| {
                                round_bf16(a[i * k + p]) as f64 * round_bf16(b[p * n + j]) as f64
                            })
                            .sum::<f64>();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                        "[{m}, {k}, {n}] at ({i}, {j}): {got} vs {want} (amx {})",
                        amx_available()
                    );
                }
            }
        }
    }

    /// The processor's conversion gives the scalar rounding's bits on normal values, zeros and
    /// infinities (ties included), ±0 for subnormals, a NaN for a NaN.
    #[test]
    fn the_processors_conversion_rounds_the_same() {
        if !has_avx512_bf16() {
            eprintln!("no AVX-512-BF16 here: the conversion does not run on this processor");
            return;
        }
        let mut vals: Vec<f32> = vec![
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -2.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            0.0,
            -0.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_7fff),
            1e-40,
            -1e-42,
            f32::NAN,
        ];
        vals.extend(rnd(300, 11).iter().map(|v| v * 3e4));
        for chunk in vals.chunks(TK).chain([&vals[..7], &vals[3..20]]) {
            let mut got = [0xffffu16; TK];
            // SAFETY: AVX-512-BF16 was detected; `got` holds 32.
            unsafe { round_32_cvt(chunk, 1.0, got.as_mut_ptr()) };
            for (i, &g) in got.iter().enumerate() {
                match chunk.get(i) {
                    None => assert_eq!(g, 0),
                    Some(v) if v.is_nan() => assert!(from_bf16(g).is_nan()),
                    Some(v) if v.is_subnormal() => assert_eq!(g & 0x7fff, 0, "{v:e}"),
                    Some(&v) => assert_eq!(g, to_bf16(v), "{v:e}"),
                }
            }
        }
    }

    /// The interleaving conversion puts each row's rounded values in the VNNI pair order.
    #[test]
    fn pair_conversion_interleaves() {
        if !has_avx512_bf16() {
            return;
        }
        let (a, b) = (rnd(16, 21), rnd(11, 22));
        let mut got = [0xffffu16; TK];
        // SAFETY: AVX-512-BF16 (and so F/BW) was detected; `got` holds 32.
        unsafe { round_pair_cvt(&a, &b, got.as_mut_ptr()) };
        for c in 0..TN {
            assert_eq!(got[2 * c], a.get(c).map_or(0, |&v| to_bf16(v)));
            assert_eq!(got[2 * c + 1], b.get(c).map_or(0, |&v| to_bf16(v)));
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
    }
}
