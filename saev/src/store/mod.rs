//! [`ActivationStore`]: a read-only, memory-mapped handle on a directory of recorded
//! activations in the Python saev's shard format (protocol 2.1 written; every earlier layout read).
//!
//! Models with register tokens (DINOv2-with-registers) also get `registers.bin`: float32
//! `[n_examples, n_layers, n_registers, d_model]`, described by `registers.json`
//! (`{"version": 1, "n_registers": R}`). The Python saev drops registers, and its readers ignore
//! these two files; saev needs them to resume the ViT from a recorded block
//! ([`crate::Residual::from_recorded`]), for heads and interventions.
//!
//! Opening validates the metadata, the shard list and every file's size against them, and reports
//! the first inconsistency with the file and the numbers. Vectors are then slices of the mapped
//! shards: no copies, no reads until touched.
//!
//! ```no_run
//! use saev::ActivationStore;
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let v = store.patch(-2, 0, 1)?;      // layer -2, example 0, token 1 (first patch): &[f32; d]
//! let img = store.example(0)?;         // [n_layers · T · d] floats of example 0
//! # Ok::<(), saev::Error>(())
//! ```

pub(crate) mod format;
pub(crate) mod loader;
pub(crate) mod merge;
pub(crate) mod ojson;
pub(crate) mod permute;
pub(crate) mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::util::files::read_json;
pub use format::{Layout, Metadata, ShardEntry, PROTOCOL};
pub use loader::{Batch, Examples, LoaderConfig, NormStats, Shuffle, ShuffledLoader, Tokens};
pub use merge::merge_parts;
pub use writer::StoreWriter;

/// Per-example provenance saev writes beside the shards (`provenance.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Format version (1).
    pub version: u32,
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// Source of each example: a file path, or `file#index`.
    pub sources: Vec<String>,
    /// Class label of each example (`None` when unlabelled).
    pub labels: Vec<Option<u32>>,
    /// SHA-256 of the source files' sizes and modification times when recorded (absent in
    /// stores of earlier saev versions): reusing the store checks the files are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<String>,
}

impl Provenance {
    /// The [`Provenance::stamp`] of `sources` as the files are now: every distinct file named
    /// (a path, or the file of `file#index`), with its size and modification time.
    pub fn stamp_of(sources: &[String]) -> String {
        use sha2::{Digest, Sha256};
        let mut files: Vec<&str> = sources
            .iter()
            .map(|s| match s.rsplit_once('#') {
                Some((f, i)) if i.parse::<usize>().is_ok() => f,
                _ => s.as_str(),
            })
            .collect();
        files.sort_unstable();
        files.dedup();
        let mut h = Sha256::new();
        for f in files {
            let m = std::fs::metadata(crate::util::paths::text_to_path(f));
            let (len, mtime) = m.map_or((u64::MAX, 0), |m| {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                (m.len(), t)
            });
            h.update(format!("{f}\0{len}\0{mtime}\n").as_bytes());
        }
        format!("{:x}", h.finalize())
    }
}

/// The suffix of a store directory recorded with bfloat16 linear layers (`<hash>-bf16`, parts
/// `<hash>-bf16.part-I-of-N`): the metadata stays the Python saev's, the name keeps the two
/// kinds of store apart.
pub const BF16_TAG: &str = "-bf16";

/// The suffix of a store recorded with float16 linear layers (GPUs), as [`BF16_TAG`].
pub const F16_TAG: &str = "-f16";

/// Current `provenance.json` version.
pub(crate) const PROVENANCE_VERSION: u32 = 1;

/// A memory-mapped activation store. Cheap to clone.
#[derive(Clone)]
pub struct ActivationStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    md: Metadata,
    shards: Vec<ShardEntry>,
    maps: Vec<Mmap>,
    labels: Option<Mmap>,
    registers: Option<(Mmap, usize)>,
    fingerprint: std::sync::OnceLock<String>,
    provenance: Option<Provenance>,
    layout: Layout,
}

fn store_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Store {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn map(path: &Path) -> Result<Mmap> {
    // A FIFO or device would block or lie about its size: only regular files are data.
    let meta = std::fs::metadata(path).with_path(path)?;
    if !meta.file_type().is_file() {
        return Err(store_err(path, "not a regular file"));
    }
    let f = std::fs::File::open(path).with_path(path)?;
    // SAFETY: read-only mapping; stores are not modified while open (documented contract).
    unsafe { Mmap::map(&f) }.with_path(path)
}

impl ActivationStore {
    /// Open and validate a store directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if dir.join(".saev-progress.json").exists() {
            return Err(store_err(
                &dir,
                "store is incomplete (a writer is running or was interrupted; re-run it to finish)",
            ));
        }
        if !dir.join("metadata.json").exists() {
            // A root of stores (`--out acts` holds `acts/<hash>`) is the usual slip: say which.
            let mut inner: Vec<String> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("metadata.json").is_file())
                .map(|p| crate::util::paths::path_to_text(&p))
                .collect();
            inner.sort();
            return Err(store_err(
                &dir,
                if inner.is_empty() {
                    "not a store (no metadata.json)".to_string()
                } else {
                    format!(
                        "not a store but a directory of stores; pass one of: {}",
                        inner.join(", ")
                    )
                },
            ));
        }
        let (md, shards, layout) = format::read_store_json(&dir)?;
        let eps = md.examples_per_shard();
        let row_bytes = md.floats_per_example() * 4;
        let total = shards
            .iter()
            .try_fold(0usize, |a, s| a.checked_add(s.n_examples))
            .unwrap_or(usize::MAX);
        if total != md.n_examples {
            return Err(store_err(
                &dir.join("shards.json"),
                format!(
                    "shards hold {total} examples, metadata.json says n_examples = {}",
                    md.n_examples
                ),
            ));
        }
        let mut maps = Vec::with_capacity(shards.len());
        for (i, s) in shards.iter().enumerate() {
            let path = dir.join(&s.name);
            if s.name != Metadata::shard_name(i) {
                return Err(store_err(
                    &dir.join("shards.json"),
                    format!(
                        "entry {i} is {:?}, expected {:?}",
                        s.name,
                        Metadata::shard_name(i)
                    ),
                ));
            }
            if s.n_examples > eps
                || (s.n_examples < eps
                    && i + 1 < shards.len()
                    && shards[i + 1..].iter().any(|x| x.n_examples > 0))
            {
                return Err(store_err(&dir.join("shards.json"), format!("{} holds {} examples; shards hold {eps} each, only the last may hold fewer", s.name, s.n_examples)));
            }
            let m = map(&path)?;
            let need = s.n_examples * row_bytes;
            // Every shard is written full size (protocol 2.1, and the paper era's memmaps); only
            // the last may be shorter, holding exactly its valid rows. Any other size means the
            // file is not what metadata.json describes (an edited d_model, cls_token or token
            // count).
            let full = md.shard_bytes() as usize;
            let last = i + 1 == shards.len();
            if m.len() > full || (!last && m.len() != full) {
                return Err(store_err(
                    &path,
                    format!(
                        "{} bytes, but a shard of {eps} examples of [{} layers, {} tokens, {} dims] float32 (metadata.json) is {full}",
                        m.len(),
                        md.layers.len(),
                        md.tokens_per_example(),
                        md.d_model
                    ),
                ));
            }
            if m.len() < need {
                return Err(store_err(
                    &path,
                    format!(
                        "{} bytes, but {} examples of [{} layers, {} tokens, {} dims] float32 need {need} (truncated?)",
                        m.len(),
                        s.n_examples,
                        md.layers.len(),
                        md.tokens_per_example(),
                        md.d_model
                    ),
                ));
            }
            // A last shard shorter than full holds exactly its valid rows (trimmed by a tool):
            // any size in between is a file of another geometry (a store of one shard, its
            // metadata edited, would otherwise read past its rows' real layout).
            if last && m.len() != full && m.len() != need {
                return Err(store_err(
                    &path,
                    format!(
                        "{} bytes: neither a full shard ({full}) nor its {} examples of [{} layers, {} tokens, {} dims] float32 ({need}); metadata.json does not describe this file",
                        m.len(),
                        s.n_examples,
                        md.layers.len(),
                        md.tokens_per_example(),
                        md.d_model
                    ),
                ));
            }
            maps.push(m);
        }
        let labels_path = dir.join("labels.bin");
        let labels = if labels_path.exists() {
            let m = map(&labels_path)?;
            let need = md.n_examples * md.content_tokens_per_example;
            if m.len() != need {
                return Err(store_err(
                    &labels_path,
                    format!(
                        "{} bytes, expected n_examples · content_tokens = {need}",
                        m.len()
                    ),
                ));
            }
            Some(m)
        } else {
            None
        };
        let registers = open_registers(&dir, &md)?;
        let prov_path = dir.join("provenance.json");
        let provenance = if prov_path.exists() {
            let p: Provenance = read_json(&prov_path)?;
            if p.version != PROVENANCE_VERSION {
                return Err(store_err(
                    &prov_path,
                    format!(
                        "unknown version {} (this saev reads {PROVENANCE_VERSION})",
                        p.version
                    ),
                ));
            }
            if p.sources.len() != md.n_examples || p.labels.len() != md.n_examples {
                return Err(store_err(
                    &prov_path,
                    format!(
                        "{} sources / {} labels for {} examples",
                        p.sources.len(),
                        p.labels.len(),
                        md.n_examples
                    ),
                ));
            }
            Some(p)
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                md,
                shards,
                maps,
                labels,
                registers,
                fingerprint: std::sync::OnceLock::new(),
                provenance,
                layout,
            }),
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The metadata (paper-era stores are presented in 2.1 terms).
    pub fn metadata(&self) -> &Metadata {
        &self.inner.md
    }

    /// Whether this is a paper-era (saev 0.1.0) store.
    pub fn is_paper_era(&self) -> bool {
        self.inner.layout == Layout::Paper
    }

    /// Which of the Python saev's layouts the store was written in (saev writes 2.1).
    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// Number of examples (images).
    pub fn n_examples(&self) -> usize {
        self.inner.md.n_examples
    }

    /// Residual width.
    pub fn d_model(&self) -> usize {
        self.inner.md.d_model
    }

    /// Recorded layers, as given when recording.
    pub fn layers(&self) -> &[i64] {
        &self.inner.md.layers
    }

    /// Tokens per example (CLS + patches).
    pub fn tokens_per_example(&self) -> usize {
        self.inner.md.tokens_per_example()
    }

    /// Patch tokens per example.
    pub fn n_patches(&self) -> usize {
        self.inner.md.content_tokens_per_example
    }

    /// Whether token 0 is CLS.
    pub fn has_cls(&self) -> bool {
        self.inner.md.cls_token
    }

    /// Position of a recorded layer (by the value it was recorded under, e.g. `-2`).
    pub fn layer_position(&self, layer: i64) -> Result<usize> {
        self.layers()
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(|| {
                Error::out_of_range(
                    format!("{}: layer", self.dir().display()),
                    layer,
                    format!("{:?}, the recorded layers", self.layers()),
                )
            })
    }

    /// All floats of example `e`: `[n_layers, T, d]` row-major.
    pub fn example(&self, e: usize) -> Result<&[f32]> {
        if e >= self.n_examples() {
            return Err(Error::out_of_range(
                "example",
                e,
                format!("0..{}, the store's examples", self.n_examples()),
            ));
        }
        let eps = self.inner.md.examples_per_shard();
        let n = self.inner.md.floats_per_example();
        let m = &self.inner.maps[e / eps];
        let start = (e % eps) * n * 4;
        let bytes = &m[start..start + n * 4];
        Ok(bytemuck_f32(bytes))
    }

    /// Ask the kernel to start reading floats `range` of example `e` now (`madvise(WILLNEED)`),
    /// so reads of several places overlap instead of waiting on one page fault at a time. A
    /// hint: out-of-range requests and refusals are ignored.
    pub(crate) fn prefetch(&self, e: usize, range: std::ops::Range<usize>) {
        let eps = self.inner.md.examples_per_shard();
        let n = self.inner.md.floats_per_example();
        if e >= self.n_examples() || range.end > n || range.is_empty() {
            return;
        }
        let m = &self.inner.maps[e / eps];
        let start = ((e % eps) * n + range.start) * 4;
        #[cfg(unix)]
        let _ = m.advise_range(memmap2::Advice::WillNeed, start, range.len() * 4);
        #[cfg(not(unix))]
        let _ = (m, start);
    }

    /// The vector of (layer, example, token): `d_model` floats. Like every call that reads a
    /// layer, `layer` comes first.
    pub fn patch(&self, layer: i64, example: usize, token: usize) -> Result<&[f32]> {
        let l = self.layer_position(layer)?;
        let t_n = self.tokens_per_example();
        if token >= t_n {
            return Err(Error::out_of_range(
                "token",
                token,
                format!("0..{t_n}, the tokens per example"),
            ));
        }
        let d = self.d_model();
        let off = (l * t_n + token) * d;
        Ok(&self.example(example)?[off..off + d])
    }

    /// Patch labels of example `e` (`content_tokens_per_example` bytes), for segmentation stores.
    pub fn patch_labels(&self, e: usize) -> Option<&[u8]> {
        let p = self.n_patches();
        self.inner
            .labels
            .as_ref()
            .and_then(|m| m.get(e * p..(e + 1) * p))
    }

    /// A stamp of the shard files as they are on disk now (sizes and modification times): what
    /// caches derived from the content (normalisation statistics) are keyed by, so a store
    /// rewritten in place never reuses them.
    pub(crate) fn files_stamp(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for s in &self.inner.shards {
            let meta = std::fs::metadata(self.dir().join(&s.name)).ok();
            let mtime = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            h.update(format!("{}:{}:{mtime}|", s.name, meta.map_or(0, |m| m.len())).as_bytes());
        }
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Register tokens recorded per example and layer (0 when the store has none).
    pub fn n_registers(&self) -> usize {
        self.inner.registers.as_ref().map_or(0, |r| r.1)
    }

    /// The register tokens at `layer` of example `e` (`[n_registers, d_model]` floats), or None
    /// when the store has none (a model without registers, or a store not recorded by saev).
    pub fn registers(&self, layer: i64, e: usize) -> Result<Option<&[f32]>> {
        let Some((m, r)) = &self.inner.registers else {
            return Ok(None);
        };
        if e >= self.n_examples() {
            return Err(Error::out_of_range(
                "example",
                e,
                format!("0..{}, the store's examples", self.n_examples()),
            ));
        }
        let l = self.layer_position(layer)?;
        let per = r * self.d_model();
        let start = ((e * self.layers().len() + l) * per) * 4;
        Ok(Some(bytemuck_f32(&m[start..start + per * 4])))
    }

    /// The register tokens at `layer` of examples `ids`, concatenated (`[ids.len(),
    /// n_registers, d_model]` floats), or None when the store has none.
    pub fn registers_of(&self, layer: i64, ids: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.inner.registers.is_none() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(ids.len() * self.n_registers() * self.d_model());
        for &e in ids {
            out.extend_from_slice(self.registers(layer, e)?.unwrap_or(&[]));
        }
        Ok(Some(out))
    }

    /// Per-example provenance (source, label), when recorded by saev.
    pub fn provenance(&self) -> Option<&Provenance> {
        self.inner.provenance.as_ref()
    }

    /// The shard list.
    pub fn shards(&self) -> &[ShardEntry] {
        &self.inner.shards
    }

    /// The store's identity: a SHA-256 prefix (16 hex digits) of its metadata, shard list, file
    /// sizes and the first and last 64 KiB of every shard. Artefacts made from a store record
    /// it, and reuse checks it.
    pub fn fingerprint(&self) -> String {
        self.inner
            .fingerprint
            .get_or_init(|| self.compute_fingerprint())
            .clone()
    }

    fn compute_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.inner.md.to_json().as_bytes());
        for (s, m) in self.inner.shards.iter().zip(&self.inner.maps) {
            h.update(format!("|{}:{}:{}", s.name, s.n_examples, m.len()).as_bytes());
            let k = m.len().min(1 << 16);
            h.update(&m[..k]);
            h.update(&m[m.len() - k..]);
        }
        h.update(format!("|labels:{:?}", self.inner.labels.as_ref().map(|m| m.len())).as_bytes());
        h.update(
            format!(
                "|registers:{:?}",
                self.inner.registers.as_ref().map(|(m, r)| (m.len(), *r))
            )
            .as_bytes(),
        );
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// `registers.json` (saev's sidecar for models with register tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegistersInfo {
    /// Format version ([`REGISTERS_VERSION`]).
    pub version: u32,
    /// Register tokens per example and layer.
    pub n_registers: usize,
}

/// Current `registers.json` version.
pub(crate) const REGISTERS_VERSION: u32 = 1;

fn open_registers(dir: &Path, md: &Metadata) -> Result<Option<(Mmap, usize)>> {
    let (info_path, bin) = (dir.join("registers.json"), dir.join("registers.bin"));
    if !info_path.exists() {
        if bin.exists() {
            return Err(store_err(&bin, "registers.bin without registers.json"));
        }
        return Ok(None);
    }
    let info: RegistersInfo = read_json(&info_path)?;
    if info.version != REGISTERS_VERSION {
        return Err(store_err(
            &info_path,
            format!(
                "unknown version {} (this saev reads {REGISTERS_VERSION})",
                info.version
            ),
        ));
    }
    if info.n_registers == 0 || info.n_registers > 1024 {
        return Err(store_err(
            &info_path,
            format!("n_registers = {} (expected 1..=1024)", info.n_registers),
        ));
    }
    let m = map(&bin)?;
    let need = md.n_examples * md.layers.len() * info.n_registers * md.d_model * 4;
    if m.len() != need {
        return Err(store_err(
            &bin,
            format!(
                "{} bytes, expected [{} examples, {} layers, {} registers, {} dims] float32 = {need}",
                m.len(),
                md.n_examples,
                md.layers.len(),
                info.n_registers,
                md.d_model
            ),
        ));
    }
    Ok(Some((m, info.n_registers)))
}

/// View little-endian f32 bytes as floats. Mappings are page-aligned and offsets multiples of 4.
fn bytemuck_f32(bytes: &[u8]) -> &[f32] {
    // SAFETY: `bytes` starts at a multiple of 4 inside a page-aligned mapping (checked below)
    // and its length is a multiple of 4; f32 has no invalid bit patterns; x86/ARM are little
    // endian like the format.
    assert!(
        (bytes.as_ptr() as usize).is_multiple_of(4) && bytes.len().is_multiple_of(4),
        "misaligned f32 view"
    );
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
}

impl fmt::Debug for ActivationStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let md = self.metadata();
        write!(
            f,
            "ActivationStore({}: {} {} examples × layers {:?} × {} tokens × d {}, {} shards{})",
            self.dir().display(),
            md.family,
            md.n_examples,
            md.layers,
            md.tokens_per_example(),
            md.d_model,
            self.shards().len(),
            match self.layout() {
                Layout::V21 => String::new(),
                other => format!(", {}", other.name()),
            }
        )
    }
}
