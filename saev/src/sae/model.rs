//! The [`Sae`] handle: a sparse autoencoder with the input normalisation it expects, applied for
//! the user.
//!
//! `f = act((x̃) W_enc + b_enc)`, `x̂ = f W_dec + b_dec`, with `x̃ = (x − mean) / scalar` (the
//! paper's normalisation; identity when none is stored). This is HEAD saev's form: the paper-era
//! encoder `(x̃ − b_dec) W_enc + b_enc` is folded on import (`b_enc ← b_enc − b_dec W_enc`).
//! Activations: ReLU, TopK(k), BatchTopK(k) with its learned inference threshold.
//! Checkpoints: `sae.safetensors` (W_enc, b_enc, W_dec, b_dec) + `sae.json` (versioned config).
//!
//! ```no_run
//! let sae = saev::Sae::from_torch("sae.pt", None)?;             // a Python saev checkpoint
//! let x = saev::candle_core::Tensor::zeros((4, sae.d_model()), saev::candle_core::DType::F32, &saev::candle_core::Device::Cpu)?;
//! let f = sae.encode(&x)?;                                      // [4, d_sae]
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Computing, Error, Result};
use crate::util::checkpoint::{self, Tensors};
use crate::util::torch_load::read_torch_checkpoint;

/// The sparsifying non-linearity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SaeActivation {
    /// ReLU (paper recipe, with an L1 penalty in training).
    Relu,
    /// Keep the `k` largest pre-activations per row; ReLU'd when `relu` (saev's own TopK), raw
    /// when not (the Python saev's TopK, so imported checkpoints code as they did: values can be
    /// negative).
    TopK {
        /// Latents kept per row.
        k: usize,
        /// Zero the negative kept values (default true; false for imported Python TopK SAEs).
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        relu: bool,
    },
    /// BatchTopK: top `k·B` over a training batch; at inference a fixed threshold.
    BatchTopK {
        /// Mean latents kept per row in training.
        k: usize,
        /// Inference threshold (EMA of the smallest kept value in training).
        threshold: f32,
    },
    /// JumpReLU: `pre · H(pre − θ)` with a threshold θ per latent (the `threshold` tensor
    /// `[d_sae]` in `sae.safetensors`, as SAELens stores it).
    JumpRelu,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Input normalisation `(x − mean) / scalar`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeNorm {
    /// Per-dimension mean (`d_model` values).
    pub mean: Vec<f32>,
    /// Scalar divisor.
    pub scalar: f32,
}

/// Current `sae.json` schema.
pub const SAE_SCHEMA: u32 = 1;

/// The versioned config stored in `sae.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeConfig {
    /// Schema version ([`SAE_SCHEMA`]).
    pub schema: u32,
    /// Input width.
    pub d_model: usize,
    /// Dictionary size.
    pub d_sae: usize,
    /// Non-linearity.
    pub activation: SaeActivation,
    /// Normalisation applied to inputs (None = inputs used as given).
    pub norm: Option<SaeNorm>,
    /// Where it came from (store, layer, backbone, training config or imported file).
    #[serde(default)]
    pub provenance: serde_json::Value,
}

/// A sparse autoencoder. Cheap to clone (tensors are reference-counted).
#[derive(Clone)]
pub struct Sae {
    cfg: SaeConfig,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    /// JumpReLU's per-latent thresholds `[d_sae]` (None for the other activations).
    threshold: Option<Tensor>,
    norm_mean: Option<(Tensor, f64)>,
}

/// NaN or infinite SAE weights make every code NaN: refused where they enter, naming the tensor.
pub(crate) fn check_finite<const N: usize>(
    path: &Path,
    tensors: [(&str, &Tensor); N],
) -> Result<()> {
    for (name, x) in tensors {
        let bad = x
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .position(|v| !v.is_finite());
        if let Some(i) = bad {
            return Err(Error::Checkpoint {
                path: path.into(),
                msg: format!("tensor `{name}` holds a non-finite value at flat index {i}"),
            });
        }
    }
    Ok(())
}

impl Sae {
    /// Build from weights (`W_enc [d, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d]`, `b_dec [d]`).
    /// A JumpReLU SAE also needs its thresholds: [`Sae::new_jump_relu`].
    pub fn new(
        cfg: SaeConfig,
        w_enc: Tensor,
        b_enc: Tensor,
        w_dec: Tensor,
        b_dec: Tensor,
    ) -> Result<Self> {
        if cfg.activation == SaeActivation::JumpRelu {
            return Err(Error::mismatch(
                "Sae::new: activation",
                "an activation without per-latent thresholds",
                "jump_relu",
                "use Sae::new_jump_relu with the thresholds",
            ));
        }
        Self::build(cfg, w_enc, b_enc, w_dec, b_dec, None)
    }

    /// A JumpReLU SAE: the weights of [`Sae::new`] and `threshold` `[d_sae]` (θ ≥ 0 per latent).
    pub fn new_jump_relu(
        cfg: SaeConfig,
        w_enc: Tensor,
        b_enc: Tensor,
        w_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
    ) -> Result<Self> {
        if cfg.activation != SaeActivation::JumpRelu {
            return Err(Error::mismatch(
                "Sae::new_jump_relu: activation",
                "jump_relu",
                format!("{:?}", cfg.activation),
                "use Sae::new for activations without thresholds",
            ));
        }
        if threshold.dims() != [cfg.d_sae] {
            return Err(Error::Shape {
                what: "threshold".into(),
                expected: vec![cfg.d_sae],
                actual: threshold.dims().to_vec(),
            });
        }
        Self::build(cfg, w_enc, b_enc, w_dec, b_dec, Some(threshold))
    }

    fn build(
        cfg: SaeConfig,
        w_enc: Tensor,
        b_enc: Tensor,
        w_dec: Tensor,
        b_dec: Tensor,
        threshold: Option<Tensor>,
    ) -> Result<Self> {
        let (d, s) = (cfg.d_model, cfg.d_sae);
        for (name, t, shape) in [
            ("W_enc", &w_enc, vec![d, s]),
            ("b_enc", &b_enc, vec![s]),
            ("W_dec", &w_dec, vec![s, d]),
            ("b_dec", &b_dec, vec![d]),
        ] {
            if t.dims() != shape.as_slice() {
                return Err(Error::Shape {
                    what: name.into(),
                    expected: shape,
                    actual: t.dims().to_vec(),
                });
            }
        }
        let norm_mean = match &cfg.norm {
            Some(n) if n.mean.len() != d => {
                return Err(Error::Shape {
                    what: "norm.mean".into(),
                    expected: vec![d],
                    actual: vec![n.mean.len()],
                })
            }
            Some(n) => Some((
                Tensor::from_vec(n.mean.clone(), d, w_enc.device())?,
                f64::from(n.scalar),
            )),
            None => None,
        };
        Ok(Self {
            cfg,
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            threshold,
            norm_mean,
        })
    }

    /// Import a Python saev `sae.pt` of any header generation (paper era, schemas 1–5; see
    /// [`crate::sae::py_import`] for what each means and what is refused); `norm` is the
    /// normalisation the checkpoint was trained with (the Python saev does not store it). The
    /// SAE computes what the checkpoint's own code computed: a paper-era encoder's `− b_dec` is
    /// folded into `b_enc`, a Python TopK keeps negative values, a BatchTopK uses the stored
    /// threshold.
    pub fn from_torch(path: impl AsRef<Path>, norm: Option<SaeNorm>) -> Result<Self> {
        let path = path.as_ref();
        let ck = read_torch_checkpoint(path)?;
        let h = super::py_import::parse_header(&ck.header, &ck.tensors, path)?;
        let dev = Device::Cpu;
        for name in ck.tensors.keys() {
            if !["W_enc", "b_enc", "W_dec", "b_dec", "activation.threshold"]
                .contains(&name.as_str())
            {
                return Err(Error::Checkpoint {
                    path: path.into(),
                    msg: format!("unexpected tensor `{name}` (an SAE state dict has W_enc, b_enc, W_dec, b_dec and, for BatchTopK, activation.threshold)"),
                });
            }
        }
        let t = ck
            .tensors
            .iter()
            .map(|(k, (shape, data))| {
                Ok((
                    k.clone(),
                    Tensor::from_vec(data.clone(), shape.as_slice(), &dev)?,
                ))
            })
            .collect::<Result<HashMap<String, Tensor>>>()?;
        let t = Tensors::from_map(path.to_path_buf(), t);
        let (d, s) = (h.d_model, h.d_sae);
        let (w_enc, mut b_enc) = (t.get("W_enc", &[d, s])?, t.get("b_enc", &[s])?);
        let (w_dec, b_dec) = (t.get("W_dec", &[s, d])?, t.get("b_dec", &[d])?);
        check_finite(
            path,
            [
                ("W_enc", &w_enc),
                ("b_enc", &b_enc),
                ("W_dec", &w_dec),
                ("b_dec", &b_dec),
            ],
        )?;
        if h.subtract_b_dec {
            // (x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc).
            b_enc = (b_enc - b_dec.unsqueeze(0)?.matmul(&w_enc)?.squeeze(0)?)?;
        }
        let cfg = SaeConfig {
            schema: SAE_SCHEMA,
            d_model: d,
            d_sae: s,
            activation: h.activation,
            norm,
            provenance: serde_json::json!({
                "imported_from": path.display().to_string(),
                "format": h.generation,
                "b_dec_subtracted_in_encoder": h.subtract_b_dec,
                "notes": h.notes,
                "header": ck.header,
            }),
        };
        Self::new(cfg, w_enc, b_enc, w_dec, b_dec)
    }

    /// `[W_enc [d, d_sae], b_enc [d_sae], W_dec [d_sae, d], b_dec [d]]` (HEAD form, normalised
    /// input space).
    pub fn weights(&self) -> [&Tensor; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }

    /// JumpReLU's per-latent thresholds `[d_sae]` (None for the other activations).
    pub fn threshold(&self) -> Option<&Tensor> {
        self.threshold.as_ref()
    }

    /// The versioned config.
    pub fn config(&self) -> &SaeConfig {
        &self.cfg
    }
    /// Input width.
    pub fn d_model(&self) -> usize {
        self.cfg.d_model
    }

    /// The block whose activations this SAE reads in `store`: the layer its provenance records,
    /// else the store's only layer, else −2 (the paper's block, and what `--sae X.pt` imports
    /// against). Every command and handle that pairs an SAE with a store picks it so — an SAE
    /// imported without a layer is read at the same block by `saev features`, `browse`,
    /// `match` and `causal`.
    pub fn layer_in(&self, store: &crate::store::ActivationStore) -> i64 {
        self.cfg
            .provenance
            .get("layer")
            .and_then(|v| v.as_i64())
            .unwrap_or(match store.layers() {
                [only] => *only,
                _ => -2,
            })
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        self.w_enc.device()
    }

    /// The same SAE with its weights on `device` (a clone when they are there already).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if self.device().same_device(device) {
            return Ok(self.clone());
        }
        let mv = |t: &Tensor| t.to_device(device);
        (|| -> Result<Self> {
            Ok(Self {
                cfg: self.cfg.clone(),
                w_enc: mv(&self.w_enc)?,
                b_enc: mv(&self.b_enc)?,
                w_dec: mv(&self.w_dec)?,
                b_dec: mv(&self.b_dec)?,
                threshold: self.threshold.as_ref().map(mv).transpose()?,
                norm_mean: match &self.norm_mean {
                    Some((m, s)) => Some((mv(m)?, *s)),
                    None => None,
                },
            })
        })()
        .computing(|| format!("moving the SAE (d_sae {}) to {device:?}", self.d_sae()))
    }
    /// Dictionary size.
    pub fn d_sae(&self) -> usize {
        self.cfg.d_sae
    }

    /// Normalise raw inputs (`[n, d]`) the way the SAE expects.
    pub fn normalize(&self, x_nd: &Tensor) -> Result<Tensor> {
        match &self.norm_mean {
            Some((m, s)) => (|| Ok((x_nd.broadcast_sub(m)? / *s)?))()
                .computing(|| self.op_context("normalize", "x", x_nd)),
            None => Ok(x_nd.clone()),
        }
    }

    /// "SAE <op> of <name> [dims] <dtype> (d_model …, d_sae …)": what a failed tensor op was.
    fn op_context(&self, op: &str, name: &str, t: &Tensor) -> String {
        format!(
            "SAE {op} of {name} {:?} {:?} (d_model {}, d_sae {})",
            t.dims(),
            t.dtype(),
            self.d_model(),
            self.d_sae()
        )
    }

    /// Latent codes of raw inputs.
    ///
    /// # Shapes
    /// `x_nd`: `[n, d_model]` → `[n, d_sae]`.
    pub fn encode(&self, x_nd: &Tensor) -> Result<Tensor> {
        self.encode_unnamed(x_nd)
            .computing(|| self.op_context("encode", "x", x_nd))
    }

    fn encode_unnamed(&self, x_nd: &Tensor) -> Result<Tensor> {
        let h = self
            .normalize(x_nd)?
            .matmul(&self.w_enc)?
            .broadcast_add(&self.b_enc)?;
        let f = match &self.cfg.activation {
            SaeActivation::Relu => h.relu()?,
            SaeActivation::BatchTopK { threshold, .. } => {
                let mask = h.ge(f64::from(*threshold))?.to_dtype(DType::F32)?;
                (h.relu()? * mask)?
            }
            SaeActivation::JumpRelu => {
                let theta = self
                    .threshold
                    .as_ref()
                    .ok_or_else(|| Error::Internal("a JumpReLU SAE without thresholds".into()))?;
                (h.broadcast_gt(theta)?.to_dtype(DType::F32)? * h)?
            }
            SaeActivation::TopK { k, relu } => {
                let k = (*k).min(self.cfg.d_sae);
                // The k-th largest value of each row; ties at it are all kept. (The chunked
                // top-k: candle's GPU sort cannot hold a whole wide row.)
                let kth = super::device_step::topk_rows(&h, k)?
                    .0
                    .narrow(1, k - 1, 1)?;
                let mask = h.broadcast_ge(&kth)?.to_dtype(DType::F32)?;
                if *relu {
                    (h.relu()? * mask)?
                } else {
                    (h * mask)?
                }
            }
        };
        Ok(f)
    }

    /// Reconstruction in the normalised space (`[n, d_sae]` → `[n, d_model]`).
    pub fn decode(&self, f_ns: &Tensor) -> Result<Tensor> {
        (|| Ok(f_ns.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?))()
            .computing(|| self.op_context("decode", "f", f_ns))
    }

    /// The reconstruction of raw inputs in their own (raw) space: `decode(encode(x)) · scalar +
    /// mean` (`[n, d_model]` → `[n, d_model]`) — what replaces a block's output when splicing
    /// the SAE into the model.
    pub fn reconstruct(&self, x_nd: &Tensor) -> Result<Tensor> {
        let xh = self.decode(&self.encode(x_nd)?)?;
        match &self.norm_mean {
            Some((m, s)) => (|| Ok((xh * *s)?.broadcast_add(m)?))()
                .computing(|| self.op_context("reconstruct", "x", x_nd)),
            None => Ok(xh),
        }
    }

    /// Save as `<dir>/sae.safetensors` + `<dir>/sae.json`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let mut t = HashMap::from([
            ("W_enc".to_string(), self.w_enc.clone()),
            ("b_enc".to_string(), self.b_enc.clone()),
            ("W_dec".to_string(), self.w_dec.clone()),
            ("b_dec".to_string(), self.b_dec.clone()),
        ]);
        if let Some(theta) = &self.threshold {
            t.insert("threshold".to_string(), theta.clone());
        }
        checkpoint::save(dir.as_ref(), "sae", &t, &self.cfg)
    }

    /// Load what [`Sae::save`] wrote; unknown schema versions are rejected.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let js = dir.join("sae.json");
        let (cfg, t): (SaeConfig, _) =
            checkpoint::load(dir, "sae", "schema", &[u64::from(SAE_SCHEMA)])?;
        let st = t.path().to_path_buf();
        let (d, s) = (cfg.d_model, cfg.d_sae);
        let (a, b, c, e) = (
            t.get("W_enc", &[d, s])?,
            t.get("b_enc", &[s])?,
            t.get("W_dec", &[s, d])?,
            t.get("b_dec", &[d])?,
        );
        check_finite(
            &st,
            [("W_enc", &a), ("b_enc", &b), ("W_dec", &c), ("b_dec", &e)],
        )?;
        if let Some(n) = &cfg.norm {
            if n.mean.len() != d {
                return Err(Error::Checkpoint {
                    path: js,
                    msg: format!("norm.mean has {} values, d_model is {d}", n.mean.len()),
                });
            }
            if !(n.scalar.is_finite() && n.scalar > 0.0) || n.mean.iter().any(|m| !m.is_finite()) {
                return Err(Error::Checkpoint {
                    path: js,
                    msg: format!(
                        "norm: scalar {} and the mean must be finite, the scalar positive",
                        n.scalar
                    ),
                });
            }
        }
        if let SaeActivation::TopK { k: 0, .. } | SaeActivation::BatchTopK { k: 0, .. } =
            cfg.activation
        {
            return Err(Error::Checkpoint {
                path: js,
                msg: "activation: k = 0 keeps no latent".into(),
            });
        }
        if cfg.activation == SaeActivation::JumpRelu {
            let theta = t.get("threshold", &[s])?;
            check_finite(&st, [("threshold", &theta)])?;
            return Self::new_jump_relu(cfg, a, b, c, e, theta);
        }
        Self::new(cfg, a, b, c, e)
    }
}

impl fmt::Debug for Sae {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sae(d_model={}, d_sae={}, activation={:?}, normalised={}{})",
            self.cfg.d_model,
            self.cfg.d_sae,
            self.cfg.activation,
            self.cfg.norm.is_some(),
            crate::util::device::on_device(self.device())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(d: usize, s: usize) -> Sae {
        let cfg = SaeConfig {
            schema: SAE_SCHEMA,
            d_model: d,
            d_sae: s,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::Value::Null,
        };
        let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        Sae::new(cfg, z(&[d, s]), z(&[s]), z(&[s, d]), z(&[d])).unwrap()
    }

    #[test]
    fn a_failed_tensor_op_names_the_sae_call_and_its_input() {
        let sae = tiny(4, 8);
        let bad_dtype = Tensor::zeros((2, 4), DType::F64, &Device::Cpu).unwrap();
        let msg = sae.encode(&bad_dtype).unwrap_err().to_string();
        assert!(
            msg.starts_with("SAE encode of x [2, 4] F64 (d_model 4, d_sae 8): "),
            "{msg}"
        );
        let bad_width = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let msg = sae.decode(&bad_width).unwrap_err().to_string();
        assert!(
            msg.starts_with("SAE decode of f [3, 5] F32 (d_model 4, d_sae 8): "),
            "{msg}"
        );
    }
}
