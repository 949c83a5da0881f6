//! Exploring SAE features: the [`Explorer`] handle bundles an SAE, the store it was trained on,
//! its feature pass ([`Features`]) and the images behind the store, and makes the pictures:
//! exemplar grids, heatmaps, the frequency × value scatter, exemplar search, SAE comparison.
//!
//! ```no_run
//! use saev::prelude::*;
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let ex = Explorer::open("runs/a/0", &store)?;   // runs (and saves) the feature pass once
//! ex.grid(12, 8)?                                  // top 8 images of latent 12, as a PNG value
//! # ; Ok::<(), saev::Error>(())
//! ```

pub(crate) mod browse;
pub(crate) mod charts;
pub(crate) mod features;
pub(crate) mod frontier;
pub(crate) mod matching;
pub(crate) mod picture;
pub(crate) mod search;

pub use browse::{html_escape, write_browser, BrowseConfig};
pub use charts::{FeatureScatter, HistoryPlot};
pub use features::{FeatureConfig, Features};
pub use frontier::{FrontierMetric, FrontierPlot, FrontierPoint};
pub use matching::{max_weight_assignment, LatentMatching};
pub use picture::{plasma, ExemplarGrid, Heatmap};
pub use search::SearchResult;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use image::{DynamicImage, RgbImage};
use polars::prelude::DataFrame;

use crate::backbone::config::Family;
use crate::backbone::preprocess::Preprocess;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::sae::model::Sae;
use crate::sae::Compute;
use crate::store::ActivationStore;
use crate::util::paths::text_to_path;

/// An SAE + its store + its feature pass + the store's images. Cheap to clone.
#[derive(Clone)]
pub struct Explorer {
    sae: Sae,
    store: ActivationStore,
    features: Features,
    layer: i64,
    views: Arc<Views>,
    /// Where the passes over the store (matching, comparison) encode.
    compute: Compute,
}

/// Loads the images behind a store's examples, as the model saw them.
pub(crate) struct Views {
    sources: Vec<String>,
    pre: Preprocess,
    grid: (usize, usize),
    datasets: Mutex<HashMap<PathBuf, Dataset>>,
}

impl Views {
    pub(crate) fn new(store: &ActivationStore) -> Result<Self> {
        let md = store.metadata();
        let family = match md.family.as_str() {
            "clip" => Family::Clip,
            "siglip" => Family::Siglip,
            "dinov3" => Family::Dinov3,
            _ => Family::Dinov2,
        };
        let p = store.n_patches();
        let side = (p as f64).sqrt().round() as usize;
        if side * side != p {
            return Err(Error::mismatch(
                store.dir().display().to_string(),
                "a square patch grid (heatmaps need it)",
                format!("{p} patches per example"),
                "",
            ));
        }
        // The recording model's own recipe when its directory (or HF-cache entry) is here and
        // has one (a CLIP-336 or SigLIP-384 crops otherwise than its family's preset; an
        // unknown family would get DINOv2's); else the family's preset.
        let local = Path::new(&md.ckpt);
        let own = (if local.is_dir() {
            Some(local.to_path_buf())
        } else {
            crate::backbone::source::resolve_model(&md.ckpt).ok()
        })
        .map(|d| d.join("preprocessor_config.json"))
        .filter(|p| p.is_file())
        .and_then(|p| Preprocess::from_hf_config(p).ok());
        let mut pre = own.unwrap_or_else(|| Preprocess::for_family(family));
        if family == Family::Dinov2 && side != 16 {
            pre = pre.with_size(side * 14);
        }
        if family == Family::Dinov3 && side != 14 {
            pre = pre.with_size(side * 16);
        }
        let sources = store
            .provenance()
            .map(|p| p.sources.clone())
            .unwrap_or_default();
        Ok(Self {
            sources,
            pre,
            grid: (side, side),
            datasets: Mutex::new(HashMap::new()),
        })
    }

    /// The model-input view of example `e`.
    pub(crate) fn view(&self, e: usize) -> Result<RgbImage> {
        Ok(self.pre.model_view(&self.source(e)?))
    }

    /// Example `e` as recorded (before preprocessing).
    fn source(&self, e: usize) -> Result<DynamicImage> {
        let src = self.sources.get(e).ok_or_else(|| {
            Error::missing(
                format!("example {e}"),
                "no provenance in the store (recorded outside saev?)",
                "",
            )
        })?;
        let img = match src.rsplit_once('#') {
            // `file#index` names a row of an IDX or parquet file — never a directory (a source
            // like `/#0` must not make saev scan the file system).
            Some((path, idx)) if idx.parse::<usize>().is_ok() && text_to_path(path).is_file() => {
                let i: usize = idx.parse().unwrap_or(0); // checked just above
                let key = text_to_path(path);
                let ds = {
                    let mut map = self
                        .datasets
                        .lock()
                        .map_err(|_| Error::Internal("the image cache lock is poisoned".into()))?;
                    match map.get(&key) {
                        Some(d) => d.clone(),
                        None => {
                            let d = Dataset::open(&key, None, false)?;
                            map.insert(key.clone(), d.clone());
                            d
                        }
                    }
                };
                ds.get(i)?.image
            }
            _ => crate::util::image_io::load_image(text_to_path(src))?,
        };
        Ok(img)
    }
}

impl Explorer {
    /// Open the SAE saved in `sae_dir` on `store`; loads `features.*` from `sae_dir` or runs
    /// the feature pass (default settings) and saves it there. The layer is the one in the
    /// SAE's provenance (else the store's last recorded layer).
    pub fn open(sae_dir: impl AsRef<Path>, store: &ActivationStore) -> Result<Self> {
        Self::open_on(sae_dir, store, &Device::Cpu)
    }

    /// [`Explorer::open`] computing on `device` (a GPU: the feature pass when it runs, and the
    /// passes of [`Explorer::match_latents`] and [`Explorer::compare`]).
    pub fn open_on(
        sae_dir: impl AsRef<Path>,
        store: &ActivationStore,
        device: &Device,
    ) -> Result<Self> {
        let dir = sae_dir.as_ref();
        let sae = Sae::load(dir)?;
        let layer = sae.layer_in(store);
        let features = match Features::load_for_store(dir, store)? {
            Some(f) => f,
            None => {
                let f =
                    Features::compute_on(&sae, store, layer, &FeatureConfig::default(), device)?;
                // Kept beside the SAE for the next time (beside another store's pass, not over
                // it); an SAE directory that cannot be written (read-only, shared) still
                // explores, from memory.
                if let Err(e) = f.save_for_store(dir) {
                    eprintln!(
                        "note: the feature pass is not saved beside the SAE ({e}); it is kept in memory for this run"
                    );
                }
                f
            }
        };
        Ok(Self::new(sae, store, features)?.with_device(device))
    }

    /// From parts already in memory.
    pub fn new(sae: Sae, store: &ActivationStore, features: Features) -> Result<Self> {
        if features.d_sae() != sae.d_sae() {
            return Err(Error::Shape {
                what: "features vs SAE (d_sae)".into(),
                expected: vec![sae.d_sae()],
                actual: vec![features.d_sae()],
            });
        }
        Ok(Self {
            layer: features.layer(),
            views: Arc::new(Views::new(store)?),
            sae,
            store: store.clone(),
            features,
            compute: Compute::CpuKernels,
        })
    }

    /// The same explorer computing on `device`: saev's CPU kernels on the CPU, candle's ops
    /// elsewhere ([`Compute::for_device`]).
    pub fn with_device(self, device: &Device) -> Self {
        self.with_compute(Compute::for_device(device))
    }

    /// The same explorer computing with `compute` (e.g. candle's ops on the CPU, to check them
    /// against the kernels).
    pub fn with_compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    /// Where the explorer's passes over the store compute.
    pub fn device(&self) -> Device {
        match &self.compute {
            Compute::CpuKernels => Device::Cpu,
            Compute::Candle(d) => d.clone(),
        }
    }

    pub(crate) fn compute(&self) -> &Compute {
        &self.compute
    }

    /// The SAE.
    pub fn sae(&self) -> &Sae {
        &self.sae
    }
    /// The store.
    pub fn store(&self) -> &ActivationStore {
        &self.store
    }
    /// The feature pass.
    pub fn features(&self) -> &Features {
        &self.features
    }
    /// Patch grid (rows, cols).
    pub fn patch_grid(&self) -> (usize, usize) {
        self.views.grid
    }

    /// The model-input view of example `e`.
    pub fn view(&self, e: usize) -> Result<RgbImage> {
        self.views.view(e)
    }

    /// Example `e`'s image as recorded (e.g. to run an [`crate::Intervention`] on it).
    pub fn image(&self, e: usize) -> Result<DynamicImage> {
        self.views.source(e)
    }

    fn check_latent(&self, latent: usize) -> Result<()> {
        if latent >= self.sae.d_sae() {
            return Err(Error::out_of_range(
                "latent",
                latent,
                format!("0..{} (d_sae)", self.sae.d_sae()),
            ));
        }
        Ok(())
    }

    /// `latent` over example `e`, scaled to the latent's max.
    pub fn heatmap(&self, latent: usize, e: usize) -> Result<Heatmap> {
        self.check_latent(latent)?;
        let values = self
            .features
            .heatmap_values(&self.sae, &self.store, latent, e)?;
        let upper = self.features.max_value()[latent];
        Ok(Heatmap::new(self.view(e)?, values, self.views.grid)?.with_upper(upper))
    }

    fn label_of(&self, e: usize) -> Option<String> {
        let p = self.store.provenance()?;
        let l = (*p.labels.get(e)?)?;
        Some(
            p.classes
                .get(l as usize)
                .cloned()
                .unwrap_or_else(|| l.to_string()),
        )
    }

    /// The top `n` images of `latent` with heatmaps, captioned with value and label.
    pub fn grid(&self, latent: usize, n: usize) -> Result<ExemplarGrid> {
        self.check_latent(latent)?;
        let f = &self.features;
        let tiles = f
            .top(latent)
            .into_iter()
            .take(n)
            .map(|(e, v)| {
                let cap = match self.label_of(e) {
                    Some(l) => format!("{v:.2} · {l}"),
                    None => format!("{v:.2} · #{e}"),
                };
                Ok(self.heatmap(latent, e)?.with_caption(cap))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut title = format!(
            "latent {latent}: freq {:.2e}, mean {:.2}, max {:.2}",
            f.freq()[latent],
            f.mean_value()[latent],
            f.max_value()[latent]
        );
        if let Some((l, q)) = f.purity(&self.store, latent) {
            let name = self
                .store
                .provenance()
                .and_then(|p| p.classes.get(l as usize).cloned())
                .unwrap_or_else(|| l.to_string());
            title.push_str(&format!(
                ", top-{} purity {:.0}% {name}",
                f.top(latent).len(),
                q * 100.0
            ));
        }
        Ok(ExemplarGrid::new(latent, title, tiles, 4))
    }

    /// The feature table (see [`Features::table`]).
    pub fn table(&self) -> Result<DataFrame> {
        self.features.table(&self.store)
    }

    /// The `n` purest non-dense live latents: (latent, class of its top images, purity), purest
    /// first, more frequent first among equals. Empty without labels.
    pub fn purest(&self, n: usize) -> Vec<(usize, String, f64)> {
        let f = &self.features;
        let classes = self
            .store
            .provenance()
            .map(|p| p.classes.clone())
            .unwrap_or_default();
        let mut v: Vec<(usize, String, f64)> = f
            .live()
            .into_iter()
            .filter(|&l| f.freq()[l] <= crate::sae::eval::DENSE_FREQ)
            .filter_map(|l| {
                let (c, q) = f.purity(&self.store, l)?;
                let name = classes
                    .get(c as usize)
                    .cloned()
                    .unwrap_or_else(|| c.to_string());
                Some((l, name, q))
            })
            .collect();
        v.sort_by(|a, b| {
            b.2.total_cmp(&a.2)
                .then(f.freq()[b.0].total_cmp(&f.freq()[a.0]))
                .then(a.0.cmp(&b.0))
        });
        v.truncate(n);
        v
    }

    /// log10 frequency × log10 mean value over all latents (dead and dense marked).
    pub fn scatter(&self) -> charts::FeatureScatter {
        charts::FeatureScatter::new(self.features.freq(), self.features.mean_value())
    }
}

impl fmt::Debug for Explorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Explorer(d_sae {}, layer {}, {} examples, {:?}{})",
            self.sae.d_sae(),
            self.layer,
            self.store.n_examples(),
            self.features,
            crate::util::device::on_device(&self.device())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Metadata, StoreWriter};

    /// Heatmap views follow the recording model's own preprocessing when its directory is
    /// here: a CLIP-336 store (24 × 24 patches) of a family saev has no preset for gets
    /// CLIP's resize-to-336-and-crop, not DINOv2's resize-to-384 (its crop ratio 0.875 would
    /// shift every heatmap).
    #[test]
    fn views_use_the_models_own_preprocessing() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/layouts/processors/clip-vit-large-patch14-336");
        let md = Metadata {
            family: "pe-core".into(),
            ckpt: model.display().to_string(),
            layers: vec![-2],
            content_tokens_per_example: 24 * 24,
            cls_token: true,
            d_model: 4,
            n_examples: 1,
            max_tokens_per_shard: 24 * 24 + 1,
            data: "test".into(),
            dataset: "/nowhere".into(),
            pixel_agg: "majority".into(),
            dtype: "float32".into(),
            protocol: "2.1".into(),
        };
        let root = std::env::temp_dir().join(format!("saev-views-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut w = StoreWriter::create(&root, md, None).unwrap();
        w.write_examples(0, &vec![0.5f32; (24 * 24 + 1) * 4])
            .unwrap();
        let store = ActivationStore::open(w.finish().unwrap()).unwrap();
        let views = Views::new(&store).unwrap();
        let want = Preprocess::from_hf_config(model.join("preprocessor_config.json")).unwrap();
        assert_eq!(views.pre.output_size((640, 480)), (336, 336));
        assert_eq!(views.pre.resize, want.resize);
        std::fs::remove_dir_all(&root).ok();
    }
}
