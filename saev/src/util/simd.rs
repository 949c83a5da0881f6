//! Which vector extensions this processor has (checked once), for the hot loops compiled twice:
//! once for the baseline x86-64 the crate targets (SSE2) and once with `#[target_feature]` for
//! AVX2+FMA or AVX-512, chosen at run time. Release binaries stay portable across x86-64
//! machines while the loops use the widest registers there are.
//!
//! ```text
//! if has_avx512() { unsafe { axpy_avx512(a, x, y) } } else { axpy_plain(a, x, y) }
//! ```

/// AVX2 and FMA (Haswell, Zen 1 and later).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512F with AVX2 and FMA (Skylake-SP, Zen 4 and later).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && has_avx2_fma())
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
