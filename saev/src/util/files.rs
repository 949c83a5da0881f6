//! Reading and writing saev's small files: JSON with the path in every error, and atomic
//! writes (temporary file + rename), so a killed job never leaves half a file behind.
//!
//! ```ignore
//! write_json(&dir.join("sae.json"), &cfg)?;          // atomic
//! let cfg: SaeConfig = read_json(&dir.join("sae.json"))?;
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Read and parse a JSON file; errors name the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_path(path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Write `value` as pretty-printed JSON to `path`, atomically.
pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, text.as_bytes())
}

/// Write `bytes` to `path` atomically (`<path>.tmp`, flushed to disk, then renamed), so that
/// after a crash or power loss `path` holds the old bytes or the new ones, never an empty file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp).with_path(&tmp)?;
    f.write_all(bytes).with_path(&tmp)?;
    f.sync_all().with_path(&tmp)?;
    drop(f);
    rename_durably(&tmp, path)
}

/// Flush a file already written to disk (its data and size).
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_path(path)
}

/// Rename `from` to `to` and flush the directory entry, so the rename survives a power loss
/// (ext4 and XFS order a rename after the data only when asked).
pub(crate) fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).with_path(to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Flush a directory's entries (the names created, renamed or removed in it).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_path(dir)
}

/// The file [`DirLock`] locks in an output directory (it stays; only its lock comes and goes).
pub(crate) const LOCK_NAME: &str = ".saev-lock";

/// An exclusive lock on an output directory for as long as it lives, so two runs never write
/// one directory at once (two Slurm tasks given the same `--out`, a job started twice). An OS
/// file lock (`flock`): released when the process ends, however it ends, so a killed run
/// leaves nothing to clean up. On a file system without locks the run goes on unlocked.
pub(crate) struct DirLock {
    /// The locked file and its path (None where the file system has no locks).
    file: Option<(std::fs::File, PathBuf)>,
}

impl DirLock {
    /// Lock `dir` (which exists) for `what` (e.g. "training run"), or say who holds it.
    pub(crate) fn acquire(dir: &Path, what: &str) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_NAME);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_path(&path)?;
        match f.try_lock() {
            Ok(()) => {
                // Who holds it, for the error another process shows.
                let _ = f.set_len(0);
                let _ = writeln!(f, "{}", std::process::id());
                Ok(Self {
                    file: Some((f, path)),
                })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.rewind().and_then(|()| f.read_to_string(&mut holder));
                Err(Error::output_dir(
                    dir,
                    format!(
                        "is being written by another {what} (process {})",
                        holder.trim()
                    ),
                    "wait for it to end, or choose another output directory",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                eprintln!(
                    "note: {} cannot be locked ({e}); two runs into it at once would not be stopped",
                    dir.display()
                );
                Ok(Self { file: None })
            }
        }
    }

    /// Remove the lock file, then let go: for a directory whose work is finished (a complete
    /// store), so that it holds only its own files. A run that opened the file just before
    /// gets the lock of the removed file, and must find the work done (callers re-check after
    /// locking).
    pub(crate) fn remove(self) {
        if let Some((_, path)) = &self.file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A fresh name beside `path` to write it whole before renaming it into place:
/// `.<name>.tmp-<pid>-<n>`, unique across processes and across threads of this one (two
/// imports into one cache, as parallel tests or array jobs run them, never share one).
pub(crate) fn unique_sibling(path: &Path) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let parent = path.parent().unwrap_or(Path::new("."));
    parent.join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// `<path>.tmp` (the extension appended, so `a.json` and `a.safetensors` never share one).
pub(crate) fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    s.into()
}
