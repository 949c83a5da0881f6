//! Train a sweep of SAEs on a store in one pass over the data: the paper's ReLU recipe and
//! TopK / BatchTopK (+AuxK) / Matryoshka, resumable, with a history table and held-out
//! evaluation.
//!
//! Every setting (lr, λ, k) sees the same shuffled batches (the data is read once). Inputs are
//! normalised with the store's saved statistics, which each checkpoint carries. Per setting:
//! Kaiming-uniform init, unit-norm decoder rows and parallel-gradient removal (paper), Adam with
//! a linear lr warm-up from 0 then constant or cosine, a linear λ warm-up that really applies
//! (saev 0.1.0's is a no-op), optional gradient clipping. `holdout_examples` examples, drawn at
//! random with the config's seed ([`TrainConfig::held_out`]), are never trained on and give the
//! final [`Evaluation`].
//!
//! Output directory: `history.{parquet,csv}` (a row per setting every `log_every` steps),
//! `<k>/sae.{safetensors,json}` and `<k>/eval.json` per setting, and `checkpoint/` (weights,
//! Adam moments, counters, loader position) every `ckpt_every` steps. Re-running the same
//! config on the same directory resumes and ends with the same weights as an uninterrupted run.
//!
//! ```no_run
//! use saev::{ActivationStore, TrainConfig};
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let cfg = TrainConfig::topk(-2, 32).with_n_patches(1_000_000);
//! let run = saev::train_saes(&store, &cfg, "runs/a")?;
//! println!("{}", run.history);
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::eval::{Evaluation, DENSE_FREQ};
use super::model::{Sae, SaeActivation, SaeConfig, SaeNorm, SAE_SCHEMA};
use super::step::{Kernels, Recipe, Scratch, StepStats, TrainActivation, TrainState};
use crate::error::{Error, IoContext, Result};
use crate::store::{ActivationStore, Examples, LoaderConfig, Tokens};
use crate::util::checkpoint::{self, Tensors};
use crate::util::files::write_json;
use crate::util::rng::splitmix64;

/// One sweep setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    /// Peak learning rate.
    pub lr: f64,
    /// Sparsity coefficient λ (ReLU only). Default 0.
    #[serde(default)]
    pub lambda: f64,
    /// Latents per row for TopK / BatchTopK (overrides the activation's k).
    #[serde(default)]
    pub k: Option<usize>,
}

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Constant at the peak (the paper).
    Constant,
    /// Cosine decay from the peak to `lr_min_frac · peak` at the last step.
    Cosine,
}

/// Training configuration (serde; documented defaults; presets and `with_*` setters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Store layer. Default -2.
    pub layer: i64,
    /// Tokens to train on. Default patches.
    pub tokens: Tokens,
    /// Dictionary size = expansion · d_model. Default 16.
    pub expansion: usize,
    /// Non-linearity. Default ReLU (+ L1).
    pub activation: TrainActivation,
    /// Matryoshka prefix ends as fractions of d_sae (e.g. [0.0625, 0.25, 1.0]); empty = off.
    pub matryoshka: Vec<f64>,
    /// AuxK latents per row on dead latents (TopK/BatchTopK; 0 = off). Default None =
    /// d_model / 2 (Gao et al.'s choice).
    pub aux_k: Option<usize>,
    /// AuxK coefficient. Default 1/32 (Gao et al.).
    pub aux_coef: f64,
    /// A latent silent this many patches is dead. Default 2^20.
    pub dead_window_patches: u64,
    /// Batch size. Default 4096.
    pub batch_size: usize,
    /// Patches to train on (epochs repeat as needed). Default 100M (the paper's).
    pub n_patches: u64,
    /// Settings trained together. Default the paper's 3×3 lr × λ grid.
    pub sweep: Vec<Setting>,
    /// Linear lr warm-up steps (from 0). Default 500.
    pub n_lr_warmup: usize,
    /// Schedule after warm-up. Default constant.
    pub lr_schedule: LrSchedule,
    /// Cosine floor as a fraction of the peak. Default 0.
    pub lr_min_frac: f64,
    /// Linear λ warm-up steps. Default 500.
    pub n_sparsity_warmup: usize,
    /// Global gradient-norm clip (None = off). Default None.
    pub max_grad_norm: Option<f64>,
    /// Unit-norm decoder rows + parallel-gradient removal. Default true.
    pub unit_norm_decoder: bool,
    /// Decoder-side kernels. Default auto.
    pub kernels: Kernels,
    /// Code density above which auto uses dense GEMMs. Default 0.05.
    pub dense_above: f64,
    /// Examples held out for evaluation, a seeded random split (seed = `seed`). Default 5% of
    /// the store (at least 1 when it has 2+ examples); set explicitly to override.
    pub holdout_examples: Option<usize>,
    /// Seed for init and shuffling. Default 0.
    pub seed: u64,
    /// Metrics every this many steps. Default 10.
    pub log_every: usize,
    /// Checkpoint every this many steps (0 = only at the end). Default 500.
    pub ckpt_every: usize,
    /// Stop (with a checkpoint) after this many steps in this call — for time-boxed jobs; a
    /// later call resumes. Not part of the run's identity.
    #[serde(skip)]
    pub stop_after_steps: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let sweep = [3e-4, 1e-3, 3e-3]
            .iter()
            .flat_map(|&lr| {
                [4e-4, 8e-4, 1.6e-3].map(|lambda| Setting {
                    lr,
                    lambda,
                    k: None,
                })
            })
            .collect();
        Self {
            layer: -2,
            tokens: Tokens::Patches,
            expansion: 16,
            activation: TrainActivation::Relu,
            matryoshka: Vec::new(),
            aux_k: None,
            aux_coef: 1.0 / 32.0,
            dead_window_patches: 1 << 20,
            batch_size: 4096,
            n_patches: 100_000_000,
            sweep,
            n_lr_warmup: 500,
            lr_schedule: LrSchedule::Constant,
            lr_min_frac: 0.0,
            n_sparsity_warmup: 500,
            max_grad_norm: None,
            unit_norm_decoder: true,
            kernels: Kernels::Auto,
            dense_above: 0.05,
            holdout_examples: None,
            seed: 0,
            log_every: 10,
            ckpt_every: 500,
            stop_after_steps: None,
        }
    }
}

impl TrainConfig {
    /// The paper's ReLU recipe on `layer` (the default 3×3 lr × λ sweep).
    pub fn new(layer: i64) -> Self {
        Self {
            layer,
            ..Self::default()
        }
    }
    /// TopK(k) with AuxK (k_aux = d_model / 2), cosine lr decay, no λ, an lr sweep of 3.
    pub fn topk(layer: i64, k: usize) -> Self {
        Self {
            layer,
            activation: TrainActivation::TopK { k },
            lr_schedule: LrSchedule::Cosine,
            sweep: [1e-4, 3e-4, 1e-3]
                .map(|lr| Setting {
                    lr,
                    lambda: 0.0,
                    k: None,
                })
                .to_vec(),
            n_sparsity_warmup: 0,
            ..Self::default()
        }
    }
    /// BatchTopK(k) (threshold saved for inference), otherwise as [`TrainConfig::topk`].
    pub fn batch_topk(layer: i64, k: usize) -> Self {
        Self {
            activation: TrainActivation::BatchTopK { k },
            ..Self::topk(layer, k)
        }
    }
    /// Set the number of training patches.
    pub fn with_n_patches(mut self, n: u64) -> Self {
        self.n_patches = n;
        self
    }
    /// Set the sweep.
    pub fn with_sweep(mut self, sweep: Vec<Setting>) -> Self {
        self.sweep = sweep;
        self
    }
    /// Set the batch size.
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    /// One setting per learning rate (λ and k as in the first current setting).
    pub fn with_lrs(mut self, lrs: &[f64]) -> Self {
        let base = self.sweep.first().copied().unwrap_or(Setting {
            lr: 1e-3,
            lambda: 0.0,
            k: None,
        });
        self.sweep = lrs.iter().map(|&lr| Setting { lr, ..base }).collect();
        self
    }
    /// Set the expansion factor.
    pub fn with_expansion(mut self, e: usize) -> Self {
        self.expansion = e.max(1);
        self
    }
    /// Set both warm-ups.
    pub fn with_warmup(mut self, n_lr: usize, n_sparsity: usize) -> Self {
        self.n_lr_warmup = n_lr;
        self.n_sparsity_warmup = n_sparsity;
        self
    }
    /// Set Matryoshka prefix ends (fractions of d_sae, ascending, last 1.0).
    pub fn with_matryoshka(mut self, fracs: Vec<f64>) -> Self {
        self.matryoshka = fracs;
        self
    }
    /// Set AuxK latents per row (0 = off).
    pub fn with_aux_k(mut self, k: usize) -> Self {
        self.aux_k = Some(k);
        self
    }
    /// Set the held-out examples.
    pub fn with_holdout(mut self, n: usize) -> Self {
        self.holdout_examples = Some(n);
        self
    }
    /// Set the checkpoint interval.
    pub fn with_ckpt_every(mut self, n: usize) -> Self {
        self.ckpt_every = n;
        self
    }
    /// Set the seed.
    pub fn with_seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }

    /// The held-out examples of a store with `n_examples` examples (what the final
    /// evaluation reads): pass to [`crate::Sae::evaluate`] or a loader.
    pub fn held_out(&self, n_examples: usize) -> Examples {
        Examples::held_out(self.holdout(n_examples), self.seed)
    }

    fn holdout(&self, n_examples: usize) -> usize {
        match self.holdout_examples {
            Some(h) => h,
            None if n_examples >= 2 => (n_examples / 20).max(1),
            None => 0,
        }
    }

    fn lr_at(&self, peak: f64, step: usize, n_steps: usize) -> f64 {
        if step < self.n_lr_warmup {
            return peak * step as f64 / self.n_lr_warmup as f64;
        }
        match self.lr_schedule {
            LrSchedule::Constant => peak,
            LrSchedule::Cosine => {
                let span = n_steps.saturating_sub(self.n_lr_warmup).max(1) as f64;
                let p = ((step - self.n_lr_warmup) as f64 / span).min(1.0);
                let lo = peak * self.lr_min_frac;
                lo + (peak - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }

    fn lambda_at(&self, lambda: f64, step: usize) -> f64 {
        if self.n_sparsity_warmup == 0 {
            lambda
        } else {
            lambda * ((step + 1) as f64 / self.n_sparsity_warmup as f64).min(1.0)
        }
    }

    /// Check every field against its valid range (errors name the field and the range).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::Invalid(format!("train: {field} {msg}")));
        if self.sweep.is_empty() {
            return bad("sweep", "is empty (give at least one setting)".into());
        }
        if !(1..=256).contains(&self.expansion) {
            return bad("expansion", format!("{} (valid: 1..=256)", self.expansion));
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return bad(
                "batch_size",
                format!("{} (valid: 1..=1048576)", self.batch_size),
            );
        }
        if self.n_patches == 0 {
            return bad("n_patches", "0 (valid: at least 1)".into());
        }
        let k_of = |a: TrainActivation| match a {
            TrainActivation::Relu => None,
            TrainActivation::TopK { k } | TrainActivation::BatchTopK { k } => Some(k),
        };
        if k_of(self.activation) == Some(0) {
            return bad("activation.k", "0 (valid: at least 1)".into());
        }
        for (i, st) in self.sweep.iter().enumerate() {
            if !(st.lr.is_finite() && st.lr > 0.0 && st.lr < 10.0) {
                return bad(
                    &format!("sweep[{i}].lr"),
                    format!("{} (valid: 0 < lr < 10)", st.lr),
                );
            }
            if !(st.lambda.is_finite() && st.lambda >= 0.0) {
                return bad(
                    &format!("sweep[{i}].lambda"),
                    format!("{} (valid: ≥ 0, finite)", st.lambda),
                );
            }
            if st.k == Some(0) {
                return bad(&format!("sweep[{i}].k"), "0 (valid: at least 1)".into());
            }
        }
        for (field, v) in [
            ("aux_coef", self.aux_coef),
            ("lr_min_frac", self.lr_min_frac),
            ("dense_above", self.dense_above),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("{v} (valid: ≥ 0, finite)"));
            }
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return bad("max_grad_norm", format!("{g} (valid: > 0, finite)"));
            }
        }
        if let Some(f) = self
            .matryoshka
            .iter()
            .find(|&&f| !(f.is_finite() && f > 0.0 && f <= 1.0))
        {
            return bad(
                "matryoshka",
                format!("holds {f} (valid: fractions in (0, 1])"),
            );
        }
        Ok(())
    }

    fn recipe(&self, setting: &Setting, d_model: usize, d_sae: usize) -> Result<Recipe> {
        let activation = match (self.activation, setting.k) {
            (TrainActivation::Relu, Some(_)) => {
                return Err(Error::Invalid(
                    "train: a sweep setting gives k, but the activation is relu".into(),
                ))
            }
            (TrainActivation::TopK { .. }, Some(k)) => TrainActivation::TopK { k },
            (TrainActivation::BatchTopK { .. }, Some(k)) => TrainActivation::BatchTopK { k },
            (a, None) => a,
        };
        let groups = if self.matryoshka.is_empty() {
            Vec::new()
        } else {
            self.matryoshka
                .iter()
                .map(|&f| (f * d_sae as f64).round() as usize)
                .collect()
        };
        Ok(Recipe {
            activation,
            groups,
            aux_k: if matches!(activation, TrainActivation::Relu) {
                0
            } else {
                self.aux_k.unwrap_or(d_model / 2)
            },
            aux_coef: self.aux_coef,
            dead_window_patches: self.dead_window_patches,
            unit_norm_decoder: self.unit_norm_decoder,
            max_grad_norm: self.max_grad_norm,
            kernels: self.kernels,
            dense_above: self.dense_above,
        })
    }
}

/// torch `kaiming_uniform_` (a = √5) on a `[rows, cols]` matrix: U(±1/√cols), seeded.
fn kaiming(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let bound = 1.0 / (cols as f64).sqrt();
    let mut s = seed;
    (0..rows * cols)
        .map(|_| {
            s = s.wrapping_add(1);
            let z = splitmix64(s);
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect()
}

/// What [`train_saes`] returns.
pub struct TrainRun {
    /// One SAE per sweep setting, in sweep order.
    pub saes: Vec<Sae>,
    /// The history table (one row per setting every `log_every` steps).
    pub history: DataFrame,
    /// Held-out evaluation per setting (None when nothing was held out).
    pub evals: Vec<Option<Evaluation>>,
    /// Whether training finished (false when stopped by `stop_after_steps`).
    pub finished: bool,
}

/// One history row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct Row {
    step: u64,
    n_patches: u64,
    setting: u32,
    lr: f64,
    lambda: f64,
    loss: f64,
    mse: f64,
    nmse: f64,
    l0: f64,
    l1: f64,
    aux: f64,
    dead: u32,
    dense: u32,
    dense_kernels: bool,
}

fn history_frame(rows: &[Row]) -> Result<DataFrame> {
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    DataFrame::new_infer_height(vec![
        col!("step", |r: &Row| r.step),
        col!("n_patches", |r: &Row| r.n_patches),
        col!("setting", |r: &Row| r.setting),
        col!("lr", |r: &Row| r.lr),
        col!("lambda", |r: &Row| r.lambda),
        col!("loss", |r: &Row| r.loss),
        col!("mse", |r: &Row| r.mse),
        col!("nmse", |r: &Row| r.nmse),
        col!("l0", |r: &Row| r.l0),
        col!("l1", |r: &Row| r.l1),
        col!("aux", |r: &Row| r.aux),
        col!("dead", |r: &Row| r.dead),
        col!("dense", |r: &Row| r.dense),
        col!("dense_kernels", |r: &Row| r.dense_kernels),
    ])
    .map_err(|e| Error::Invalid(format!("history table: {e}")))
}

fn save_history(out: &Path, rows: &[Row]) -> Result<DataFrame> {
    let mut df = history_frame(rows)?;
    let pq = out.join("history.parquet");
    let tmp = out.join("history.parquet.tmp");
    let file = std::fs::File::create(&tmp).with_path(&tmp)?;
    ParquetWriter::new(file)
        .finish(&mut df)
        .map_err(|e| Error::Invalid(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &pq).with_path(&pq)?;
    let mut csv = String::from(
        "step,n_patches,setting,lr,lambda,loss,mse,nmse,l0,l1,aux,dead,dense,dense_kernels\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.step,
            r.n_patches,
            r.setting,
            r.lr,
            r.lambda,
            r.loss,
            r.mse,
            r.nmse,
            r.l0,
            r.l1,
            r.aux,
            r.dead,
            r.dense,
            r.dense_kernels
        ));
    }
    let p = out.join("history.csv");
    std::fs::write(&p, csv).with_path(&p)?;
    Ok(df)
}

/// Checkpoint bookkeeping (`checkpoint/state.json`).
#[derive(Serialize, Deserialize)]
struct CkptState {
    version: u32,
    config: TrainConfig,
    store: String,
    /// [`ActivationStore::fingerprint`] of the store trained on (empty in checkpoints written
    /// before it was recorded).
    #[serde(default)]
    store_fingerprint: String,
    step: usize,
    seen: u64,
    epoch: u64,
    batch_in_epoch: usize,
    adam_t: Vec<u64>,
    threshold: Vec<f32>,
    since_fired: Vec<Vec<u64>>,
    window_fired: Vec<Vec<u32>>,
    window_start: u64,
    history: Vec<Row>,
}

/// 2: the held-out examples are a seeded random split (1 held out the last ones).
const CKPT_VERSION: u32 = 2;

fn tensor(v: &[f32], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)?)
}

fn save_checkpoint(out: &Path, states: &[TrainState], st: &CkptState) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_path(&tmp)?;
    let mut t = HashMap::new();
    for (k, s) in states.iter().enumerate() {
        let (d, n) = (s.d, s.s);
        t.insert(format!("{k}.w_enc"), tensor(&s.w_enc, &[n, d])?);
        t.insert(format!("{k}.b_enc"), tensor(&s.b_enc, &[n])?);
        t.insert(format!("{k}.w_dec"), tensor(&s.w_dec, &[n, d])?);
        t.insert(format!("{k}.b_dec"), tensor(&s.b_dec, &[d])?);
        for (j, (m, v)) in s.adam_m.iter().zip(&s.adam_v).enumerate() {
            t.insert(format!("{k}.m{j}"), tensor(m, &[m.len()])?);
            t.insert(format!("{k}.v{j}"), tensor(v, &[v.len()])?);
        }
    }
    checkpoint::save(&tmp, "state", &t, st)?;
    // Swap in atomically: checkpoint → checkpoint.old, tmp → checkpoint, drop old.
    let cur = out.join("checkpoint");
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if cur.exists() {
        std::fs::rename(&cur, &old).with_path(&cur)?;
    }
    std::fs::rename(&tmp, &cur).with_path(&cur)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(out: &Path, states: &mut [TrainState]) -> Result<Option<CkptState>> {
    let mut dir = out.join("checkpoint");
    if !dir.exists() {
        // Killed between the two renames: the previous checkpoint is intact.
        dir = out.join("checkpoint.old");
        if !dir.exists() {
            return Ok(None);
        }
    }
    let j = dir.join("state.json");
    let st: CkptState = checkpoint::read_header(&j, "version", &[u64::from(CKPT_VERSION)])?;
    // One entry per setting in every per-setting list, d_sae counters each.
    let n = states.len();
    for (field, len) in [
        ("adam_t", st.adam_t.len()),
        ("threshold", st.threshold.len()),
        ("since_fired", st.since_fired.len()),
        ("window_fired", st.window_fired.len()),
    ] {
        if len != n {
            return Err(Error::Checkpoint {
                path: j,
                msg: format!("`{field}` has {len} entries for {n} settings"),
            });
        }
    }
    // Every setting takes one Adam step per training step; a finite BatchTopK threshold.
    if let Some(k) = (0..n).find(|&k| st.adam_t[k] != st.step as u64) {
        return Err(Error::Checkpoint {
            path: j,
            msg: format!(
                "adam_t[{k}] = {} but step = {} (each setting steps once per step)",
                st.adam_t[k], st.step
            ),
        });
    }
    if let Some(k) = (0..n).find(|&k| !st.threshold[k].is_finite()) {
        return Err(Error::Checkpoint {
            path: j,
            msg: format!("threshold[{k}] = {} is not finite", st.threshold[k]),
        });
    }
    if let Some(s0) = states.first() {
        if st.since_fired.iter().any(|v| v.len() != s0.s)
            || st.window_fired.iter().any(|v| v.len() != s0.s)
        {
            return Err(Error::Checkpoint {
                path: j,
                msg: format!("latent counters are not {} long (d_sae)", s0.s),
            });
        }
    }
    let t = Tensors::open(dir.join("state.safetensors"))?;
    let get = |key: String, len: usize| t.vec_f32(&key, len);
    if st.adam_t.len() != states.len() {
        return Err(Error::Checkpoint {
            path: j,
            msg: format!(
                "{} settings, the config has {}",
                st.adam_t.len(),
                states.len()
            ),
        });
    }
    for (k, s) in states.iter_mut().enumerate() {
        let (d, n) = (s.d, s.s);
        s.w_enc = get(format!("{k}.w_enc"), n * d)?;
        s.b_enc = get(format!("{k}.b_enc"), n)?;
        s.w_dec = get(format!("{k}.w_dec"), n * d)?;
        s.b_dec = get(format!("{k}.b_dec"), d)?;
        for (jj, len) in [n * d, n, n * d, d].into_iter().enumerate() {
            s.adam_m[jj] = get(format!("{k}.m{jj}"), len)?;
            s.adam_v[jj] = get(format!("{k}.v{jj}"), len)?;
        }
        s.t = st.adam_t[k];
        s.threshold = st.threshold[k];
        s.since_fired.clone_from(&st.since_fired[k]);
    }
    Ok(Some(st))
}

/// The directory for a run of `cfg` on `store` when the user asks for a fresh one
/// (`saev train --fresh`): `out` itself when [`train_saes`] would start or resume there (new,
/// empty, or a checkpoint of this config on this store), else the first `out/run-N` that would.
pub fn fresh_run_dir(
    store: &ActivationStore,
    cfg: &TrainConfig,
    out: impl AsRef<Path>,
) -> Result<PathBuf> {
    #[derive(Deserialize)]
    struct Peek {
        config: TrainConfig,
        #[serde(default)]
        store_fingerprint: String,
    }
    let mut same = cfg.clone();
    same.stop_after_steps = None;
    let fits = |dir: &Path| {
        if std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none()) {
            return true;
        }
        ["checkpoint", "checkpoint.old"].iter().any(|c| {
            let j = dir.join(c).join("state.json");
            std::fs::read_to_string(j)
                .ok()
                .and_then(|t| serde_json::from_str::<Peek>(&t).ok())
                .is_some_and(|p| p.config == same && p.store_fingerprint == store.fingerprint())
        })
    };
    let out = out.as_ref();
    if fits(out) {
        return Ok(out.to_path_buf());
    }
    for n in 1.. {
        let d = out.join(format!("run-{n}"));
        if fits(&d) {
            return Ok(d);
        }
    }
    unreachable!("an unbounded range always yields a free directory")
}

/// Train the sweep on `store` into `out` (resuming a checkpoint there if one exists).
pub fn train_saes(
    store: &ActivationStore,
    cfg: &TrainConfig,
    out: impl AsRef<Path>,
) -> Result<TrainRun> {
    let out = out.as_ref();
    cfg.validate()?;
    let d = store.d_model();
    let s = d * cfg.expansion;
    let n_ex = store.n_examples();
    let holdout = cfg.holdout(n_ex);
    if holdout >= n_ex {
        return Err(Error::Invalid(format!(
            "train: {holdout} held-out examples leave none of the store's {n_ex} to train on"
        )));
    }
    let norm = store.norm_stats(cfg.layer, cfg.tokens)?;
    let (mean, scalar) = (norm.mean.clone(), norm.scalar);
    let mut states = cfg
        .sweep
        .iter()
        .enumerate()
        .map(|(k, setting)| {
            let seed = cfg.seed.wrapping_mul(1000) + 2 * k as u64;
            // W_enc is `[d, d_sae]` in the paper (fan-in d_sae); stored here as rows `[d_sae, d]`.
            let w = kaiming(d, s, seed);
            let mut w_enc = vec![0f32; s * d];
            for (i, row) in w.chunks_exact(s).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    w_enc[j * d + i] = v;
                }
            }
            TrainState::new(
                w_enc,
                vec![0.0; s],
                kaiming(s, d, seed + 1),
                vec![0.0; d],
                cfg.recipe(setting, d, s)?,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    // Never write into a directory of someone else's files: an output directory is new, empty,
    // or a run of saev's (it has a checkpoint).
    let ours = ["checkpoint", "checkpoint.old", "checkpoint.tmp"]
        .iter()
        .any(|c| out.join(c).exists());
    let foreign = !ours && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if foreign {
        return Err(Error::Invalid(format!(
            "{} exists and holds files a saev training run did not write; choose a new or empty output directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).with_path(out)?;
    let store_id = store.dir().display().to_string();
    let mut ck = match load_checkpoint(out, &mut states)? {
        Some(ck) => {
            let mut same = cfg.clone();
            same.stop_after_steps = None;
            if ck.config != same {
                return Err(Error::Checkpoint {
                    path: out.join("checkpoint/state.json"),
                    msg: "it was made with a different training config; use a new output directory"
                        .into(),
                });
            }
            let fp = store.fingerprint();
            if !ck.store_fingerprint.is_empty() && ck.store_fingerprint != fp {
                return Err(Error::Checkpoint {
                    path: out.join("checkpoint/state.json"),
                    msg: format!(
                        "it was made on another store ({}, fingerprint {}), not {} ({fp}); use a new output directory",
                        ck.store,
                        ck.store_fingerprint,
                        store.dir().display()
                    ),
                });
            }
            ck
        }
        None => CkptState {
            version: CKPT_VERSION,
            config: TrainConfig {
                stop_after_steps: None,
                ..cfg.clone()
            },
            store: store_id.clone(),
            store_fingerprint: store.fingerprint(),
            step: 0,
            seen: 0,
            epoch: 0,
            batch_in_epoch: 0,
            adam_t: vec![0; cfg.sweep.len()],
            threshold: vec![0.0; cfg.sweep.len()],
            since_fired: vec![vec![0; s]; cfg.sweep.len()],
            window_fired: vec![vec![0; s]; cfg.sweep.len()],
            window_start: 0,
            history: Vec::new(),
        },
    };
    let bs = cfg.batch_size.max(1);
    let n_steps = cfg.n_patches.div_ceil(bs as u64) as usize;
    let loader_cfg = LoaderConfig::new(cfg.layer)
        .with_tokens(cfg.tokens)
        .with_batch_size(bs)
        .with_seed(cfg.seed)
        .with_examples(Examples::train(holdout, cfg.seed));
    let n_tok = match cfg.tokens {
        Tokens::Patches => store.n_patches(),
        Tokens::Cls => 1,
        Tokens::All => store.tokens_per_example(),
    } as u64;
    let bar = crate::util::progress::bar(cfg.n_patches, "patches");
    bar.set_position(ck.seen.min(cfg.n_patches));
    let mut scratch = Scratch::default();
    let mut steps_this_call = 0usize;
    let mut finished = ck.seen >= cfg.n_patches;
    'outer: while !finished {
        let loader = store.shuffled_from(&loader_cfg, ck.epoch, ck.batch_in_epoch)?;
        for batch in loader {
            if ck.seen >= cfg.n_patches {
                break;
            }
            if cfg.stop_after_steps.is_some_and(|m| steps_this_call >= m) {
                break 'outer;
            }
            let n = batch.n;
            let mut x = batch.acts_nd;
            for (r, row) in x.chunks_exact_mut(d).enumerate() {
                for (t, (v, m)) in row.iter_mut().zip(&mean).enumerate() {
                    if !v.is_finite() {
                        let ix = batch.index[r];
                        return Err(Error::NonFinite {
                            store: store.dir().to_path_buf(),
                            step: ck.step,
                            example: ix / n_tok,
                            token: ix % n_tok,
                            dim: t,
                            value: *v,
                        });
                    }
                    *v = (*v - m) / scalar;
                }
            }
            let log = ck.step % cfg.log_every.max(1) == 0;
            let mut first: Option<StepStats> = None;
            for (k, (st, setting)) in states.iter_mut().zip(&cfg.sweep).enumerate() {
                let lr = cfg.lr_at(setting.lr, ck.step, n_steps);
                let lambda = cfg.lambda_at(setting.lambda, ck.step);
                let (stats, fired) = st.step(&x, n, lr, lambda, &mut scratch)?;
                // A non-finite loss, or weights an update made non-finite (its loss, computed
                // before the update, can still be finite): the weights of this step are never
                // saved, so the last checkpoint stays good.
                let what = if stats.loss.is_finite() {
                    st.first_non_finite()
                        .map(|(name, i)| format!("{name}[{i}] is not finite after the update"))
                } else {
                    Some(format!("loss {}", stats.loss))
                };
                if let Some(what) = what {
                    return Err(Error::Diverged {
                        setting: k,
                        detail: format!("{setting:?}"),
                        what,
                        step: ck.step,
                        lr,
                        checkpoint: out.join("checkpoint"),
                    });
                }
                for (w, f) in ck.window_fired[k].iter_mut().zip(&fired) {
                    *w = w.saturating_add(*f);
                }
                if log {
                    let window = (ck.seen + n as u64 - ck.window_start).max(1) as f64;
                    ck.history.push(Row {
                        step: ck.step as u64,
                        n_patches: ck.seen + n as u64,
                        setting: k as u32,
                        lr,
                        lambda: stats.lambda,
                        loss: stats.loss,
                        mse: stats.mse,
                        nmse: stats.nmse,
                        l0: stats.l0,
                        l1: stats.l1,
                        aux: stats.aux,
                        dead: st.dead_mask().iter().filter(|&&x| x).count() as u32,
                        dense: ck.window_fired[k]
                            .iter()
                            .filter(|&&c| f64::from(c) / window > DENSE_FREQ)
                            .count() as u32,
                        dense_kernels: stats.dense,
                    });
                    ck.window_fired[k].iter_mut().for_each(|c| *c = 0);
                }
                first.get_or_insert(stats);
            }
            if log {
                ck.window_start = ck.seen + n as u64;
            }
            if let Some(f) = first {
                bar.set_message(format!("loss {:.4} L0 {:.1}", f.loss, f.l0));
            }
            ck.seen += n as u64;
            ck.step += 1;
            ck.batch_in_epoch += 1;
            steps_this_call += 1;
            bar.set_position(ck.seen.min(cfg.n_patches));
            if cfg.ckpt_every > 0 && ck.step % cfg.ckpt_every == 0 && ck.seen < cfg.n_patches {
                snapshot(&mut ck, &states);
                save_checkpoint(out, &states, &ck)?;
                save_history(out, &ck.history)?;
            }
        }
        if ck.seen >= cfg.n_patches {
            finished = true;
        } else if cfg.stop_after_steps.is_some_and(|m| steps_this_call >= m) {
            break;
        } else {
            ck.epoch += 1;
            ck.batch_in_epoch = 0;
        }
    }
    bar.finish_and_clear();
    snapshot(&mut ck, &states);
    save_checkpoint(out, &states, &ck)?;
    let history = save_history(out, &ck.history)?;
    let mut saes = Vec::new();
    let mut evals = Vec::new();
    for (k, (st, setting)) in states.iter().zip(&cfg.sweep).enumerate() {
        let sae = export(st, cfg, setting, store, &norm.mean, norm.scalar, ck.seen)?;
        let ev = if finished && holdout > 0 {
            let ev = sae.evaluate(store, cfg.layer, cfg.tokens, cfg.held_out(n_ex))?;
            std::fs::create_dir_all(out.join(k.to_string())).with_path(out)?;
            write_json(&out.join(k.to_string()).join("eval.json"), &ev)?;
            Some(ev)
        } else {
            None
        };
        if finished {
            sae.save(out.join(k.to_string()))?;
        }
        saes.push(sae);
        evals.push(ev);
    }
    Ok(TrainRun {
        saes,
        history,
        evals,
        finished,
    })
}

fn snapshot(ck: &mut CkptState, states: &[TrainState]) {
    ck.adam_t = states.iter().map(|s| s.t).collect();
    ck.threshold = states.iter().map(|s| s.threshold).collect();
    ck.since_fired = states.iter().map(|s| s.since_fired.clone()).collect();
}

/// The inference-form [`Sae`] of a training state (`W_enc` transposed, `− b_dec W_enc` folded).
fn export(
    st: &TrainState,
    cfg: &TrainConfig,
    setting: &Setting,
    store: &ActivationStore,
    mean: &[f32],
    scalar: f32,
    seen: u64,
) -> Result<Sae> {
    let (d, s) = (st.d, st.s);
    let w_enc_sd = tensor(&st.w_enc, &[s, d])?;
    let b_dec = tensor(&st.b_dec, &[d])?;
    let b_enc = (tensor(&st.b_enc, &[s])? - w_enc_sd.matmul(&b_dec.unsqueeze(1)?)?.squeeze(1)?)?;
    let activation = match st.recipe.activation {
        TrainActivation::Relu => SaeActivation::Relu,
        TrainActivation::TopK { k } => SaeActivation::TopK { k, relu: true },
        TrainActivation::BatchTopK { k } => SaeActivation::BatchTopK {
            k,
            threshold: st.threshold,
        },
    };
    let sae_cfg = SaeConfig {
        schema: SAE_SCHEMA,
        d_model: d,
        d_sae: s,
        activation,
        norm: Some(SaeNorm {
            mean: mean.to_vec(),
            scalar,
        }),
        provenance: serde_json::json!({
            "store": store.dir().display().to_string(),
            "family": store.metadata().family,
            "ckpt": store.metadata().ckpt,
            "layer": cfg.layer,
            "tokens": cfg.tokens,
            "setting": setting,
            "train": cfg,
            "n_patches_seen": seen,
        }),
    };
    Sae::new(
        sae_cfg,
        w_enc_sd.t()?.contiguous()?,
        b_enc,
        tensor(&st.w_dec, &[s, d])?,
        b_dec,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_files_with_unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<TrainConfig>(r#"{"lr": 1}"#).is_err());
        assert!(serde_json::from_str::<Vec<Setting>>(r#"[{"lr": 1, "lamda": 2}]"#).is_err());
        let c: TrainConfig =
            serde_json::from_str(r#"{"n_patches": 10, "sweep": [{"lr": 1e-3, "lambda": 4e-4}]}"#)
                .unwrap();
        assert_eq!((c.n_patches, c.sweep.len(), c.batch_size), (10, 1, 4096));
        let c: TrainConfig = serde_json::from_str(
            r#"{"activation": {"kind": "top_k", "k": 32}, "lr_schedule": "cosine", "sweep": [{"lr": 1e-3, "k": 16}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.recipe(&c.sweep[0], 4, 64).unwrap().activation,
            TrainActivation::TopK { k: 16 }
        );
    }

    #[test]
    fn schedules_have_their_closed_forms() {
        let mut c = TrainConfig::new(-2).with_warmup(10, 4);
        assert_eq!(c.lr_at(1.0, 0, 100), 0.0);
        assert_eq!(c.lr_at(1.0, 5, 100), 0.5);
        assert_eq!(c.lr_at(1.0, 50, 100), 1.0);
        c.lr_schedule = LrSchedule::Cosine;
        c.lr_min_frac = 0.1;
        assert!((c.lr_at(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(1.0, 60, 110) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(1.0, 110, 110) - 0.1).abs() < 1e-12);
        assert_eq!(c.lambda_at(2.0, 0), 0.5);
        assert_eq!(c.lambda_at(2.0, 3), 2.0);
        assert_eq!(c.lambda_at(2.0, 99), 2.0);
    }

    #[test]
    fn kaiming_bound_and_determinism() {
        let a = kaiming(8, 64, 3);
        assert_eq!(a, kaiming(8, 64, 3));
        assert!(a.iter().all(|v| v.abs() <= 0.125));
        assert!(a.iter().any(|v| v.abs() > 0.1));
    }
}
