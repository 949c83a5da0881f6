//! Python saev `sae.pt` checkpoints (made by torch: `scripts/make_sae_fixtures.py`) read without
//! executing pickle code.

mod common;

use common::{max_diff, TensorExt};

use std::path::{Path, PathBuf};

use common::TestResult;
use saev::candle_core::Device;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sae")
}

fn check(file: &str) -> saev::io::TorchCheckpoint {
    let ckpt = saev::io::read_torch_checkpoint(fixtures().join(file)).unwrap();
    let want =
        saev::candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(ckpt.tensors.len(), 4);
    for (name, t) in &want {
        let (shape, data) = &ckpt.tensors[name];
        assert_eq!(shape.as_slice(), t.dims(), "{file} {name}");
        let w: Vec<f32> = t.flat();
        assert_eq!(data, &w, "{file} {name}");
    }
    ckpt
}

#[test]
fn paper_era_checkpoint() -> TestResult {
    let c = check("paper.pt");
    assert_eq!(c.header["d_vit"], 8);
    assert_eq!(c.header["exp_factor"], 4);
    Ok(())
}

#[test]
fn schema5_checkpoint_with_views_and_offsets() -> TestResult {
    let c = check("schema5.pt");
    assert_eq!(c.header["schema"], 5);
    // The header as the Python saev writes it (this test used to pin an invented
    // `{"activation": {"key": "relu"}}` that the Python loader rejects).
    assert_eq!(c.header["cfg"]["activation"]["params"]["key"], "relu");
    Ok(())
}

#[test]
fn code_in_the_pickle_is_refused_not_run() -> TestResult {
    // Replace the tensor-rebuild global with os.system (same length keeps the zip valid).
    let mut bytes = std::fs::read(fixtures().join("paper.pt"))?;
    let needle = b"torch._utils\n_rebuild_tensor_v2\n";
    let evil = "os\nsystem";
    let dir = std::env::temp_dir().join(format!("saev-evil-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // data.pkl is stored uncompressed by torch, so the bytes are findable in the file.
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("global in the pickle");
    // Keep it a valid GLOBAL line pair: "os\nsystem" padded inside the name line.
    let replacement = format!("{evil}{}\n", " ".repeat(needle.len() - evil.len() - 1));
    bytes.splice(at..at + needle.len(), replacement.bytes());
    let path = dir.join("evil.pt");
    std::fs::write(&path, &bytes)?;
    let err = saev::io::read_torch_checkpoint(&path)
        .unwrap_err()
        .to_string();
    // Either the zip's CRC catches the edit or the pickle reader refuses the global.
    assert!(
        err.contains("refusing to call os.system")
            || err.to_lowercase().contains("crc")
            || err.contains("checksum"),
        "{err}"
    );
    Ok(())
}

#[test]
fn truncated_or_foreign_files_are_named() -> TestResult {
    let dir = std::env::temp_dir().join(format!("saev-badckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bytes = std::fs::read(fixtures().join("paper.pt"))?;
    let p = dir.join("cut.pt");
    std::fs::write(&p, &bytes[..bytes.len() / 2])?;
    let e = saev::io::read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("cut.pt"), "{e}");
    let p = dir.join("text.pt");
    std::fs::write(&p, b"{\"a\": 1}\nnot a zip")?;
    let e = saev::io::read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("text.pt") && e.contains("zip"), "{e}");
    Ok(())
}

/// Closed form of the paper-era encoder, computed here with plain loops from the torch tensors:
/// f = relu((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec.
#[test]
fn imported_paper_sae_encodes_like_the_reference_formula() -> TestResult {
    let want = saev::candle_core::safetensors::load(
        fixtures().join("expected.safetensors"),
        &Device::Cpu,
    )?;
    let v = |n: &str| -> Vec<f32> { want[n].flat() };
    let (w_enc, b_enc, w_dec, b_dec) = (v("W_enc"), v("b_enc"), v("W_dec"), v("b_dec"));
    let (d, s) = (8usize, 32usize);
    let sae = saev::Sae::from_torch(fixtures().join("paper.pt"), None)?;
    assert_eq!((sae.d_model(), sae.d_sae()), (d, s));
    let x: Vec<f32> = (0..3 * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let xt = saev::candle_core::Tensor::from_vec(x.clone(), (3, d), &Device::Cpu)?;
    let f: Vec<f32> = sae.encode(&xt)?.flat();
    let xh: Vec<f32> = sae.decode(&sae.encode(&xt)?)?.flat();
    for r in 0..3 {
        for j in 0..s {
            let mut h = b_enc[j];
            for i in 0..d {
                h += (x[r * d + i] - b_dec[i]) * w_enc[i * s + j];
            }
            assert!((f[r * s + j] - h.max(0.0)).abs() < 1e-5, "f[{r},{j}]");
        }
        for i in 0..d {
            let mut y = b_dec[i];
            for j in 0..s {
                y += f[r * s + j] * w_dec[j * d + i];
            }
            assert!((xh[r * d + i] - y).abs() < 1e-4, "x̂[{r},{i}]");
        }
    }
    // Save / load round trip, and an unknown schema is refused.
    let dir = std::env::temp_dir().join(format!("saev-sae-rt-{}", std::process::id()));
    sae.save(&dir)?;
    let back = saev::Sae::load(&dir)?;
    let f2: Vec<f32> = back.encode(&xt)?.flat();
    assert_eq!(f, f2);
    let js = std::fs::read_to_string(dir.join("sae.json"))?.replacen(
        "\"schema\": 1",
        "\"schema\": 99",
        1,
    );
    std::fs::write(dir.join("sae.json"), js)?;
    assert!(saev::Sae::load(&dir)
        .unwrap_err()
        .to_string()
        .contains("schema"));
    Ok(())
}

#[test]
fn topk_keeps_k_latents() -> TestResult {
    let sae = saev::Sae::from_torch(fixtures().join("schema5.pt"), None)?;
    let cfg = saev::sae::SaeConfig {
        activation: saev::sae::SaeActivation::TopK { k: 3, relu: true },
        ..sae.config().clone()
    };
    let want = saev::candle_core::safetensors::load(
        fixtures().join("expected.safetensors"),
        &Device::Cpu,
    )?;
    let topk = saev::Sae::new(
        cfg,
        want["W_enc"].clone(),
        want["b_enc"].clone(),
        want["W_dec"].clone(),
        want["b_dec"].clone(),
    )?;
    let x = saev::candle_core::Tensor::randn(0f32, 1.0, (5, 8), &Device::Cpu)?;
    let f: Vec<f32> = topk.encode(&x)?.flat();
    for row in f.chunks(32) {
        assert!(row.iter().filter(|&&v| v > 0.0).count() <= 3);
    }
    Ok(())
}

/// Codes and reconstructions of `x` by an imported SAE.
fn run_sae(sae: &saev::Sae, x: &saev::candle_core::Tensor) -> (Vec<f32>, Vec<f32>) {
    let f = sae.encode(x).unwrap();
    let xh = sae.decode(&f).unwrap();
    (f.flat(), xh.flat())
}

/// The Python saev's own checkpoints (written by its `dump` at HEAD, schema 5) and its own
/// forward's outputs: the import reproduces `f_x` and `x_hat` within 1e-5.
#[test]
fn python_saev_head_checkpoints_reproduce_its_forward() -> TestResult {
    let dir = fixtures().join("../sae-head-schema5");
    let want =
        saev::candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let x = &want["x"];
    for name in ["relu", "topk", "batchtopk"] {
        let sae = saev::Sae::from_torch(dir.join(format!("{name}.pt")), None)?;
        assert_eq!((sae.d_model(), sae.d_sae()), (16, 64), "{name}");
        let (f, xh) = run_sae(&sae, x);
        let df = max_diff(&f, &want[&format!("{name}.f_x")].flat());
        let dx = max_diff(&xh, &want[&format!("{name}.x_hat")].flat());
        assert!(df <= 1e-5 && dx <= 1e-5, "{name}: f_x {df}, x_hat {dx}");
        match (name, &sae.config().activation) {
            ("relu", saev::sae::SaeActivation::Relu) => {}
            ("topk", saev::sae::SaeActivation::TopK { k: 4, relu: false }) => {}
            ("batchtopk", saev::sae::SaeActivation::BatchTopK { k: 4, .. }) => {}
            (n, a) => panic!("{n} imported as {a:?}"),
        }
        // Provenance says where it came from; save/load keeps the activation.
        assert_eq!(sae.config().provenance["format"], "schema5");
        let out = std::env::temp_dir().join(format!("saev-imp-{name}-{}", std::process::id()));
        sae.save(&out)?;
        let back = saev::Sae::load(&out)?;
        assert_eq!(back.config().activation, sae.config().activation);
        assert_eq!(run_sae(&back, x).0, f, "{name} after save/load");
        std::fs::remove_dir_all(&out).ok();
    }
    Ok(())
}

/// Every header generation the Python saev has written (`scripts/make_sae_header_fixtures.py`,
/// each header by that era's own `dump`): the import computes what the checkpoint's own code
/// computed — the Python saev at HEAD where it reads the file the same way, the writing era's
/// forward where HEAD differs (paper-era `− b_dec`) or refuses the file — and refuses only what
/// depends on the batch at inference.
#[test]
fn every_python_header_generation_imports_as_its_own_code_computed() -> TestResult {
    let dir = fixtures().join("../sae-headers");
    let head =
        saev::candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let era =
        saev::candle_core::safetensors::load(dir.join("era-reference.safetensors"), &Device::Cpu)?;
    let x = &head["x"];
    // (file, reference: "head" | "era", generation)
    let cases = [
        ("paper", "era", "paper"),
        ("paper-l1", "era", "paper"),
        ("schema1-cls-relu", "era", "schema1"),
        ("schema1-cls-topk", "era", "schema1"),
        ("schema1-config", "head", "schema1"),
        ("schema2-dvit", "era", "schema2"),
        ("schema2", "head", "schema2"),
        ("schema3", "head", "schema3"),
        ("schema3-batchtopk", "era", "schema3"),
        ("schema4", "head", "schema4"),
        ("schema4-batchtopk", "head", "schema4"),
        ("schema4-kind", "head", "schema4"),
        ("schema5-kind", "head", "schema5"),
        ("schema5-auxk-dead-threshold", "era", "schema5"),
        ("schema5-relu", "head", "schema5"),
        ("schema5-topk", "head", "schema5"),
        ("schema5-batchtopk", "head", "schema5"),
        ("schema5-batchtopk-threshold0", "head", "schema5"),
    ];
    for (name, which, generation) in cases {
        let sae = saev::Sae::from_torch(dir.join(format!("{name}.pt")), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((sae.d_model(), sae.d_sae()), (8, 32), "{name}");
        assert_eq!(sae.config().provenance["format"], generation, "{name}");
        let (f, xh) = run_sae(&sae, x);
        let (wf, wx) = match which {
            "head" => (
                head[&format!("{name}.f_x")].flat(),
                head[&format!("{name}.x_hat")].flat(),
            ),
            _ => (
                era[&format!("{name}.era_f_x")].flat(),
                era[&format!("{name}.era_x_hat")].flat(),
            ),
        };
        let (df, dx) = (max_diff(&f, &wf), max_diff(&xh, &wx));
        assert!(df <= 1e-5 && dx <= 1e-5, "{name}: f_x {df}, x_hat {dx}");
    }
    // The TopK of the Python saev keeps negative values (row 0 of x is zero: h = b_enc).
    let topk = saev::Sae::from_torch(dir.join("schema5-topk.pt"), None)?;
    let (f, _) = run_sae(&topk, x);
    assert!(f[..32].iter().any(|&v| v < 0.0), "{:?}", &f[..32]);
    assert_eq!(f[..32].iter().filter(|&&v| v != 0.0).count(), 3);
    // Batch-coupled at inference: refused with the reason.
    let e = saev::Sae::from_torch(dir.join("schema4-absbatchtopk.pt"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("AbsBatchTopK") && e.contains("schema4-absbatchtopk.pt"),
        "{e}"
    );
    Ok(())
}

/// Headers that are not what any Python saev wrote are clear errors naming the field.
#[test]
fn unknown_or_incomplete_headers_are_refused_by_field() -> TestResult {
    let src = std::fs::read(fixtures().join("../sae-headers/schema5-topk.pt"))?;
    let nl = src.iter().position(|&b| b == b'\n').unwrap();
    let header: serde_json::Value = serde_json::from_slice(&src[..nl])?;
    let dir = std::env::temp_dir().join(format!("saev-badhdr-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let with = |h: serde_json::Value, file: &str| -> String {
        let p = dir.join(file);
        let mut bytes = serde_json::to_vec(&h).unwrap();
        bytes.extend_from_slice(&src[nl..]);
        std::fs::write(&p, bytes).unwrap();
        saev::Sae::from_torch(&p, None).unwrap_err().to_string()
    };
    let mut h = header.clone();
    h["schema"] = serde_json::json!(6);
    let e = with(h, "s6.pt");
    assert!(e.contains("schema") && e.contains("s6.pt"), "{e}");
    let mut h = header.clone();
    h["cfg"]["activation"]["params"]
        .as_object_mut()
        .unwrap()
        .remove("top_k");
    let e = with(h, "nok.pt");
    assert!(e.contains("top_k") && e.contains("missing"), "{e}");
    let mut h = header.clone();
    h["cfg"]["activation"]["cls"] = serde_json::json!("JumpRelu");
    let e = with(h, "jr.pt");
    assert!(e.contains("JumpRelu"), "{e}");
    let mut h = header.clone();
    h["cfg"]["activation"]["params"]["key"] = serde_json::json!("relu");
    let e = with(h, "key.pt");
    assert!(e.contains("does not match cls TopK"), "{e}");
    let mut h = header.clone();
    h["cfg"]["d_sae"] = serde_json::json!(64);
    let e = with(h, "wide.pt");
    assert!(e.contains("W_enc") && e.contains("64"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// The checkpoint notebook 04 uses (Python saev HEAD `dump`, d_model 32 for the tiny register
/// model): the import reproduces the Python forward after `load`.
#[test]
fn notebook_checkpoint_reproduces_its_python_forward() -> TestResult {
    let dir = fixtures().join("../notebook");
    let want = saev::candle_core::safetensors::load(
        dir.join("topk-d32.reference.safetensors"),
        &Device::Cpu,
    )?;
    let sae = saev::Sae::from_torch(dir.join("topk-d32.pt"), None)?;
    assert_eq!((sae.d_model(), sae.d_sae()), (32, 128));
    let (f, xh) = run_sae(&sae, &want["x"]);
    let (df, dx) = (
        max_diff(&f, &want["f_x"].flat()),
        max_diff(&xh, &want["x_hat"].flat()),
    );
    assert!(df <= 1e-5 && dx <= 1e-5, "f_x {df}, x_hat {dx}");
    Ok(())
}

/// Imports running at once — two into one directory (Slurm array tasks given one `sae.pt`) and
/// two of dotted names side by side (`layer.10`, `layer.11`, which shared one temp directory)
/// — all succeed, each directory holds its SAE, and no temp directory is left.
#[test]
fn concurrent_imports_do_not_collide() -> TestResult {
    let pt = fixtures().join("../sae-headers/schema5-topk.pt");
    let root = std::env::temp_dir().join(format!("saev-import-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let outs = ["same", "same", "layer.10", "layer.11"].map(|n| root.join(n));
    let pt = &pt;
    std::thread::scope(|s| {
        let jobs: Vec<_> = outs
            .iter()
            .map(|o| s.spawn(move || saev::sae::import_python_sae(pt, o, None)))
            .collect();
        for j in jobs {
            let r = j.join().expect("import thread");
            assert!(r.is_ok(), "{:?}", r.err());
        }
    });
    let mut names: Vec<String> = std::fs::read_dir(&root)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, ["layer.10", "layer.11", "same"]);
    for n in &names {
        saev::Sae::load(root.join(n))?;
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
