//! Allocator tuning for tensor workloads on glibc.
//!
//! A ViT forward allocates and frees many multi-megabyte temporaries. glibc's defaults serve
//! them from fresh `mmap`s or trim them back to the OS after each free, so every batch pays page
//! faults and page clearing again — measured here as a ~40% slowdown of a DINOv2-S/14 forward.
//! [`tune_allocator`] keeps freed blocks for reuse (`M_MMAP_THRESHOLD` 32 MiB, `M_TRIM_THRESHOLD`
//! 1 GiB) and serves even blocks above 32 MiB (glibc's largest threshold — a batch's recorded
//! blocks, `[8, 12, 257, 384]` f32 = 38 MB) from the heap (`M_MMAP_MAX` 0; glibc still maps
//! memory when the heap cannot grow): a fresh 38 MB map per batch cost its 9,000 page faults,
//! 13% of a bf16 DINOv2-S/14 forward here. It runs once per process, only on glibc, and not
//! when the user set `MALLOC_*` variables of their own or `SAEV_NO_MALLOC_TUNING`.
//!
//! ```
//! saev::tune_allocator(); // idempotent; the saev binary and the notebook kernel call it
//! ```

/// Tune glibc malloc for large tensor temporaries (once per process; see the module docs).
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let user_set = std::env::vars_os().any(|(k, _)| {
            k.to_str().is_some_and(|k| {
                k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES" || k == "SAEV_NO_MALLOC_TUNING"
            })
        });
        if !user_set {
            apply();
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() {
    // SAFETY: mallopt only changes allocator parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() {}
