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

/// The y range of a panel whose finite values span `lo..=hi`: from 0 (or below, for negative
/// values) to 5% above the top, and a unit above a constant (TopK's L0 is k at every step: a
/// fixed 0..1 axis put its line off the chart).
fn y_range(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let lo = lo.min(0.0);
    if hi > lo {
        (lo, hi + 0.05 * (hi - lo))
    } else {
        (lo, lo + 1.0)
    }
}

/// One history row: (n_patches, loss, l0, nmse).
type HistoryRow = (f64, f64, f64, f64);

/// Loss, L0 and NMSE per sweep setting against patches seen, from a training history table.
#[derive(Clone)]
pub struct HistoryPlot {
    /// Per setting in the table (its index in the sweep, and its (n_patches, loss, l0, nmse)
    /// rows): a `--group` run's table holds only its own settings.
    series: Vec<(usize, Vec<HistoryRow>)>,
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
        let mut series: Vec<(usize, Vec<_>)> = Vec::new();
        for i in 0..set.len() {
            let k = set[i] as usize;
            let at = match series.binary_search_by_key(&k, |s| s.0) {
                Ok(at) => at,
                Err(at) => {
                    series.insert(at, (k, Vec::new()));
                    at
                }
            };
            series[at].1.push((n[i], loss[i], l0[i], nmse[i]));
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
            let x_max = self
                .series
                .iter()
                .flat_map(|s| &s.1)
                .fold(1.0f64, |m, r| m.max(r.0));
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
                    .flat_map(|s| &s.1)
                    .map(get)
                    .filter(|v| v.is_finite())
                    .collect();
                let (lo, hi) = ys
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let (lo, hi) = y_range(lo, hi);
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
                for (k, ser) in &self.series {
                    let k = *k;
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
            self.series.iter().map(|s| s.1.len()).sum::<usize>()
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

    /// TopK's L0 is k at every step: its axis must reach past k (it was 0..1, the line off the
    /// chart); a `--group 1/2` run's table holds settings 2 and 3 only: two series, named so.
    #[test]
    fn history_axes_hold_constant_metrics_and_series_keep_their_setting() {
        assert_eq!(y_range(32.0, 32.0), (0.0, 33.6));
        assert_eq!(y_range(0.0, 0.0), (0.0, 1.0));
        assert_eq!(y_range(-3.0, -3.0), (-3.0, -2.0));
        assert_eq!(y_range(0.5, 2.5), (0.0, 2.625));
        assert_eq!(y_range(f64::INFINITY, f64::NEG_INFINITY), (0.0, 1.0));
        let df = polars::prelude::df!(
            "setting" => [2i64, 3, 2, 3],
            "n_patches" => [1i64, 1, 2, 2],
            "loss" => [1.0f64, 2.0, 0.5, 1.0],
            "l0" => [32.0f64, 32.0, 32.0, 32.0],
            "nmse" => [0.3f64, 0.4, 0.2, 0.3],
        )
        .unwrap();
        let plot = HistoryPlot::new(&df).unwrap();
        assert_eq!(
            plot.series.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let svg = plot.to_svg().unwrap();
        assert!(svg.contains("setting 2") && svg.contains("setting 3"));
        assert!(!svg.contains("setting 0") && !svg.contains("setting 1"));
        // The L0 panel's tick labels reach 32 (the fixed 0..1 axis had none above 1; every other
        // value here, patches included, is at most 2).
        let labels: Vec<f64> = svg
            .split('>')
            .filter_map(|t| t.split('<').next()?.trim().parse::<f64>().ok())
            .collect();
        assert!(labels.iter().any(|&v| v >= 30.0), "{labels:?}");
    }

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
