//! The feature pass: one ordered pass over a store with an SAE, giving per-latent statistics
//! (firing frequency, mean value when firing, max, a log10 value histogram) and each latent's
//! top-k images ranked by their max patch activation (one entry per image). Heatmaps are not
//! stored: they are recomputed on demand from the store ([`Features::heatmap_values`]), so
//! memory is O(d_sae · k), not O(d_sae · k · patches).
//!
//! Saved beside the SAE as `features.safetensors` + `features.json` (versioned) and reopened
//! without recomputation; a pass on another store of the same SAE goes beside it, named by
//! that store ([`Features::save_for_store`], [`Features::load_for_store`]). [`Features::table`] is the polars "feature table".
//!
//! ```no_run
//! use saev::{ActivationStore, Features, explore::FeatureConfig, Sae};
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let sae = Sae::load("runs/a/0")?;
//! let feats = Features::compute(&sae, &store, -2, &FeatureConfig::default())?;
//! feats.save("runs/a/0")?;
//! println!("{}", feats.table(&store)?);
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use polars::prelude::*;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Computing, Error, Result};
use crate::sae::linalg::{gemm, topk_keep_mask, Mat};
use crate::sae::model::{Sae, SaeActivation};
use crate::sae::Compute;
use crate::store::{ActivationStore, Tokens};
use crate::util::checkpoint;

/// Feature-pass settings (serde; defaults documented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureConfig {
    /// Top images kept per latent. Default 16.
    pub top_k: usize,
    /// Histogram bins over log10(value) in [`hist_lo`, `hist_hi`). Default 48.
    pub n_bins: usize,
    /// Lowest log10 value binned (smaller values go to bin 0). Default -4.
    pub hist_lo: f32,
    /// Highest log10 value binned (larger values go to the last bin). Default 2.
    pub hist_hi: f32,
    /// Vectors encoded per GEMM. Default 4096.
    pub rows_per_batch: usize,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self {
            top_k: 16,
            n_bins: 48,
            hist_lo: -4.0,
            hist_hi: 2.0,
            rows_per_batch: 4096,
        }
    }
}

impl FeatureConfig {
    /// Set the number of top images per latent.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }
    /// Set the histogram bins.
    pub fn with_n_bins(mut self, n_bins: usize) -> Self {
        self.n_bins = n_bins.max(1);
        self
    }
    /// Set the histogram's log10 range `[lo, hi)` (`lo < hi`, both finite: the pass refuses
    /// others).
    pub fn with_hist_range(mut self, lo: f32, hi: f32) -> Self {
        (self.hist_lo, self.hist_hi) = (lo, hi);
        self
    }
    /// Set the vectors encoded per GEMM.
    pub fn with_rows_per_batch(mut self, rows_per_batch: usize) -> Self {
        self.rows_per_batch = rows_per_batch.max(1);
        self
    }
}

/// `features.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    version: u32,
    d_sae: usize,
    layer: i64,
    n_examples: usize,
    n_patches_per_example: usize,
    n_vectors: u64,
    store: String,
    /// [`ActivationStore::fingerprint`] of the store the pass ran on (empty in files written
    /// before it was recorded).
    #[serde(default)]
    store_fingerprint: String,
    config: FeatureConfig,
}

const VERSION: u32 = 1;

struct Inner {
    h: Header,
    freq: Vec<f64>,
    mean: Vec<f64>,
    max: Vec<f32>,
    hist: Vec<u32>,
    top_values: Vec<f32>,
    top_examples: Vec<i64>,
}

/// Per-latent statistics and top images of one SAE over one store. Cheap to clone.
#[derive(Clone)]
pub struct Features {
    inner: Arc<Inner>,
}

/// Per-latent accumulators for a block of latents (owned by one task: no merging).
struct Block {
    first: usize,
    count: Vec<u64>,
    sum: Vec<f64>,
    max: Vec<f32>,
    hist: Vec<u32>,
    ex_max: Vec<f32>,
    /// Per latent: (value, example) sorted by value desc, ≤ k.
    top: Vec<Vec<(f32, u32)>>,
}

const BLOCK: usize = 64;

impl Block {
    /// Accumulators for latents `first..first + n`.
    fn new(first: usize, n: usize, nb: usize, k: usize) -> Self {
        Block {
            first,
            count: vec![0; n],
            sum: vec![0.0; n],
            max: vec![0.0; n],
            hist: vec![0; n * nb],
            ex_max: vec![0.0; n],
            top: vec![Vec::with_capacity(k + 1); n],
        }
    }

    /// Latent `j`'s max `v` on `example`: the running max and, when it ranks, the top `k`.
    fn offer(&mut self, j: usize, v: f32, example: u32, k: usize) {
        if v <= 0.0 {
            return;
        }
        self.max[j] = self.max[j].max(v);
        let top = &mut self.top[j];
        if top.len() < k || v > top[top.len() - 1].0 {
            let at = top.partition_point(|&(t, _)| t >= v);
            top.insert(at, (v, example));
            top.truncate(k);
        }
    }
}

/// The SAE's encoder as plain slices (GEMM through the `gemm` crate), its activation applied
/// in place. Internal; public for benchmarks.
pub struct Encoder {
    /// Input width.
    pub d: usize,
    /// Dictionary size.
    pub s: usize,
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    mean: Vec<f32>,
    scalar: f32,
    act: SaeActivation,
    /// JumpReLU's per-latent thresholds (empty otherwise).
    thresholds: Vec<f32>,
}

impl Encoder {
    /// Copy the SAE's encoder.
    pub fn new(sae: &Sae) -> Result<Self> {
        let [w, b, _, _] = sae.weights();
        let (d, s) = (sae.d_model(), sae.d_sae());
        let (mean, scalar) = match &sae.config().norm {
            Some(n) => (n.mean.clone(), n.scalar),
            None => (vec![0.0; d], 1.0),
        };
        Ok(Self {
            d,
            s,
            w_enc: w.flatten_all()?.to_vec1()?,
            b_enc: b.to_vec1()?,
            mean,
            scalar,
            act: sae.config().activation.clone(),
            thresholds: match sae.threshold() {
                Some(t) => t.to_vec1()?,
                None => Vec::new(),
            },
        })
    }

    /// Codes `[n, s]` of raw vectors `x` `[n, d]` into `out`.
    pub fn encode(&self, x: &mut [f32], out: &mut Vec<f32>) {
        let (d, s) = (self.d, self.s);
        let n = x.len() / d;
        x.par_chunks_mut(d).for_each(|r| {
            for (v, m) in r.iter_mut().zip(&self.mean) {
                *v = (*v - m) / self.scalar;
            }
        });
        out.resize(n * s, 0.0);
        out.par_chunks_mut(s)
            .for_each(|r| r.copy_from_slice(&self.b_enc));
        gemm(
            n,
            s,
            d,
            out,
            0,
            s,
            Mat::rows(x, d),
            Mat::rows(&self.w_enc, s),
            true,
        );
        match &self.act {
            SaeActivation::Relu => out.par_iter_mut().for_each(|v| *v = v.max(0.0)),
            SaeActivation::JumpRelu => out.par_chunks_mut(s).for_each(|r| {
                for (v, t) in r.iter_mut().zip(&self.thresholds) {
                    if *v <= *t {
                        *v = 0.0;
                    }
                }
            }),
            SaeActivation::BatchTopK { threshold, .. } => {
                let t = *threshold;
                out.par_iter_mut()
                    .for_each(|v| *v = if *v >= t { v.max(0.0) } else { 0.0 })
            }
            SaeActivation::TopK { k, relu: true } => out.par_chunks_mut(s).for_each(|r| {
                let keep = topk_keep_mask(r, *k);
                for (v, kp) in r.iter_mut().zip(keep) {
                    if !kp {
                        *v = 0.0;
                    }
                }
            }),
            // The Python saev's TopK: the k largest values, negative ones included (ties at the
            // k-th value all kept, as `Sae::encode`).
            SaeActivation::TopK { k, relu: false } => out.par_chunks_mut(s).for_each(|r| {
                let k = (*k).clamp(1, r.len());
                let mut sorted = r.to_vec();
                sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                let kth = sorted[k - 1];
                for v in r.iter_mut() {
                    if *v < kth {
                        *v = 0.0;
                    }
                }
            }),
        }
    }
}

impl Encoder {
    /// Latent `j`'s values on raw vectors `x` `[n, d]` (normalised in place), without the
    /// full code — exact for ReLU, JumpReLU and BatchTopK; TopK needs the full row (None).
    pub fn column(&self, x: &mut [f32], j: usize) -> Option<Vec<f32>> {
        let thr = match &self.act {
            SaeActivation::Relu => 0.0,
            SaeActivation::JumpRelu => *self.thresholds.get(j)?,
            SaeActivation::BatchTopK { threshold, .. } => *threshold,
            SaeActivation::TopK { .. } => return None,
        };
        let (d, s) = (self.d, self.s);
        // JumpReLU keeps values above θ (as `encode`); BatchTopK those at or above its threshold.
        let strict = self.act == SaeActivation::JumpRelu;
        Some(
            x.chunks_exact_mut(d)
                .map(|r| {
                    let mut h = self.b_enc[j];
                    for (t, v) in r.iter_mut().enumerate() {
                        *v = (*v - self.mean[t]) / self.scalar;
                        h += *v * self.w_enc[t * s + j];
                    }
                    let keep = if strict { h > thr } else { h >= thr };
                    if keep && h > 0.0 {
                        h
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }
}

/// Where the explorer's passes over a store compute codes: saev's CPU kernels ([`Encoder`]), or
/// candle's ops on a device (a GPU; or the CPU, to check it against the kernels), where the codes
/// stay and only per-example maxima come back.
pub(crate) enum CodeEngine {
    Cpu(Encoder),
    Candle(Sae),
}

impl CodeEngine {
    /// The engine `compute` names, with `sae`'s encoder.
    pub(crate) fn new(sae: &Sae, compute: &Compute) -> Result<Self> {
        Ok(match compute {
            Compute::CpuKernels => CodeEngine::Cpu(Encoder::new(sae)?),
            Compute::Candle(dev) => CodeEngine::Candle(sae.to_device(dev)?),
        })
    }

    /// Codes `[n, s]` (row-major, on the host) of raw vectors `x` `[n, d]`.
    pub(crate) fn codes(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        match self {
            CodeEngine::Cpu(enc) => {
                let (mut x, mut out) = (x, Vec::new());
                enc.encode(&mut x, &mut out);
                Ok(out)
            }
            CodeEngine::Candle(sae) => {
                let n = x.len() / sae.d_model().max(1);
                let xt = Tensor::from_vec(x, (n, sae.d_model()), sae.device())?;
                Ok(sae.encode(&xt)?.flatten_all()?.to_vec1()?)
            }
        }
    }

    /// Each example's max code of every latent over its `p` rows: `x` `[n_ex · p, d]` raw
    /// vectors → `[n_ex, s]`, row-major.
    pub(crate) fn example_maxima(&self, x: Vec<f32>, p: usize) -> Result<Vec<f32>> {
        match self {
            CodeEngine::Cpu(enc) => {
                let s = enc.s;
                let codes = self.codes(x)?;
                let n_ex = codes.len() / (p * s).max(1);
                let mut out = vec![f32::NEG_INFINITY; n_ex * s];
                out.par_chunks_mut(s.max(1)).enumerate().for_each(|(e, m)| {
                    for r in codes[e * p * s..(e + 1) * p * s].chunks_exact(s) {
                        m.iter_mut().zip(r).for_each(|(a, &b)| *a = a.max(b));
                    }
                });
                Ok(out)
            }
            CodeEngine::Candle(sae) => {
                let (d, s) = (sae.d_model(), sae.d_sae());
                let n_ex = x.len() / (p * d).max(1);
                let xt = Tensor::from_vec(x, (n_ex * p, d), sae.device())?;
                let codes = sae.encode(&xt)?.reshape((n_ex, p, s))?;
                Ok(codes.max(1)?.flatten_all()?.to_vec1()?)
            }
        }
    }
}

fn check_width(sae: &Sae, store: &ActivationStore) -> Result<()> {
    if sae.d_model() != store.d_model() {
        return Err(Error::Shape {
            what: format!("SAE d_model vs store {} (d_model)", store.dir().display()),
            expected: vec![sae.d_model()],
            actual: vec![store.d_model()],
        });
    }
    Ok(())
}

/// The histogram's log10 range must be a finite `lo < hi` (an empty one has no bin width).
fn check_range(cfg: &FeatureConfig) -> Result<()> {
    let (lo, hi) = (cfg.hist_lo, cfg.hist_hi);
    if lo.is_finite() && hi.is_finite() && lo < hi {
        return Ok(());
    }
    Err(Error::out_of_range(
        "feature histogram range (hist_lo, hist_hi)",
        format!("({lo}, {hi})"),
        "finite log10 values with hist_lo < hist_hi",
    ))
}

/// Top images kept per latent: at least 1, at most the store's examples (a larger `top_k`
/// would only allocate empty slots, `d_sae · top_k` of them).
fn top_k(cfg: &FeatureConfig, store: &ActivationStore) -> usize {
    cfg.top_k.clamp(1, store.n_examples().max(1))
}

/// A NaN or ±∞ in the patches of examples `e0..` (`x`: `[n, p, d]`) is named where it is: it
/// would otherwise vanish into the statistics (a NaN code never fires).
fn finite_or_named(
    x: &[f32],
    e0: usize,
    d: usize,
    layer: i64,
    store: &ActivationStore,
) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let g = (e0 * store.n_patches() + i / d.max(1)) as u64;
            Err(store.non_finite(
                g,
                i % d.max(1),
                x[i],
                layer,
                Tokens::Patches,
                (0, "the feature pass"),
            ))
        }
    }
}

impl Features {
    /// [`Features::compute`] with the encoding and the per-latent reductions on `device` (a
    /// GPU): the CPU uses its own kernels. Each batch's codes stay on the device; only per-latent
    /// sums, counts, histogram counts and per-image maxima come back. The top images are chosen
    /// on the host from the per-image maxima, as on the CPU.
    pub fn compute_on(
        sae: &Sae,
        store: &ActivationStore,
        layer: i64,
        cfg: &FeatureConfig,
        device: &Device,
    ) -> Result<Self> {
        if device.is_cpu() {
            return Self::compute(sae, store, layer, cfg);
        }
        Self::compute_candle(sae, store, layer, cfg, device)
    }

    /// The device pass in candle's ops (public for the equivalence test, which runs it on the
    /// CPU).
    #[doc(hidden)]
    pub fn compute_candle(
        sae: &Sae,
        store: &ActivationStore,
        layer: i64,
        cfg: &FeatureConfig,
        device: &Device,
    ) -> Result<Self> {
        check_width(sae, store)?;
        check_range(cfg)?;
        let sae_d = sae.to_device(device)?;
        let (d, s, p) = (sae.d_model(), sae.d_sae(), store.n_patches());
        let (k, nb) = (top_k(cfg, store), cfg.n_bins.max(1));
        let bin_w = f64::from(cfg.hist_hi - cfg.hist_lo) / nb as f64;
        let mut all = Block::new(0, s, nb, k);
        let per = (cfg.rows_per_batch / p.max(1)).max(1);
        let bar = crate::util::progress::bar((store.n_examples() * p) as u64, "patches");
        for (e0, x) in store.ordered(layer, Tokens::Patches, per)? {
            let n_ex = x.len() / d / p;
            finite_or_named(&x, e0, d, layer, store)?;
            let pass = || -> Result<()> {
                let xt = Tensor::from_vec(x, (n_ex * p, d), device)?;
                let codes = sae_d.encode(&xt)?;
                let sum: Vec<f32> = codes.relu()?.sum(0)?.to_vec1()?;
                // One pass for the histogram: each positive code's bin, floor((log10 v − lo) /
                // w) clamped to the bins; the others get u32::MAX, which scatter_add skips.
                // Counted per latent column ([n, s] → [nb, s]): one thread per latent on a GPU.
                // One temporary at a time (each is as large as the codes).
                let mut t = (codes.log()? * (1.0 / std::f64::consts::LN_10))?;
                t = t.affine(1.0 / bin_w, -f64::from(cfg.hist_lo) / bin_w)?;
                t = t.floor()?;
                t = t.clamp(0.0, (nb - 1) as f64)?;
                let raw = t.to_dtype(DType::U32)?;
                drop(t);
                let skip = Tensor::full(u32::MAX, raw.shape(), device)?;
                let bins = codes.gt(0.0)?.where_cond(&raw, &skip)?;
                drop((raw, skip));
                let hist: Vec<Vec<f32>> = Tensor::zeros((nb, s), DType::F32, device)?
                    .scatter_add(&bins, &codes.ones_like()?, 0)?
                    .to_vec2()?;
                let ex_max: Vec<Vec<f32>> = codes.reshape((n_ex, p, s))?.max(1)?.to_vec2()?;
                for i in 0..s {
                    for (b, h) in hist.iter().enumerate() {
                        let c = h[i].round() as u32;
                        all.hist[i * nb + b] += c;
                        all.count[i] += u64::from(c);
                    }
                    all.sum[i] += f64::from(sum[i]);
                }
                for (e, row) in ex_max.iter().enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        all.offer(i, v, (e0 + e) as u32, k);
                    }
                }
                Ok(())
            };
            pass().computing(|| {
                format!("feature pass on {device:?}, examples {e0}..{}", e0 + n_ex)
            })?;
            bar.inc((n_ex * p) as u64);
        }
        bar.finish_and_clear();
        Ok(Self::from_blocks(&[all], s, layer, store, cfg))
    }

    /// One ordered pass over the patches of `layer` in `store`.
    pub fn compute(
        sae: &Sae,
        store: &ActivationStore,
        layer: i64,
        cfg: &FeatureConfig,
    ) -> Result<Self> {
        check_width(sae, store)?;
        check_range(cfg)?;
        let enc = Encoder::new(sae)?;
        let (s, p) = (enc.s, store.n_patches());
        let (k, nb) = (top_k(cfg, store), cfg.n_bins.max(1));
        let bin_w = (cfg.hist_hi - cfg.hist_lo) / nb as f32;
        let mut blocks: Vec<Block> = (0..s.div_ceil(BLOCK))
            .map(|b| Block::new(b * BLOCK, BLOCK.min(s - b * BLOCK), nb, k))
            .collect();
        let per = (cfg.rows_per_batch / p.max(1)).max(1);
        let bar = crate::util::progress::bar((store.n_examples() * p) as u64, "patches");
        let mut codes = Vec::new();
        for (e0, mut x) in store.ordered(layer, Tokens::Patches, per)? {
            let n_ex = x.len() / enc.d / p;
            finite_or_named(&x, e0, enc.d, layer, store)?;
            enc.encode(&mut x, &mut codes);
            let codes_r = &codes;
            blocks.par_iter_mut().for_each(|bl| {
                let nl = bl.count.len();
                for e in 0..n_ex {
                    bl.ex_max.iter_mut().for_each(|m| *m = 0.0);
                    for r in e * p..(e + 1) * p {
                        let row = &codes_r[r * s + bl.first..r * s + bl.first + nl];
                        for (j, &v) in row.iter().enumerate() {
                            if v > 0.0 {
                                bl.count[j] += 1;
                                bl.sum[j] += f64::from(v);
                                if v > bl.ex_max[j] {
                                    bl.ex_max[j] = v;
                                }
                                let b = ((v.log10() - cfg.hist_lo) / bin_w).floor();
                                let b = (b.max(0.0) as usize).min(nb - 1);
                                bl.hist[j * nb + b] += 1;
                            }
                        }
                    }
                    for j in 0..nl {
                        bl.offer(j, bl.ex_max[j], (e0 + e) as u32, k);
                    }
                }
            });
            bar.inc((n_ex * p) as u64);
        }
        bar.finish_and_clear();
        Ok(Self::from_blocks(&blocks, s, layer, store, cfg))
    }

    /// The finished pass from its accumulators.
    fn from_blocks(
        blocks: &[Block],
        s: usize,
        layer: i64,
        store: &ActivationStore,
        cfg: &FeatureConfig,
    ) -> Self {
        let (k, nb) = (top_k(cfg, store), cfg.n_bins.max(1));
        let p = store.n_patches();
        let n_vec = (store.n_examples() * p) as u64;
        let mut freq = vec![0f64; s];
        let mut mean = vec![0f64; s];
        let mut max = vec![0f32; s];
        let mut hist = vec![0u32; s * nb];
        let mut top_values = vec![0f32; s * k];
        let mut top_examples = vec![-1i64; s * k];
        for bl in blocks {
            for j in 0..bl.count.len() {
                let i = bl.first + j;
                freq[i] = bl.count[j] as f64 / n_vec.max(1) as f64;
                mean[i] = if bl.count[j] > 0 {
                    bl.sum[j] / bl.count[j] as f64
                } else {
                    0.0
                };
                max[i] = bl.max[j];
                hist[i * nb..(i + 1) * nb].copy_from_slice(&bl.hist[j * nb..(j + 1) * nb]);
                for (t, &(v, e)) in bl.top[j].iter().enumerate() {
                    top_values[i * k + t] = v;
                    top_examples[i * k + t] = i64::from(e);
                }
            }
        }
        Self {
            inner: Arc::new(Inner {
                h: Header {
                    version: VERSION,
                    d_sae: s,
                    layer,
                    n_examples: store.n_examples(),
                    n_patches_per_example: p,
                    n_vectors: n_vec,
                    store: store.dir().display().to_string(),
                    store_fingerprint: store.fingerprint(),
                    config: FeatureConfig {
                        top_k: k,
                        n_bins: nb,
                        ..cfg.clone()
                    },
                },
                freq,
                mean,
                max,
                hist,
                top_values,
                top_examples,
            }),
        }
    }

    /// Dictionary size.
    pub fn d_sae(&self) -> usize {
        self.inner.h.d_sae
    }
    /// Store layer the pass read.
    pub fn layer(&self) -> i64 {
        self.inner.h.layer
    }
    /// Top images kept per latent.
    pub fn top_k(&self) -> usize {
        self.inner.h.config.top_k
    }
    /// Per latent: fraction of patches it fires on.
    pub fn freq(&self) -> &[f64] {
        &self.inner.freq
    }
    /// Per latent: mean value when firing.
    pub fn mean_value(&self) -> &[f64] {
        &self.inner.mean
    }
    /// Per latent: max value.
    pub fn max_value(&self) -> &[f32] {
        &self.inner.max
    }
    /// Histogram of `latent`'s positive values over log10 bins `[lo + i·w, lo + (i+1)·w)`:
    /// `(counts, lo, w)`; no counts for a latent past `d_sae` (as [`Self::top`] gives none).
    pub fn histogram(&self, latent: usize) -> (&[u32], f32, f32) {
        let c = &self.inner.h.config;
        let nb = c.n_bins;
        (
            self.inner
                .hist
                .get(latent * nb..(latent + 1) * nb)
                .unwrap_or(&[]),
            c.hist_lo,
            (c.hist_hi - c.hist_lo) / nb as f32,
        )
    }

    /// `latent`'s top images: (example index, max patch value), best first.
    pub fn top(&self, latent: usize) -> Vec<(usize, f32)> {
        let k = self.top_k();
        if latent >= self.d_sae() {
            return Vec::new();
        }
        (0..k)
            .filter_map(|t| {
                let e = self.inner.top_examples[latent * k + t];
                (e >= 0).then(|| (e as usize, self.inner.top_values[latent * k + t]))
            })
            .collect()
    }

    /// Latents that fired at least once, `0 < freq`.
    pub fn live(&self) -> Vec<usize> {
        (0..self.d_sae())
            .filter(|&i| self.inner.freq[i] > 0.0)
            .collect()
    }

    /// `latent`'s value on every patch of `example` (recomputed from the store): `[n_patches]`.
    pub fn heatmap_values(
        &self,
        sae: &Sae,
        store: &ActivationStore,
        latent: usize,
        example: usize,
    ) -> Result<Vec<f32>> {
        let s = sae.d_sae();
        if latent >= s {
            return Err(Error::out_of_range(
                "latent",
                latent,
                format!("0..{s} (d_sae)"),
            ));
        }
        check_width(sae, store)?;
        if example >= store.n_examples() {
            return Err(Error::out_of_range(
                "example",
                example,
                format!("0..{}, the store's examples", store.n_examples()),
            ));
        }
        let (_, mut x) = store
            .ordered_range(self.layer(), Tokens::Patches, 1, (example, example + 1))?
            .next()
            .ok_or_else(|| Error::missing(format!("example {example}"), "no patch tokens", ""))?;
        let enc = Encoder::new(sae)?;
        if let Some(col) = enc.column(&mut x.clone(), latent) {
            return Ok(col);
        }
        let mut out = Vec::new();
        enc.encode(&mut x, &mut out);
        Ok(out.chunks_exact(s).map(|r| r[latent]).collect())
    }

    /// Majority label among `latent`'s top images and its share (label purity), when the
    /// store has labels.
    pub fn purity(&self, store: &ActivationStore, latent: usize) -> Option<(u32, f64)> {
        let labels = &store.provenance()?.labels;
        let mut counts: HashMap<u32, usize> = HashMap::new();
        let mut n = 0;
        for (e, _) in self.top(latent) {
            if let Some(Some(l)) = labels.get(e) {
                *counts.entry(*l).or_default() += 1;
                n += 1;
            }
        }
        let (&l, &c) = counts
            .iter()
            .max_by_key(|(l, c)| (**c, std::cmp::Reverse(**l)))?;
        Some((l, c as f64 / n as f64))
    }

    /// The feature table: latent, log10 frequency, log10 mean value, max, top examples, and
    /// (with labels) the dominant label and its purity among the top images.
    pub fn table(&self, store: &ActivationStore) -> Result<DataFrame> {
        let s = self.d_sae();
        let classes = store
            .provenance()
            .map(|p| p.classes.clone())
            .unwrap_or_default();
        let lg = |v: f64| {
            if v > 0.0 {
                v.log10()
            } else {
                f64::NEG_INFINITY
            }
        };
        let pur: Vec<Option<(u32, f64)>> = (0..s).map(|i| self.purity(store, i)).collect();
        let cols = vec![
            Column::new("latent".into(), (0..s as u32).collect::<Vec<_>>()),
            Column::new(
                "log10_freq".into(),
                self.inner.freq.iter().map(|&v| lg(v)).collect::<Vec<_>>(),
            ),
            Column::new(
                "log10_mean".into(),
                self.inner.mean.iter().map(|&v| lg(v)).collect::<Vec<_>>(),
            ),
            Column::new("max".into(), self.inner.max.clone()),
            Column::new(
                "top_examples".into(),
                (0..s)
                    .map(|i| {
                        self.top(i)
                            .iter()
                            .map(|(e, _)| e.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "label".into(),
                pur.iter()
                    .map(|p| {
                        p.map(|(l, _)| {
                            classes
                                .get(l as usize)
                                .cloned()
                                .unwrap_or_else(|| l.to_string())
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "purity".into(),
                pur.iter().map(|p| p.map(|(_, q)| q)).collect::<Vec<_>>(),
            ),
        ];
        DataFrame::new_infer_height(cols).map_err(|e| Error::render("feature table", e))
    }

    /// Save as `<dir>/features.{safetensors,json}`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_as(dir.as_ref(), "features")
    }

    /// Save beside an SAE without replacing another store's pass: as `features` when that
    /// holds nothing or a pass of this pass's store (or of an unrecorded one), else as
    /// `features-<store fingerprint prefix>` — so an SAE explored on a training and a
    /// validation store keeps a pass for each ([`Features::load_for_store`] finds it). Returns
    /// the header file written.
    pub fn save_for_store(&self, sae_dir: impl AsRef<Path>) -> Result<PathBuf> {
        let dir = sae_dir.as_ref();
        let fp = self.store_fingerprint();
        let stem = match Self::load(dir) {
            Ok(old)
                if !fp.is_empty()
                    && !old.store_fingerprint().is_empty()
                    && old.store_fingerprint() != fp =>
            {
                Self::store_stem(fp)
            }
            // Nothing there, this store's pass, or one that cannot be read: replaced (as a
            // feature pass of the SAE, which `saev features` was asked to compute).
            _ => "features".to_string(),
        };
        self.save_as(dir, &stem)?;
        Ok(dir.join(format!("{stem}.json")))
    }

    /// The pass of `store` saved beside an SAE by [`Features::save_for_store`] (None when there
    /// is none): `features` when it ran on this store (or does not record its store), else
    /// `features-<fingerprint prefix>`.
    pub fn load_for_store(
        sae_dir: impl AsRef<Path>,
        store: &ActivationStore,
    ) -> Result<Option<Self>> {
        let dir = sae_dir.as_ref();
        let fp = store.fingerprint();
        if Self::path_for(dir).exists() {
            let f = Self::load(dir)?;
            if f.store_fingerprint().is_empty() || f.store_fingerprint() == fp {
                return Ok(Some(f));
            }
        }
        let stem = Self::store_stem(&fp);
        if !dir.join(format!("{stem}.json")).exists() {
            return Ok(None);
        }
        let f = Self::load_stem(dir, &stem)?;
        if f.store_fingerprint() != fp {
            return Err(Error::mismatch(
                dir.join(format!("{stem}.json")).display().to_string(),
                format!("the pass of store {fp}"),
                format!("a pass of store {}", f.store_fingerprint()),
                "remove it to recompute",
            ));
        }
        Ok(Some(f))
    }

    fn store_stem(fp: &str) -> String {
        format!("features-{}", &fp[..fp.len().min(16)])
    }

    fn save_as(&self, dir: &Path, stem: &str) -> Result<()> {
        let i = &self.inner;
        let (s, k, nb) = (i.h.d_sae, i.h.config.top_k, i.h.config.n_bins);
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert(
            "freq".to_string(),
            Tensor::from_vec(i.freq.clone(), s, &dev)?,
        );
        t.insert(
            "mean".to_string(),
            Tensor::from_vec(i.mean.clone(), s, &dev)?,
        );
        t.insert("max".to_string(), Tensor::from_vec(i.max.clone(), s, &dev)?);
        t.insert(
            "hist".to_string(),
            Tensor::from_vec(i.hist.clone(), (s, nb), &dev)?,
        );
        t.insert(
            "top_values".to_string(),
            Tensor::from_vec(i.top_values.clone(), (s, k), &dev)?,
        );
        t.insert(
            "top_examples".to_string(),
            Tensor::from_vec(i.top_examples.clone(), (s, k), &dev)?,
        );
        checkpoint::save(dir, stem, &t, &i.h)
    }

    /// Open what [`Features::save`] wrote.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_stem(dir.as_ref(), "features")
    }

    fn load_stem(dir: &Path, stem: &str) -> Result<Self> {
        let (h, t): (Header, _) = checkpoint::load(dir, stem, "version", &[u64::from(VERSION)])?;
        let (s, k, nb) = (h.d_sae, h.config.top_k, h.config.n_bins);
        let get = |name: &str, dtype: DType, len: usize| t.get_flat(name, dtype, len);
        Ok(Self {
            inner: Arc::new(Inner {
                freq: get("freq", DType::F64, s)?.to_vec1()?,
                mean: get("mean", DType::F64, s)?.to_vec1()?,
                max: get("max", DType::F32, s)?.to_vec1()?,
                hist: get("hist", DType::U32, s * nb)?.to_vec1()?,
                top_values: get("top_values", DType::F32, s * k)?.to_vec1()?,
                top_examples: get("top_examples", DType::I64, s * k)?.to_vec1()?,
                h,
            }),
        })
    }

    /// The fingerprint of the store this pass ran on ("" when not recorded).
    pub fn store_fingerprint(&self) -> &str {
        &self.inner.h.store_fingerprint
    }

    /// Where [`Features::save`] writes for an SAE directory (the same directory).
    pub fn path_for(sae_dir: impl AsRef<Path>) -> PathBuf {
        let sae_dir = sae_dir.as_ref();
        sae_dir.join("features.json")
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let live = self.inner.freq.iter().filter(|&&q| q > 0.0).count();
        write!(
            f,
            "Features(d_sae {}, {} live, top {} of {} examples, layer {})",
            self.d_sae(),
            live,
            self.top_k(),
            self.inner.h.n_examples,
            self.layer()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sae::model::{SaeConfig, SAE_SCHEMA};
    use crate::util::rng::uniforms;

    /// The candle engine (what runs on a GPU; here on the CPU) gives the CPU kernels' codes and
    /// per-example maxima for every activation (TopK without ReLU keeps negative values).
    #[test]
    fn candle_codes_and_maxima_equal_the_cpu_kernels() {
        let (d, s, n, p) = (8usize, 40usize, 24usize, 4usize);
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        let x = uniforms(1, n * d, 2.0);
        for act in [
            SaeActivation::Relu,
            SaeActivation::TopK { k: 5, relu: true },
            SaeActivation::TopK { k: 30, relu: false },
            SaeActivation::BatchTopK {
                k: 5,
                threshold: 0.2,
            },
            SaeActivation::JumpRelu,
        ] {
            let cfg = SaeConfig {
                schema: SAE_SCHEMA,
                d_model: d,
                d_sae: s,
                activation: act.clone(),
                norm: Some(crate::sae::model::SaeNorm {
                    mean: uniforms(2, d, 0.5),
                    scalar: 1.7,
                }),
                provenance: serde_json::json!({}),
            };
            let w = (
                t(uniforms(3, d * s, 0.5), &[d, s]),
                t(uniforms(4, s, 0.3), &[s]),
                t(uniforms(5, s * d, 0.5), &[s, d]),
                t(vec![0.0; d], &[d]),
            );
            let sae = if act == SaeActivation::JumpRelu {
                let theta = uniforms(6, s, 0.2).iter().map(|v| v.abs()).collect();
                Sae::new_jump_relu(cfg, w.0, w.1, w.2, w.3, t(theta, &[s])).unwrap()
            } else {
                Sae::new(cfg, w.0, w.1, w.2, w.3).unwrap()
            };
            let cpu = CodeEngine::new(&sae, &Compute::CpuKernels).unwrap();
            let dev = CodeEngine::new(&sae, &Compute::Candle(Device::Cpu)).unwrap();
            let (a, b) = (cpu.codes(x.clone()).unwrap(), dev.codes(x.clone()).unwrap());
            let (ma, mb) = (
                cpu.example_maxima(x.clone(), p).unwrap(),
                dev.example_maxima(x.clone(), p).unwrap(),
            );
            assert_eq!((a.len(), ma.len()), (n * s, n / p * s), "{act:?}");
            assert!(
                a.iter().filter(|v| **v != 0.0).count() > n,
                "{act:?}: codes fire"
            );
            for (u, v) in a.iter().zip(&b).chain(ma.iter().zip(&mb)) {
                assert!((u - v).abs() <= 1e-5, "{act:?}: {u} vs {v}");
            }
            if act == (SaeActivation::TopK { k: 30, relu: false }) {
                assert!(a.iter().any(|v| *v < 0.0), "negative kept values exercised");
            }
        }
    }
}
