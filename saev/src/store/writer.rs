//! Write a store's files: [`StoreWriter`] (shards at full size, `shards.json` as shards
//! complete, labels, register tokens); parts are joined by [`super::merge::merge_parts`]. Recording a backbone over a dataset
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

use super::format::Metadata;
use super::{ojson, Provenance};
use crate::error::{Error, IoContext, Result};
use crate::util::files::write_atomic;

/// Open (creating) a file for in-place writes, extended with zeros to at least `len` bytes;
/// existing contents are kept (a resumed writer continues in it).
pub(super) fn open_at_least(path: &Path, len: u64) -> Result<File> {
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
        if !regs.len().is_multiple_of(per) || first + regs.len() / per > self.md.n_examples {
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
            Some((i, n)) => super::merge::part_shards(&self.md, i, n),
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
        if !acts.len().is_multiple_of(per) || first + acts.len() / per > self.md.n_examples {
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
            let text = serde_json::to_vec(&super::merge::PartInfo {
                version: 1,
                part: i,
                n_parts: n,
            })
            .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
            write_atomic(&self.dir.join(super::merge::PART), &text)?;
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

pub(super) fn write_registers_info(dir: &Path, n_registers: usize) -> Result<()> {
    let info = super::RegistersInfo {
        version: super::REGISTERS_VERSION,
        n_registers,
    };
    let text =
        serde_json::to_vec(&info).map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
    write_atomic(&dir.join("registers.json"), &text)
}
