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

use std::path::Path;

use candle_core::{Device, Tensor};
use polars::prelude::*;

use super::device_step::DeviceState;
use super::eval::{Evaluation, DENSE_FREQ};
use super::model::{Sae, SaeActivation, SaeConfig, SaeNorm, SAE_SCHEMA};
use super::step::{Scratch, StepStats, TrainActivation, TrainState};
pub use super::train_checkpoint::fresh_run_dir;
use super::train_checkpoint::{
    load_checkpoint, save_checkpoint, snapshot, tensor, CkptState, CKPT_VERSION,
};
pub use super::train_config::{Init, LrSchedule, Setting, TrainConfig};
use super::train_history::{save_history, Row};
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::store::{ActivationStore, Examples, LoaderConfig};
use crate::util::files::write_json;
use crate::util::rng::splitmix64;

/// torch `kaiming_uniform_` (a = √5) on a `[rows, cols]` matrix: U(±1/√cols), seeded. Each
/// seed reads its own splitmix64 stream, from a start the seed's hash picks: counting up from
/// the seed itself made seed + 2 the same numbers two places on (one sweep setting's encoder
/// was the last one's with latents relabelled, the decoder the encoder's shifted by one).
fn kaiming(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let bound = 1.0 / (cols as f64).sqrt();
    let mut s = splitmix64(seed ^ 0x6b61_696d_696e_6721);
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
    /// Per setting, what it trained ([`Setting::label`](crate::sae::Setting::label): activation,
    /// k or λ, lr).
    pub labels: Vec<String>,
}

/// Which code computes the SAE steps.
#[derive(Debug, Clone)]
pub enum Compute {
    /// saev's CPU kernels (sparse decoder and gradients when the codes are sparse): the fastest
    /// on a CPU, and the default.
    CpuKernels,
    /// The device-generic step on candle ops ([`super::device_step`]), on this device: a GPU, or
    /// the CPU to check it against [`Compute::CpuKernels`].
    Candle(Device),
}

impl Compute {
    /// The best code for `device`: the CPU kernels on the CPU, candle's ops elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Compute::CpuKernels
        } else {
            Compute::Candle(device.clone())
        }
    }
}

/// Wall-clock seconds between checkpoints at most (besides `ckpt_every` steps).
const CKPT_EVERY_S: u64 = 600;

/// Train the sweep on `store` into `out` (resuming a checkpoint there if one exists), on the CPU.
/// A stop request ([`crate::request_stop`], or Ctrl-C / SIGTERM once
/// [`crate::install_stop_handlers`] ran) checkpoints and returns [`Error::Interrupted`].
pub fn train_saes(
    store: &ActivationStore,
    cfg: &TrainConfig,
    out: impl AsRef<Path>,
) -> Result<TrainRun> {
    train_saes_with(store, cfg, out, &Compute::CpuKernels)
}

/// [`train_saes`] on a chosen device (`Device::new_cuda(0)?`; the CPU uses its own kernels).
/// Checkpoints are the same files whichever device wrote them, so a run may resume elsewhere.
pub fn train_saes_on(
    store: &ActivationStore,
    cfg: &TrainConfig,
    out: impl AsRef<Path>,
    device: &Device,
) -> Result<TrainRun> {
    train_saes_with(store, cfg, out, &Compute::for_device(device))
}

/// [`train_saes`] with the step computed by `compute`.
pub fn train_saes_with(
    store: &ActivationStore,
    cfg: &TrainConfig,
    out: impl AsRef<Path>,
    compute: &Compute,
) -> Result<TrainRun> {
    let out = out.as_ref();
    cfg.validate()?;
    let d = store.d_model();
    let s = d * cfg.expansion;
    let n_ex = store.n_examples();
    let holdout = cfg.holdout(n_ex);
    if holdout >= n_ex {
        return Err(Error::out_of_range(
            "train: holdout_examples",
            holdout,
            format!("0..{n_ex} (the store's examples; some must be left to train on)"),
        ));
    }
    let norm = store.norm_stats(cfg.layer, cfg.tokens)?;
    let mut states = initial_states(cfg, d, s)?;
    let mut ck = open_run(out, store, cfg, s, &mut states)?;
    // Held to the end: a second run into `out` is refused while this one writes.
    let _lock = crate::util::files::DirLock::acquire(out, "training run")?;
    // On a device, the weights and moments live there from here on (written back before every
    // checkpoint and at the end).
    let mut devs = match compute {
        Compute::CpuKernels => Vec::new(),
        Compute::Candle(dev) => states
            .iter()
            .map(|st| DeviceState::new(st, dev))
            .collect::<Result<Vec<_>>>()?,
    };
    let bs = cfg.batch_size.max(1);
    let n_steps = cfg.n_patches.div_ceil(bs as u64) as usize;
    let loader_cfg = LoaderConfig::new(cfg.layer)
        .with_tokens(cfg.tokens)
        .with_batch_size(bs)
        .with_seed(cfg.seed)
        .with_shuffle(cfg.shuffle)
        .with_examples(Examples::train(holdout, cfg.seed));
    let bar = crate::util::progress::bar(cfg.n_patches, "patches");
    bar.set_position(ck.seen.min(cfg.n_patches));
    // The rate counts from here: a resumed run is not millions of patches a second.
    bar.reset_eta();
    let mut scratch = Scratch::default();
    let mut steps_this_call = 0usize;
    let mut finished = ck.seen >= cfg.n_patches;
    // Besides every `ckpt_every` steps, a checkpoint at least every CKPT_EVERY_S seconds of
    // wall time (a run killed outright loses at most that), and one when a stop is requested.
    let mut last_ckpt = std::time::Instant::now();
    'outer: while !finished {
        let loader = store.shuffled_from(&loader_cfg, ck.epoch, ck.batch_in_epoch)?;
        let fresh_epoch = ck.batch_in_epoch == 0;
        let mut n_batches = 0usize;
        for batch in loader {
            n_batches += 1;
            if ck.seen >= cfg.n_patches {
                break;
            }
            if cfg.stop_after_steps.is_some_and(|m| steps_this_call >= m) {
                break 'outer;
            }
            let n = batch.n;
            let x = normalized(store, cfg, &norm.mean, norm.scalar, ck.step, batch)?;
            let mut stepper = Stepper {
                scratch: &mut scratch,
                devs: &mut devs,
            };
            let first = step_all(&mut states, &mut ck, cfg, &x, n, n_steps, out, &mut stepper)?;
            if let Some(f) = first {
                bar.set_message(format!("loss {:.4} L0 {:.1}", f.loss, f.l0));
            }
            ck.seen += n as u64;
            ck.step += 1;
            ck.batch_in_epoch += 1;
            steps_this_call += 1;
            bar.set_position(ck.seen.min(cfg.n_patches));
            let stop = crate::util::interrupt::stop_requested();
            let due = (cfg.ckpt_every > 0 && ck.step % cfg.ckpt_every == 0)
                || last_ckpt.elapsed().as_secs() >= CKPT_EVERY_S
                || stop;
            if due && ck.seen < cfg.n_patches {
                write_back(&devs, &mut states)?;
                snapshot(&mut ck, &states);
                save_checkpoint(out, &states, &ck)?;
                save_history(out, &ck.history)?;
                last_ckpt = std::time::Instant::now();
            }
            if stop && ck.seen < cfg.n_patches {
                crate::util::interrupt::clear_stop();
                bar.finish_and_clear();
                return Err(Error::Interrupted {
                    seen: ck.seen,
                    total: cfg.n_patches,
                    checkpoint: out.join("checkpoint"),
                });
            }
        }
        if fresh_epoch && n_batches == 0 && ck.seen < cfg.n_patches {
            // A whole epoch gave nothing (every example held out, or none of the chosen
            // tokens): another epoch would give nothing either.
            return Err(Error::Store {
                path: store.dir().to_path_buf(),
                msg: format!(
                    "an epoch of layer {} ({:?} tokens, {} examples held out) yields no batch: nothing to train on",
                    cfg.layer, cfg.tokens, holdout
                ),
            });
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
    // A stop asked for after the last step has nothing left to stop (and must not stop the
    // next run of this process).
    crate::util::interrupt::clear_stop();
    write_back(&devs, &mut states)?;
    snapshot(&mut ck, &states);
    save_checkpoint(out, &states, &ck)?;
    let history = save_history(out, &ck.history)?;
    let mut saes = Vec::new();
    let mut evals = Vec::new();
    for (k, (st, setting)) in states.iter().zip(&cfg.sweep).enumerate() {
        let k = cfg.first_setting + k;
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
        labels: cfg.sweep.iter().map(|s| s.label(cfg.activation)).collect(),
    })
}

/// The sweep's starting weights ([`TrainConfig::init`]), seeded per global setting index so a
/// group of a split sweep starts exactly as the whole sweep would.
fn initial_states(cfg: &TrainConfig, d: usize, s: usize) -> Result<Vec<TrainState>> {
    cfg.sweep
        .iter()
        .enumerate()
        .map(|(k, setting)| {
            let seed = cfg.seed.wrapping_mul(1000) + 2 * (cfg.first_setting + k) as u64;
            let (w_enc, w_dec) = match cfg.init() {
                Init::Kaiming => {
                    // W_enc is `[d, d_sae]` in the paper (fan-in d_sae); stored here as rows
                    // `[d_sae, d]`.
                    let w = kaiming(d, s, seed);
                    let mut w_enc = vec![0f32; s * d];
                    for (i, row) in w.chunks_exact(s).enumerate() {
                        for (j, &v) in row.iter().enumerate() {
                            w_enc[j * d + i] = v;
                        }
                    }
                    (w_enc, kaiming(s, d, seed + 1))
                }
                Init::Tied => {
                    // Rows `[d_sae, d]` for both: the decoder's at unit norm, the encoder's the
                    // same directions at Kaiming scale (its transpose, in the paper's layout).
                    let w_enc = kaiming(s, d, seed + 1);
                    let mut w_dec = w_enc.clone();
                    for row in w_dec.chunks_exact_mut(d) {
                        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                        row.iter_mut().for_each(|v| *v /= norm);
                    }
                    (w_enc, w_dec)
                }
            };
            TrainState::new(
                w_enc,
                vec![0.0; s],
                w_dec,
                vec![0.0; d],
                cfg.recipe(setting, d, s)?,
            )
        })
        .collect()
}

/// The run's bookkeeping: resumed from `out`'s checkpoint (into `states`) when it holds one made
/// with this config on this store, else fresh. Refuses a directory of someone else's files, a
/// checkpoint of another config or another store.
fn open_run(
    out: &Path,
    store: &ActivationStore,
    cfg: &TrainConfig,
    s: usize,
    states: &mut [TrainState],
) -> Result<CkptState> {
    // Never write into a directory of someone else's files: an output directory is new, empty,
    // or a run of saev's (it has a checkpoint).
    let ours = ["checkpoint", "checkpoint.old", "checkpoint.tmp"]
        .iter()
        .any(|c| out.join(c).exists());
    let foreign = !ours
        && std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name() != crate::util::files::LOCK_NAME)
        });
    // The parent of `--group` runs (`group-0/`, …): saev's, but each group resumes in its own.
    let grouped = foreign
        && std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("group-")
                    && e.path().join("checkpoint").exists()
            })
        });
    if grouped {
        return Err(Error::output_dir(
            out,
            "holds the runs of a grouped sweep (group-0/, …)",
            "pass --group I/N (the same N) to resume one group, or choose another --out",
        ));
    }
    if foreign {
        return Err(Error::output_dir(
            out,
            "exists and holds files a saev training run did not write",
            "choose a new or empty output directory",
        ));
    }
    std::fs::create_dir_all(out).with_path(out)?;
    let Some(ck) = load_checkpoint(out, states)? else {
        return Ok(CkptState {
            version: CKPT_VERSION,
            config: TrainConfig {
                stop_after_steps: None,
                ..cfg.clone()
            },
            store: store.dir().display().to_string(),
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
            last_density: vec![0.0; cfg.sweep.len()],
        });
    };
    let mut same = cfg.clone();
    same.stop_after_steps = None;
    if ck.config != same {
        return Err(Error::Checkpoint {
            path: out.join("checkpoint/state.json"),
            msg: "it was made with a different training config; use a new output directory".into(),
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
    Ok(ck)
}

/// A batch in the SAEs' input space, `(x − mean) / scalar`; a NaN or infinity is an error naming
/// the example, token and dimension it came from.
fn normalized(
    store: &ActivationStore,
    cfg: &TrainConfig,
    mean: &[f32],
    scalar: f32,
    step: usize,
    batch: crate::store::Batch,
) -> Result<Vec<f32>> {
    let d = store.d_model();
    let mut x = batch.acts_nd;
    for (r, row) in x.chunks_exact_mut(d).enumerate() {
        for (t, (v, m)) in row.iter_mut().zip(mean).enumerate() {
            if !v.is_finite() {
                return Err(store.non_finite(
                    batch.index[r],
                    t,
                    *v,
                    cfg.layer,
                    cfg.tokens,
                    (step, "training"),
                ));
            }
            *v = (*v - m) / scalar;
        }
    }
    Ok(x)
}

/// Copy the device states' weights into the host states (no-op on the CPU kernels).
fn write_back(devs: &[DeviceState], states: &mut [TrainState]) -> Result<()> {
    for (d, st) in devs.iter().zip(states) {
        d.write_back(st)?;
    }
    Ok(())
}

/// The first parameter or moment (name, flat index) an update made non-finite, if any.
type NonFinite = Option<(String, usize)>;

/// What computes one setting's step: the CPU kernels (with their scratch buffers) or the
/// settings' device states.
struct Stepper<'a> {
    scratch: &'a mut Scratch,
    devs: &'a mut [DeviceState],
}

impl Stepper<'_> {
    /// Setting `k`'s step on `x` (the batch on the device, copied once per step, when `x_dev`).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        k: usize,
        st: &mut TrainState,
        x: &[f32],
        x_dev: Option<&Tensor>,
        n: usize,
        lr: f64,
        lambda: f64,
    ) -> Result<(StepStats, Vec<u32>, NonFinite)> {
        match (self.devs.get_mut(k), x_dev) {
            (Some(dev), Some(xt)) => {
                let (stats, fired) = dev.step(st, xt, lr, lambda)?;
                // An exact host check only when the device's sums say something is off.
                let bad = if stats.loss.is_finite() && !dev.all_finite()? {
                    dev.write_back(st)?;
                    st.first_non_finite()
                } else {
                    None
                };
                Ok((stats, fired, bad))
            }
            _ => {
                let (stats, fired) = st.step(x, n, lr, lambda, self.scratch)?;
                let bad = if stats.loss.is_finite() {
                    st.first_non_finite()
                } else {
                    None
                };
                Ok((stats, fired, bad))
            }
        }
    }
}

/// One optimiser step of every setting on batch `x` (`n` rows): divergence checks, firing
/// counts, and a history row per setting every `log_every` steps. Returns the first setting's
/// statistics (for the progress line).
#[allow(clippy::too_many_arguments)] // the loop's state, passed rather than bundled
fn step_all(
    states: &mut [TrainState],
    ck: &mut CkptState,
    cfg: &TrainConfig,
    x: &[f32],
    n: usize,
    n_steps: usize,
    out: &Path,
    stepper: &mut Stepper<'_>,
) -> Result<Option<StepStats>> {
    let log = ck.step.is_multiple_of(cfg.log_every.max(1));
    let mut first: Option<StepStats> = None;
    let x_dev = match stepper.devs.first() {
        Some(dev) => Some(
            Tensor::from_slice(x, (n, x.len() / n.max(1)), dev.device())
                .context("copying the training batch to the device")?,
        ),
        None => None,
    };
    for (k, (st, setting)) in states.iter_mut().zip(&cfg.sweep).enumerate() {
        let lr = cfg.lr_at(setting.lr, ck.step, n_steps);
        let lambda = cfg.lambda_at(setting.lambda, ck.step);
        let (stats, fired, bad) = stepper.step(k, st, x, x_dev.as_ref(), n, lr, lambda)?;
        // A non-finite loss, or weights an update made non-finite (its loss, computed before the
        // update, can still be finite): the weights of this step are never saved, so the last
        // checkpoint stays good.
        let what = if stats.loss.is_finite() {
            bad.map(|(name, i)| format!("{name}[{i}] is not finite after the update"))
        } else {
            Some(format!("loss {}", stats.loss))
        };
        if let Some(what) = what {
            return Err(Error::Diverged {
                setting: cfg.first_setting + k,
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
                setting: (cfg.first_setting + k) as u32,
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
    Ok(first)
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
        TrainActivation::JumpRelu { .. } => SaeActivation::JumpRelu,
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
    let (w_enc, w_dec) = (w_enc_sd.t()?.contiguous()?, tensor(&st.w_dec, &[s, d])?);
    if st.log_threshold.is_empty() {
        Sae::new(sae_cfg, w_enc, b_enc, w_dec, b_dec)
    } else {
        let theta = tensor(&st.thresholds(), &[s])?;
        Sae::new_jump_relu(sae_cfg, w_enc, b_enc, w_dec, b_dec, theta)
    }
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

    /// `--group i/N` (a Slurm array of N): the groups cover the sweep in order, each setting
    /// keeps its index, none is empty while N ≤ settings (9 settings in 4 groups refused group
    /// 3: ⌈9/4⌉ = 3 each left it none), and splits that worked are unchanged.
    #[test]
    fn groups_cover_the_sweep_and_none_is_empty() {
        let lrs: Vec<f64> = (1..=9).map(|i| f64::from(i) * 1e-4).collect();
        let cfg = TrainConfig::new(-2).with_lrs(&lrs);
        for n in 1..=9 {
            let mut got = Vec::new();
            for i in 0..n {
                let g = cfg.group(i, n).unwrap();
                assert!(!g.sweep.is_empty(), "group {i}/{n}");
                assert_eq!(g.first_setting, got.len(), "group {i}/{n}");
                got.extend(g.sweep);
            }
            assert_eq!(got, cfg.sweep, "{n} groups");
            assert!(cfg.group(n, n).is_err());
        }
        assert_eq!(
            cfg.group(1, 2).unwrap().first_setting,
            5,
            "⌈9/2⌉ = 5, as before"
        );
        assert!(cfg.group(9, 10).is_err(), "more groups than settings");
    }

    #[test]
    fn kaiming_bound_and_determinism() {
        let a = kaiming(8, 64, 3);
        assert_eq!(a, kaiming(8, 64, 3));
        assert!(a.iter().all(|v| v.abs() <= 0.125));
        assert!(a.iter().any(|v| v.abs() > 0.1));
        // Nearby seeds (the sweep's settings are 2 apart, a decoder 1 from its encoder) share
        // no run of values at any small offset: independent draws.
        for other in [1u64, 2, 4, 1003] {
            let b = kaiming(8, 64, 3 + other);
            for shift in 0..16 {
                let same = a[shift..]
                    .iter()
                    .zip(&b)
                    .chain(b[shift..].iter().zip(&a))
                    .filter(|(x, y)| x == y)
                    .count();
                assert!(same <= 2, "seed +{other}, offset {shift}: {same} equal");
            }
        }
    }
}
