//! Loaders over an [`ActivationStore`]: shuffled batches of vectors for training, and examples in
//! order for feature passes; plus the normalisation statistics every later step shares.
//!
//! Shuffled: the vectors of one layer (patches, CLS or both) are visited in the order of a seeded
//! pseudo-random permutation — each exactly once per epoch, O(1) memory whatever the store size.
//! A background thread gathers the next batches from the memory-mapped shards (indices sorted
//! within a batch for locality) into a bounded queue, so the consumer does not wait.
//!
//! ```no_run
//! use saev::{ActivationStore, LoaderConfig, Tokens};
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! for batch in store.shuffled(&LoaderConfig::new(-2).with_batch_size(4096), 0)? {
//!     let acts_nd = batch.acts_nd; // [n, d] row-major
//! }
//! # Ok::<(), saev::Error>(())
//! ```

use std::sync::mpsc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::permute::Permutation;
use super::ActivationStore;
use crate::error::{Error, IoContext, Result};

/// Which tokens of each example a loader yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tokens {
    /// Patch tokens only (the paper's choice).
    Patches,
    /// The CLS token only.
    Cls,
    /// CLS and patches.
    All,
}

impl Tokens {
    fn name(self) -> &'static str {
        match self {
            Tokens::Patches => "patches",
            Tokens::Cls => "cls",
            Tokens::All => "all",
        }
    }
}

/// Loader settings. Defaults: layer as given, patches, batch 4096, seed 0, 4 batches prefetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Recorded layer to read (by the value it was recorded under, e.g. -2).
    pub layer: i64,
    /// Tokens to read. Default patches.
    pub tokens: Tokens,
    /// Vectors per batch. Default 4096.
    pub batch_size: usize,
    /// Shuffle seed. Default 0.
    pub seed: u64,
    /// Batches gathered ahead. Default 4.
    pub prefetch: usize,
    /// Only these examples (`[start, end)`; None = all). Training and held-out splits.
    #[serde(default)]
    pub examples: Option<(usize, usize)>,
}

impl LoaderConfig {
    /// Defaults for `layer`.
    pub fn new(layer: i64) -> Self {
        Self {
            layer,
            tokens: Tokens::Patches,
            batch_size: 4096,
            seed: 0,
            prefetch: 4,
            examples: None,
        }
    }
    /// Only examples `start..end`.
    pub fn with_examples(mut self, start: usize, end: usize) -> Self {
        self.examples = Some((start, end));
        self
    }
    /// Set the tokens.
    pub fn with_tokens(mut self, t: Tokens) -> Self {
        self.tokens = t;
        self
    }
    /// Set the batch size.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// Set the seed.
    pub fn with_seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
}

/// A batch of vectors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[n, d]` row-major.
    pub acts_nd: Vec<f32>,
    /// Rows.
    pub n: usize,
    /// Columns (`d_model`).
    pub d: usize,
    /// Global vector index of each row (`example · n_tokens + token position`).
    pub index: Vec<u64>,
}

/// Geometry of the vectors a loader reads.
#[derive(Clone)]
struct View {
    store: ActivationStore,
    layer_pos: usize,
    first_token: usize,
    n_tok: usize,
    /// First example and number of examples in view.
    e0: usize,
    n_ex: usize,
}

impl View {
    fn new(
        store: &ActivationStore,
        layer: i64,
        tokens: Tokens,
        examples: Option<(usize, usize)>,
    ) -> Result<Self> {
        let layer_pos = store.layer_position(layer)?;
        let cls = usize::from(store.has_cls());
        let (first_token, n_tok) = match tokens {
            Tokens::Patches => (cls, store.n_patches()),
            Tokens::All => (0, store.tokens_per_example()),
            Tokens::Cls if cls == 1 => (0, 1),
            Tokens::Cls => return Err(Error::Invalid("this store has no CLS token".into())),
        };
        let (e0, e1) = examples.unwrap_or((0, store.n_examples()));
        if e0 >= e1 || e1 > store.n_examples() {
            return Err(Error::Invalid(format!(
                "{}: examples {e0}..{e1} are not a non-empty part of the store's 0..{}",
                store.dir().display(),
                store.n_examples()
            )));
        }
        Ok(Self {
            store: store.clone(),
            layer_pos,
            first_token,
            n_tok,
            e0,
            n_ex: e1 - e0,
        })
    }

    fn n_vectors(&self) -> u64 {
        (self.n_ex * self.n_tok) as u64
    }

    fn vector(&self, v: u64) -> &[f32] {
        let (e, t) = (
            self.e0 + (v / self.n_tok as u64) as usize,
            (v % self.n_tok as u64) as usize,
        );
        let d = self.store.d_model();
        let off = (self.layer_pos * self.store.tokens_per_example() + self.first_token + t) * d;
        // `v < n_vectors` by construction, so the example exists.
        match self.store.example(e) {
            Ok(x) => &x[off..off + d],
            Err(_) => &[],
        }
    }

    fn gather(&self, idx: &[u64]) -> Vec<f32> {
        let d = self.store.d_model();
        let mut out = vec![0f32; idx.len() * d];
        out.par_chunks_mut(d * 256)
            .zip(idx.par_chunks(256))
            .for_each(|(o, ix)| {
                for (row, &v) in o.chunks_exact_mut(d).zip(ix) {
                    row.copy_from_slice(self.vector(v - (self.e0 * self.n_tok) as u64));
                }
            });
        out
    }
}

/// Shuffled batches for one epoch (see the module docs). Iterate it.
pub struct ShuffledLoader {
    rx: mpsc::Receiver<Batch>,
    n_batches: usize,
}

impl Iterator for ShuffledLoader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.rx.recv().ok()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.n_batches))
    }
}

impl ShuffledLoader {
    /// Batches in this epoch (the last may be short).
    pub fn n_batches(&self) -> usize {
        self.n_batches
    }
}

impl ActivationStore {
    /// Shuffled batches of epoch `epoch` (each epoch has its own order, fixed by the seed).
    pub fn shuffled(&self, cfg: &LoaderConfig, epoch: u64) -> Result<ShuffledLoader> {
        self.shuffled_from(cfg, epoch, 0)
    }

    /// [`ActivationStore::shuffled`] starting at batch `first_batch` of the epoch (resuming).
    pub fn shuffled_from(
        &self,
        cfg: &LoaderConfig,
        epoch: u64,
        first_batch: usize,
    ) -> Result<ShuffledLoader> {
        let view = View::new(self, cfg.layer, cfg.tokens, cfg.examples)?;
        let base = (view.e0 * view.n_tok) as u64;
        let n = view.n_vectors();
        let bs = cfg.batch_size.max(1) as u64;
        let n_batches = n.div_ceil(bs) as usize;
        let perm = Permutation::new(n, cfg.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (tx, rx) = mpsc::sync_channel(cfg.prefetch.max(1));
        std::thread::spawn(move || {
            for b in first_batch as u64..n_batches as u64 {
                let mut idx: Vec<u64> = (b * bs..((b + 1) * bs).min(n))
                    .map(|i| base + perm.apply(i))
                    .collect();
                idx.sort_unstable();
                let acts_nd = view.gather(&idx);
                let batch = Batch {
                    n: idx.len(),
                    d: view.store.d_model(),
                    acts_nd,
                    index: idx,
                };
                if tx.send(batch).is_err() {
                    break;
                }
            }
        });
        Ok(ShuffledLoader {
            rx,
            n_batches: n_batches.saturating_sub(first_batch),
        })
    }

    /// Examples in order, `n_examples` at a time: `(first example, [n, n_tok, d] floats)`.
    pub fn ordered(
        &self,
        layer: i64,
        tokens: Tokens,
        n_examples: usize,
    ) -> Result<impl Iterator<Item = (usize, Vec<f32>)> + '_> {
        self.ordered_range(layer, tokens, n_examples, (0, self.n_examples()))
    }

    /// [`ActivationStore::ordered`] over examples `range.0..range.1` only.
    pub fn ordered_range(
        &self,
        layer: i64,
        tokens: Tokens,
        n_examples: usize,
        range: (usize, usize),
    ) -> Result<impl Iterator<Item = (usize, Vec<f32>)> + '_> {
        let view = View::new(self, layer, tokens, Some(range))?;
        let step = n_examples.max(1);
        Ok((range.0..range.1).step_by(step).map(move |e0| {
            let e1 = (e0 + step).min(range.1);
            let idx: Vec<u64> = ((e0 * view.n_tok) as u64..(e1 * view.n_tok) as u64).collect();
            (e0, view.gather(&idx))
        }))
    }

    /// Normalisation statistics for `layer`/`tokens`: computed from a seeded sample of up to
    /// 2^19 vectors and saved beside the store (`norm-<layer>-<tokens>.json`), or loaded if there.
    pub fn norm_stats(&self, layer: i64, tokens: Tokens) -> Result<NormStats> {
        let path = self
            .dir()
            .join(format!("norm-{layer}-{}.json", tokens.name()));
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_path(&path)?;
            let s: NormStats = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
            if s.version != NORM_VERSION {
                return Err(Error::Store {
                    path,
                    msg: format!("unknown version {}", s.version),
                });
            }
            return Ok(s);
        }
        let s = NormStats::compute(self, layer, tokens, 1 << 19, 0)?;
        let text = serde_json::to_string(&s).map_err(|e| Error::Invalid(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_path(&tmp)?;
        std::fs::rename(&tmp, &path).with_path(&path)?;
        Ok(s)
    }
}

const NORM_VERSION: u32 = 1;

/// Mean vector and scalar so that `(x − mean) / scalar` has mean L2 norm √d (the paper's
/// normalisation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    /// Format version (1).
    pub version: u32,
    /// Layer the statistics are for.
    pub layer: i64,
    /// Tokens they are for.
    pub tokens: Tokens,
    /// Vectors sampled.
    pub n_samples: usize,
    /// Sampling seed.
    pub seed: u64,
    /// Per-dimension mean, `d` values.
    pub mean: Vec<f32>,
    /// `mean ‖x − mean‖₂ / √d`.
    pub scalar: f32,
}

impl NormStats {
    /// Compute from the first `max_samples` vectors of a seeded permutation (all when fewer).
    pub fn compute(
        store: &ActivationStore,
        layer: i64,
        tokens: Tokens,
        max_samples: usize,
        seed: u64,
    ) -> Result<Self> {
        let view = View::new(store, layer, tokens, None)?;
        let n = view.n_vectors();
        let k = (max_samples as u64).min(n);
        let perm = Permutation::new(n, seed);
        let d = store.d_model();
        let mut idx: Vec<u64> = (0..k).map(|i| perm.apply(i)).collect();
        idx.sort_unstable();
        let mut sum = vec![0f64; d];
        for &v in &idx {
            for (s, &x) in sum.iter_mut().zip(view.vector(v)) {
                *s += f64::from(x);
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / k as f64).collect();
        let mut norm_sum = 0f64;
        for &v in &idx {
            let sq: f64 = view
                .vector(v)
                .iter()
                .zip(&mean)
                .map(|(&x, m)| (f64::from(x) - m).powi(2))
                .sum();
            norm_sum += sq.sqrt();
        }
        let scalar = (norm_sum / k as f64 / (d as f64).sqrt()) as f32;
        Ok(Self {
            version: NORM_VERSION,
            layer,
            tokens,
            n_samples: k as usize,
            seed,
            mean: mean.iter().map(|&m| m as f32).collect(),
            scalar,
        })
    }
}
