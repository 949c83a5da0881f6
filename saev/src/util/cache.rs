//! saev's cache directory: imported models, imported SAEs, normalisation statistics.
//!
//! ```no_run
//! let dir = saev::io::saev_cache_dir(); // $SAEV_CACHE, else ~/.cache/saev
//! ```

use std::path::PathBuf;

/// saev's cache directory (`$SAEV_CACHE`, else the user cache dir + `saev`).
pub fn saev_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SAEV_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("saev")
}
