//! Task heads trained in Rust on backbone outputs: a linear probe classifier on the final CLS
//! (or mean-pooled patch) output, and a patch-level linear segmenter on the final patch tokens.
//! Softmax cross-entropy, Adam, minibatches, seeded. Saved as `head.safetensors` (`W [d, C]`,
//! `b [C]`) + `head.json` (versioned config: kind, classes, backbone, held-out score).
//!
//! Training data comes from an activation store: the recorded block output is resumed through
//! the remaining blocks and the final norm ([`Residual::from_recorded`], with the register
//! tokens the store recorded for models that have them), so a head costs a
//! fraction of a full forward per image.
//!
//! ```no_run
//! # use saev::prelude::*;
//! let vit = Backbone::open("facebook/dinov2-small")?;
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let (head, acc) = saev::Head::train_classifier(&vit, &store, -2, &saev::intervene::HeadConfig::default())?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Residual};
use crate::error::{CandleContext, Computing, Error, Result};
use crate::store::{ActivationStore, Examples, Tokens};
use crate::util::checkpoint;

/// What a head reads and predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Class of the image from the final CLS token (pooled output).
    ClassifierCls,
    /// Class of the image from the mean of the final patch tokens.
    ClassifierMean,
    /// Class of every patch from its final token.
    Segmenter,
}

/// Training settings (serde; defaults documented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// What to train. Default classifier on CLS.
    pub kind: HeadKind,
    /// Adam learning rate. Default 3e-3.
    pub lr: f64,
    /// L2 weight decay. Default 1e-4.
    pub weight_decay: f64,
    /// Epochs. Default 200.
    pub epochs: usize,
    /// Minibatch rows. Default 256.
    pub batch_size: usize,
    /// Fraction of the store's examples held out (a random split seeded by `seed`). Default 0.2.
    pub holdout_frac: f64,
    /// Seed. Default 0.
    pub seed: u64,
}

impl HeadConfig {
    /// Refuse settings that cannot train (a NaN or negative rate, no epochs, a hold-out of
    /// everything), naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String, valid: &str| {
            Err(Error::out_of_range(format!("head: {field}"), value, valid))
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "finite, > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay.to_string(), "finite, ≥ 0");
        }
        if self.epochs == 0 {
            return bad("epochs", "0".into(), "at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "0".into(), "at least 1");
        }
        if !(0.0..1.0).contains(&self.holdout_frac) {
            return bad("holdout_frac", self.holdout_frac.to_string(), "0 ≤ f < 1");
        }
        Ok(())
    }
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            kind: HeadKind::ClassifierCls,
            lr: 3e-3,
            weight_decay: 1e-4,
            epochs: 200,
            batch_size: 256,
            holdout_frac: 0.2,
            seed: 0,
        }
    }
}

impl HeadConfig {
    /// A segmenter with the other defaults.
    pub fn segmenter() -> Self {
        Self {
            kind: HeadKind::Segmenter,
            epochs: 20,
            ..Self::default()
        }
    }
    /// A classifier reading the CLS token (`mean_pool` false) or the mean of the patch tokens.
    pub fn classifier(mean_pool: bool) -> Self {
        Self {
            kind: if mean_pool {
                HeadKind::ClassifierMean
            } else {
                HeadKind::ClassifierCls
            },
            ..Self::default()
        }
    }
    /// Set what the head predicts from.
    pub fn with_kind(mut self, kind: HeadKind) -> Self {
        self.kind = kind;
        self
    }
    /// Set the learning rate.
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
    /// Set the L2 weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }
    /// Set the epochs.
    pub fn with_epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    /// Set the minibatch rows.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }
    /// Set the held-out fraction.
    pub fn with_holdout_frac(mut self, holdout_frac: f64) -> Self {
        self.holdout_frac = holdout_frac;
        self
    }
    /// Set the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// `head.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMeta {
    /// Format version.
    pub version: u32,
    /// What it predicts from.
    pub kind: HeadKind,
    /// Input width.
    pub d_model: usize,
    /// Class names (index = class id).
    pub classes: Vec<String>,
    /// The backbone checkpoint it was trained on.
    pub backbone: String,
    /// Held-out accuracy (classifier) or patch mIoU (segmenter) at training time.
    pub heldout_score: Option<f64>,
    /// The training config.
    pub config: HeadConfig,
    /// The store examples that gave `heldout_score` (None: not recorded, version 1 heads).
    #[serde(default)]
    pub held_out: Option<Examples>,
}

/// 2 records `held_out` (a seeded random split; version 1 held out the last examples).
const HEAD_VERSION: u32 = 2;

/// A linear head. Cheap to clone.
#[derive(Clone)]
pub struct Head {
    meta: HeadMeta,
    w: Tensor,
    b: Tensor,
}

impl fmt::Debug for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Head({:?}, {} classes, d {}, held-out {:?}{})",
            self.meta.kind,
            self.meta.classes.len(),
            self.meta.d_model,
            self.meta.heldout_score,
            crate::util::device::on_device(self.device())
        )
    }
}

/// The inputs a head reads from a backbone output: `[B, d]` (classifier) or `[B·P, d]`.
pub(crate) fn head_inputs(
    kind: HeadKind,
    out: &crate::backbone::vit::VitOutput,
    has_cls: bool,
) -> Result<Tensor> {
    let h = &out.last_hidden;
    let (_, t, _) = h.dims3()?;
    let c = usize::from(has_cls);
    Ok(match kind {
        HeadKind::ClassifierCls => match &out.pooled {
            Some(p) => p.clone(),
            None => h.narrow(1, 0, 1)?.squeeze(1)?,
        },
        HeadKind::ClassifierMean => h.narrow(1, c, t - c)?.mean(1)?,
        HeadKind::Segmenter => {
            let p = h.narrow(1, c, t - c)?;
            let (b, p_n, d) = p.dims3()?;
            p.reshape((b * p_n, d))?
        }
    })
}

impl Head {
    /// Metadata.
    pub fn meta(&self) -> &HeadMeta {
        &self.meta
    }
    /// Class names.
    pub fn classes(&self) -> &[String] {
        &self.meta.classes
    }
    /// The store examples it was scored on (never trained on): where to measure change rates.
    /// An error for heads built from weights or saved by saev's first head format.
    pub fn held_out(&self) -> Result<Examples> {
        self.meta.held_out.clone().ok_or_else(|| {
            Error::missing(
                "this head",
                "no held-out examples recorded (built from weights, or saved by an older saev)",
                "choose the examples yourself, e.g. a range (start, end)",
            )
        })
    }
    /// What it reads.
    pub fn kind(&self) -> HeadKind {
        self.meta.kind
    }

    /// The weights: `W` `[d, C]` and `b` `[C]`.
    pub fn weights(&self) -> (&Tensor, &Tensor) {
        (&self.w, &self.b)
    }

    /// Where the head's weights live (a trained head: where its backbone ran).
    pub fn device(&self) -> &candle_core::Device {
        self.w.device()
    }

    /// The same head with its weights on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            meta: self.meta.clone(),
            w: self.w.to_device(device).context("moving the head's W")?,
            b: self.b.to_device(device).context("moving the head's b")?,
        })
    }

    /// Class probabilities for inputs `[n, d]` → `[n, C]`.
    pub fn probs(&self, x_nd: &Tensor) -> Result<Tensor> {
        (|| {
            let logits = x_nd.matmul(&self.w)?.broadcast_add(&self.b)?;
            Ok(candle_nn::ops::softmax_last_dim(&logits)?)
        })()
        .computing(|| {
            format!(
                "{:?} head on inputs {:?} {:?} (weights {:?})",
                self.meta.kind,
                x_nd.dims(),
                x_nd.dtype(),
                self.w.dims()
            )
        })
    }

    /// The head applied to a backbone output: probabilities `[B, C]` or `[B·P, C]`.
    pub fn predict(&self, vit: &Backbone, out: &crate::backbone::vit::VitOutput) -> Result<Tensor> {
        self.probs(&head_inputs(self.meta.kind, out, vit.has_cls())?)
    }

    /// Train a classifier probe (kind from `cfg`, CLS by default) on the store's labelled
    /// examples (`holdout_frac` of them held out at random, seeded); returns the head and its
    /// held-out accuracy. Computes on `vit`'s device (the backbone resumes there, and the fit
    /// runs there too); the head's weights stay there.
    pub fn train_classifier(
        vit: &Backbone,
        store: &ActivationStore,
        layer: i64,
        cfg: &HeadConfig,
    ) -> Result<(Self, f64)> {
        cfg.validate()?;
        if cfg.kind == HeadKind::Segmenter {
            return Err(Error::mismatch(
                "train_classifier",
                "a classifier config",
                "a segmenter config",
                "use Head::train_segmenter",
            ));
        }
        let prov = store.provenance().ok_or_else(|| {
            Error::missing(
                store.dir().display().to_string(),
                "no labels (provenance.json)",
                "record a labelled dataset",
            )
        })?;
        if prov.classes.len() < 2 || prov.labels.iter().all(Option::is_none) {
            // Checked before the backbone runs over the whole store.
            return Err(Error::missing(
                store.dir().display().to_string(),
                format!(
                    "class labels ({} classes named, {} examples labelled)",
                    prov.classes.len(),
                    prov.labels.iter().flatten().count()
                ),
                "record a labelled dataset (one sub-folder per class, IDX with labels, parquet with a label column)",
            ));
        }
        let x = final_inputs(vit, store, layer, cfg.kind).computing(|| {
            format!(
                "the final inputs of {} at layer {layer}",
                store.dir().display()
            )
        })?;
        let y: Vec<Option<u32>> = (0..store.n_examples())
            .map(|e| prov.labels.get(e).copied().flatten())
            .collect();
        let n_classes = prov.classes.len();
        if let Some((e, l)) = y
            .iter()
            .enumerate()
            .find_map(|(e, l)| l.filter(|&l| l as usize >= n_classes).map(|l| (e, l)))
        {
            return Err(Error::Store {
                path: store.dir().join("provenance.json"),
                msg: format!("example {e} has label {l}, but the store names {n_classes} classes"),
            });
        }
        let split = Split::new(store.n_examples(), cfg)?;
        fit(
            x,
            y,
            &split,
            1,
            prov.classes.clone(),
            (vit.name(), vit.device()),
            cfg,
        )
        .computing(|| format!("fitting a {:?} probe", cfg.kind))
    }

    /// Train a patch segmenter on a store with per-patch labels (ADE20K layout); returns the
    /// head and its held-out patch-level mIoU (over classes present in the held-out labels).
    pub fn train_segmenter(
        vit: &Backbone,
        store: &ActivationStore,
        layer: i64,
        classes: Vec<String>,
        cfg: &HeadConfig,
    ) -> Result<(Self, f64)> {
        cfg.validate()?;
        let p = store.n_patches();
        let mut y = Vec::with_capacity(store.n_examples() * p);
        for e in 0..store.n_examples() {
            let l = store.patch_labels(e).ok_or_else(|| {
                Error::missing(
                    store.dir().display().to_string(),
                    "no per-patch labels",
                    "record a segmentation dataset",
                )
            })?;
            y.extend(l.iter().map(|&v| Some(u32::from(v))));
        }
        let n_classes = y.iter().flatten().max().map_or(0, |&m| m as usize + 1);
        if !classes.is_empty() && n_classes > classes.len() {
            // Named classes must cover every label (a short list, or labels of another
            // dataset, would otherwise be padded with numbers, silently).
            let e = (0..store.n_examples())
                .find(|&e| {
                    store
                        .patch_labels(e)
                        .is_some_and(|l| l.iter().any(|&v| usize::from(v) >= classes.len()))
                })
                .unwrap_or(0);
            return Err(Error::Store {
                path: store.dir().join("labels.bin"),
                msg: format!(
                    "patch label {} (example {e}) past the {} class names given",
                    n_classes - 1,
                    classes.len()
                ),
            });
        }
        let mut classes = classes;
        while classes.len() < n_classes {
            classes.push(classes.len().to_string());
        }
        let cfg = HeadConfig {
            kind: HeadKind::Segmenter,
            ..cfg.clone()
        };
        let x = final_inputs(vit, store, layer, HeadKind::Segmenter)?;
        let split = Split::new(store.n_examples(), &cfg)?;
        fit(x, y, &split, p, classes, (vit.name(), vit.device()), &cfg)
            .computing(|| "fitting a patch segmenter".to_string())
    }

    /// Whether this head reads `store`'s labels as its own classes: a classifier head on a
    /// store whose provenance names other classes (or the same in another order) would score
    /// every example against the wrong class, silently. Stores without class names pass.
    pub fn check_store(&self, store: &ActivationStore) -> Result<()> {
        if self.meta.kind == HeadKind::Segmenter {
            return Ok(());
        }
        let Some(prov) = store.provenance() else {
            return Ok(());
        };
        if prov.classes.is_empty() || prov.classes == self.meta.classes {
            return Ok(());
        }
        let show = |c: &[String]| {
            let mut s = c.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
            if c.len() > 4 {
                s.push_str(&format!(", … ({} in all)", c.len()));
            }
            s
        };
        Err(Error::mismatch(
            format!("store {}", store.dir().display()),
            format!("the head's classes [{}]", show(&self.meta.classes)),
            format!("[{}]", show(&prov.classes)),
            "use a head trained on a store of this dataset (saev probe)",
        ))
    }

    /// Save as `<dir>/head.{safetensors,json}`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let t = HashMap::from([
            ("W".to_string(), self.w.clone()),
            ("b".to_string(), self.b.clone()),
        ]);
        checkpoint::save(dir.as_ref(), "head", &t, &self.meta)
    }

    /// Open what [`Head::save`] wrote.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let (meta, t): (HeadMeta, _) = checkpoint::load(
            dir.as_ref(),
            "head",
            "version",
            &[1, u64::from(HEAD_VERSION)],
        )?;
        let (d, c) = (meta.d_model, meta.classes.len());
        let (w, b) = (t.get("W", &[d, c])?, t.get("b", &[c])?);
        let st = dir.as_ref().join("head.safetensors");
        crate::sae::model::check_finite(&st, [("W", &w), ("b", &b)])?;
        Ok(Self { w, b, meta })
    }

    /// A head from given weights (`w [d, C]`, `b [C]`), e.g. a synthetic one.
    pub fn from_weights(
        kind: HeadKind,
        w: Tensor,
        b: Tensor,
        classes: Vec<String>,
        backbone: &str,
    ) -> Result<Self> {
        let (d, c) = w.dims2().context("head W")?;
        if b.dims() != [c] || classes.len() != c {
            return Err(Error::Shape {
                what: "head b / classes".into(),
                expected: vec![c],
                actual: vec![b.elem_count(), classes.len()],
            });
        }
        Ok(Self {
            meta: HeadMeta {
                version: HEAD_VERSION,
                kind,
                d_model: d,
                classes,
                backbone: backbone.into(),
                heldout_score: None,
                config: HeadConfig {
                    kind,
                    ..HeadConfig::default()
                },
                held_out: None,
            },
            w,
            b,
        })
    }
}

/// Training and held-out examples: `holdout_frac` of them (at least 1 of 2+), seeded.
struct Split {
    held_out: Examples,
    train_ids: Vec<usize>,
    test_ids: Vec<usize>,
}

impl Split {
    fn new(n: usize, cfg: &HeadConfig) -> Result<Self> {
        let n_test = ((n as f64 * cfg.holdout_frac).round() as usize)
            .clamp(usize::from(n > 1), n.saturating_sub(1));
        let held_out = Examples::held_out(n_test, cfg.seed);
        Ok(Self {
            train_ids: Examples::train(n_test, cfg.seed).ids(n)?,
            test_ids: if n_test > 0 {
                held_out.ids(n)?
            } else {
                Vec::new()
            },
            held_out,
        })
    }
}

/// Head inputs for every example of the store: the recorded `layer` output resumed through the
/// remaining blocks. Rows: one per example (classifiers) or per patch (segmenter).
fn final_inputs(
    vit: &Backbone,
    store: &ActivationStore,
    layer: i64,
    kind: HeadKind,
) -> Result<Vec<f32>> {
    if store.d_model() != vit.d_model() || store.tokens_per_example() != vit.tokens_per_image() {
        return Err(Error::Shape {
            what: format!(
                "store {} vs backbone {} (tokens, d_model)",
                store.dir().display(),
                vit.name()
            ),
            expected: vec![vit.tokens_per_image(), vit.d_model()],
            actual: vec![store.tokens_per_example(), store.d_model()],
        });
    }
    // Same shapes, another model family (a CLIP store resumed through a DINOv2): every number
    // after the recorded block would be wrong without any error.
    let family = vit.family().as_str();
    let known = ["dinov2", "clip", "siglip", "dinov3"];
    let recorded = store.metadata().family.as_str();
    if known.contains(&recorded) && recorded != family {
        return Err(Error::mismatch(
            format!("store {}", store.dir().display()),
            format!(
                "a {recorded} backbone (the store's family; model {})",
                store.metadata().ckpt
            ),
            format!("{} ({family})", vit.name()),
            "pass the model the store was recorded with",
        ));
    }
    let (t, d) = (store.tokens_per_example(), store.d_model());
    let bar = crate::util::progress::bar(store.n_examples() as u64, "images");
    let mut out = Vec::new();
    for (ids, x) in store.ordered_examples(layer, Tokens::All, 16, Examples::All)? {
        let n = x.len() / (t * d);
        let tokens = Tensor::from_vec(x, (n, t, d), vit.device())?;
        let regs = recorded_registers(store, layer, &ids, vit.device())?;
        let res = Residual::from_recorded(vit, layer, &tokens, regs.as_ref())?;
        let o = vit.forward_from(&res)?;
        out.extend(
            head_inputs(kind, &o, vit.has_cls())?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The register tokens `[n, R, D]` the store recorded at `layer` for examples `ids`, if any.
pub(crate) fn recorded_registers(
    store: &ActivationStore,
    layer: i64,
    ids: &[usize],
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let r = store.n_registers();
    Ok(match store.registers_of(layer, ids)? {
        Some(v) => Some(Tensor::from_vec(
            v,
            (ids.len(), r, store.d_model()),
            device,
        )?),
        None => None,
    })
}

/// Softmax regression on rows `x` (`[n_rows, d]`) with labels `y` (None = skip); rows of the
/// split's training examples train, those of its held-out examples score. `rows_per_example`:
/// 1 or P. Fitted on `dev` (the backbone's device); the head stays there.
fn fit(
    x: Vec<f32>,
    y: Vec<Option<u32>>,
    split: &Split,
    rows_per_example: usize,
    classes: Vec<String>,
    (backbone, dev): (&str, &Device),
    cfg: &HeadConfig,
) -> Result<(Head, f64)> {
    let n_rows = y.len();
    let d = x.len() / n_rows.max(1);
    let c = classes.len();
    if c < 2 {
        return Err(Error::out_of_range("head classes", c, "≥ 2"));
    }
    let rows = |ids: &[usize]| -> Vec<usize> {
        ids.iter()
            .flat_map(|&e| e * rows_per_example..(e + 1) * rows_per_example)
            .filter(|&r| y[r].is_some())
            .collect()
    };
    let (train, test) = (rows(&split.train_ids), rows(&split.test_ids));
    if train.is_empty() {
        return Err(Error::missing(
            "head training",
            "no labelled training rows",
            "",
        ));
    }
    // The rows stay on the host (a segmenter's are examples × patches: ~16 GB for ADE20K at
    // d 768); each batch is gathered there and moved to `dev`.
    let gather = |rows: &[usize]| -> Result<Tensor> {
        let mut v = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            v.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        Ok(Tensor::from_vec(v, (rows.len(), d), dev)?)
    };
    let mut w = Tensor::zeros((d, c), DType::F32, dev)?;
    let mut b = Tensor::zeros(c, DType::F32, dev)?;
    let (mut mw, mut vw) = (w.zeros_like()?, w.zeros_like()?);
    let (mut mb, mut vb) = (b.zeros_like()?, b.zeros_like()?);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut t = 0i32;
    let mut order = train.clone();
    let mut seed = cfg.seed;
    for _ in 0..cfg.epochs.max(1) {
        // Seeded Fisher–Yates.
        for i in (1..order.len()).rev() {
            seed = seed.wrapping_add(1);
            let j = (crate::util::rng::splitmix64(seed) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let xb = gather(chunk)?;
            let mut onehot = vec![0f32; chunk.len() * c];
            for (i, &r) in chunk.iter().enumerate() {
                // `train` keeps only labelled rows.
                let l = y[r].unwrap_or(0) as usize;
                if l < c {
                    onehot[i * c + l] = 1.0;
                }
            }
            let yb = Tensor::from_vec(onehot, (chunk.len(), c), dev)?;
            let p = candle_nn::ops::softmax_last_dim(&xb.matmul(&w)?.broadcast_add(&b)?)?;
            let g = ((p - yb)? / chunk.len() as f64)?;
            let gw = (xb.t()?.matmul(&g)? + (&w * cfg.weight_decay)?)?;
            let gb = g.sum(0)?;
            t += 1;
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            for (p, g, m, v) in [
                (&mut w, gw, &mut mw, &mut vw),
                (&mut b, gb, &mut mb, &mut vb),
            ] {
                *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let den = ((v.sqrt()? / c2.sqrt())? + eps)?;
                *p = (&*p - ((&*m / den)? * (cfg.lr / c1))?)?;
            }
        }
    }
    let mut head = Head {
        meta: HeadMeta {
            version: HEAD_VERSION,
            kind: cfg.kind,
            d_model: d,
            classes,
            backbone: backbone.to_string(),
            heldout_score: None,
            config: cfg.clone(),
            held_out: Some(split.held_out.clone()),
        },
        w,
        b,
    };
    let score = if test.is_empty() {
        f64::NAN
    } else {
        let mut pred: Vec<u32> = Vec::with_capacity(test.len());
        for rows in test.chunks(16_384) {
            pred.extend(
                head.probs(&gather(rows)?)?
                    .argmax(D::Minus1)?
                    .to_vec1::<u32>()?,
            );
        }
        let truth: Vec<u32> = test.iter().map(|&r| y[r].unwrap_or(0)).collect();
        match cfg.kind {
            HeadKind::Segmenter => miou(&pred, &truth, c),
            _ => {
                pred.iter().zip(&truth).filter(|(a, b)| a == b).count() as f64 / truth.len() as f64
            }
        }
    };
    head.meta.heldout_score = Some(score);
    Ok((head, score))
}

/// Mean IoU over classes present in `truth` or `pred`.
pub fn miou(pred: &[u32], truth: &[u32], n_classes: usize) -> f64 {
    let mut inter = vec![0usize; n_classes];
    let mut uni = vec![0usize; n_classes];
    for (&p, &t) in pred.iter().zip(truth) {
        let (p, t) = (p as usize, t as usize);
        if p == t && p < n_classes {
            inter[p] += 1;
            uni[p] += 1;
        } else {
            if p < n_classes {
                uni[p] += 1;
            }
            if t < n_classes {
                uni[t] += 1;
            }
        }
    }
    let present: Vec<usize> = (0..n_classes).filter(|&k| uni[k] > 0).collect();
    if present.is_empty() {
        return 0.0;
    }
    present
        .iter()
        .map(|&k| inter[k] as f64 / uni[k] as f64)
        .sum::<f64>()
        / present.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings that cannot train are refused by field; a saved head with a NaN weight is
    /// refused where it is opened.
    #[test]
    fn bad_settings_and_non_finite_heads_are_refused() {
        for (cfg, field) in [
            (HeadConfig::default().with_holdout_frac(1.0), "holdout_frac"),
            (
                HeadConfig {
                    lr: f64::NAN,
                    ..HeadConfig::default()
                },
                "lr",
            ),
            (
                HeadConfig {
                    weight_decay: -1.0,
                    ..HeadConfig::default()
                },
                "weight_decay",
            ),
            (
                HeadConfig {
                    epochs: 0,
                    ..HeadConfig::default()
                },
                "epochs",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        assert!(HeadConfig::default().validate().is_ok());
        let dev = candle_core::Device::Cpu;
        let w = Tensor::from_vec(vec![1f32, f32::NAN, 0.0, 2.0], (2, 2), &dev).unwrap();
        let b = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let h = Head::from_weights(
            HeadKind::ClassifierCls,
            w,
            b,
            vec!["a".into(), "b".into()],
            "x",
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("saev-head-nan-{}", std::process::id()));
        h.save(&dir).unwrap();
        let e = Head::load(&dir).unwrap_err().to_string();
        assert!(e.contains("head.safetensors") && e.contains("`W`"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn miou_closed_form() {
        // class 0: inter {0}, union {0, 1, 3}; class 1: inter {2}, union {1, 2, 3} → 1/3.
        let m = miou(&[0, 0, 1, 1], &[0, 1, 1, 0], 2);
        assert!((m - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(miou(&[2, 2], &[2, 2], 3), 1.0);
    }

    #[test]
    fn probe_separates_separable_classes_and_round_trips() {
        // Three classes along three axes with noise; the held-out quarter must be all right.
        let (n, d) = (120usize, 6usize);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % 3;
            for j in 0..d {
                let noise = ((i * 7 + j * 13) % 10) as f32 / 40.0 - 0.125;
                x.push(if j == c { 2.0 } else { 0.0 } + noise);
            }
            y.push(Some(c as u32));
        }
        let classes = vec!["a".to_string(), "b".into(), "c".into()];
        let cfg = HeadConfig {
            epochs: 300,
            holdout_frac: 0.25,
            ..HeadConfig::default()
        };
        let split = Split::new(n, &cfg).unwrap();
        assert_eq!((split.train_ids.len(), split.test_ids.len()), (90, 30));
        let (h, acc) = fit(x, y, &split, 1, classes, ("synthetic", &Device::Cpu), &cfg).unwrap();
        assert_eq!(acc, 1.0);
        assert_eq!(h.held_out().unwrap(), Examples::held_out(30, 0));
        let dir = std::env::temp_dir().join(format!("saev-head-{}", std::process::id()));
        h.save(&dir).unwrap();
        let back = Head::load(&dir).unwrap();
        let probe =
            Tensor::from_vec(vec![0f32, 0.0, 2.0, 0.0, 0.0, 0.0], (1, 6), &Device::Cpu).unwrap();
        let p: Vec<f32> = back
            .probs(&probe)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(p[2] > 0.6 && p[2] > 2.0 * p[0].max(p[1]), "{p:?}");
        assert_eq!(back.meta(), h.meta());
    }
}
