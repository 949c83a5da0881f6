//! Record a backbone's activations for a whole dataset into a store, resumably — the layer
//! between the models (`backbone`, `data`) and the format (`store`).
//!
//! Images are decoded and preprocessed by a pool of reader threads, in parallel with the model;
//! batches are written in dataset order at their fixed offsets (`pwrite`), so a writer killed at
//! any moment (even `kill -9`) and re-run with the same arguments continues from the last batch
//! it recorded as done and finishes with exactly the bytes of an uninterrupted run. Progress
//! lives in `.saev-progress.json` (written atomically after each batch; created before
//! `metadata.json`, removed last), so a store without it is complete and is never overwritten.
//!
//! ```no_run
//! use saev::prelude::*;
//! let vit = Backbone::open("facebook/dinov2-small")?;
//! let data = saev::Dataset::open("photos/", None, false)?;
//! let dir = saev::record::record_activations(&vit, &data, "acts/", &saev::record::WriterConfig::default())?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backbone::Precision;
use crate::error::{Error, IoContext, Result};
use crate::store::merge::part_examples;
use crate::store::{
    ActivationStore, Metadata, Provenance, StoreWriter, PROTOCOL, PROVENANCE_VERSION,
};
use crate::store::{BF16_TAG, F16_TAG};
use crate::util::files::read_json;
use crate::util::files::write_atomic;
use crate::{Backbone, Dataset, Preprocess};

/// How to record. Serde struct with documented defaults; `with_*` setters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Blocks to record, Python style. Default `[-2]` (the paper's choice).
    pub layers: Vec<i64>,
    /// Images per forward pass. Default 32.
    pub batch_size: usize,
    /// Shard capacity in vectors. Default 2,400,000 (the Python saev's).
    pub max_tokens_per_shard: usize,
    /// Mask → patch label rule. Default [`PixelAgg::Majority`].
    pub pixel_agg: PixelAgg,
    /// Image decoding and preprocessing threads, each preparing whole batches while the model
    /// runs (at most `n_readers + 2` batches ahead of it). Default 0 = automatic: 2 when the
    /// model runs on the CPU (it needs the cores itself), every core up to 16 when it runs on a
    /// GPU (which a few decoders would keep waiting).
    pub n_readers: usize,
    /// Write only part `i` of `n` (`(i, n)`, whole shards each), to be joined by
    /// [`merge_parts`]. Default `None` (the whole store).
    pub part: Option<(usize, usize)>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            layers: vec![-2],
            batch_size: 32,
            max_tokens_per_shard: 2_400_000,
            pixel_agg: PixelAgg::Majority,
            n_readers: 0,
            part: None,
        }
    }
}

impl WriterConfig {
    /// Set the recorded layers.
    pub fn with_layers(mut self, layers: Vec<i64>) -> Self {
        self.layers = layers;
        self
    }
    /// Set the batch size.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Set the shard capacity (vectors).
    pub fn with_max_tokens_per_shard(mut self, n: usize) -> Self {
        self.max_tokens_per_shard = n;
        self
    }
    /// Write only part `i` of `n` (0-based).
    pub fn with_part(mut self, i: usize, n: usize) -> Self {
        self.part = Some((i, n));
        self
    }
    /// Set the image decoding threads (0 = automatic).
    pub fn with_n_readers(mut self, n: usize) -> Self {
        self.n_readers = n;
        self
    }
    /// The decoding threads used with a model on `device`: `n_readers`, or when 0, 2 on the CPU
    /// and every core up to 16 on a GPU.
    pub fn readers_for(&self, device: &candle_core::Device) -> usize {
        match self.n_readers {
            0 if device.is_cpu() => 2,
            0 => std::thread::available_parallelism().map_or(4, |n| n.get().min(16)),
            n => n,
        }
    }
    /// Set the mask aggregation.
    pub fn with_pixel_agg(mut self, agg: PixelAgg) -> Self {
        self.pixel_agg = agg;
        self
    }
}

/// How a patch's label is chosen from a segmentation mask's pixels (stored in the store's
/// `metadata.json` as `pixel_agg`, the Python saev's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PixelAgg {
    /// The most frequent class of the patch's pixels (`"majority"`).
    #[default]
    Majority,
    /// The most frequent non-background class when any is present (`"prefer-fg"`).
    PreferFg,
}

impl PixelAgg {
    /// The name stored in `metadata.json`.
    pub fn name(self) -> &'static str {
        match self {
            PixelAgg::Majority => "majority",
            PixelAgg::PreferFg => "prefer-fg",
        }
    }
}

impl std::str::FromStr for PixelAgg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::util::parse_name(s, &["majority", "prefer-fg"])
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    version: u32,
    fingerprint: String,
    batch_size: usize,
    n_done: usize,
}

const PROGRESS: &str = ".saev-progress.json";

/// Per-patch labels from a model-view mask: bincount per patch, argmax (first on ties);
/// `prefer-fg` ignores class 0 unless the patch is all background.
pub(crate) fn patch_labels(mask: &image::GrayImage, patch: usize, prefer_fg: bool) -> Vec<u8> {
    let (gw, gh) = (
        mask.width() as usize / patch,
        mask.height() as usize / patch,
    );
    let mut out = Vec::with_capacity(gw * gh);
    for py in 0..gh {
        for px in 0..gw {
            let mut counts = [0u32; 256];
            for y in py * patch..(py + 1) * patch {
                for x in px * patch..(px + 1) * patch {
                    counts[usize::from(mask.get_pixel(x as u32, y as u32).0[0])] += 1;
                }
            }
            if prefer_fg && counts[1..].iter().any(|&c| c > 0) {
                counts[0] = 0;
            }
            let mut best = 0;
            for c in 1..256 {
                if counts[c] > counts[best] {
                    best = c;
                }
            }
            out.push(best as u8);
        }
    }
    out
}

struct Prepared {
    pixels: Vec<f32>,
    labels: Option<Vec<u8>>,
    n: usize,
}

/// One batch through the model, on its way to the store: examples `s..s + n`, their
/// activations `[n, layers, tokens, d]`, registers and patch labels.
struct Recorded {
    s: usize,
    n: usize,
    acts: Vec<f32>,
    regs: Option<Vec<f32>>,
    labels: Option<Vec<u8>>,
}

fn prepare(
    ds: &Dataset,
    pre: &Preprocess,
    patch: usize,
    prefer_fg: bool,
    range: std::ops::Range<usize>,
) -> Result<Prepared> {
    let mut pixels = Vec::new();
    let mut labels: Option<Vec<u8>> = None;
    for i in range.clone() {
        let ex = ds.get(i)?;
        pixels.extend(pre.apply(&ex.image));
        if let Some(m) = ex.mask {
            labels.get_or_insert_with(Vec::new).extend(patch_labels(
                &pre.mask_view(&m),
                patch,
                prefer_fg,
            ));
        }
    }
    Ok(Prepared {
        pixels,
        labels,
        n: range.len(),
    })
}

fn provenance(ds: &Dataset) -> Provenance {
    let sources: Vec<String> = (0..ds.len()).map(|i| ds.source(i)).collect();
    Provenance {
        version: PROVENANCE_VERSION,
        classes: ds.class_names().to_vec(),
        stamp: Some(Provenance::stamp_of(&sources)),
        sources,
        labels: (0..ds.len()).map(|i| ds.label(i)).collect(),
    }
}

/// Record `backbone`'s activations over `dataset` into `<root>/<hash>/` (`<hash>-bf16/` for a
/// backbone in [`Precision::Bf16`]); returns that directory.
/// Resumes an interrupted run; returns a complete store as it is.
pub fn record_activations(
    backbone: &Backbone,
    dataset: &Dataset,
    root: impl AsRef<Path>,
    cfg: &WriterConfig,
) -> Result<PathBuf> {
    let root = root.as_ref();
    let mut seen = Vec::new();
    for &l in &cfg.layers {
        let i = backbone.layer_index(l)?;
        if seen.contains(&i) {
            // The same block twice (`-2,-2`, or `-2` and `10` of 12): twice the disk for one
            // block, and a reader asking for it finds only the first.
            return Err(Error::out_of_range(
                "layers",
                format!("{:?}", cfg.layers),
                "distinct blocks (a block given twice, counted from either end)",
            ));
        }
        seen.push(i);
    }
    let (h, w) = backbone.input_size();
    let md = Metadata {
        family: backbone.family().as_str().into(),
        ckpt: backbone.name().into(),
        layers: cfg.layers.clone(),
        content_tokens_per_example: backbone.n_patches(),
        cls_token: backbone.has_cls(),
        d_model: backbone.d_model(),
        n_examples: dataset.len(),
        max_tokens_per_shard: cfg.max_tokens_per_shard,
        data: dataset.describe(),
        dataset: dataset.root().display().to_string(),
        pixel_agg: cfg.pixel_agg.name().into(),
        dtype: "float32".into(),
        protocol: PROTOCOL.into(),
    };
    md.validate(Path::new("<writer config>"))?;
    // A store recorded with bf16 linear layers holds other numbers than the f32 one of the
    // same metadata (which stays the Python saev's, field for field): its directory says so,
    // so neither is ever reused or resumed as the other.
    let tag = match backbone.precision() {
        Precision::F32 => "",
        Precision::Bf16 => BF16_TAG,
        Precision::F16 => F16_TAG,
    };
    let (dir, range) = match cfg.part {
        None => (root.join(format!("{}{tag}", md.hash())), 0..md.n_examples),
        Some((i, n)) if i < n => (
            root.join(format!("{}{tag}.part-{i}-of-{n}", md.hash())),
            part_examples(&md, i, n),
        ),
        Some((i, n)) => {
            return Err(Error::out_of_range(
                format!("part i of {n}:"),
                i,
                format!("0..{n}"),
            ))
        }
    };
    // `--out` naming a store itself (not the directory of stores): the same recording is that
    // store (reused or resumed); another one is refused — it would be written in full inside it.
    let dir = if root.join("metadata.json").exists() {
        if root.file_name() == dir.file_name() {
            root.to_path_buf()
        } else {
            return Err(Error::output_dir(
                root,
                "is an activation store of another recording (stores go in a directory of \
                 stores, each named by its hash)",
                format!(
                    "pass its parent directory{}",
                    root.parent()
                        .map(|p| format!(" ({})", p.display()))
                        .unwrap_or_default()
                ),
            ));
        }
    } else {
        dir
    };
    let prog_path = dir.join(PROGRESS);
    let prov = provenance(dataset);
    let prov_text = serde_json::to_string(&prov)
        .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
    let fingerprint = format!(
        "{:x}",
        Sha256::digest(format!("{prov_text}|{h}x{w}{tag}").as_bytes())
    );

    let mut n_done = range.start;
    // Complete: validate and hand it back untouched — if it is of these files as they are now
    // (the same count of other or changed images would be reused silently).
    let complete = || dir.join("metadata.json").exists() && !prog_path.exists();
    let reuse = || -> Result<PathBuf> {
        if cfg.part.is_none() {
            let store = ActivationStore::open(&dir)?;
            if let Some(old) = store.provenance() {
                let changed = if old.sources != prov.sources {
                    let e = (0..old.sources.len().max(prov.sources.len()))
                        .find(|&e| old.sources.get(e) != prov.sources.get(e))
                        .unwrap_or(0);
                    Some(format!(
                        "example {e} was {:?}, the dataset now lists {:?}",
                        old.sources.get(e).map_or("(none)", String::as_str),
                        prov.sources.get(e).map_or("(none)", String::as_str)
                    ))
                } else if old.stamp.is_some() && old.stamp != prov.stamp {
                    Some("its files' sizes or modification times changed".into())
                } else {
                    None
                };
                if let Some(what) = changed {
                    return Err(Error::output_dir(
                        &dir,
                        format!("a store of this dataset as it was when recorded: {what}"),
                        "remove it to record the images as they are now, or choose another --out",
                    ));
                }
            }
        }
        Ok(dir.clone())
    };
    if complete() {
        return reuse();
    }
    // One writer at a time (two Slurm tasks given the same --part, a job started twice): the
    // second is refused before it touches the progress file or a shard. A complete store is
    // only read above, so a read-only one is still reused.
    std::fs::create_dir_all(&dir).with_path(&dir)?;
    let lock = crate::util::files::DirLock::acquire(&dir, "recording of activations")?;
    if complete() {
        // Finished by the run that held the lock a moment ago.
        return reuse();
    }
    let mut writer = if prog_path.exists() {
        let p: Progress = read_json(&prog_path)?;
        if p.fingerprint != fingerprint {
            return Err(Error::Store {
                path: prog_path,
                msg: "an interrupted run over another dataset listing (or files changed since); remove the directory to start over".into(),
            });
        }
        if p.batch_size != cfg.batch_size {
            // Batches of another size round differently in the GEMMs: the store would not be
            // the bytes of an uninterrupted run.
            return Err(Error::Store {
                path: prog_path,
                msg: format!(
                    "an interrupted run with batch size {} ({} now); rerun with --batch-size {} to resume it, or remove the directory to start over",
                    p.batch_size, cfg.batch_size, p.batch_size
                ),
            });
        }
        n_done = p.n_done.max(range.start);
        // Killed between the progress file and metadata.json / provenance.json: write them now.
        if !dir.join("metadata.json").exists() {
            write_atomic(&dir.join("metadata.json"), md.to_json().as_bytes())?;
        }
        if !dir.join("provenance.json").exists() {
            write_atomic(&dir.join("provenance.json"), prov_text.as_bytes())?;
        }
        StoreWriter::reopen(dir.clone(), md.clone(), cfg.part)
            .with_registers(backbone.config().num_register_tokens)
    } else {
        // The progress file comes first: a directory with metadata.json but no progress file
        // is a complete store.
        std::fs::create_dir_all(&dir).with_path(&dir)?;
        let p = Progress {
            version: 1,
            fingerprint: fingerprint.clone(),
            batch_size: cfg.batch_size,
            n_done: range.start,
        };
        write_atomic(
            &prog_path,
            &serde_json::to_vec(&p)
                .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?,
        )?;
        let mut w = StoreWriter::create_in(dir.clone(), md.clone(), Some(&prov))?
            .with_registers(backbone.config().num_register_tokens);
        w.part = cfg.part;
        w
    };

    let bar = crate::util::progress::bar(range.end as u64, "images");
    bar.set_position(n_done as u64);
    // The rate counts from here: a resumed run is not thousands of images a second.
    bar.reset_eta();

    let bs = cfg.batch_size.max(1);
    let starts: Vec<usize> = (n_done..range.end).step_by(bs).collect();
    let pre = backbone.preprocess().clone();
    let patch = backbone.patch_size();
    let prefer_fg = cfg.pixel_agg == PixelAgg::PreferFg;
    let next = AtomicUsize::new(0);
    // Batches the model has taken, and whether it stopped (readers then stop waiting).
    let taken = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let writer = std::thread::scope(|scope| -> Result<StoreWriter> {
        let n_readers = cfg.readers_for(backbone.device());
        // At most this many batches ahead of the model (being prepared, queued, or waiting for
        // an earlier one): memory stays bounded whatever the core count, and one slow image
        // does not let the others pile up.
        let window = n_readers + 2;
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<Prepared>)>(window);
        for _ in 0..n_readers {
            let tx = tx.clone();
            let (starts, next, pre, taken, done) = (&starts, &next, &pre, &taken, &done);
            scope.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&s) = starts.get(k) else { break };
                while k >= taken.load(Ordering::Acquire) + window {
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                let end = (s + bs).min(range.end);
                if tx
                    .send((k, prepare(dataset, pre, patch, prefer_fg, s..end)))
                    .is_err()
                {
                    break;
                }
            });
        }
        drop(tx);
        // The store is written by its own thread, a batch behind the model: on a GPU the next
        // forward runs while this batch is checked and written (a batch's activations are
        // ~100 MB at batch 256), and the progress file still follows its batch's bytes.
        let (out_tx, out_rx) = mpsc::sync_channel::<Recorded>(1);
        let name = backbone.name().to_string();
        let (md_w, dir_w, prog_w, fp_w, bar_w) = (&md, &dir, &prog_path, &fingerprint, &bar);
        let store_thread = scope.spawn(move || -> Result<StoreWriter> {
            for b in out_rx {
                if let Some(i) = b.acts.iter().position(|v| !v.is_finite()) {
                    let (d, t_n, l_n) = (md_w.d_model, md_w.tokens_per_example(), md_w.layers.len());
                    let (e, rest) = (i / (l_n * t_n * d), i % (l_n * t_n * d));
                    let (l, t) = (rest / (t_n * d), rest % (t_n * d) / d);
                    return Err(Error::Store {
                        path: dir_w.clone(),
                        msg: format!(
                            "{name} produced a non-finite activation ({}) for example {} ({}), layer {}, token {t} as stored (0 = CLS when present), dimension {}; nothing of this batch was written",
                            b.acts[i],
                            b.s + e,
                            dataset.source(b.s + e),
                            md_w.layers[l],
                            rest % d
                        ),
                    });
                }
                writer.write_examples(b.s, &b.acts)?;
                if let Some(r) = &b.regs {
                    writer.write_registers(b.s, r)?;
                }
                if let Some(l) = &b.labels {
                    writer.write_labels(b.s, l)?;
                }
                let p = Progress {
                    version: 1,
                    fingerprint: fp_w.clone(),
                    batch_size: bs,
                    n_done: b.s + b.n,
                };
                write_atomic(
                    prog_w,
                    &serde_json::to_vec(&p)
                        .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?,
                )?;
                bar_w.set_position((b.s + b.n) as u64);
            }
            Ok(writer)
        });
        let consume = || -> Result<()> {
            let mut pending = BTreeMap::new();
            for (k, &s) in starts.iter().enumerate() {
                let prepared = loop {
                    if let Some(p) = pending.remove(&k) {
                        break p;
                    }
                    let (j, p) = rx
                        .recv()
                        .map_err(|_| Error::Internal("the image reader threads stopped".into()))?;
                    pending.insert(j, p);
                };
                taken.store(k + 1, Ordering::Release);
                let prepared: Prepared = prepared?;
                let pixels = candle_core::Tensor::from_vec(
                    prepared.pixels,
                    (prepared.n, 3, h, w),
                    backbone.device(),
                )?;
                let (acts, regs) = backbone.record_with_registers(&pixels, &md.layers)?;
                let batch = Recorded {
                    s,
                    n: prepared.n,
                    acts: acts.flatten_all()?.to_vec1::<f32>()?,
                    regs: match regs {
                        Some(r) => Some(r.flatten_all()?.to_vec1::<f32>()?),
                        None => None,
                    },
                    labels: prepared.labels,
                };
                if out_tx.send(batch).is_err() {
                    // The store thread stopped on an error: it is returned below.
                    break;
                }
            }
            Ok(())
        };
        let res = consume();
        done.store(true, Ordering::Release);
        drop(out_tx);
        // The store thread's error first (it stopped the model); then the model's.
        let written = store_thread
            .join()
            .map_err(|_| Error::Internal("the store writer thread panicked".into()))?;
        let writer = written?;
        res?;
        Ok(writer)
    })?;
    let dir = writer.finish()?;
    bar.finish_and_clear();
    std::fs::remove_file(&prog_path).with_path(&prog_path)?;
    // The finished store holds only its own files (byte for byte a run's, whoever recorded it).
    lock.remove();
    Ok(dir)
}

impl ActivationStore {
    /// Record `data` through `vit` under `root` with the default writer settings (block −2,
    /// see [`WriterConfig`]) and open the store; a store already recorded from the same model,
    /// data and settings is reused, an interrupted one resumed. For other settings call
    /// [`record_activations`].
    pub fn record(vit: &Backbone, data: &Dataset, root: impl AsRef<Path>) -> Result<Self> {
        Self::open(record_activations(
            vit,
            data,
            root.as_ref(),
            &WriterConfig::default(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_labels_majority_and_prefer_fg() {
        // 4x2 mask, patch 2: left patch has 3 background + 1 class 5; right all class 7.
        let mask = image::GrayImage::from_raw(4, 2, vec![0, 0, 7, 7, 0, 5, 7, 7]).unwrap();
        assert_eq!(patch_labels(&mask, 2, false), vec![0, 7]);
        assert_eq!(patch_labels(&mask, 2, true), vec![5, 7]);
        // Ties go to the smaller class.
        let tie = image::GrayImage::from_raw(2, 2, vec![3, 3, 2, 2]).unwrap();
        assert_eq!(patch_labels(&tie, 2, false), vec![2]);
    }

    #[test]
    fn readers_default_to_two_on_the_cpu_and_keep_an_explicit_count() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(WriterConfig::default().readers_for(&cpu), 2);
        assert_eq!(
            WriterConfig::default().with_n_readers(5).readers_for(&cpu),
            5
        );
        // A config written before the field was automatic keeps its count.
        let old: WriterConfig = serde_json::from_str(r#"{"n_readers": 2}"#).unwrap();
        assert_eq!(old.readers_for(&cpu), 2);
    }
}
