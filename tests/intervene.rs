//! Interventions on a tiny DINOv2 (fixture): no edit = the unedited model exactly; edits touch
//! only the chosen patches, with the closed-form effect of an identity SAE; bad input and a
//! mismatched SAE are clear errors; heads train, save and reload.

use std::path::PathBuf;

use saev::candle_core::{DType, Device, Tensor};
use saev::{
    intervene::HeadKind, sae::SaeActivation, sae::SaeConfig, Backbone, Edit, Head, Intervention,
    Sae,
};
mod common;
use common::TestResult;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/backbone")
}

fn tiny() -> Backbone {
    let vit = Backbone::from_dir(fixtures().join("tiny-dinov2"), &Device::Cpu).unwrap();
    let pre = vit.preprocess().clone().with_size(16);
    vit.with_preprocess(pre)
}

/// The identity SAE (ReLU, d_sae = d, no normalisation) on `layer`: f = relu(x), x̂ = f.
fn identity_sae(d: usize, layer: i64) -> Sae {
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu).unwrap();
    let z = Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap();
    Sae::new(
        SaeConfig {
            schema: saev::sae::SAE_SCHEMA,
            d_model: d,
            d_sae: d,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::json!({"layer": layer, "ckpt": fixtures().join("tiny-dinov2").display().to_string()}),
        },
        eye.clone(),
        z.clone(),
        eye,
        z,
    )
    .unwrap()
}

fn head(vit: &Backbone, kind: HeadKind) -> Head {
    let d = vit.d_model();
    let w = Tensor::randn(0f32, 1.0, (d, 3), &Device::Cpu).unwrap();
    let b = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    Head::from_weights(
        kind,
        w,
        b,
        vec!["a".into(), "b".into(), "c <d>".into()],
        vit.name(),
    )
    .unwrap()
}

fn images() -> Vec<saev::image::DynamicImage> {
    ["astronaut.png", "chelsea.png"]
        .iter()
        .map(|f| saev::load_image(fixtures().join(f)).unwrap())
        .collect()
}

#[test]
fn no_edit_is_the_unedited_model_and_edits_stay_on_their_patches() -> TestResult {
    let vit = tiny();
    let d = vit.d_model();
    let sae = identity_sae(d, -2);
    for kind in [HeadKind::ClassifierCls, HeadKind::Segmenter] {
        let h = head(&vit, kind);
        let iv = Intervention::new(&vit, -2, &sae, &h)?;
        let out = iv.run_batch(&images(), Some(&[0, 5]), &[])?;
        for o in &out {
            assert_eq!(o.before, o.after, "{kind:?}: no edit must change nothing");
            assert!(!o.changed());
        }
        // The same as a plain forward pass of the whole model + head.
        let pixels = vit.pixels(&images())?;
        let full = vit.forward(&pixels)?;
        let want: Vec<f32> = h.predict(&vit, &full)?.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = out.iter().flat_map(|o| o.after.clone()).collect();
        assert_eq!(want, got, "{kind:?}");
    }
    // Closed form: with the identity SAE, setting latent j to v on patch q makes coordinate j of
    // patch q equal v (where x_j > 0) and leaves every other number bitwise unchanged.
    let iv = Intervention::new(&vit, -2, &sae, &head(&vit, HeadKind::ClassifierCls))?;
    // One Debug line naming what it is made of; on the CPU no device is named.
    let shown = format!("{iv:?}");
    assert!(
        shown.contains("layer -2") && shown.contains("ClassifierCls") && !shown.contains('\n'),
        "{shown}"
    );
    assert!(iv.device().is_cpu() && !shown.contains(", on "), "{shown}");
    let (q, j, v) = (5usize, 3usize, 7.5f32);
    let (before, after) = iv.edited_tokens(&images(), Some(&[q]), &[Edit::set(j, v)])?;
    // A patch listed twice is one patch: edited once, not moved twice from the same codes.
    let (_, twice) = iv.edited_tokens(&images(), Some(&[q, q]), &[Edit::set(j, v)])?;
    assert_eq!(
        twice.flatten_all()?.to_vec1::<f32>()?,
        after.flatten_all()?.to_vec1::<f32>()?
    );
    let (b, t, dd) = before.dims3()?;
    let x: Vec<f32> = before.flatten_all()?.to_vec1()?;
    let y: Vec<f32> = after.flatten_all()?.to_vec1()?;
    for img in 0..b {
        for tok in 0..t {
            for k in 0..dd {
                let i = (img * t + tok) * dd + k;
                if tok == q + 1 && k == j {
                    let want = x[i] + (v - x[i].max(0.0));
                    assert!(
                        (y[i] - want).abs() <= 1e-5,
                        "edited value {} vs {want}",
                        y[i]
                    );
                } else {
                    assert_eq!(
                        x[i].to_bits(),
                        y[i].to_bits(),
                        "token {tok} dim {k} changed"
                    );
                }
            }
        }
    }
    // An edit that changes the block-L input does change the output.
    let big = iv.run(&images()[0], Some(&[q]), &[Edit::set(j, 1e3)])?;
    assert_ne!(big.before, big.after);
    Ok(())
}

#[test]
fn bad_edits_and_mismatched_saes_are_errors() -> TestResult {
    let vit = tiny();
    let d = vit.d_model();
    let h = head(&vit, HeadKind::ClassifierCls);
    let iv = Intervention::new(&vit, -2, &identity_sae(d, -2), &h)?;
    let img = &images()[0];
    let e = iv.run(img, None, &[Edit::set(d + 3, 1.0)]).err().unwrap();
    assert!(e.to_string().contains(&format!("latent {}", d + 3)), "{e}");
    let e = iv
        .run(img, Some(&[999]), &[Edit::set(0, 1.0)])
        .err()
        .unwrap();
    assert!(e.to_string().contains("patch 999"), "{e}");
    let e = iv.run(img, None, &[Edit::scale_max(0, 2.0)]).err().unwrap();
    assert!(e.to_string().contains("with_features"), "{e}");
    // One latent edited twice in a list: each change is computed from the unedited codes, so
    // setting it to 0 twice would end at minus its value. Refused, naming the latent.
    let e = iv
        .run(
            img,
            None,
            &[Edit::set(4, 0.0), Edit::set(1, 1.0), Edit::set(4, 0.0)],
        )
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("latent 4") && e.to_string().contains("at most once"),
        "{e}"
    );
    // An SAE trained on another layer, or on another backbone.
    let e = Intervention::new(&vit, -1, &identity_sae(d, -2), &h)
        .err()
        .unwrap();
    assert!(e.to_string().contains("layer -2"), "{e}");
    let mut other = identity_sae(d, -2).config().clone();
    other.provenance = serde_json::json!({"layer": -2, "ckpt": "facebook/dinov2-large"});
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
    let z = Tensor::zeros(d, DType::F32, &Device::Cpu)?;
    let sae = Sae::new(other, eye.clone(), z.clone(), eye, z)?;
    let e = Intervention::new(&vit, -2, &sae, &h).err().unwrap();
    assert!(e.to_string().contains("dinov2-large"), "{e}");
    // A head trained on another backbone of the same width: its weights read other features.
    let w = Tensor::randn(0f32, 1.0, (d, 3), &Device::Cpu)?;
    let other_head = Head::from_weights(
        HeadKind::ClassifierCls,
        w,
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
        vec!["a".into(), "b".into(), "c".into()],
        "openai/clip-vit-base-patch16",
    )?;
    let e = Intervention::new(&vit, -2, &identity_sae(d, -2), &other_head)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("head") && e.to_string().contains("clip-vit-base-patch16"),
        "{e}"
    );
    Ok(())
}

#[test]
fn outcomes_render_bars_or_masks() -> TestResult {
    let vit = tiny();
    let d = vit.d_model();
    for (kind, needle) in [
        (HeadKind::ClassifierCls, "<svg"),
        (HeadKind::Segmenter, "<figcaption>after"),
    ] {
        let iv = Intervention::new(&vit, -2, &identity_sae(d, -2), &head(&vit, kind))?;
        let o = iv.run(&images()[1], Some(&[1, 2]), &[Edit::set(0, 5.0)])?;
        let html = o.to_html();
        assert!(
            html.contains("data:image/png;base64,") && html.contains(needle),
            "{kind:?}"
        );
        // Class names are escaped in the bars.
        if kind == HeadKind::ClassifierCls {
            assert!(html.contains("c &lt;d&gt;") && !html.contains("c <d>"));
        }
    }
    Ok(())
}

/// At the last block only the final LayerNorm and the head follow, so a segmenter's output on
/// the edited patch has a closed form: softmax(LN(x') W + b), with x' from the identity SAE's
/// closed form and LN computed here from the checkpoint's weights; every other patch's output
/// is unchanged bitwise (no attention after the edit).
#[test]
fn segmenter_output_after_an_edit_at_the_last_block_has_its_closed_form() -> TestResult {
    let vit = tiny();
    let d = vit.d_model();
    let h = head(&vit, HeadKind::Segmenter);
    let iv = Intervention::new(&vit, -1, &identity_sae(d, -1), &h)?;
    let (q, j, v) = (6usize, 2usize, 4.0f32);
    let img = &images()[0];
    let out = iv.run(img, Some(&[q]), &[Edit::set(j, v)])?;
    let (_, edited) =
        iv.edited_tokens(std::slice::from_ref(img), Some(&[q]), &[Edit::set(j, v)])?;
    let x: Vec<f32> = edited.narrow(1, q + 1, 1)?.flatten_all()?.to_vec1()?;
    let w = saev::candle_core::safetensors::load(
        fixtures().join("tiny-dinov2/model.safetensors"),
        &Device::Cpu,
    )?;
    let g: Vec<f32> = w["layernorm.weight"].to_vec1()?;
    let bb: Vec<f32> = w["layernorm.bias"].to_vec1()?;
    let mean = x.iter().sum::<f32>() / d as f32;
    let var = x.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / d as f32;
    let ln: Vec<f32> = (0..d)
        .map(|k| (x[k] - mean) / (var + 1e-6).sqrt() * g[k] + bb[k])
        .collect();
    let probs = h
        .probs(&Tensor::from_vec(ln, (1, d), &Device::Cpu)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let c = h.classes().len();
    let got = &out.after[q * c..(q + 1) * c];
    for (a, b) in got.iter().zip(&probs) {
        assert!((a - b).abs() < 1e-5, "{got:?} vs {probs:?}");
    }
    assert_ne!(&out.before[q * c..(q + 1) * c], got);
    for p in (0..vit.n_patches()).filter(|&p| p != q) {
        assert_eq!(
            out.before[p * c..(p + 1) * c],
            out.after[p * c..(p + 1) * c],
            "patch {p}"
        );
    }
    Ok(())
}

/// A model with register tokens (HF `Dinov2WithRegistersModel`) through the store pipeline:
/// the store records the registers, resuming from a recorded block gives exactly the whole
/// model's output, and heads and the change-rate test run on it.
#[test]
fn register_model_runs_heads_and_change_rates_from_a_store() -> TestResult {
    use saev::{record::WriterConfig, ActivationStore, Dataset, Features, Residual};
    let dir = std::env::temp_dir().join(format!("saev-iv-reg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("imgs");
    for i in 0..24usize {
        let img = &images()[i % 2];
        let img = img
            .crop_imm((i * 11) as u32, (i * 5) as u32, 180, 150)
            .to_rgb8();
        let p = root
            .join(if i % 2 == 0 { "astronaut" } else { "cat" })
            .join(format!("{i:02}.png"));
        std::fs::create_dir_all(p.parent().unwrap())?;
        img.save(&p)?;
    }
    let reg_dir = fixtures().join("tiny-dinov2-reg");
    let vit = Backbone::from_dir(&reg_dir, &Device::Cpu)?;
    let vit = vit
        .clone()
        .with_preprocess(vit.preprocess().clone().with_size(16));
    assert_eq!(vit.config().num_register_tokens, 3);
    let ds = Dataset::open(&root, None, false)?;
    let cfg = WriterConfig::default().with_batch_size(5);
    let store = ActivationStore::open(saev::record::record_activations(
        &vit,
        &ds,
        dir.join("acts"),
        &cfg,
    )?)?;
    assert_eq!(store.n_registers(), 3);
    // Resume from the store's block -2 (tokens + registers) = the whole model on the image.
    let (t, d) = (store.tokens_per_example(), store.d_model());
    for e in [0usize, 7] {
        let tokens = Tensor::from_slice(store.example(e)?, (1, t, d), &Device::Cpu)?;
        let regs = Tensor::from_slice(store.registers(-2, e)?.unwrap(), (1, 3, d), &Device::Cpu)?;
        let res = Residual::from_recorded(&vit, -2, &tokens, Some(&regs))?;
        let got = vit.forward_from(&res)?;
        let px = vit.pixels(&[ds.get(e)?.image])?;
        let want = vit.forward(&px)?;
        let diff = (got.last_hidden - want.last_hidden)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff <= 1e-5, "example {e}: {diff}");
    }
    // A head trains on it, and the causal test runs with an SAE on the same backbone.
    let (h, acc) =
        Head::train_classifier(&vit, &store, -2, &saev::intervene::HeadConfig::default())?;
    assert!((0.0..=1.0).contains(&acc));
    // The same store said to be CLIP's: shapes agree, the family does not; refused by name.
    let other = dir.join("acts-as-clip");
    common::copy_dir(store.dir(), &other);
    let md = std::fs::read_to_string(other.join("metadata.json"))?;
    std::fs::write(
        other.join("metadata.json"),
        md.replace("\"family\": \"dinov2\"", "\"family\": \"clip\""),
    )?;
    let e = Head::train_classifier(
        &vit,
        &ActivationStore::open(&other)?,
        -2,
        &saev::intervene::HeadConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("clip") && e.contains("acts-as-clip"), "{e}");
    // The same store with its classes named in the other order: the head's class 0 would be
    // scored as the store's class 0, silently. Refused before any run.
    let swapped = dir.join("acts-swapped");
    common::copy_dir(store.dir(), &swapped);
    let mut prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(swapped.join("provenance.json"))?)?;
    assert_eq!(prov["classes"], serde_json::json!(["astronaut", "cat"]));
    prov["classes"] = serde_json::json!(["cat", "astronaut"]);
    std::fs::write(swapped.join("provenance.json"), prov.to_string())?;
    let e = h
        .check_store(&ActivationStore::open(&swapped)?)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("acts-swapped") && e.contains("astronaut, cat"),
        "{e}"
    );
    h.check_store(&store)?;
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
    let z = Tensor::zeros(d, DType::F32, &Device::Cpu)?;
    let sae = Sae::new(
        SaeConfig {
            schema: saev::sae::SAE_SCHEMA,
            d_model: d,
            d_sae: d,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::json!({"layer": -2, "ckpt": reg_dir.display().to_string()}),
        },
        eye.clone(),
        z.clone(),
        eye.clone(),
        z.clone(),
    )?;
    let feats = Features::compute(&sae, &store, -2, &saev::explore::FeatureConfig::default())?;
    let latent = feats.live()[0];
    let iv = Intervention::new(&vit, -2, &sae, &h)?.with_features(&feats);
    let r = iv.change_rates(&store, h.held_out()?, latent, 0, -10.0, 1)?;
    assert!(r.totals[0] + r.totals[1] > 0, "{r}");
    // Another SAE's feature pass (d latents) on an SAE of 2·d latents: its maxima would be read
    // at the wrong latents (and past their end): refused, naming both sizes.
    let mut wide_cfg = sae.config().clone();
    wide_cfg.d_sae = 2 * d;
    let wide = Sae::new(
        wide_cfg,
        Tensor::cat(&[&eye, &eye], 1)?,
        Tensor::zeros(2 * d, DType::F32, &Device::Cpu)?,
        (Tensor::cat(&[&eye, &eye], 0)? * 0.5)?,
        z.clone(),
    )?;
    let e = Intervention::new(&vit, -2, &wide, &h)?
        .with_features(&feats)
        .change_rates(&store, h.held_out()?, 2 * d - 1, 0, -10.0, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{} latents", 2 * d)) && e.contains(&format!("{d} latents")),
        "{e}"
    );

    // The §5 protocol over both classes. With the ReLU "SAE" above, latent i fires on a patch
    // exactly where the recorded value x_i > 0: the F1 choice computed here from the raw store
    // values must be the one the protocol made.
    let (p, c) = (store.n_patches(), 1usize);
    let labels = store.provenance().ok_or("no provenance")?.labels.clone();
    // The same with a TopK SAE without ReLU (a Python import) coding −x, every value kept: a
    // latent fires where its code is positive, x_i < 0 — not wherever it is non-zero.
    let neg = Sae::new(
        SaeConfig {
            activation: SaeActivation::TopK { k: d, relu: false },
            ..sae.config().clone()
        },
        eye.neg()?,
        z.clone(),
        eye.neg()?,
        z.clone(),
    )?;
    let iv_neg = Intervention::new(&vit, -2, &neg, &h)?;
    for (iv, sign) in [(&iv, 1f32), (&iv_neg, -1f32)] {
        for class in 0..2u32 {
            let (mut best, mut best_f1) = (0usize, -1.0f64);
            for i in 0..d {
                let (mut tp, mut fired, mut support) = (0f64, 0f64, 0f64);
                for (e, label) in labels.iter().enumerate() {
                    let x = store.example(e)?;
                    let fires = (0..p).any(|q| sign * x[(c + q) * d + i] > 0.0);
                    let is = *label == Some(class);
                    tp += f64::from(u8::from(fires && is));
                    fired += f64::from(u8::from(fires));
                    support += f64::from(u8::from(is));
                }
                let f1 = 2.0 * tp / (fired + support);
                if f1 > best_f1 {
                    (best, best_f1) = (i, f1);
                }
            }
            let got = &iv.latent_f1(&store, saev::store::Examples::All)?[class as usize];
            assert_eq!(
                (got.class, got.latent),
                (class, best),
                "class {class}, sign {sign}"
            );
            assert!(
                (got.f1 - best_f1).abs() < 1e-12,
                "class {class}, sign {sign}: {} vs {best_f1}",
                got.f1
            );
        }
    }
    let table = iv
        .clone()
        .with_group_by(saev::intervene::GroupBy::Predictions)
        .protocol(&store, saev::store::Examples::All, h.held_out()?, 0.0, 3)?;
    assert_eq!(table.rows.len(), 2, "{table}");
    assert!(
        table
            .to_string()
            .contains("grouped by the head's predictions"),
        "{table}"
    );
    for row in &table.rows {
        assert_eq!(row.rates.mult, 0.0);
        assert!(row.rates.totals[0] + row.rates.totals[1] > 0, "{table}");
    }
    eprintln!("{table}");

    // Cross-model matching: the same SAE with its latents permuted (W_enc = P, W_dec = Pᵀ)
    // codes latent k as the original's perm[k] on every patch, so the one-to-one matching is
    // the permutation, at r = 1.
    let perm: Vec<usize> = (0..d).map(|k| (k * 7 + 3) % d).collect();
    let mut p_enc = vec![0f32; d * d];
    for (k, &i) in perm.iter().enumerate() {
        p_enc[i * d + k] = 1.0;
    }
    let p_t = Tensor::from_vec(p_enc, (d, d), &Device::Cpu)?;
    let permuted = Sae::new(
        SaeConfig {
            schema: saev::sae::SAE_SCHEMA,
            d_model: d,
            d_sae: d,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::json!({"layer": -2}),
        },
        p_t.clone(),
        Tensor::zeros(d, DType::F32, &Device::Cpu)?,
        p_t.t()?.contiguous()?,
        Tensor::zeros(d, DType::F32, &Device::Cpu)?,
    )?;
    let fcfg = saev::explore::FeatureConfig::default();
    let ex_a = saev::Explorer::new(sae.clone(), &store, feats.clone())?;
    let ex_b = saev::Explorer::new(
        permuted.clone(),
        &store,
        Features::compute(&permuted, &store, -2, &fcfg)?,
    )?;
    let m = ex_a.match_latents(&ex_b)?;
    assert_eq!(m.n_images, store.n_examples());
    assert!(m.n_live.0 > 1 && m.n_live.0 == m.n_live.1, "{m}");
    for &(a, b, r) in &m.pairs {
        assert_eq!(perm[b], a, "{m}");
        assert!((r - 1.0).abs() < 1e-4, "{m}");
    }
    assert!((m.mean_r - 1.0).abs() < 1e-4, "{m}");
    // A store of the same count whose provenance lists other images: refused, not correlated.
    let shuffled = dir.join("acts-other-images");
    common::copy_dir(store.dir(), &shuffled);
    let mut prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shuffled.join("provenance.json"))?)?;
    let mut sources = prov["sources"].as_array().ok_or("sources")?.clone();
    sources.reverse();
    prov["sources"] = serde_json::Value::Array(sources);
    std::fs::write(shuffled.join("provenance.json"), prov.to_string())?;
    let other = ActivationStore::open(&shuffled)?;
    let ex_c = saev::Explorer::new(
        permuted.clone(),
        &other,
        Features::compute(&permuted, &other, -2, &fcfg)?,
    )?;
    let e = ex_a.match_latents(&ex_c).unwrap_err().to_string();
    assert!(e.contains("same images") && e.contains("example 0"), "{e}");

    // Downstream fidelity. The clean score is the head's accuracy on the whole model's outputs,
    // computed here image by image from pixels; an exact identity SAE (W_enc = [I, −I],
    // W_dec = [I; −I]: relu(x) − relu(−x) = x) loses nothing.
    let n = store.n_examples();
    let prov = store.provenance().ok_or("no provenance")?;
    let mut hits = 0;
    for e in 0..n {
        let out = vit.forward(&vit.pixels(&[ds.get(e)?.image])?)?;
        let p: Vec<f32> = h.predict(&vit, &out)?.flatten_all()?.to_vec1()?;
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .ok_or("no classes")?;
        hits += usize::from(Some(best as u32) == prov.labels[e]);
    }
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
    let exact = Sae::new(
        SaeConfig {
            schema: saev::sae::SAE_SCHEMA,
            d_model: d,
            d_sae: 2 * d,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::json!({"layer": -2}),
        },
        Tensor::cat(&[&eye, &eye.neg()?], 1)?,
        Tensor::zeros(2 * d, DType::F32, &Device::Cpu)?,
        Tensor::cat(&[&eye, &eye.neg()?], 0)?,
        Tensor::zeros(d, DType::F32, &Device::Cpu)?,
    )?;
    let fid = Intervention::new(&vit, -2, &exact, &h)?.fidelity(&store, (0, n))?;
    assert_eq!(fid.metric, "accuracy");
    assert_eq!(fid.n_examples, n);
    assert_eq!(fid.clean, hits as f64 / n as f64, "{fid}");
    assert_eq!((fid.sae, fid.with_error), (fid.clean, fid.clean), "{fid}");
    assert_eq!(fid.agreement, 1.0, "{fid}");
    assert!((0.0..=1.0).contains(&fid.ablated), "{fid}");
    // The other end: an SAE that always outputs the store's mean patch token (zero weights,
    // b_dec = the mean) scores exactly what mean ablation scores, so it recovers 0.
    let mean = store.norm_stats(-2, saev::store::Tokens::Patches)?.mean;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
    let constant = Sae::new(
        SaeConfig {
            schema: saev::sae::SAE_SCHEMA,
            d_model: d,
            d_sae: 4,
            activation: SaeActivation::Relu,
            norm: None,
            provenance: serde_json::json!({"layer": -2}),
        },
        zeros(&[d, 4])?,
        zeros(&[4])?,
        zeros(&[4, d])?,
        Tensor::from_vec(mean, d, &Device::Cpu)?,
    )?;
    let floor = Intervention::new(&vit, -2, &constant, &h)?.fidelity(&store, (0, n))?;
    assert_eq!(
        (floor.clean, floor.with_error),
        (fid.clean, fid.clean),
        "{floor}"
    );
    assert_eq!(floor.sae, floor.ablated, "{floor}");
    eprintln!("{fid}\n{floor}");

    // `saev train --head`: each trained SAE's fidelity on the head's held-out examples, with the
    // backbone at the store's recorded size (16, not the model's own). The clean score is the
    // head's accuracy from pixels on those examples, and SAE + error is the clean run.
    let head_dir = dir.join("head");
    h.save(&head_dir)?;
    let sweep = dir.join("sweep.json");
    std::fs::write(
        &sweep,
        r#"{"activation": {"kind": "top_k", "k": 4}, "expansion": 2, "batch_size": 16,
            "n_patches": 320, "sweep": [{"lr": 1e-3}, {"lr": 3e-3}], "n_lr_warmup": 0}"#,
    )?;
    let run = dir.join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saev"))
        .env("SAEV_CACHE", dir.join("cache"))
        .arg("train")
        .arg("--store")
        .arg(store.dir())
        .arg("--sweep")
        .arg(&sweep)
        .arg("--out")
        .arg(&run)
        .arg("--head")
        .arg(&head_dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("input size 16"), "{stderr}");
    let held = h.held_out()?.ids(n)?;
    let hits_held = held
        .iter()
        .map(|&e| -> saev::Result<usize> {
            let out = vit.forward(&vit.pixels(&[ds.get(e)?.image])?)?;
            let p: Vec<f32> = h.predict(&vit, &out)?.flatten_all()?.to_vec1()?;
            let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b]));
            Ok(usize::from(best.map(|b| b as u32) == prov.labels[e]))
        })
        .sum::<saev::Result<usize>>()?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("fidelity.json"))?)?;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row["metric"], "accuracy");
        assert_eq!(row["n_examples"], held.len());
        let clean = row["clean"].as_f64().ok_or("clean")?;
        assert_eq!(clean, hits_held as f64 / held.len() as f64, "{row}");
        assert_eq!(row["with_error"].as_f64(), Some(clean), "{row}");
        let agreement = row["agreement"].as_f64().ok_or("agreement")?;
        assert!((0.0..=1.0).contains(&agreement), "{row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Notebook 04's path in a test: a Python saev checkpoint imported beside a register model's
/// store, the feature pass, a grid, and an edit through the rest of the model.
#[test]
fn python_checkpoint_on_a_register_model_explores_and_intervenes() -> TestResult {
    use saev::{record::WriterConfig, ActivationStore, Dataset, Explorer};
    let dir = std::env::temp_dir().join(format!("saev-iv-py-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("imgs");
    for i in 0..20usize {
        let img = images()[i % 2]
            .crop_imm((i * 9) as u32, (i * 4) as u32, 170, 150)
            .to_rgb8();
        let p = root.join(["a", "b"][i % 2]).join(format!("{i:02}.png"));
        std::fs::create_dir_all(p.parent().unwrap())?;
        img.save(&p)?;
    }
    let vit = Backbone::from_dir(fixtures().join("tiny-dinov2-reg"), &Device::Cpu)?;
    let vit = vit
        .clone()
        .with_preprocess(vit.preprocess().clone().with_size(16));
    let ds = Dataset::open(&root, None, false)?;
    let store = ActivationStore::open(saev::record::record_activations(
        &vit,
        &ds,
        dir.join("acts"),
        &WriterConfig::default(),
    )?)?;
    let pt = fixtures().join("../notebook/topk-d32.pt");
    let sae_dir = dir.join("sae");
    let sae = saev::sae::import_python_sae(&pt, &sae_dir, None)?;
    assert_eq!(
        sae.config().activation,
        SaeActivation::TopK { k: 8, relu: false }
    );
    let ex = Explorer::open(&sae_dir, &store)?;
    let latent = ex.features().live()[0];
    let grid = ex.grid(latent, 4)?;
    drop(grid);
    let (probe, _) =
        Head::train_classifier(&vit, &store, -2, &saev::intervene::HeadConfig::default())?;
    let iv = Intervention::new(&vit, -2, ex.sae(), &probe)?.with_features(ex.features());
    let e = ex.features().top(latent)[0].0;
    let out = iv.run(&ex.image(e)?, None, &[Edit::scale_max(latent, -10.0)])?;
    assert_eq!(out.before.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
