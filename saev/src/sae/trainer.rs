//! Train ReLU SAEs on a store, the paper's recipe, several sweep settings per pass over the data.
//!
//! Every setting (lr, λ) sees the same shuffled batches (the data is read once); inputs are
//! normalised with the store's saved statistics, which are stored in each checkpoint. Per
//! setting: Kaiming-uniform init, unit-norm decoder rows before each step, parallel-gradient
//! removal, Adam with linear lr warm-up from 0, and a sparsity warm-up that really applies
//! (λ grows linearly over `n_sparsity_warmup` steps; saev 0.1.0's was a no-op). Metrics every
//! `log_every` steps go to `history.csv`; each SAE is saved as `<out>/<k>/sae.{safetensors,json}`.
//!
//! ```no_run
//! use saev::{ActivationStore, TrainConfig};
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let saes = saev::train_saes(&store, &TrainConfig::new(-2).with_n_patches(1_000_000), "runs/a".as_ref())?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::model::{Sae, SaeActivation, SaeConfig, SaeNorm, SAE_SCHEMA};
use super::paper_step::PaperReluStep;
use crate::error::{Error, IoContext, Result};
use crate::store::permute::splitmix64;
use crate::store::{ActivationStore, LoaderConfig, Tokens};

/// One sweep setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    /// Peak learning rate.
    pub lr: f64,
    /// Sparsity coefficient λ.
    pub lambda: f64,
}

/// Training configuration (serde; documented defaults; `with_*` setters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Store layer. Default -2.
    pub layer: i64,
    /// Tokens to train on. Default patches.
    pub tokens: Tokens,
    /// Dictionary size = expansion · d_model. Default 16.
    pub expansion: usize,
    /// Batch size. Default 4096.
    pub batch_size: usize,
    /// Patches to train on (epochs repeat as needed). Default 100M (the paper's).
    pub n_patches: u64,
    /// Settings trained together. Default the paper's 3×3 lr × λ grid.
    pub sweep: Vec<Setting>,
    /// Linear lr warm-up steps. Default 500.
    pub n_lr_warmup: usize,
    /// Linear λ warm-up steps. Default 500.
    pub n_sparsity_warmup: usize,
    /// Seed for init and shuffling. Default 0.
    pub seed: u64,
    /// Metrics every this many steps. Default 10.
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let sweep = [3e-4, 1e-3, 3e-3]
            .iter()
            .flat_map(|&lr| [4e-4, 8e-4, 1.6e-3].map(|lambda| Setting { lr, lambda }))
            .collect();
        Self {
            layer: -2,
            tokens: Tokens::Patches,
            expansion: 16,
            batch_size: 4096,
            n_patches: 100_000_000,
            sweep,
            n_lr_warmup: 500,
            n_sparsity_warmup: 500,
            seed: 0,
            log_every: 10,
        }
    }
}

impl TrainConfig {
    /// Defaults on `layer`.
    pub fn new(layer: i64) -> Self {
        Self {
            layer,
            ..Self::default()
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
}

/// torch `kaiming_uniform_` (a = √5) on a `[rows, cols]` matrix: U(±1/√cols), seeded.
fn kaiming(rows: usize, cols: usize, seed: u64) -> Result<Tensor> {
    let bound = 1.0 / (cols as f64).sqrt();
    let mut s = seed;
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s.wrapping_add(1);
            let z = splitmix64(s);
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect();
    Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
}

/// Train the sweep on `store`; returns the SAEs (also saved under `out`).
pub fn train_saes(store: &ActivationStore, cfg: &TrainConfig, out: &Path) -> Result<Vec<Sae>> {
    if cfg.sweep.is_empty() {
        return Err(Error::Invalid("train: empty sweep".into()));
    }
    let d = store.d_model();
    let s = d * cfg.expansion;
    let norm = store.norm_stats(cfg.layer, cfg.tokens)?;
    let mean = Tensor::from_vec(norm.mean.clone(), d, &Device::Cpu)?;
    let scalar = f64::from(norm.scalar);
    let mut steps = cfg
        .sweep
        .iter()
        .enumerate()
        .map(|(k, st)| {
            let seed = cfg.seed.wrapping_mul(1000) + 2 * k as u64;
            PaperReluStep::new(
                kaiming(d, s, seed)?,
                Tensor::zeros(s, candle_core::DType::F32, &Device::Cpu)?,
                kaiming(s, d, seed + 1)?,
                Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu)?,
                st.lr,
                0.0,
                cfg.n_lr_warmup,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(out).with_path(out)?;
    let hist_path = out.join("history.csv");
    let mut hist = std::fs::File::create(&hist_path).with_path(&hist_path)?;
    writeln!(hist, "step,n_patches,setting,lr,lambda,loss,mse,l0,l1,dead").with_path(&hist_path)?;
    let bar = indicatif::ProgressBar::new(cfg.n_patches);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} patches [{elapsed} < {eta}, {per_sec}] {msg}",
    ) {
        bar.set_style(style);
    }
    let mut fired: Vec<Vec<bool>> = vec![vec![false; s]; cfg.sweep.len()];
    let (mut seen, mut step, mut epoch) = (0u64, 0usize, 0u64);
    let loader_cfg = LoaderConfig::new(cfg.layer)
        .with_tokens(cfg.tokens)
        .with_batch_size(cfg.batch_size)
        .with_seed(cfg.seed);
    'outer: loop {
        for batch in store.shuffled(&loader_cfg, epoch)? {
            if seen >= cfg.n_patches {
                break 'outer;
            }
            let x = Tensor::from_vec(batch.acts_nd, (batch.n, d), &Device::Cpu)?;
            let x = (x.broadcast_sub(&mean)? / scalar)?;
            let warm = if cfg.n_sparsity_warmup == 0 {
                1.0
            } else {
                ((step + 1) as f64 / cfg.n_sparsity_warmup as f64).min(1.0)
            };
            for (k, (st, setting)) in steps.iter_mut().zip(&cfg.sweep).enumerate() {
                st.set_lambda(setting.lambda * warm);
                let (terms, active) = st.step_with_activity(&x)?;
                for (f, a) in fired[k].iter_mut().zip(active) {
                    *f |= a;
                }
                if step % cfg.log_every.max(1) == 0 {
                    let dead = fired[k].iter().filter(|&&f| !f).count();
                    writeln!(
                        hist,
                        "{step},{seen},{k},{},{},{},{},{},{},{dead}",
                        st.lr(),
                        setting.lambda * warm,
                        terms.loss,
                        terms.mse,
                        terms.l0,
                        terms.l1
                    )
                    .with_path(&hist_path)?;
                }
                if k == 0 {
                    bar.set_message(format!("loss {:.4} L0 {:.1}", terms.loss, terms.l0));
                }
            }
            seen += batch.n as u64;
            step += 1;
            bar.set_position(seen.min(cfg.n_patches));
        }
        epoch += 1;
    }
    bar.finish_and_clear();
    let mut saes = Vec::new();
    for (k, (st, setting)) in steps.iter().zip(&cfg.sweep).enumerate() {
        // HEAD form: fold the paper encoder's − b_dec into b_enc.
        let b_enc = (&st.b_enc - st.b_dec.unsqueeze(0)?.matmul(&st.w_enc)?.squeeze(0)?)?;
        let sae_cfg = SaeConfig {
            schema: SAE_SCHEMA,
            d_model: d,
            d_sae: s,
            activation: SaeActivation::Relu,
            norm: Some(SaeNorm {
                mean: norm.mean.clone(),
                scalar: norm.scalar,
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
        let sae = Sae::new(
            sae_cfg,
            st.w_enc.clone(),
            b_enc,
            st.w_dec.clone(),
            st.b_dec.clone(),
        )?;
        let dir: PathBuf = out.join(k.to_string());
        sae.save(&dir)?;
        saes.push(sae);
    }
    Ok(saes)
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
    }

    #[test]
    fn kaiming_bound_and_determinism() {
        let a: Vec<f32> = kaiming(8, 64, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = kaiming(8, 64, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.abs() <= 0.125));
        assert!(a.iter().any(|v| v.abs() > 0.1));
    }
}
