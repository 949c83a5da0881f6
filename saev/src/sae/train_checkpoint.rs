//! The trainer's checkpoint (`<out>/checkpoint/`: `state.safetensors` with every setting's
//! weights and Adam moments, `state.json` with the config, the store's fingerprint, counters,
//! loader position and history), swapped in atomically, and checked when read back: another
//! config or store, list lengths, counters and finiteness are refused with the file named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::step::TrainState;
use super::train_config::TrainConfig;
use super::train_history::Row;
use crate::error::{Error, IoContext, Result};
use crate::store::ActivationStore;
use crate::util::checkpoint::{self, Tensors};

/// Checkpoint bookkeeping (`checkpoint/state.json`).
#[derive(Serialize, Deserialize)]
pub(super) struct CkptState {
    pub(super) version: u32,
    pub(super) config: TrainConfig,
    pub(super) store: String,
    /// [`ActivationStore::fingerprint`] of the store trained on (empty in checkpoints written
    /// before it was recorded).
    #[serde(default)]
    pub(super) store_fingerprint: String,
    pub(super) step: usize,
    pub(super) seen: u64,
    pub(super) epoch: u64,
    pub(super) batch_in_epoch: usize,
    pub(super) adam_t: Vec<u64>,
    pub(super) threshold: Vec<f32>,
    pub(super) since_fired: Vec<Vec<u64>>,
    pub(super) window_fired: Vec<Vec<u32>>,
    pub(super) window_start: u64,
    pub(super) history: Vec<Row>,
    /// Per setting, the last step's L0 / d_sae (whether the next step screens the encoder;
    /// empty in checkpoints written before it was recorded: 0, as a fresh run).
    #[serde(default)]
    pub(super) last_density: Vec<f64>,
}

/// 2: the held-out examples are a seeded random split (1 held out the last ones).
pub(super) const CKPT_VERSION: u32 = 2;

pub(super) fn tensor(v: &[f32], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)?)
}

pub(super) fn save_checkpoint(out: &Path, states: &[TrainState], st: &CkptState) -> Result<()> {
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
        if !s.log_threshold.is_empty() {
            t.insert(
                format!("{k}.log_threshold"),
                tensor(&s.log_threshold, &[n])?,
            );
        }
        // m4/v4 (JumpReLU's thresholds) only where there are thresholds: checkpoints of the
        // other activations read as before.
        for (j, (m, v)) in s.adam_m.iter().zip(&s.adam_v).enumerate() {
            if j < 4 || !m.is_empty() {
                t.insert(format!("{k}.m{j}"), tensor(m, &[m.len()])?);
                t.insert(format!("{k}.v{j}"), tensor(v, &[v.len()])?);
            }
        }
    }
    checkpoint::save(&tmp, "state", &t, st)?;
    // Swap in atomically: checkpoint → checkpoint.old, tmp → checkpoint, drop old.
    let cur = out.join("checkpoint");
    let old = out.join("checkpoint.old");
    if cur.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&cur, &old).with_path(&cur)?;
    }
    // With no `checkpoint` (a run resumed from `checkpoint.old` after a kill between the
    // renames), that one stays until the new one has its name: removing it first left a
    // window with only `checkpoint.tmp`, which no run resumes from (it restarted at step 0).
    std::fs::rename(&tmp, &cur).with_path(&cur)?;
    // The new checkpoint's files were flushed as written; the renames are flushed before the
    // old one goes, so a power loss leaves one whole checkpoint under one of the two names.
    crate::util::files::sync_dir(out)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

pub(super) fn load_checkpoint(out: &Path, states: &mut [TrainState]) -> Result<Option<CkptState>> {
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
                msg: format!(
                    "`{field}` has {len} entries for {n} settings: a checkpoint of a run with another sweep (--fresh starts over, or choose another --out)"
                ),
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
    let st_path = dir.join("state.safetensors");
    let t = Tensors::open(st_path.clone())?;
    // Weights and moments must be finite: a damaged file would otherwise resume into a NaN
    // loss, reported as divergence.
    let get = |key: String, len: usize| -> Result<Vec<f32>> {
        let v = t.vec_f32(&key, len)?;
        match v.iter().position(|x| !x.is_finite()) {
            None => Ok(v),
            Some(i) => Err(Error::Checkpoint {
                path: st_path.clone(),
                msg: format!("tensor `{key}` holds a non-finite value at flat index {i}"),
            }),
        }
    };
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
        let t_len = s.log_threshold.len();
        if t_len > 0 {
            s.log_threshold = get(format!("{k}.log_threshold"), t_len)?;
        }
        for (jj, len) in [n * d, n, n * d, d, t_len].into_iter().enumerate() {
            if jj < 4 || len > 0 {
                s.adam_m[jj] = get(format!("{k}.m{jj}"), len)?;
                s.adam_v[jj] = get(format!("{k}.v{jj}"), len)?;
            }
        }
        s.t = st.adam_t[k];
        s.threshold = st.threshold[k];
        s.since_fired.clone_from(&st.since_fired[k]);
        if let Some(&dens) = st.last_density.get(k) {
            s.last_density = dens;
        }
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
        // Empty but for a run's lock file (a run stopped before its first checkpoint).
        if std::fs::read_dir(dir).map_or(true, |d| {
            d.flatten()
                .all(|e| e.file_name() == crate::util::files::LOCK_NAME)
        }) {
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

pub(super) fn snapshot(ck: &mut CkptState, states: &[TrainState]) {
    ck.adam_t = states.iter().map(|s| s.t).collect();
    ck.threshold = states.iter().map(|s| s.threshold).collect();
    ck.since_fired = states.iter().map(|s| s.since_fired.clone()).collect();
    ck.last_density = states.iter().map(|s| s.last_density).collect();
}
