//! Loaders over an [`ActivationStore`]: shuffled batches of vectors for training, and examples in
//! order for feature passes; plus the normalisation statistics every later step shares.
//!
//! Shuffled: the vectors of one layer (patches, CLS or both) are visited in the order of a seeded
//! pseudo-random permutation — each exactly once per epoch, O(1) memory whatever the store size.
//! A background thread gathers the next batches from the memory-mapped shards (indices sorted
//! within a batch for locality) into a bounded queue, so the consumer does not wait.
//!
//! ```no_run
//! use saev::{ActivationStore, store::LoaderConfig, store::Tokens};
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! for batch in store.shuffled(&LoaderConfig::new(-2).with_batch_size(4096), 0)? {
//!     let acts_nd = batch.acts_nd; // [n, d] row-major
//! }
//! # Ok::<(), saev::Error>(())
//! ```

use std::path::Path;
use std::sync::mpsc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::permute::Permutation;
use super::ActivationStore;
use crate::error::{Error, Result};
use crate::util::files::read_json;
use crate::util::rng::splitmix64;

/// Which tokens of each example a loader yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokens {
    /// Patch tokens only (the paper's choice).
    Patches,
    /// The CLS token only.
    Cls,
    /// CLS and patches.
    All,
}

impl std::str::FromStr for Tokens {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::util::parse_name(s, &["patches", "cls", "all"])
    }
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

/// Which of a store's examples a loader reads. Serde: `{"kind": "range", "start": 0, "end": 9}`.
///
/// Splits are seeded random, not "the last n": stores recorded from class-sorted folders would
/// otherwise hold out one class.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Examples {
    /// Every example (the default).
    #[default]
    All,
    /// Examples `start..end`.
    Range {
        /// First example.
        start: usize,
        /// One past the last.
        end: usize,
    },
    /// The held-out side of a seeded random split: `n_held_out` examples drawn by a seeded
    /// permutation of all of them.
    HeldOut {
        /// Held-out examples.
        n_held_out: usize,
        /// Split seed.
        seed: u64,
    },
    /// The other side of the same split: every example not in `HeldOut { n_held_out, seed }`.
    Train {
        /// Held-out examples (excluded).
        n_held_out: usize,
        /// Split seed.
        seed: u64,
    },
}

impl std::fmt::Display for Examples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Examples::All => write!(f, "all"),
            Examples::Range { start, end } => write!(f, "{start}..{end}"),
            Examples::HeldOut { n_held_out, seed } => {
                write!(f, "{n_held_out} held out at random (seed {seed})")
            }
            Examples::Train { n_held_out, seed } => {
                write!(f, "all but {n_held_out} held out at random (seed {seed})")
            }
        }
    }
}

impl From<(usize, usize)> for Examples {
    fn from((start, end): (usize, usize)) -> Self {
        Examples::Range { start, end }
    }
}

impl Examples {
    /// The held-out side of a seeded split of the store's examples.
    pub fn held_out(n_held_out: usize, seed: u64) -> Self {
        Examples::HeldOut { n_held_out, seed }
    }

    /// The training side of a seeded split.
    pub fn train(n_held_out: usize, seed: u64) -> Self {
        Examples::Train { n_held_out, seed }
    }

    /// The store example indices, ascending; an error when they are empty or out of range.
    pub fn ids(&self, n_examples: usize) -> Result<Vec<usize>> {
        let bad =
            |value: String, valid: String| Err(Error::out_of_range("examples:", value, valid));
        let ids: Vec<usize> = match *self {
            Examples::All => (0..n_examples).collect(),
            Examples::Range { start, end } => {
                if start >= end || end > n_examples {
                    return bad(
                        format!("{start}..{end}"),
                        format!("a non-empty part of the store's 0..{n_examples}"),
                    );
                }
                (start..end).collect()
            }
            Examples::HeldOut { n_held_out, seed } | Examples::Train { n_held_out, seed } => {
                if n_held_out > n_examples {
                    return bad(
                        format!("{n_held_out} held out of a store with {n_examples} examples"),
                        format!("at most {n_examples} held out"),
                    );
                }
                let perm = Permutation::new(n_examples as u64, seed ^ SPLIT_SALT);
                let mut held = vec![false; n_examples];
                for i in 0..n_held_out as u64 {
                    held[perm.apply(i) as usize] = true;
                }
                let want = matches!(self, Examples::HeldOut { .. });
                (0..n_examples).filter(|&e| held[e] == want).collect()
            }
        };
        if ids.is_empty() {
            return bad(
                format!("{self:?}, which selects none of the store's {n_examples}"),
                "a split that selects at least one example".into(),
            );
        }
        Ok(ids)
    }
}

/// Keeps split permutations apart from the shuffles drawn with the same seed.
const SPLIT_SALT: u64 = 0x5eed_0000_0000_0001;

/// How the shuffled loader orders an epoch. Serde: `{"kind": "global"}` or
/// `{"kind": "blocks", "block": 256, "window": 256}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Shuffle {
    /// Every vector anywhere in the store (the default): random reads of one vector each, best
    /// when the store is in RAM or the page cache.
    #[default]
    Global,
    /// For a store larger than RAM, read from disk: runs of `block` consecutive vectors (one
    /// read each, sequential on disk) in a seeded random order, `window` runs at a time shuffled
    /// together; every vector still once per epoch. A batch mixes `window` places of the store
    /// instead of `batch_size` (with `block` = patches per image: `window` images).
    Blocks {
        /// Consecutive vectors per run (default 256: one DINOv2 image at 224²); taken as 1 when
        /// 0 and as the whole view when longer.
        block: u64,
        /// Runs shuffled together (default 256); at least 1, at most all runs.
        window: u64,
    },
}

impl Shuffle {
    /// [`Shuffle::Blocks`] with its defaults (256 runs of 256 vectors).
    pub fn blocks() -> Self {
        Shuffle::Blocks {
            block: 256,
            window: 256,
        }
    }
}

/// The order of one epoch: view vector at each position.
enum Order {
    Global(Permutation),
    Blocks {
        n: u64,
        block: u64,
        window: u64,
        n_blocks: u64,
        runs: Permutation,
        seed: u64,
    },
}

impl Order {
    fn new(n: u64, shuffle: Shuffle, seed: u64) -> Self {
        match shuffle {
            Shuffle::Global => Order::Global(Permutation::new(n, seed)),
            Shuffle::Blocks { block, window } => {
                // A run longer than the view is the whole view; more runs per window than
                // there are runs is all of them (huge settings would otherwise build and walk
                // a permutation of `window · block` mostly empty places).
                let block = block.clamp(1, n.max(1));
                let n_blocks = n.div_ceil(block);
                let window = window.clamp(1, n_blocks.max(1));
                Order::Blocks {
                    n,
                    block,
                    window,
                    n_blocks,
                    runs: Permutation::new(n_blocks, seed),
                    seed,
                }
            }
        }
    }

    /// The view indices of the epoch in order, from the `skip`-th on. `prefetch(first, len)` is
    /// called with the runs of each window and of the next one as a window starts (blocks).
    fn indices(
        self,
        skip: u64,
        prefetch: impl Fn(u64, u64) + Send + Clone + 'static,
    ) -> Box<dyn Iterator<Item = u64> + Send> {
        match self {
            Order::Global(perm) => {
                let n = perm.len();
                Box::new((skip..n).map(move |i| perm.apply(i)))
            }
            Order::Blocks {
                n,
                block,
                window,
                n_blocks,
                runs,
                seed,
            } => {
                let n_windows = n_blocks.div_ceil(window);
                let it = (0..n_windows).flat_map(move |w| {
                    let first = w * window;
                    let k = window.min(n_blocks - first);
                    let local = Permutation::new(k * block, splitmix64(seed ^ (w + 1)));
                    let runs = runs.clone();
                    // This window's runs (the first may wait on them) and the next window's.
                    for r in first..(first + 2 * window).min(n_blocks) {
                        let v = runs.apply(r) * block;
                        prefetch(v, block.min(n - v));
                    }
                    (0..k * block).filter_map(move |j| {
                        let l = local.apply(j);
                        let v = runs.apply(first + l / block) * block + l % block;
                        (v < n).then_some(v)
                    })
                });
                Box::new(it.skip(skip as usize))
            }
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
    /// Which examples (training and held-out splits). Default all.
    #[serde(default)]
    pub examples: Examples,
    /// The epoch's order. Default [`Shuffle::Global`].
    #[serde(default)]
    pub shuffle: Shuffle,
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
            examples: Examples::All,
            shuffle: Shuffle::Global,
        }
    }
    /// Set the epoch's order ([`Shuffle::blocks`] for a store larger than RAM).
    pub fn with_shuffle(mut self, shuffle: Shuffle) -> Self {
        self.shuffle = shuffle;
        self
    }
    /// Only these examples (a range `(start, end)` or an [`Examples`] split).
    pub fn with_examples(mut self, examples: impl Into<Examples>) -> Self {
        self.examples = examples.into();
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
    /// Set the batches gathered ahead.
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
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
    /// The store examples in view, ascending.
    ids: std::sync::Arc<Vec<usize>>,
}

impl View {
    fn new(
        store: &ActivationStore,
        layer: i64,
        tokens: Tokens,
        examples: &Examples,
    ) -> Result<Self> {
        let layer_pos = store.layer_position(layer)?;
        let cls = usize::from(store.has_cls());
        let (first_token, n_tok) = match tokens {
            Tokens::Patches => (cls, store.n_patches()),
            Tokens::All => (0, store.tokens_per_example()),
            Tokens::Cls if cls == 1 => (0, 1),
            Tokens::Cls => {
                return Err(Error::missing(
                    store.dir().display().to_string(),
                    "no CLS token",
                    "read `patches`",
                ))
            }
        };
        let ids = examples.ids(store.n_examples()).map_err(|e| match e {
            Error::OutOfRange { what, value, valid } => Error::OutOfRange {
                what: format!("{}: {what}", store.dir().display()),
                value,
                valid,
            },
            e => e,
        })?;
        Ok(Self {
            store: store.clone(),
            layer_pos,
            first_token,
            n_tok,
            ids: std::sync::Arc::new(ids),
        })
    }

    fn n_vectors(&self) -> u64 {
        (self.ids.len() * self.n_tok) as u64
    }

    /// The store-wide index (`example · n_tok + token`) of view vector `v`.
    fn global(&self, v: u64) -> u64 {
        let n_tok = self.n_tok as u64;
        self.ids[(v / n_tok) as usize] as u64 * n_tok + v % n_tok
    }

    /// View vector `v` (`v < n_vectors`).
    fn vector(&self, v: u64) -> &[f32] {
        let (e, t) = (
            self.ids[(v / self.n_tok as u64) as usize],
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

    /// Start reading view vectors `first..first + len` (see [`ActivationStore::prefetch`]).
    fn prefetch(&self, first: u64, len: u64) {
        let n_tok = self.n_tok as u64;
        let d = self.store.d_model();
        let base = self.layer_pos * self.store.tokens_per_example() + self.first_token;
        let mut v = first;
        while v < first + len && v < self.n_vectors() {
            let (i, t) = ((v / n_tok) as usize, (v % n_tok) as usize);
            let take = (n_tok - t as u64).min(first + len - v) as usize;
            self.store
                .prefetch(self.ids[i], (base + t) * d..(base + t + take) * d);
            v += take as u64;
        }
    }

    fn gather(&self, idx: &[u64]) -> Vec<f32> {
        let d = self.store.d_model();
        let mut out = vec![0f32; idx.len() * d];
        out.par_chunks_mut(d * 256)
            .zip(idx.par_chunks(256))
            .for_each(|(o, ix)| {
                for (row, &v) in o.chunks_exact_mut(d).zip(ix) {
                    row.copy_from_slice(self.vector(v));
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
        let view = View::new(self, cfg.layer, cfg.tokens, &cfg.examples)?;
        let n = view.n_vectors();
        let bs = cfg.batch_size.max(1) as u64;
        let n_batches = n.div_ceil(bs) as usize;
        let order = Order::new(
            n,
            cfg.shuffle,
            cfg.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let (tx, rx) = mpsc::sync_channel(cfg.prefetch.max(1));
        let skip = (first_batch as u64).saturating_mul(bs).min(n);
        let ahead = view.clone();
        let prefetch = move |first: u64, len: u64| ahead.prefetch(first, len);
        std::thread::spawn(move || {
            let mut indices = order.indices(skip, prefetch);
            for _ in first_batch as u64..n_batches as u64 {
                // Sorted view indices are sorted store indices too (ids ascend): reads stay local.
                let mut idx: Vec<u64> = indices.by_ref().take(bs as usize).collect();
                idx.sort_unstable();
                let acts_nd = view.gather(&idx);
                let batch = Batch {
                    n: idx.len(),
                    d: view.store.d_model(),
                    acts_nd,
                    index: idx.iter().map(|&v| view.global(v)).collect(),
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
        Ok(self
            .ordered_examples(layer, tokens, n_examples, range)?
            .map(|(ids, x)| (ids[0], x)))
    }

    /// The chosen examples in ascending order, up to `n_examples` at a time:
    /// `(their indices, [n, n_tok, d] floats)`.
    pub fn ordered_examples(
        &self,
        layer: i64,
        tokens: Tokens,
        n_examples: usize,
        examples: impl Into<Examples>,
    ) -> Result<impl Iterator<Item = (Vec<usize>, Vec<f32>)> + '_> {
        let view = View::new(self, layer, tokens, &examples.into())?;
        let step = n_examples.max(1);
        let n_tok = view.n_tok as u64;
        Ok((0..view.ids.len()).step_by(step).map(move |k0| {
            let k1 = (k0 + step).min(view.ids.len());
            let idx: Vec<u64> = (k0 as u64 * n_tok..k1 as u64 * n_tok).collect();
            (view.ids[k0..k1].to_vec(), view.gather(&idx))
        }))
    }

    /// The error for a non-finite `value` at dimension `dim` of the vector with global index
    /// `g` (`example · n + position`, `n` the tokens of the view) at `layer`, read by `during`
    /// (at training step `step`, 0 outside training):
    /// names the shard file, the example, the token (its position in the view: the patch index
    /// for patches) and the dimension.
    pub(crate) fn non_finite(
        &self,
        g: u64,
        dim: usize,
        value: f32,
        layer: i64,
        tokens: Tokens,
        (step, during): (usize, &'static str),
    ) -> Error {
        let n_tok = match tokens {
            Tokens::Patches => self.n_patches(),
            Tokens::All => self.tokens_per_example(),
            Tokens::Cls => 1,
        }
        .max(1) as u64;
        let (example, token) = (g / n_tok, g % n_tok);
        let eps = self.metadata().examples_per_shard().max(1) as u64;
        Error::NonFinite {
            file: self.dir().join(super::format::Metadata::shard_name(
                (example / eps) as usize,
            )),
            during,
            layer,
            step,
            example,
            token,
            dim,
            value,
        }
    }

    /// Normalisation statistics for `layer`/`tokens`: computed from a seeded sample of up to
    /// 2^19 vectors, cached in saev's cache directory under the store's
    /// [fingerprint](ActivationStore::fingerprint) and its files' sizes and modification times
    /// (written atomically, validated when read back), so nothing is written into the store and read-only stores work. A
    /// `norm-<layer>-<tokens>.json` beside the store (earlier saev versions wrote one) is used
    /// when it is valid.
    pub fn norm_stats(&self, layer: i64, tokens: Tokens) -> Result<NormStats> {
        let name = format!("norm-{layer}-{}.json", tokens.name());
        let legacy = self.dir().join(&name);
        if legacy.is_file() {
            if let Ok(s) = self.read_norm(&legacy, layer, tokens) {
                return Ok(s);
            }
        }
        let dir = crate::util::cache::saev_cache_dir()
            .join("norm")
            .join(format!("{}-{}", self.fingerprint(), self.files_stamp()));
        let path = dir.join(&name);
        if path.is_file() {
            return self.read_norm(&path, layer, tokens);
        }
        let s = NormStats::compute(self, layer, tokens, 1 << 19, 0)?;
        let text = serde_json::to_string(&s)
            .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
        // The cache is an optimisation: an unwritable cache directory is not an error.
        if std::fs::create_dir_all(&dir).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok(s)
    }

    fn read_norm(&self, path: &Path, layer: i64, tokens: Tokens) -> Result<NormStats> {
        let s: NormStats = read_json(path)?;
        let ok = s.version == NORM_VERSION
            && s.layer == layer
            && s.tokens == tokens
            && s.mean.len() == self.d_model()
            && s.mean.iter().all(|m| m.is_finite())
            && s.scalar.is_finite()
            && s.scalar > 0.0;
        if !ok {
            return Err(Error::Store {
                path: path.to_path_buf(),
                msg: format!(
                    "not valid normalisation statistics for layer {layer}, {tokens:?}, d_model {} (version {}, layer {}, {} means, scalar {}); delete it to recompute",
                    self.d_model(),
                    s.version,
                    s.layer,
                    s.mean.len(),
                    s.scalar
                ),
            });
        }
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
        let view = View::new(store, layer, tokens, &Examples::All)?;
        let n = view.n_vectors();
        let k = (max_samples as u64).min(n);
        if k == 0 {
            return Err(Error::Store {
                path: store.dir().to_path_buf(),
                msg: format!(
                    "normalisation statistics need at least one vector: layer {layer} has {n}, {max_samples} asked for"
                ),
            });
        }
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
        if sum.iter().any(|s| !s.is_finite()) {
            // NaN or ±∞ in the recorded activations (a damaged shard, or a model that
            // overflowed): named where it is, never turned into statistics or cached.
            let bad = idx.iter().find_map(|&v| {
                let x = view.vector(v);
                let dim = x.iter().position(|x| !x.is_finite())?;
                Some((v, dim, x[dim]))
            });
            return Err(match bad {
                Some((v, dim, value)) => store.non_finite(
                    view.global(v),
                    dim,
                    value,
                    layer,
                    tokens,
                    (0, "the normalisation statistics"),
                ),
                None => Error::Store {
                    path: store.dir().to_path_buf(),
                    msg: format!("layer {layer}: activations too large to average in f64"),
                },
            });
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
        // Every sampled vector equal (one example's CLS token, a constant store): dividing by
        // the spread would make every input NaN — refused here, not cached and then refused
        // with advice to recompute the same 0.
        if !(scalar.is_finite() && scalar > 0.0) {
            return Err(Error::Store {
                path: store.dir().to_path_buf(),
                msg: format!(
                    "layer {layer}, {tokens:?}: the {k} sampled vectors do not vary (mean distance from their mean {scalar}): there is nothing to normalise by; train on more examples or tokens, or without normalisation"
                ),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_partitions_the_examples_and_spreads_over_sorted_classes() {
        // 1,000 examples sorted by class (100 per class), as a labelled folder records them.
        let held = Examples::held_out(50, 0).ids(1000).unwrap();
        let train = Examples::train(50, 0).ids(1000).unwrap();
        assert_eq!((held.len(), train.len()), (50, 950));
        let mut all: Vec<usize> = held.iter().chain(&train).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "a partition");
        assert!(held.windows(2).all(|w| w[0] < w[1]), "ascending");
        let classes: std::collections::BTreeSet<usize> = held.iter().map(|e| e / 100).collect();
        // "The last 50" would be one class. A uniform draw misses a class with probability
        // ≈ 0.9^50 each: all 10 are expected.
        assert_eq!(classes.len(), 10, "{held:?}");
        // Seeded: the same seed gives the same split, another seed another.
        assert_eq!(held, Examples::held_out(50, 0).ids(1000).unwrap());
        assert_ne!(held, Examples::held_out(50, 1).ids(1000).unwrap());
        // Ranges and their errors.
        assert_eq!(Examples::from((3, 6)).ids(10).unwrap(), vec![3, 4, 5]);
        assert!(Examples::from((6, 6)).ids(10).is_err());
        assert!(Examples::from((3, 11)).ids(10).is_err());
        assert!(
            Examples::train(10, 0).ids(10).is_err(),
            "nothing left to train on"
        );
        assert_eq!(Examples::All.ids(3).unwrap(), vec![0, 1, 2]);
        let json = serde_json::to_string(&Examples::held_out(5, 2)).unwrap();
        assert_eq!(json, r#"{"kind":"held_out","n_held_out":5,"seed":2}"#);
    }
}
