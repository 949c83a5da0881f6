//! The paper's §5.2 causal test as an experiment: [`Intervention::change_rates`] suppresses (or
//! scales) a latent where it fires on a store's held-out images and counts how often the head's
//! predictions change for the latent's class and for other classes, next to a random-direction
//! and a random-latent control; [`ChangeRates`] holds the counts and renders the table.

use std::fmt;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::outcome::argmax;
use super::{head, Edit, GroupBy, HeadKind, Intervention, Perturb};
use crate::error::{Computing, Error, Result};
use crate::store::{ActivationStore, Examples, Tokens};
use crate::util::display::emit_text;

impl Intervention {
    /// The paper's §5.2 test on some of the store's examples (recorded at this layer; a range
    /// `(start, end)` or an [`Examples`] split such as the head's [`Head::held_out`](super::Head::held_out)): edit
    /// `latent` to `mult ×` its max on the patches where it fires, and count how often the
    /// head's prediction changes for images (classifier) or patches (segmenter: per-patch labels
    /// from the store) of the latent's class (`target_class`) and of other classes — next to
    /// two controls: a random unit direction with the same norm per patch, and a random live
    /// latent edited the same way on its own active patches.
    pub fn change_rates(
        &self,
        store: &ActivationStore,
        examples: impl Into<Examples>,
        latent: usize,
        target_class: u32,
        mult: f32,
        seed: u64,
    ) -> Result<ChangeRates> {
        self.head.check_store(store)?;
        self.change_rates_unnamed(store, examples.into(), latent, target_class, mult, seed)
            .computing(|| {
                format!(
                    "change rates of latent {latent} ×{mult} on {}",
                    store.dir().display()
                )
            })
    }

    fn change_rates_unnamed(
        &self,
        store: &ActivationStore,
        examples: Examples,
        latent: usize,
        target_class: u32,
        mult: f32,
        seed: u64,
    ) -> Result<ChangeRates> {
        self.check(None, &[Edit::scale_max(latent, mult)])?;
        let ids = examples.ids(store.n_examples())?;
        let seg = self.head.kind() == HeadKind::Segmenter;
        let labels = store
            .provenance()
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        let by_labels = self.group_by == GroupBy::Labels;
        if by_labels && !seg && labels.iter().all(Option::is_none) {
            return Err(Error::missing(
                store.dir().display().to_string(),
                "no image labels",
                "record a labelled dataset",
            ));
        }
        if by_labels && seg && store.patch_labels(ids[0]).is_none() {
            return Err(Error::missing(
                store.dir().display().to_string(),
                "no per-patch labels for a segmentation head",
                "record a segmentation dataset",
            ));
        }
        let max = self.max.as_ref().ok_or_else(|| {
            Error::missing(
                "change rates",
                "the latent maxima",
                "Intervention::with_features",
            )
        })?;
        // Control latent: a seeded random live latent other than `latent`.
        let live: Vec<usize> = (0..max.len())
            .filter(|&l| max[l] > 0.0 && l != latent)
            .collect();
        if live.is_empty() {
            return Err(Error::missing(
                "the random-latent control",
                "no other live latent",
                "",
            ));
        }
        let ctrl = live[(crate::util::rng::splitmix64(seed) % live.len() as u64) as usize];
        let d = self.vit.d_model();
        let mut u: Vec<f32> = (0..d)
            .map(|i| {
                let z =
                    crate::util::rng::splitmix64(seed.wrapping_mul(31).wrapping_add(i as u64 + 1));
                (z >> 11) as f32 / (1u64 << 53) as f32 - 0.5
            })
            .collect();
        let nu = u.iter().map(|v| v * v).sum::<f32>().sqrt();
        u.iter_mut().for_each(|v| *v /= nu);
        let (t, c) = (store.tokens_per_example(), usize::from(self.vit.has_cls()));
        let p = t - c;
        let mut r = ChangeRates {
            latent,
            control_latent: ctrl,
            target_class,
            mult,
            counts: [[0; 2]; 3],
            totals: [0; 2],
        };
        let bar = crate::util::progress::bar(ids.len() as u64, "images");
        for (chunk, x) in store.ordered_examples(self.layer, Tokens::All, 8, examples)? {
            let n = x.len() / (t * d);
            let tokens = Tensor::from_vec(x, (n, t, d), self.vit.device())?;
            let regs = head::recorded_registers(store, self.layer, &chunk, self.vit.device())?;
            let before = self.heads_from_tokens(&tokens, regs.as_ref())?;
            let c_n = self.head.classes().len();
            let rows_per = if seg { p } else { 1 };
            let preds = |v: &[f32]| -> Vec<usize> { v.chunks(c_n).map(argmax).collect() };
            for i in 0..n {
                let img = tokens.narrow(0, i, 1)?;
                let img_regs = match &regs {
                    Some(r) => Some(r.narrow(0, i, 1)?),
                    None => None,
                };
                let pred0 = preds(&before[i * rows_per * c_n..(i + 1) * rows_per * c_n]);
                // Group of each counted unit (the image, or each patch): 0 target, 1 other — by
                // label, or (the paper's grouping) by what the head saw before the edit.
                let groups: Vec<usize> = match (self.group_by, seg) {
                    (GroupBy::Predictions, _) => pred0
                        .iter()
                        .map(|&q| usize::from(q as u32 != target_class))
                        .collect(),
                    (GroupBy::Labels, true) => {
                        let pl = store.patch_labels(chunk[i]).unwrap_or(&[]);
                        pl.iter()
                            .map(|&l| usize::from(u32::from(l) != target_class))
                            .collect()
                    }
                    (GroupBy::Labels, false) => match labels.get(chunk[i]).copied().flatten() {
                        Some(lab) => vec![usize::from(lab != target_class)],
                        None => continue,
                    },
                };
                for &g in &groups {
                    r.totals[g] += 1;
                }
                let active = |l: usize| -> Result<Vec<usize>> {
                    let xs = img.narrow(1, c, p)?.squeeze(0)?;
                    let f = self.sae.encode(&xs)?.narrow(1, l, 1)?.squeeze(1)?;
                    let v: Vec<f32> = f.to_vec1()?;
                    Ok((0..p).filter(|&q| v[q] > 0.0).collect())
                };
                let (pa, pc) = (active(latent)?, active(ctrl)?);
                let e_main = [Edit::scale_max(latent, mult)];
                let e_ctrl = [Edit::scale_max(ctrl, mult)];
                for (k, (rows, how)) in [
                    (&pa, Perturb::Edits(&e_main)),
                    (&pa, Perturb::DirectionLike(&e_main, &u)),
                    (&pc, Perturb::Edits(&e_ctrl)),
                ]
                .into_iter()
                .enumerate()
                {
                    if rows.is_empty() {
                        continue;
                    }
                    let edited = self.edit_tokens(&img, Some(rows), &how)?;
                    let after = preds(&self.heads_from_tokens(&edited, img_regs.as_ref())?);
                    for ((a, b), &g) in after.iter().zip(&pred0).zip(&groups) {
                        if a != b {
                            r.counts[k][g] += 1;
                        }
                    }
                }
            }
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        Ok(r)
    }
}

/// Counts of [`Intervention::change_rates`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRates {
    /// The latent tested.
    pub latent: usize,
    /// The random live latent of the control.
    pub control_latent: usize,
    /// The latent's class.
    pub target_class: u32,
    /// The edit: `mult ×` max.
    pub mult: f32,
    /// Changed predictions `[edit, random direction, random latent][target, other]` (images for
    /// a classifier, patches for a segmenter).
    pub counts: [[usize; 2]; 3],
    /// Images (classifier) or patches (segmenter) `[target, other]`.
    pub totals: [usize; 2],
}

impl ChangeRates {
    /// Jupyter (evcxr) display: the table as Markdown.
    pub fn evcxr_display(&self) {
        emit_text("text/markdown", &self.to_string());
    }

    /// `(target rate, other rate)` of row `k` (0 edit, 1 random direction, 2 random latent).
    pub fn rates(&self, k: usize) -> (f64, f64) {
        let f = |c: usize, n: usize| if n == 0 { 0.0 } else { c as f64 / n as f64 };
        (
            f(self.counts[k][0], self.totals[0]),
            f(self.counts[k][1], self.totals[1]),
        )
    }
}

impl fmt::Display for ChangeRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "latent {} ({}× max; target class {}; {} target / {} other units)\n",
            self.latent, self.mult, self.target_class, self.totals[0], self.totals[1]
        )?;
        writeln!(
            f,
            "| perturbation | target changed | other changed |\n|---|---|---|"
        )?;
        for (k, name) in [
            "SAE latent edit".to_string(),
            "random direction, same norm".to_string(),
            format!("random live latent {}", self.control_latent),
        ]
        .iter()
        .enumerate()
        {
            let (a, b) = self.rates(k);
            writeln!(
                f,
                "| {name} | {:.1}% ({}/{}) | {:.1}% ({}/{}) |",
                100.0 * a,
                self.counts[k][0],
                self.totals[0],
                100.0 * b,
                self.counts[k][1],
                self.totals[1]
            )?;
        }
        Ok(())
    }
}
