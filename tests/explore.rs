//! The feature pass, pictures and the static browser on a hand-built store and SAE whose
//! statistics, top images and heatmaps are known in closed form.
//!
//! Store: 6 examples × 4 patches (2×2 grid, plus CLS), d = 4; the SAE is the identity with ReLU,
//! so latent j's value on a patch is x[j]:
//! - latent 0 = e·(p+1)/10: fires on examples 1..5; mean 0.75, max 2.0, top examples 5, 4, 3;
//! - latent 1 = e+1 on patch e mod 4 only: freq 1/4, mean 3.5, max 6, top 5, 4, 3;
//! - latent 2 = −1: dead;
//! - latent 3 = 1 everywhere: freq 1 (dense), ties resolved to the first examples 0, 1, 2.

use std::path::{Path, PathBuf};

use saev::candle_core::{DType, Device, Tensor};
use saev::{
    explore::BrowseConfig, explore::FeatureConfig, sae::SaeActivation, sae::SaeConfig,
    sae::SAE_SCHEMA, store::Metadata, store::Provenance, store::StoreWriter, ActivationStore,
    Explorer, Features, Sae,
};
mod common;
use common::TestResult;

const N: usize = 6;
const P: usize = 4;
const D: usize = 4;

fn value(e: usize, p: usize, j: usize) -> f32 {
    match j {
        0 => (e * (p + 1)) as f32 / 10.0,
        1 if p == e % 4 => (e + 1) as f32,
        1 => 0.0,
        2 => -1.0,
        _ => 1.0,
    }
}

fn colour(e: usize) -> [u8; 3] {
    [(40 * e) as u8, 100, (200 - 30 * e) as u8]
}

fn setup(root: &Path) -> (ActivationStore, Sae) {
    let _ = std::fs::remove_dir_all(root);
    let img_dir = root.join("images");
    std::fs::create_dir_all(&img_dir).unwrap();
    let mut sources = Vec::new();
    for e in 0..N {
        let p = img_dir.join(format!("{e}.png"));
        saev::image::RgbImage::from_pixel(40, 40, saev::image::Rgb(colour(e)))
            .save(&p)
            .unwrap();
        sources.push(p.display().to_string());
    }
    let md = Metadata {
        family: "dinov2".into(),
        ckpt: "hand-built".into(),
        layers: vec![-2],
        content_tokens_per_example: P,
        cls_token: true,
        d_model: D,
        n_examples: N,
        max_tokens_per_shard: 1000,
        data: "hand-built".into(),
        dataset: "hand-built".into(),
        pixel_agg: "majority".into(),
        dtype: "float32".into(),
        protocol: saev::store::PROTOCOL.into(),
    };
    let prov = Provenance {
        version: 1,
        classes: vec!["even <i>".into(), "odd & co".into()],
        sources,
        labels: (0..N).map(|e| Some((e % 2) as u32)).collect(),
        stamp: None,
    };
    let mut acts = Vec::new();
    for e in 0..N {
        acts.extend([9.0f32; D]); // CLS: ignored by the pass
        for p in 0..P {
            for j in 0..D {
                acts.push(value(e, p, j));
            }
        }
    }
    let mut w = StoreWriter::create(root.join("store"), md, Some(&prov)).unwrap();
    w.write_examples(0, &acts).unwrap();
    let store = ActivationStore::open(w.finish().unwrap()).unwrap();
    let eye = Tensor::eye(D, DType::F32, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(D, DType::F32, &Device::Cpu).unwrap();
    let sae = Sae::new(
        SaeConfig {
            schema: SAE_SCHEMA,
            d_model: D,
            d_sae: D,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::json!({"layer": -2}),
        },
        eye.clone(),
        zeros.clone(),
        eye,
        zeros,
    )
    .unwrap();
    (store, sae)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("saev-explore-{name}-{}", std::process::id()))
}

/// The closed-form statistics, top images and histogram of the hand-built store (module doc).
fn assert_closed_form(f: &Features) {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert!(close(f.freq()[0], 20.0 / 24.0) && close(f.mean_value()[0], 0.75));
    assert!(close(f.freq()[1], 0.25) && close(f.mean_value()[1], 3.5));
    assert!(close(f.freq()[2], 0.0) && close(f.freq()[3], 1.0) && close(f.mean_value()[3], 1.0));
    assert_eq!(f.max_value(), &[2.0, 6.0, 0.0, 1.0]);
    let top = |l: usize| -> Vec<usize> { f.top(l).iter().map(|t| t.0).collect() };
    assert_eq!(top(0), vec![5, 4, 3]);
    assert!((f.top(0)[1].1 - 1.6).abs() < 1e-6);
    assert_eq!(top(1), vec![5, 4, 3]);
    assert_eq!(f.top(1)[2].1, 4.0);
    assert!(top(2).is_empty());
    assert_eq!(top(3), vec![0, 1, 2]);
    assert_eq!(f.live(), vec![0, 1, 3]);
    // Histogram: latent 1's six values 1..6 → log10 in [0, 0.78]: bins of 0.125 from -4.
    let (h, lo, w) = f.histogram(1);
    assert_eq!(h.iter().sum::<u32>(), 6);
    let bin = |v: f32| ((v.log10() - lo) / w).floor() as usize;
    assert_eq!(h[bin(1.0)], 1);
    assert_eq!(h[bin(6.0)], if bin(5.0) == bin(6.0) { 2 } else { 1 });
}

/// 40 examples × 16 patches (4×4) of d = 8 uniform values (in the hand-built store's layout).
fn random_store(root: &Path, like: &ActivationStore) -> ActivationStore {
    let (n, p, d) = (40usize, 16usize, 8usize);
    let md = Metadata {
        n_examples: n,
        content_tokens_per_example: p,
        d_model: d,
        ..like.metadata().clone()
    };
    let acts = saev::__private::uniforms(7, n * (p + 1) * d, 2.0);
    let mut w = StoreWriter::create(root.join("random"), md, None).unwrap();
    w.write_examples(0, &acts).unwrap();
    ActivationStore::open(w.finish().unwrap()).unwrap()
}

/// A random SAE on [`random_store`]'s width with `s` latents (weights from `seed`).
fn random_sae(s: usize, activation: SaeActivation, seed: u64) -> Sae {
    let d = 8;
    let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    Sae::new(
        SaeConfig {
            schema: SAE_SCHEMA,
            d_model: d,
            d_sae: s,
            activation,
            norm: None,
            provenance: serde_json::json!({"layer": -2}),
        },
        t(saev::__private::uniforms(seed, d * s, 0.5), &[d, s]),
        t(saev::__private::uniforms(seed + 1, s, 0.1), &[s]),
        t(saev::__private::uniforms(seed + 2, s * d, 0.5), &[s, d]),
        t(vec![0.0; d], &[d]),
    )
    .unwrap()
}

/// The device pass (candle's ops: what runs on a GPU), run on the CPU: the same closed form, and
/// on a random store with a TopK SAE the same top images as the CPU pass, statistics within
/// float rounding.
#[test]
fn device_feature_pass_matches_the_closed_form_and_the_cpu_pass() -> TestResult {
    let root = tmp("pass-device");
    let (store, sae) = setup(&root);
    let cfg = FeatureConfig::default().with_top_k(3);
    assert_closed_form(&Features::compute_candle(
        &sae,
        &store,
        -2,
        &cfg,
        &Device::Cpu,
    )?);
    // `compute_on` the CPU is the CPU pass.
    let on = Features::compute_on(&sae, &store, -2, &cfg, &Device::Cpu)?;
    assert_closed_form(&on);

    let s = 64;
    let store = random_store(&root, &store);
    let sae = random_sae(s, SaeActivation::TopK { k: 4, relu: true }, 8);
    let cfg = FeatureConfig::default()
        .with_top_k(5)
        .with_rows_per_batch(100);
    let cpu = Features::compute(&sae, &store, -2, &cfg)?;
    let dev = Features::compute_candle(&sae, &store, -2, &cfg, &Device::Cpu)?;
    assert!(
        cpu.live().len() > s / 2,
        "a test SAE with most latents alive"
    );
    for l in 0..s {
        let (a, b) = (cpu.top(l), dev.top(l));
        let ids = |t: &[(usize, f32)]| t.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b), "latent {l}: top images");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x.1 - y.1).abs() <= 1e-5 * x.1.abs().max(1.0),
                "latent {l}: {x:?} vs {y:?}"
            );
        }
        assert!(
            (cpu.freq()[l] - dev.freq()[l]).abs() < 1e-12,
            "latent {l}: freq"
        );
        assert!(
            (cpu.mean_value()[l] - dev.mean_value()[l]).abs()
                <= 1e-5 * cpu.mean_value()[l].abs().max(1.0)
        );
        assert_eq!(cpu.max_value()[l], dev.max_value()[l], "latent {l}: max");
        let (hc, hd) = (cpu.histogram(l).0, dev.histogram(l).0);
        assert_eq!(
            hc.iter().sum::<u32>(),
            hd.iter().sum::<u32>(),
            "latent {l}: histogram total"
        );
        // Bin edges are computed two ways (log10 of the value, or the value against 10^edge):
        // a value on an edge may land one bin over.
        let moved: u32 = hc.iter().zip(hd).map(|(a, b)| a.abs_diff(*b)).sum();
        assert!(moved <= 2, "latent {l}: histograms {hc:?} vs {hd:?}");
    }
    Ok(())
}

/// Matching and comparison computed by candle's ops (what runs on a GPU), run on the CPU: the
/// same matched pairs, best matches and comparison ranking as saev's CPU kernels, correlations
/// within float rounding. A TopK SAE against a ReLU and a BatchTopK one.
#[test]
fn device_matching_and_comparison_match_the_cpu_kernels() -> TestResult {
    use saev::sae::Compute;
    let root = tmp("match-device");
    let (hand, _) = setup(&root);
    let store = random_store(&root, &hand);
    let cfg = FeatureConfig::default();
    let explorer = |sae: Sae| -> saev::Result<Explorer> {
        let f = Features::compute(&sae, &store, -2, &cfg)?;
        Explorer::new(sae, &store, f)
    };
    let a = explorer(random_sae(48, SaeActivation::TopK { k: 6, relu: true }, 20))?;
    let candle = |e: &Explorer| e.clone().with_compute(Compute::Candle(Device::Cpu));
    assert!(matches!(a.device(), Device::Cpu));
    assert!(matches!(
        a.clone().with_device(&Device::Cpu).device(),
        Device::Cpu
    ));
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-5;
    for b in [
        explorer(random_sae(40, SaeActivation::Relu, 30))?,
        explorer(random_sae(
            40,
            SaeActivation::BatchTopK {
                k: 4,
                threshold: 0.3,
            },
            40,
        ))?,
    ] {
        let (cpu, dev) = (a.match_latents(&b)?, candle(&a).match_latents(&candle(&b))?);
        assert!(cpu.pairs.len() > 10, "{cpu}");
        assert_eq!(cpu.n_live, dev.n_live);
        let ids = |v: &[(usize, usize, f64)]| v.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>();
        assert_eq!(ids(&cpu.pairs), ids(&dev.pairs), "{cpu}\n{dev}");
        assert_eq!(ids(&cpu.best), ids(&dev.best));
        for (x, y) in cpu
            .pairs
            .iter()
            .zip(&dev.pairs)
            .chain(cpu.best.iter().zip(&dev.best))
        {
            assert!(close(x.2, y.2), "{x:?} vs {y:?}");
        }
        assert!(close(cpu.mean_r, dev.mean_r));
        for latent in [0, 7, 31] {
            let (c, d) = (
                a.compare(latent, &b, 5)?,
                candle(&a).compare(latent, &candle(&b), 5)?,
            );
            assert_eq!(
                c.iter().map(|x| x.0).collect::<Vec<_>>(),
                d.iter().map(|x| x.0).collect::<Vec<_>>(),
                "latent {latent}: {c:?} vs {d:?}"
            );
            for (x, y) in c.iter().zip(&d) {
                assert!(close(x.1, y.1), "latent {latent}: {x:?} vs {y:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn feature_pass_matches_the_closed_form() -> TestResult {
    let root = tmp("pass");
    let (store, sae) = setup(&root);
    let f = Features::compute(&sae, &store, -2, &FeatureConfig::default().with_top_k(3))?;
    assert_closed_form(&f);
    // Heatmap values recomputed from the store: latent 1 on example 4 lights patch 0 with 5.
    assert_eq!(
        f.heatmap_values(&sae, &store, 1, 4)?,
        vec![5.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(
        f.heatmap_values(&sae, &store, 0, 2)?,
        vec![0.2, 0.4, 0.6, 0.8]
    );
    // Purity: latent 0's top (5, 4, 3) have labels odd, even, odd.
    let (lab, q) = f.purity(&store, 0).unwrap();
    assert_eq!(lab, 1);
    assert!((q - 2.0 / 3.0).abs() < 1e-9);
    // The feature table.
    let t = f.table(&store)?;
    assert_eq!(t.height(), 4);
    let labels = t.column("label")?.str()?.clone();
    assert_eq!(labels.get(0), Some("odd & co"));
    // Saved and reopened identically.
    let dir = root.join("sae");
    f.save(&dir)?;
    let g = Features::load(&dir)?;
    assert_eq!(
        (g.freq(), g.mean_value(), g.max_value()),
        (f.freq(), f.mean_value(), f.max_value())
    );
    assert_eq!(g.top(1), f.top(1));
    // An empty or reversed histogram range has no bin width: refused on both passes.
    for (lo, hi) in [(-4.0, -4.0), (2.0, -4.0), (f32::NAN, 2.0)] {
        let cfg = FeatureConfig::default().with_hist_range(lo, hi);
        for e in [
            Features::compute(&sae, &store, -2, &cfg).err(),
            Features::compute_candle(&sae, &store, -2, &cfg, &Device::Cpu).err(),
        ] {
            let e = e
                .ok_or("an empty histogram range was accepted")?
                .to_string();
            assert!(e.contains("hist_lo < hist_hi"), "{e}");
        }
    }
    // Wrong width and bad versions are clear errors.
    let js = dir.join("features.json");
    let text = std::fs::read_to_string(&js)?.replace("\"version\": 1", "\"version\": 99");
    std::fs::write(&js, text)?;
    let err = Features::load(&dir).err().unwrap();
    assert!(err.to_string().contains("version 99"), "{err}");
    Ok(())
}

#[test]
fn heatmaps_grids_and_the_browser_render() -> TestResult {
    let root = tmp("pics");
    let (store, sae) = setup(&root);
    let f = Features::compute(&sae, &store, -2, &FeatureConfig::default().with_top_k(3))?;
    let ex = Explorer::new(sae, &store, f)?;
    assert_eq!(ex.patch_grid(), (2, 2));
    // The recorded image (40×40 file) vs the model-input view (28×28).
    let orig = ex.image(4)?.to_rgb8();
    assert_eq!((orig.width(), orig.height()), (40, 40));
    assert_eq!(orig.get_pixel(0, 0).0, colour(4));
    // Latent 1 on example 4: patch 0 (top-left 14×14 of the 28×28 view) at 5 of upper 6.
    let hm = ex.heatmap(1, 4)?;
    let img = hm.overlay();
    assert_eq!((img.width(), img.height()), (28, 28));
    let (t, base) = (5.0f32 / 6.0, colour(4));
    let c = saev::explore::plasma(t);
    let a = 0.9 * t;
    let want: Vec<u8> = (0..3)
        .map(|k| ((1.0 - a) * f32::from(base[k]) + a * f32::from(c[k])).round() as u8)
        .collect();
    assert_eq!(img.get_pixel(3, 5).0.to_vec(), want);
    assert_eq!(
        img.get_pixel(20, 20).0,
        base,
        "unlit patch keeps the image colour"
    );
    // The exemplar grid renders to a PNG with all three tiles.
    let grid = ex.grid(0, 3)?;
    assert_eq!(grid.tiles().len(), 3);
    let png = grid.to_png()?;
    assert_eq!(&png[1..4], b"PNG");
    // Errors name what is wrong.
    assert!(ex
        .grid(7, 3)
        .err()
        .unwrap()
        .to_string()
        .contains("latent 7"));
    // The static site, opened by headless Chromium.
    let site = root.join("site");
    let index = saev::explore::write_browser(&ex, &site, &BrowseConfig::default())?;
    for l in [0, 1, 3] {
        assert!(site.join(format!("latents/{l}.png")).exists());
    }
    assert!(
        !site.join("latents/2.html").exists(),
        "dead latents get no page"
    );
    // Written again with fewer pages (as for another SAE): no stale page stays, files of other
    // names are kept, and the marker says what the site shows.
    std::fs::write(site.join("latents/notes.txt"), "mine")?;
    std::fs::write(site.join("latents/17.html"), "stale")?;
    saev::explore::write_browser(&ex, &site, &BrowseConfig::default().with_max_pages(1))?;
    let pages: Vec<String> = std::fs::read_dir(site.join("latents"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    let mut pages = pages;
    pages.sort();
    assert_eq!(pages, ["3.html", "3.png", "notes.txt"], "{pages:?}");
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(site.join(".saev-browser.json"))?)?;
    assert_eq!(marker["store_fingerprint"], store.fingerprint());
    assert_eq!(
        (marker["n_pages"].as_u64(), marker["d_sae"].as_u64()),
        (Some(1), Some(4))
    );
    saev::explore::write_browser(&ex, &site, &BrowseConfig::default())?;
    let html = std::fs::read_to_string(&index)?;
    // Label text sits in the page only as JSON with `<`/`>` escaped (cannot end the script).
    assert!(
        !html.contains("<i>") && html.contains("even \\u003ci\\u003e"),
        "unescaped label text"
    );
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok())
        .expect("headless Chromium is needed for this test (apt-get install chromium; .ci/run installs it)");
    for page in [index.clone(), site.join("latents/1.html")] {
        let out = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
            ])
            .arg(format!("file://{}", page.display()))
            .output()?;
        let dom = String::from_utf8_lossy(&out.stdout);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "chromium failed: {log}");
        assert!(
            !log.contains("Uncaught") && !log.contains(":CONSOLE"),
            "script errors in {}: {log}",
            page.display()
        );
        if page == index {
            // The script rendered the three live latents, sorted by frequency (3, 0, 1).
            let body = dom.split("<tbody id=\"body\">").nth(1).unwrap_or("");
            let rows: Vec<&str> = body.split("<tr>").skip(1).collect();
            assert_eq!(rows.len(), 3, "{dom}");
            assert!(rows[0].contains("latents/3.html") && rows[2].contains("latents/1.html"));
            assert!(dom.contains("odd &amp; co"));
            assert!(dom.contains("3 of 4 latents"));
        } else {
            assert!(dom.contains("<img id=\"grid\" src=\"1.png\""), "{dom}");
        }
    }
    Ok(())
}

/// An SAE that does not record its layer (a Python checkpoint imported without a store) is read
/// at one block everywhere: the layer its provenance names, else the store's only layer, else
/// −2 — here on a store of blocks −2 and −1 whose values differ, so the feature pass's
/// statistics tell which block was read (`saev features` used −2 and the explorer the last
/// layer, −1, and each overwrote the other's pass).
#[test]
fn an_sae_without_a_layer_is_read_at_the_same_block_everywhere() -> TestResult {
    let root = tmp("layerless");
    let (store, _) = setup(&root);
    let (n, p, d) = (6usize, 4usize, 8usize);
    let md = Metadata {
        n_examples: n,
        content_tokens_per_example: p,
        d_model: d,
        layers: vec![-2, -1],
        ..store.metadata().clone()
    };
    // Block −2 holds 1.0 everywhere, block −1 holds 3.0: with the identity ReLU SAE, a latent's
    // mean over patches is the block's value.
    let mut acts = Vec::new();
    for _ in 0..n {
        for v in [1.0f32, 3.0] {
            acts.extend(std::iter::repeat_n(v, (p + 1) * d));
        }
    }
    let mut w = StoreWriter::create(root.join("two-layers"), md, None)?;
    w.write_examples(0, &acts)?;
    let two = ActivationStore::open(w.finish()?)?;
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
    let z = Tensor::zeros(d, DType::F32, &Device::Cpu)?;
    let cfg = |provenance| SaeConfig {
        schema: SAE_SCHEMA,
        d_model: d,
        d_sae: d,
        activation: SaeActivation::Relu,
        norm: None,
        provenance,
    };
    let layerless = Sae::new(
        cfg(serde_json::json!({})),
        eye.clone(),
        z.clone(),
        eye.clone(),
        z.clone(),
    )?;
    assert_eq!(layerless.layer_in(&two), -2);
    let sae_dir = root.join("sae");
    layerless.save(&sae_dir)?;
    let ex = Explorer::open(&sae_dir, &two)?;
    assert_eq!(ex.features().layer(), -2);
    assert!(
        (ex.features().mean_value()[0] - 1.0).abs() < 1e-9,
        "read block −2 (all 1.0), got mean {}",
        ex.features().mean_value()[0]
    );
    // A recorded layer wins; a one-layer store names its layer.
    let at_last = Sae::new(
        cfg(serde_json::json!({"layer": -1})),
        eye.clone(),
        z.clone(),
        eye,
        z,
    )?;
    assert_eq!(at_last.layer_in(&two), -1);
    let mut one_md = two.metadata().clone();
    one_md.layers = vec![-1];
    let mut w = StoreWriter::create(root.join("one-layer"), one_md, None)?;
    w.write_examples(0, &vec![3.0f32; acts.len() / 2])?;
    let one = ActivationStore::open(w.finish()?)?;
    assert_eq!(layerless.layer_in(&one), -1);
    // The same SAE explored on the other store gets that store's pass, saved beside the first
    // (not over it), and each store finds its own again.
    let on_one = Explorer::open(&sae_dir, &one)?;
    assert_eq!(on_one.features().layer(), -1);
    assert!((on_one.features().mean_value()[0] - 3.0).abs() < 1e-9);
    assert_eq!(
        Features::load(&sae_dir)?.store_fingerprint(),
        two.fingerprint()
    );
    let again = Explorer::open(&sae_dir, &two)?;
    assert!((again.features().mean_value()[0] - 1.0).abs() < 1e-9);
    let reopened = Features::load_for_store(&sae_dir, &one)?.ok_or("no pass for `one`")?;
    assert_eq!(reopened.store_fingerprint(), one.fingerprint());
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
