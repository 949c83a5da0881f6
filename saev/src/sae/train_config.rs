//! The training configuration: the sweep settings (lr, λ, k), the recipe (activation, AuxK,
//! Matryoshka, warm-ups, schedule) and their valid ranges — a serde struct with presets
//! ([`TrainConfig::new`] = the paper's ReLU recipe, [`TrainConfig::sparse_relu`],
//! [`TrainConfig::topk`], [`TrainConfig::batch_topk`], [`TrainConfig::jump_relu`]) and `with_*`
//! setters. Read by [`super::trainer`].
//!
//! ```
//! let cfg = saev::TrainConfig::topk(-2, 32).with_n_patches(1_000_000).with_expansion(16);
//! cfg.validate()?;
//! # Ok::<(), saev::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use super::step::{Kernels, Recipe, TrainActivation};
use crate::error::{Error, Result};
use crate::store::{Examples, Shuffle, Tokens};

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

/// How an SAE's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// The paper's (saev 0.1.0): encoder and decoder drawn independently, torch's
    /// `kaiming_uniform_`.
    Kaiming,
    /// The encoder as the decoder's transpose (Gao et al. 2024; the Python saev at HEAD,
    /// sparsify): Kaiming-uniform directions, decoder rows at unit norm. Every latent starts
    /// reading the direction it writes, so far fewer die.
    Tied,
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
    /// AuxK latents per row on dead latents (TopK/BatchTopK/JumpReLU; 0 = off). Default None =
    /// d_model / 2 (Gao et al.'s choice) for TopK and BatchTopK, off for JumpReLU.
    pub aux_k: Option<usize>,
    /// AuxK coefficient. Default 1/32 (Gao et al.).
    pub aux_coef: f64,
    /// A latent silent this many patches is dead (AuxK revives it; counted in the history).
    /// Default None = scaled to the run: `n_patches / 64`, at least one batch and at most 2^20
    /// (a fixed 2^20 was half of the quickstart's whole budget, so latents died unrevived; on
    /// the quickstart store TopK-32 left 1,007 of 6,144 latents dead with n/20, 374 with n/64).
    pub dead_window_patches: Option<u64>,
    /// Weight initialisation. Default None = [`Init::Tied`] for TopK / BatchTopK,
    /// [`Init::Kaiming`] (the paper's) for ReLU.
    pub init: Option<Init>,
    /// ReLU only: every latent's encoder bias starts where it fires on this fraction of the
    /// first batch (its `(1 − p)` quantile of pre-activations, subtracted). Default None = the
    /// paper's zero bias, where half the latents fire at first and training runs dense until the
    /// L1 penalty brings L0 down (JumpReLU has the same start in its activation).
    pub init_density: Option<f32>,
    /// Batch size. Default 4096 (the TopK / BatchTopK / JumpReLU presets: 2048 — twice the
    /// optimiser steps on a short budget: on the quickstart store, 2M patches, TopK-32 at 2048
    /// and lr 2e-3 never fires 138 of 6,144 latents on held-out patches, 374 at 4096 and lr 3e-3,
    /// at held-out NMSE 0.0693 vs 0.0718).
    pub batch_size: usize,
    /// Patches to train on (epochs repeat as needed), rounded up to whole batches: at most
    /// `batch_size − 1` more (the Python saev trains until it has seen more than `n_patches`,
    /// one whole batch past an exact multiple). Default 100M (the paper's).
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
    /// The loader's order: [`Shuffle::Global`] (default), or [`Shuffle::blocks`] for a store
    /// larger than RAM read from disk.
    pub shuffle: Shuffle,
    /// Metrics every this many steps. Default 10.
    pub log_every: usize,
    /// Checkpoint every this many steps (0 = only at the end). Default 500.
    pub ckpt_every: usize,
    /// Index of this sweep's first setting in a larger sweep trained in groups
    /// ([`TrainConfig::group`], `saev train --group`): each setting's initialisation is seeded,
    /// its directory and history rows are named, by its index in the whole sweep, so a group's
    /// SAEs are the whole sweep's. Default 0.
    pub first_setting: usize,
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
            dead_window_patches: None,
            init: None,
            init_density: None,
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
            shuffle: Shuffle::Global,
            log_every: 10,
            ckpt_every: 500,
            first_setting: 0,
            stop_after_steps: None,
        }
    }
}

impl Setting {
    /// A short label for charts and logs: `TopK k 32, lr 4e-4`, `ReLU λ 8e-4, lr 4e-4`.
    pub fn label(&self, activation: TrainActivation) -> String {
        let (name, k) = match activation {
            TrainActivation::Relu => {
                return format!("ReLU λ {:.0e}, lr {:.0e}", self.lambda, self.lr)
            }
            TrainActivation::JumpRelu { .. } => {
                return format!("JumpReLU λ {:.0e}, lr {:.0e}", self.lambda, self.lr)
            }
            TrainActivation::TopK { k } => ("TopK", k),
            TrainActivation::BatchTopK { k } => ("BatchTopK", k),
        };
        format!("{name} k {}, lr {:.0e}", self.k.unwrap_or(k), self.lr)
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
    /// ReLU + L1 that reaches L0 ≈ 1% of d_sae on a short budget: tied init, every latent
    /// starting to fire on 1% of the first batch ([`TrainConfig::init_density`]), 100-step lr
    /// and λ warm-ups, cosine lr decay, batch 2048, a λ sweep {4e-3, 7e-3, 1e-2} at lr 1e-3.
    /// On the quickstart store (2M patches, 16×) λ 4e-3 gave L0 88 at held-out NMSE 0.083 and
    /// λ 1e-2 L0 41 (0.7% of 6,144) at 0.138, training 4 SAEs at 2,800 patches/s; the paper's
    /// recipe ([`TrainConfig::new`]) was still at L0 ≈ 2,900 after 200K patches, at 750/s.
    pub fn sparse_relu(layer: i64) -> Self {
        Self {
            layer,
            init: Some(Init::Tied),
            init_density: Some(0.01),
            lr_schedule: LrSchedule::Cosine,
            batch_size: 2048,
            n_lr_warmup: 100,
            n_sparsity_warmup: 100,
            sweep: [4e-3, 7e-3, 1e-2]
                .map(|lambda| Setting {
                    lr: 1e-3,
                    lambda,
                    k: None,
                })
                .to_vec(),
            ..Self::default()
        }
    }
    /// TopK(k) with AuxK (k_aux = d_model / 2), tied init, cosine lr decay, batch 2048, no λ,
    /// an lr sweep of 3.
    pub fn topk(layer: i64, k: usize) -> Self {
        Self {
            layer,
            activation: TrainActivation::TopK { k },
            lr_schedule: LrSchedule::Cosine,
            batch_size: 2048,
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
    /// JumpReLU (Rajamanoharan et al. 2024) with its L0 penalty: tied init, cosine lr decay, a
    /// λ sweep at lr 1e-3 (λ is the paper's: the L0 penalty against MSE summed over d_model).
    pub fn jump_relu(layer: i64) -> Self {
        Self {
            layer,
            activation: TrainActivation::jump_relu(),
            lr_schedule: LrSchedule::Cosine,
            batch_size: 2048,
            sweep: [0.3, 1.0, 3.0]
                .map(|lambda| Setting {
                    lr: 1e-3,
                    lambda,
                    k: None,
                })
                .to_vec(),
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
    /// Set the loader's order (see [`TrainConfig::shuffle`]).
    pub fn with_shuffle(mut self, shuffle: Shuffle) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The dead-latent window in patches ([`TrainConfig::dead_window_patches`] or its default).
    pub fn dead_window(&self) -> u64 {
        self.dead_window_patches.unwrap_or_else(|| {
            (self.n_patches / 64)
                .max(self.batch_size as u64)
                .min(1 << 20)
        })
    }

    /// The initialisation ([`TrainConfig::init`] or its default for the activation).
    pub fn init(&self) -> Init {
        self.init.unwrap_or(match self.activation {
            TrainActivation::Relu => Init::Kaiming,
            TrainActivation::TopK { .. }
            | TrainActivation::BatchTopK { .. }
            | TrainActivation::JumpRelu { .. } => Init::Tied,
        })
    }

    /// Group `i` of `n` of the sweep (contiguous, as even as the settings allow), for training
    /// a large sweep as `n` jobs (one per GPU or Slurm array task) that each read the data once.
    /// Each setting keeps its seed and index, so the groups' SAEs equal the whole sweep's.
    pub fn group(&self, i: usize, n: usize) -> Result<Self> {
        let len = self.sweep.len();
        let part = crate::util::cluster::contiguous_part(len, n, i);
        let (a, b) = (part.start, part.end);
        if n == 0 || i >= n || a >= b {
            return Err(Error::out_of_range(
                format!("train: group i of {n}:"),
                i,
                format!("0..{} (non-empty groups of the {len} settings)", n.min(len)),
            ));
        }
        Ok(Self {
            sweep: self.sweep[a..b].to_vec(),
            first_setting: self.first_setting + a,
            ..self.clone()
        })
    }

    /// The held-out examples of a store with `n_examples` examples (what the final
    /// evaluation reads): pass to [`crate::Sae::evaluate`] or a loader.
    pub fn held_out(&self, n_examples: usize) -> Examples {
        Examples::held_out(self.holdout(n_examples), self.seed)
    }

    pub(super) fn holdout(&self, n_examples: usize) -> usize {
        match self.holdout_examples {
            Some(h) => h,
            None if n_examples >= 2 => (n_examples / 20).max(1),
            None => 0,
        }
    }

    pub(super) fn lr_at(&self, peak: f64, step: usize, n_steps: usize) -> f64 {
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

    pub(super) fn lambda_at(&self, lambda: f64, step: usize) -> f64 {
        if self.n_sparsity_warmup == 0 {
            lambda
        } else {
            lambda * ((step + 1) as f64 / self.n_sparsity_warmup as f64).min(1.0)
        }
    }

    /// Check every field against its valid range (errors name the field and the range).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String, valid: &str| {
            Err(Error::out_of_range(format!("train: {field}"), value, valid))
        };
        if self.sweep.is_empty() {
            return bad("sweep", "[] (empty)".into(), "at least one setting");
        }
        if !(1..=256).contains(&self.expansion) {
            return bad("expansion", self.expansion.to_string(), "1..=256");
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return bad("batch_size", self.batch_size.to_string(), "1..=1048576");
        }
        if self.n_patches == 0 {
            return bad("n_patches", "0".into(), "at least 1");
        }
        let k_of = |a: TrainActivation| match a {
            TrainActivation::Relu | TrainActivation::JumpRelu { .. } => None,
            TrainActivation::TopK { k } | TrainActivation::BatchTopK { k } => Some(k),
        };
        if k_of(self.activation) == Some(0) {
            return bad("activation.k", "0".into(), "at least 1");
        }
        for (i, st) in self.sweep.iter().enumerate() {
            if !(st.lr.is_finite() && st.lr > 0.0 && st.lr < 10.0) {
                return bad(&format!("sweep[{i}].lr"), st.lr.to_string(), "0 < lr < 10");
            }
            if !(st.lambda.is_finite() && st.lambda >= 0.0) {
                return bad(
                    &format!("sweep[{i}].lambda"),
                    st.lambda.to_string(),
                    "≥ 0, finite",
                );
            }
            if st.k == Some(0) {
                return bad(&format!("sweep[{i}].k"), "0".into(), "at least 1");
            }
            // TopK and BatchTopK have no sparsity penalty: a λ sweep would train identical SAEs
            // (each recording its own λ).
            if k_of(self.activation).is_some() && st.lambda != 0.0 {
                return Err(Error::mismatch(
                    format!("train: sweep[{i}].lambda"),
                    "no λ for the top_k and batch_top_k activations (k sets their sparsity)",
                    format!("lambda {}", st.lambda),
                    "drop lambda, sweep k instead, or use the relu / jump_relu activation",
                ));
            }
        }
        for (field, v) in [
            ("aux_coef", self.aux_coef),
            ("lr_min_frac", self.lr_min_frac),
            ("dense_above", self.dense_above),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v.to_string(), "≥ 0, finite");
            }
        }
        // The cosine schedule decays to this fraction of the peak: above 1 it would rise.
        if self.lr_min_frac > 1.0 {
            return bad("lr_min_frac", self.lr_min_frac.to_string(), "0 ≤ f ≤ 1");
        }
        if let Some(p) = self.init_density {
            if !(p > 0.0 && p < 1.0) {
                return bad("init_density", p.to_string(), "0 < p < 1");
            }
            if self.activation != TrainActivation::Relu {
                return Err(Error::mismatch(
                    "train: init_density",
                    "the relu activation",
                    format!("{:?}", self.activation),
                    "drop it (JumpReLU takes activation.init_density; TopK needs none)",
                ));
            }
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return bad("max_grad_norm", g.to_string(), "> 0, finite");
            }
        }
        if let Some(f) = self
            .matryoshka
            .iter()
            .find(|&&f| !(f.is_finite() && f > 0.0 && f <= 1.0))
        {
            return bad("matryoshka", f.to_string(), "fractions in (0, 1]");
        }
        Ok(())
    }

    pub(super) fn recipe(&self, setting: &Setting, d_model: usize, d_sae: usize) -> Result<Recipe> {
        let activation = match (self.activation, setting.k) {
            (TrainActivation::Relu | TrainActivation::JumpRelu { .. }, Some(_)) => {
                return Err(Error::mismatch(
                    "train: sweep setting",
                    "no k for the relu and jump_relu activations",
                    "a k",
                    "drop k or use a top_k / batch_top_k activation",
                ))
            }
            (TrainActivation::TopK { .. }, Some(k)) => TrainActivation::TopK { k },
            (TrainActivation::BatchTopK { .. }, Some(k)) => TrainActivation::BatchTopK { k },
            (a, None) => a,
        };
        if let TrainActivation::TopK { k } | TrainActivation::BatchTopK { k } = activation {
            if k > d_sae {
                return Err(Error::out_of_range(
                    "train: activation.k",
                    k,
                    format!("1..={d_sae} (d_sae = d_model {d_model} × expansion)"),
                ));
            }
        }
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
            aux_k: match activation {
                TrainActivation::Relu => 0,
                // The paper trains JumpReLU without AuxK; on request it revives dead latents.
                TrainActivation::JumpRelu { .. } => self.aux_k.unwrap_or(0),
                _ => self.aux_k.unwrap_or(d_model / 2),
            },
            aux_coef: self.aux_coef,
            dead_window_patches: self.dead_window(),
            unit_norm_decoder: self.unit_norm_decoder,
            max_grad_norm: self.max_grad_norm,
            kernels: self.kernels,
            dense_above: self.dense_above,
            relu_init_density: self.init_density,
        })
    }
}
