//! Write a store's files: [`StoreWriter`] (shards at full size, `shards.json` as shards
//! complete, labels, register tokens) and [`merge_parts`]. Recording a backbone over a dataset
//! into one is [`crate::record`], a layer above this one.
//!
//! ```no_run
//! # let md = saev::ActivationStore::open("old/1a2b3c4d")?.metadata().clone();
//! let mut w = saev::store::StoreWriter::create("converted", md, None)?;
//! w.write_examples(0, &vec![0.0; 10])?;
//! let dir = w.finish()?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::Metadata;
use super::{ojson, Provenance};
use crate::error::{Error, IoContext, Result};
use crate::util::files::{read_json, write_atomic};

/// Open (creating) a file for in-place writes, extended with zeros to at least `len` bytes;
/// existing contents are kept (a resumed writer continues in it).
fn open_at_least(path: &Path, len: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_path(path)?;
    if f.metadata().with_path(path)?.len() < len {
        f.set_len(len).with_path(path)?;
    }
    Ok(f)
}

/// Low-level writer of a store's files from activations you already have: shards at full
/// size, `shards.json` as shards complete, `labels.bin`. [`crate::record::record_activations`] drives it from a
/// backbone; use it directly to convert other recordings.
///
/// ```no_run
/// # let md = saev::ActivationStore::open("old/1a2b3c4d")?.metadata().clone(); // or build one
/// let mut w = saev::store::StoreWriter::create("converted", md, None)?;
/// w.write_examples(0, &vec![0.0; 10])?;  // [n, n_layers, T, d] floats of examples 0..n
/// let dir = w.finish()?;
/// # Ok::<(), saev::Error>(())
/// ```
pub struct StoreWriter {
    dir: PathBuf,
    md: Metadata,
    files: Vec<Option<File>>,
    labels: Option<(File, PathBuf)>,
    registers: Option<(usize, Option<File>)>,
    pub(crate) part: Option<(usize, usize)>,
}

impl StoreWriter {
    /// Start a new store `<root>/<hash>/` (an existing one is an error, never overwritten):
    /// writes `metadata.json` and, if given, `provenance.json`.
    pub fn create(
        root: impl AsRef<Path>,
        md: Metadata,
        provenance: Option<&Provenance>,
    ) -> Result<Self> {
        let root = root.as_ref();
        Self::create_in(root.join(md.hash()), md, provenance)
    }

    pub(crate) fn create_in(
        dir: PathBuf,
        md: Metadata,
        provenance: Option<&Provenance>,
    ) -> Result<Self> {
        md.validate(Path::new("<metadata>"))?;
        if dir.join("metadata.json").exists() {
            return Err(Error::Store {
                path: dir,
                msg: "a store already exists here".into(),
            });
        }
        std::fs::create_dir_all(&dir).with_path(&dir)?;
        write_atomic(&dir.join("metadata.json"), md.to_json().as_bytes())?;
        if let Some(p) = provenance {
            let text = serde_json::to_vec(p)
                .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
            write_atomic(&dir.join("provenance.json"), &text)?;
        }
        Ok(Self::reopen(dir, md, None))
    }

    pub(crate) fn reopen(dir: PathBuf, md: Metadata, part: Option<(usize, usize)>) -> Self {
        let n = md.n_shards();
        Self {
            dir,
            md,
            files: (0..n).map(|_| None).collect(),
            labels: None,
            registers: None,
            part,
        }
    }

    /// Also record `n_registers` register tokens per example and layer (`registers.bin`, see
    /// [`crate::ActivationStore::registers`]); 0 = none.
    pub fn with_registers(mut self, n_registers: usize) -> Self {
        self.registers = (n_registers > 0).then_some((n_registers, None));
        self
    }

    fn registers_bytes(&self, n_registers: usize) -> u64 {
        (self.md.n_examples * self.md.layers.len() * n_registers * self.md.d_model * 4) as u64
    }

    /// Write the register tokens of examples `first..` (`[n, n_layers, n_registers, d]` floats).
    pub fn write_registers(&mut self, first: usize, regs: &[f32]) -> Result<()> {
        let Some((r, _)) = self.registers else {
            return Err(Error::missing(
                "write_registers",
                "a writer made with with_registers",
                "",
            ));
        };
        let per = self.md.layers.len() * r * self.md.d_model;
        if regs.len() % per != 0 || first + regs.len() / per > self.md.n_examples {
            return Err(Error::Shape {
                what: format!("register tokens for examples from {first}"),
                expected: vec![regs.len() / per, self.md.layers.len(), r, self.md.d_model],
                actual: vec![regs.len()],
            });
        }
        let path = self.dir.join("registers.bin");
        let len = self.registers_bytes(r);
        if let Some((_, f @ None)) = &mut self.registers {
            *f = Some(open_at_least(&path, len)?);
        }
        if let Some((_, Some(f))) = &self.registers {
            let bytes: Vec<u8> = regs.iter().flat_map(|v| v.to_le_bytes()).collect();
            f.write_all_at(&bytes, (first * per * 4) as u64)
                .with_path(&path)?;
        }
        Ok(())
    }

    /// The shards this writer owns (all, or those of its part).
    fn owned_shards(&self) -> std::ops::Range<usize> {
        match self.part {
            None => 0..self.md.n_shards(),
            Some((i, n)) => part_shards(&self.md, i, n),
        }
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn shard(&mut self, i: usize) -> Result<&File> {
        if self.files[i].is_none() {
            let f = open_at_least(
                &self.dir.join(Metadata::shard_name(i)),
                self.md.shard_bytes(),
            )?;
            self.files[i] = Some(f);
        }
        self.files[i]
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("shard file {i} is not open")))
    }

    /// Write examples `first..first + n` from `acts` (`[n, n_layers, T, d]` floats); updates
    /// `shards.json` when a shard becomes complete.
    pub fn write_examples(&mut self, first: usize, acts: &[f32]) -> Result<()> {
        let per = self.md.floats_per_example();
        if acts.len() % per != 0 || first + acts.len() / per > self.md.n_examples {
            return Err(Error::Shape {
                what: format!("activations for examples from {first}"),
                expected: vec![
                    acts.len() / per,
                    self.md.layers.len(),
                    self.md.tokens_per_example(),
                    self.md.d_model,
                ],
                actual: vec![acts.len()],
            });
        }
        let n = acts.len() / per;
        let eps = self.md.examples_per_shard();
        let row_bytes = per * 4;
        let bytes: Vec<u8> = acts.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut e = first;
        while e < first + n {
            let shard = e / eps;
            let n_here = ((shard + 1) * eps).min(first + n) - e;
            let path = self.dir.join(Metadata::shard_name(shard));
            let src = &bytes[(e - first) * row_bytes..(e - first + n_here) * row_bytes];
            self.shard(shard)?
                .write_all_at(src, ((e % eps) * row_bytes) as u64)
                .with_path(&path)?;
            e += n_here;
        }
        let done = first + n;
        if self.part.is_none() && (done % eps < n || done == self.md.n_examples) {
            let k = if done == self.md.n_examples {
                self.md.n_shards()
            } else {
                done / eps
            };
            let entries: Vec<_> = self.md.shard_entries().into_iter().take(k).collect();
            let v = serde_json::to_value(&entries)
                .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
            write_atomic(
                &self.dir.join("shards.json"),
                ojson::dumps(&v, true, false).as_bytes(),
            )?;
        }
        Ok(())
    }

    /// Write patch labels of examples `first..` (`content_tokens_per_example` bytes each).
    pub fn write_labels(&mut self, first: usize, labels: &[u8]) -> Result<()> {
        let p = self.md.content_tokens_per_example;
        if self.labels.is_none() {
            let path = self.dir.join("labels.bin");
            let f = open_at_least(&path, (self.md.n_examples * p) as u64)?;
            self.labels = Some((f, path));
        }
        if let Some((f, path)) = &self.labels {
            f.write_all_at(labels, (first * p) as u64).with_path(path)?;
        }
        Ok(())
    }

    /// Make every shard exist at full size, write the final `shards.json`, flush to disk.
    pub fn finish(mut self) -> Result<PathBuf> {
        for i in self.owned_shards() {
            let path = self.dir.join(Metadata::shard_name(i));
            self.shard(i)?.sync_all().with_path(&path)?;
        }
        if let Some((r, _)) = self.registers {
            let path = self.dir.join("registers.bin");
            open_at_least(&path, self.registers_bytes(r))?
                .sync_all()
                .with_path(&path)?;
            write_registers_info(&self.dir, r)?;
        }
        if let Some((i, n)) = self.part {
            let text = serde_json::to_vec(&PartInfo {
                version: 1,
                part: i,
                n_parts: n,
            })
            .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
            write_atomic(&self.dir.join(PART), &text)?;
            return Ok(self.dir);
        }
        let v = serde_json::to_value(self.md.shard_entries())
            .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
        write_atomic(
            &self.dir.join("shards.json"),
            ojson::dumps(&v, true, false).as_bytes(),
        )?;
        Ok(self.dir)
    }
}

fn write_registers_info(dir: &Path, n_registers: usize) -> Result<()> {
    let info = super::RegistersInfo {
        version: super::REGISTERS_VERSION,
        n_registers,
    };
    let text =
        serde_json::to_vec(&info).map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
    write_atomic(&dir.join("registers.json"), &text)
}

/// Copy bytes `range` of `from` into the same place of `to` (created, at least `len` bytes).
fn copy_range(from: &Path, to: &Path, len: u64, range: std::ops::Range<u64>) -> Result<()> {
    let src = File::open(from).with_path(from)?;
    let dst = open_at_least(to, len)?;
    let mut buf = vec![0u8; 1 << 22];
    let mut at = range.start;
    while at < range.end {
        let n = ((range.end - at) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], at).with_path(from)?;
        dst.write_all_at(&buf[..n], at).with_path(to)?;
        at += n as u64;
    }
    dst.sync_all().with_path(to)
}

const PART: &str = "part.json";

#[derive(Debug, Serialize, Deserialize)]
struct PartInfo {
    version: u32,
    part: usize,
    n_parts: usize,
}

/// Shards of part `i` of `n`: contiguous, as even as whole shards allow.
fn part_shards(md: &Metadata, i: usize, n: usize) -> std::ops::Range<usize> {
    let per = md.n_shards().div_ceil(n.max(1));
    (i * per).min(md.n_shards())..((i + 1) * per).min(md.n_shards())
}

pub(crate) fn part_examples(md: &Metadata, i: usize, n: usize) -> std::ops::Range<usize> {
    let s = part_shards(md, i, n);
    let eps = md.examples_per_shard();
    (s.start * eps).min(md.n_examples)..(s.end * eps).min(md.n_examples)
}

/// Join the parts written with [`crate::WriterConfig::part`] into one store under `root`. Shard files
/// are moved (renamed), not copied, when the parts are on the same file system as `root`; the
/// part directories are removed afterwards.
pub fn merge_parts(parts: &[PathBuf], root: impl AsRef<Path>) -> Result<PathBuf> {
    let root = root.as_ref();
    let first = parts
        .first()
        .ok_or_else(|| Error::out_of_range("merge: parts given:", 0, "≥ 1"))?;
    let md_text = std::fs::read_to_string(first.join("metadata.json"))
        .with_path(first.join("metadata.json"))?;
    let md: Metadata = serde_json::from_str(&md_text).map_err(|source| Error::Json {
        path: first.join("metadata.json"),
        source,
    })?;
    let mut seen = Vec::new();
    for p in parts {
        let path = p.join(PART);
        let text = std::fs::read_to_string(&path).map_err(|_| Error::Store {
            path: path.clone(),
            msg: "not a finished part (no part.json)".into(),
        })?;
        let info: PartInfo = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let other =
            std::fs::read_to_string(p.join("metadata.json")).with_path(p.join("metadata.json"))?;
        if other != md_text {
            return Err(Error::Store {
                path: p.join("metadata.json"),
                msg: format!(
                    "differs from {}: parts of different stores",
                    first.display()
                ),
            });
        }
        seen.push((info.part, info.n_parts, p.clone()));
    }
    seen.sort();
    let n_parts = seen[0].1;
    if seen.len() != n_parts
        || seen
            .iter()
            .enumerate()
            .any(|(k, (i, n, _))| *i != k || *n != n_parts)
    {
        let have: Vec<usize> = seen.iter().map(|s| s.0).collect();
        return Err(Error::out_of_range(
            "merge: parts",
            format!("{have:?}"),
            format!("0..{n_parts} exactly once each"),
        ));
    }
    let dir = root.join(md.hash());
    if dir.join("metadata.json").exists() {
        return Err(Error::Store {
            path: dir,
            msg: "a store already exists here".into(),
        });
    }
    // Validate every part completely before moving anything: a bad part leaves all parts as
    // they were, and the error names it.
    let n_labels_total = md.n_examples * md.content_tokens_per_example;
    for (i, n, p) in &seen {
        for s in part_shards(&md, *i, *n) {
            let f = p.join(Metadata::shard_name(s));
            let len = std::fs::metadata(&f).with_path(&f)?.len();
            if len != md.shard_bytes() {
                return Err(Error::Store {
                    path: f,
                    msg: format!(
                        "{len} bytes, a shard is {} (truncated part?)",
                        md.shard_bytes()
                    ),
                });
            }
        }
        for (name, want) in [("labels.bin", n_labels_total as u64), ("registers.bin", 0)] {
            let f = p.join(name);
            if !f.exists() {
                continue;
            }
            let len = std::fs::metadata(&f).with_path(&f)?.len();
            let want = if name == "registers.bin" {
                let info: super::RegistersInfo = read_json(&p.join("registers.json"))?;
                (md.n_examples * md.layers.len() * info.n_registers * md.d_model * 4) as u64
            } else {
                want
            };
            if len != want {
                return Err(Error::Store {
                    path: f,
                    msg: format!("{len} bytes, expected {want} (truncated part?)"),
                });
            }
        }
    }
    std::fs::create_dir_all(&dir).with_path(&dir)?;
    let n_labels = md.n_examples * md.content_tokens_per_example;
    let mut labels: Option<Vec<u8>> = None;
    for (i, n, p) in &seen {
        for s in part_shards(&md, *i, *n) {
            let name = Metadata::shard_name(s);
            let (from, to) = (p.join(&name), dir.join(&name));
            if std::fs::rename(&from, &to).is_err() {
                std::fs::copy(&from, &to).with_path(&from)?;
            }
        }
        let lp = p.join("labels.bin");
        if lp.exists() {
            let bytes = std::fs::read(&lp).with_path(&lp)?;
            let r = part_examples(&md, *i, *n);
            let cp = md.content_tokens_per_example;
            let buf = labels.get_or_insert_with(|| vec![0u8; n_labels]);
            buf[r.start * cp..r.end * cp].copy_from_slice(&bytes[r.start * cp..r.end * cp]);
        }
    }
    if let Some(l) = labels {
        write_atomic(&dir.join("labels.bin"), &l)?;
    }
    // Register tokens (models with registers): each part holds its examples' rows.
    let reg_info = first.join("registers.json");
    if reg_info.exists() {
        let info: super::RegistersInfo = read_json(&reg_info)?;
        let per = (md.layers.len() * info.n_registers * md.d_model * 4) as u64;
        let len = md.n_examples as u64 * per;
        for (i, n, p) in &seen {
            let r = part_examples(&md, *i, *n);
            copy_range(
                &p.join("registers.bin"),
                &dir.join("registers.bin"),
                len,
                r.start as u64 * per..r.end as u64 * per,
            )?;
        }
        write_registers_info(&dir, info.n_registers)?;
    }
    if first.join("provenance.json").exists() {
        std::fs::copy(first.join("provenance.json"), dir.join("provenance.json"))
            .with_path(first.join("provenance.json"))?;
    }
    write_atomic(&dir.join("metadata.json"), md_text.as_bytes())?;
    let v = serde_json::to_value(md.shard_entries())
        .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
    write_atomic(
        &dir.join("shards.json"),
        ojson::dumps(&v, true, false).as_bytes(),
    )?;
    super::ActivationStore::open(&dir)?;
    for (_, _, p) in &seen {
        std::fs::remove_dir_all(p).with_path(p)?;
    }
    Ok(dir)
}
