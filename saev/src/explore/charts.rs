//! Charts as SVG values (plotters): the feature scatter (log10 frequency × log10 mean value,
//! live latents as translucent dots so crowded regions read as density, dense latents in red,
//! dead latents counted in the title) and training-history curves (loss, L0, NMSE per sweep
//! setting against patches seen).
//!
//! ```no_run
//! # let store = saev::ActivationStore::open("acts/1a2b3c4d")?;
//! let run = saev::train_saes(&store, &saev::TrainConfig::new(-2), "runs/a")?;
//! let plot = saev::explore::HistoryPlot::new(&run.history)?;
//! plot.save("history.svg")?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;
use std::path::Path;

use plotters::prelude::*;
use polars::prelude::DataFrame;

use super::picture::ensure_font;
use crate::error::{Error, Result};
use crate::sae::eval::DENSE_FREQ;
use crate::util::display::{show_text, write_out};

fn plot_err(e: impl fmt::Display) -> Error {
    Error::render("chart", e)
}

/// log10 frequency × log10 mean value of every latent.
#[derive(Clone)]
pub struct FeatureScatter {
    points: Vec<(f64, f64)>,
    n_dead: usize,
    n_dense: usize,
}

impl FeatureScatter {
    /// From per-latent firing frequency and mean value.
    pub fn new(freq: &[f64], mean: &[f64]) -> Self {
        let points: Vec<(f64, f64)> = freq
            .iter()
            .zip(mean)
            .filter(|(&f, &m)| f > 0.0 && m > 0.0)
            .map(|(&f, &m)| (f.log10(), m.log10()))
            .collect();
        Self {
            n_dead: freq.iter().filter(|&&f| f <= 0.0).count(),
            n_dense: freq.iter().filter(|&&f| f > DENSE_FREQ).count(),
            points,
        }
    }

    /// The SVG text.
    pub fn to_svg(&self) -> Result<String> {
        ensure_font();
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, (560, 420)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let (mut x0, mut x1, mut y0, mut y1) = (-6.0f64, 0.0f64, -3.0f64, 2.0f64);
            for &(x, y) in &self.points {
                x0 = x0.min(x.floor());
                x1 = x1.max(x.ceil());
                y0 = y0.min(y.floor());
                y1 = y1.max(y.ceil());
            }
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{} live latents ({} dead, {} dense > 1e-2)",
                        self.points.len(),
                        self.n_dead,
                        self.n_dense
                    ),
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("log10 firing frequency")
                .y_desc("log10 mean value")
                .draw()
                .map_err(plot_err)?;
            let dense = DENSE_FREQ.log10();
            chart
                .draw_series(self.points.iter().map(|&(x, y)| {
                    let c = if x > dense {
                        RED.mix(0.5)
                    } else {
                        BLUE.mix(0.25)
                    };
                    Circle::new((x, y), 2, c.filled())
                }))
                .map_err(plot_err)?;
            root.present().map_err(plot_err)?;
        }
        Ok(s)
    }

    /// Write the SVG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_out(path, self.to_svg())
    }

    /// Jupyter (evcxr) display: inline SVG.
    pub fn evcxr_display(&self) {
        show_text("image/svg+xml", self.to_svg());
    }
}

impl fmt::Debug for FeatureScatter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FeatureScatter({} live, {} dead, {} dense)",
            self.points.len(),
            self.n_dead,
            self.n_dense
        )
    }
}

/// Loss, L0 and NMSE per sweep setting against patches seen, from a training history table.
#[derive(Clone)]
pub struct HistoryPlot {
    /// Per setting: (n_patches, loss, l0, nmse) rows.
    series: Vec<Vec<(f64, f64, f64, f64)>>,
}

impl HistoryPlot {
    /// From [`TrainRun::history`](crate::TrainRun) (columns `setting`, `n_patches`, `loss`,
    /// `l0`, `nmse`).
    pub fn new(history: &DataFrame) -> Result<Self> {
        let col = |name: &str| -> Result<Vec<f64>> {
            let c = history
                .column(name)
                .map_err(|e| Error::render("history table", e))?;
            let c = c
                .cast(&polars::prelude::DataType::Float64)
                .map_err(|e| Error::render(format!("history column {name}"), e))?;
            let ca = c
                .f64()
                .map_err(|e| Error::render(format!("history column {name}"), e))?;
            Ok((0..ca.len())
                .map(|i| ca.get(i).unwrap_or(f64::NAN))
                .collect())
        };
        let (set, n, loss, l0, nmse) = (
            col("setting")?,
            col("n_patches")?,
            col("loss")?,
            col("l0")?,
            col("nmse")?,
        );
        let k = set.iter().fold(0usize, |m, &s| m.max(s as usize + 1));
        let mut series = vec![Vec::new(); k];
        for i in 0..set.len() {
            series[set[i] as usize].push((n[i], loss[i], l0[i], nmse[i]));
        }
        Ok(Self { series })
    }

    /// The SVG text (three panels side by side).
    pub fn to_svg(&self) -> Result<String> {
        ensure_font();
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, (1080, 340)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let panels = root.split_evenly((1, 3));
            let x_max = self.series.iter().flatten().fold(1.0f64, |m, r| m.max(r.0));
            for (p, (name, pick)) in panels
                .iter()
                .zip([("loss", 1usize), ("L0", 2), ("NMSE", 3)])
            {
                let get = |r: &(f64, f64, f64, f64)| match pick {
                    1 => r.1,
                    2 => r.2,
                    _ => r.3,
                };
                let ys: Vec<f64> = self
                    .series
                    .iter()
                    .flatten()
                    .map(get)
                    .filter(|v| v.is_finite())
                    .collect();
                let (lo, hi) = ys
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let (lo, hi) = if lo.is_finite() && hi > lo {
                    (lo.min(0.0), hi * 1.05)
                } else {
                    (0.0, 1.0)
                };
                let mut chart = ChartBuilder::on(p)
                    .caption(name, ("sans-serif", 15))
                    .margin(8)
                    .x_label_area_size(35)
                    .y_label_area_size(50)
                    .build_cartesian_2d(0.0..x_max, lo..hi)
                    .map_err(plot_err)?;
                chart
                    .configure_mesh()
                    .x_desc("patches")
                    .x_labels(4)
                    .draw()
                    .map_err(plot_err)?;
                for (k, ser) in self.series.iter().enumerate() {
                    let c = Palette99::pick(k);
                    chart
                        .draw_series(LineSeries::new(
                            ser.iter().map(|r| (r.0, get(r))),
                            c.stroke_width(2),
                        ))
                        .map_err(plot_err)?
                        .label(format!("setting {k}"))
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 14, y)], Palette99::pick(k))
                        });
                }
                if pick == 1 {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .label_font(("sans-serif", 10))
                        .draw()
                        .map_err(plot_err)?;
                }
            }
            root.present().map_err(plot_err)?;
        }
        Ok(s)
    }

    /// Write the SVG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_out(path, self.to_svg())
    }

    /// Jupyter (evcxr) display: inline SVG.
    pub fn evcxr_display(&self) {
        show_text("image/svg+xml", self.to_svg());
    }
}

impl fmt::Debug for HistoryPlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HistoryPlot({} settings, {} rows)",
            self.series.len(),
            self.series.iter().map(Vec::len).sum::<usize>()
        )
    }
}

/// Drawing lives here, above `sae`: the trainer knows nothing of charts.
impl crate::sae::trainer::TrainRun {
    /// The history drawn (loss, L0, NMSE per setting; renders inline in a notebook).
    pub fn plot(&self) -> Result<HistoryPlot> {
        HistoryPlot::new(&self.history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_counts_and_svg() {
        let freq = [0.0, 1e-4, 0.5, 1e-3];
        let mean = [0.0, 1.0, 2.0, 0.1];
        let s = FeatureScatter::new(&freq, &mean);
        assert_eq!((s.points.len(), s.n_dead, s.n_dense), (3, 1, 1));
        let svg = s.to_svg().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("3 live latents (1 dead, 1 dense"));
        assert_eq!(svg.matches("<circle").count(), 3);
    }
}
