//! The sparsity–fidelity frontier, the paper's Figure 4: held-out reconstruction error (NMSE, or
//! MSE) against L0, one point per SAE, coloured by activation, with the Pareto-optimal SAEs —
//! those no other SAE beats on both axes — joined. It is what an SAE user reads first after a
//! sweep: which settings give the best reconstruction at a given sparsity.
//!
//! `saev train` writes it as `frontier.svg` beside the SAEs; in a notebook a [`FrontierPlot`]
//! renders inline.
//!
//! ```no_run
//! # let store = saev::ActivationStore::open("acts/1a2b3c4d")?;
//! let run = saev::train_saes(&store, &saev::TrainConfig::new(-2), "runs/a")?;
//! let plot = run.frontier(); // add other runs with `.with_run(&other)`
//! println!("{}", plot.table()?);
//! plot.save("runs/a/frontier.svg")?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;
use std::path::Path;

use plotters::prelude::*;
use polars::prelude::{DataFrame, NamedFrom, Series};
use serde::{Deserialize, Serialize};

use super::picture::ensure_font;
use crate::error::{Error, Result};
use crate::sae::{Evaluation, TrainRun};
use crate::util::display::{show_text, write_out};

/// The error axis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontierMetric {
    /// Σ‖x̂ − x‖² / Σ‖x − x̄‖² (comparable across layers and models). The default.
    #[default]
    Nmse,
    /// Mean squared error per element (the paper's Figure 4).
    Mse,
}

/// One SAE on the chart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    /// What it is (`TopK k 32, lr 4e-4`).
    pub label: String,
    /// Its colour group: the label's first word (the activation).
    pub family: String,
    /// Mean active latents per held-out vector.
    pub l0: f64,
    /// Held-out MSE.
    pub mse: f64,
    /// Held-out NMSE.
    pub nmse: f64,
    /// Latents that never fired on the held-out vectors, and the dictionary size.
    pub n_dead: usize,
    /// Dictionary size.
    pub d_sae: usize,
}

/// Held-out error against L0 over SAEs (renders inline; `save` writes SVG).
#[derive(Clone, Default)]
pub struct FrontierPlot {
    points: Vec<FrontierPoint>,
    metric: FrontierMetric,
}

impl FrontierPlot {
    /// An empty chart (add SAEs with [`FrontierPlot::with_point`] / [`FrontierPlot::with_run`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one SAE's held-out evaluation under `label`.
    pub fn with_point(mut self, label: impl Into<String>, ev: &Evaluation) -> Self {
        let label = label.into();
        self.points.push(FrontierPoint {
            family: label.split_whitespace().next().unwrap_or("").to_string(),
            label,
            l0: ev.l0,
            mse: ev.mse,
            nmse: ev.nmse,
            n_dead: ev.n_dead,
            d_sae: ev.freq.len(),
        });
        self
    }

    /// Add every evaluated setting of a training run.
    pub fn with_run(self, run: &TrainRun) -> Self {
        run.evals
            .iter()
            .enumerate()
            .fold(self, |plot, (k, ev)| match ev {
                Some(ev) => {
                    let label = run
                        .labels
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| format!("setting {k}"));
                    plot.with_point(label, ev)
                }
                None => plot,
            })
    }

    /// Plot MSE or NMSE (default NMSE).
    pub fn with_metric(mut self, metric: FrontierMetric) -> Self {
        self.metric = metric;
        self
    }

    /// The SAEs on the chart, in the order added.
    pub fn points(&self) -> &[FrontierPoint] {
        &self.points
    }

    fn error_of(&self, p: &FrontierPoint) -> f64 {
        match self.metric {
            FrontierMetric::Nmse => p.nmse,
            FrontierMetric::Mse => p.mse,
        }
    }

    /// Indices of the Pareto-optimal SAEs, by increasing L0: no other SAE has both a lower (or
    /// equal) L0 and a lower error. Points with a non-finite L0 or error are never on it.
    pub fn pareto(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.points.len())
            .filter(|&i| {
                let p = &self.points[i];
                p.l0.is_finite() && self.error_of(p).is_finite()
            })
            .collect();
        idx.sort_by(|&a, &b| {
            let (pa, pb) = (&self.points[a], &self.points[b]);
            pa.l0
                .total_cmp(&pb.l0)
                .then(self.error_of(pa).total_cmp(&self.error_of(pb)))
        });
        let mut best = f64::INFINITY;
        idx.into_iter()
            .filter(|&i| {
                let e = self.error_of(&self.points[i]);
                let keep = e < best;
                best = best.min(e);
                keep
            })
            .collect()
    }

    /// One row per SAE: label, L0, MSE, NMSE, dead latents, d_sae, on the frontier.
    pub fn table(&self) -> Result<DataFrame> {
        let on = self.pareto();
        let p = &self.points;
        let col = |name: &str, v: Vec<f64>| Series::new(name.into(), v).into();
        DataFrame::new_infer_height(vec![
            Series::new(
                "sae".into(),
                p.iter().map(|p| p.label.clone()).collect::<Vec<_>>(),
            )
            .into(),
            col("l0", p.iter().map(|p| p.l0).collect()),
            col("mse", p.iter().map(|p| p.mse).collect()),
            col("nmse", p.iter().map(|p| p.nmse).collect()),
            Series::new(
                "dead".into(),
                p.iter().map(|p| p.n_dead as u64).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "d_sae".into(),
                p.iter().map(|p| p.d_sae as u64).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "on_frontier".into(),
                (0..p.len()).map(|i| on.contains(&i)).collect::<Vec<_>>(),
            )
            .into(),
        ])
        .map_err(|e| Error::render("frontier table", e))
    }

    /// The SVG text: log-scale L0 across, error up, one colour per activation, the frontier as
    /// a dashed line, each point labelled.
    pub fn to_svg(&self) -> Result<String> {
        ensure_font();
        let err = |e: &dyn fmt::Display| Error::render("frontier chart", e);
        let pts: Vec<&FrontierPoint> = self
            .points
            .iter()
            .filter(|p| p.l0.is_finite() && p.l0 > 0.0 && self.error_of(p).is_finite())
            .collect();
        let (x_lo, x_hi) = pts.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
            (a.min(p.l0), b.max(p.l0))
        });
        // Whole decades, so the log axis always has labelled ticks.
        let (x_lo, x_hi) = if pts.is_empty() {
            (1.0, 10.0)
        } else {
            (
                10f64.powf((x_lo / 1.2).log10().floor()),
                10f64.powf((x_hi * 1.2).log10().ceil()),
            )
        };
        let y_hi = pts
            .iter()
            .map(|p| self.error_of(p))
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE)
            * 1.15;
        let families: Vec<&str> = pts.iter().fold(Vec::new(), |mut v, p| {
            if !v.contains(&p.family.as_str()) {
                v.push(p.family.as_str());
            }
            v
        });
        let name = match self.metric {
            FrontierMetric::Nmse => "held-out NMSE",
            FrontierMetric::Mse => "held-out MSE",
        };
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, (720, 460)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(&e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{name} vs L0 ({} SAE{})",
                        pts.len(),
                        if pts.len() == 1 { "" } else { "s" }
                    ),
                    ("sans-serif", 16),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_hi)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc("L0 (active latents per patch)")
                .y_desc(name)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .light_line_style(WHITE)
                .draw()
                .map_err(|e| err(&e))?;
            let frontier: Vec<(f64, f64)> = self
                .pareto()
                .into_iter()
                .map(|i| (self.points[i].l0, self.error_of(&self.points[i])))
                .collect();
            chart
                .draw_series(DashedLineSeries::new(frontier, 6, 4, BLACK.stroke_width(1)))
                .map_err(|e| err(&e))?;
            for (c, fam) in families.iter().enumerate() {
                let colour = Palette99::pick(c).to_rgba();
                chart
                    .draw_series(pts.iter().filter(|p| p.family == *fam).map(|p| {
                        EmptyElement::at((p.l0, self.error_of(p)))
                            + Circle::new((0, 0), 5, colour.filled())
                            + Text::new(p.label.clone(), (7, -12), ("sans-serif", 10).into_font())
                    }))
                    .map_err(|e| err(&e))?
                    .label(fam.to_string())
                    .legend(move |(x, y)| Circle::new((x + 6, y), 5, colour.filled()));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|e| err(&e))?;
            root.present().map_err(|e| err(&e))?;
        }
        Ok(s)
    }

    /// Write the SVG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_out(path.as_ref(), self.to_svg())
    }

    /// Jupyter (evcxr) display: inline SVG.
    pub fn evcxr_display(&self) {
        show_text("image/svg+xml", self.to_svg());
    }
}

impl fmt::Debug for FrontierPlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FrontierPlot({} SAEs, {} on the frontier, {:?})",
            self.points.len(),
            self.pareto().len(),
            self.metric
        )
    }
}

/// Drawing lives here, above `sae`: the trainer knows nothing of charts.
impl TrainRun {
    /// Held-out NMSE against L0 for every evaluated setting (the paper's Figure 4).
    pub fn frontier(&self) -> FrontierPlot {
        FrontierPlot::new().with_run(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Examples;

    fn ev(l0: f64, mse: f64, nmse: f64) -> Evaluation {
        Evaluation {
            examples: Examples::Range { start: 0, end: 1 },
            n_examples: 1,
            n_vectors: 1,
            mse,
            nmse,
            explained_variance: 1.0 - nmse,
            l0,
            freq: vec![0.0; 8],
            mean_value: vec![0.0; 8],
            n_dead: 8,
            n_almost_dead: 0,
            n_dense: 0,
        }
    }

    #[test]
    fn the_frontier_is_the_points_no_other_beats_on_both_axes() {
        // (L0, NMSE): b beats a on both; c is beaten by b; d ties b's NMSE at a higher L0
        // (dominated); e is the sparsest; f has the lowest error; g is NaN.
        let plot = FrontierPlot::new()
            .with_point("TopK a", &ev(20.0, 1.0, 0.5))
            .with_point("TopK b", &ev(16.0, 0.8, 0.3))
            .with_point("ReLU c", &ev(30.0, 0.9, 0.4))
            .with_point("ReLU d", &ev(40.0, 0.3, 0.3))
            .with_point("ReLU e", &ev(4.0, 2.0, 0.9))
            .with_point("TopK f", &ev(64.0, 0.2, 0.1))
            .with_point("TopK g", &ev(f64::NAN, 0.2, 0.05));
        assert_eq!(plot.pareto(), vec![4, 1, 5]);
        // By MSE instead, d (0.3 at L0 40) now beats c and joins.
        let by_mse = plot.clone().with_metric(FrontierMetric::Mse);
        assert_eq!(by_mse.pareto(), vec![4, 1, 3, 5]);
        let t = plot.table().unwrap();
        assert_eq!(t.shape(), (7, 7));
        let on = t.column("on_frontier").unwrap().bool().unwrap().clone();
        let on: Vec<bool> = (0..on.len()).map(|i| on.get(i) == Some(true)).collect();
        assert_eq!(on, [false, true, false, false, true, true, false]);
        let svg = plot.to_svg().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("held-out NMSE vs L0 (6 SAEs)"));
        // Six points and two legend marks.
        assert_eq!(svg.matches("<circle").count(), 8, "{svg}");
        assert!(
            svg.contains("\nTopK b\n") && svg.contains("\nReLU e\n"),
            "{svg}"
        );
        // L0s within one decade (17–31) still get a labelled axis: it spans 10..100.
        let narrow = FrontierPlot::new()
            .with_point("JumpReLU a", &ev(31.3, 0.1, 0.088))
            .with_point("JumpReLU b", &ev(17.4, 0.1, 0.11))
            .to_svg()
            .unwrap();
        for tick in ["\n10\n", "\n20\n", "\n50\n"] {
            assert!(narrow.contains(tick), "no tick {tick:?}: {narrow}");
        }
    }
}
