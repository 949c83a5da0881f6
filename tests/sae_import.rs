//! Python saev `sae.pt` checkpoints (made by torch: `scripts/make_sae_fixtures.py`) read without
//! executing pickle code.

mod common;

use common::TensorExt;

use std::path::{Path, PathBuf};

use saev::candle_core::Device;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sae")
}

fn check(file: &str) -> saev::TorchCheckpoint {
    let ckpt = saev::read_torch_checkpoint(fixtures().join(file)).unwrap();
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
fn paper_era_checkpoint() {
    let c = check("paper.pt");
    assert_eq!(c.header["d_vit"], 8);
    assert_eq!(c.header["exp_factor"], 4);
}

#[test]
fn schema5_checkpoint_with_views_and_offsets() {
    let c = check("schema5.pt");
    assert_eq!(c.header["schema"], 5);
    assert_eq!(c.header["cfg"]["activation"]["key"], "relu");
}

#[test]
fn code_in_the_pickle_is_refused_not_run() {
    // Replace the tensor-rebuild global with os.system (same length keeps the zip valid).
    let mut bytes = std::fs::read(fixtures().join("paper.pt")).unwrap();
    let needle = b"torch._utils\n_rebuild_tensor_v2\n";
    let evil = "os\nsystem";
    let dir = std::env::temp_dir().join(format!("saev-evil-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // data.pkl is stored uncompressed by torch, so the bytes are findable in the file.
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("global in the pickle");
    // Keep it a valid GLOBAL line pair: "os\nsystem" padded inside the name line.
    let replacement = format!("{evil}{}\n", " ".repeat(needle.len() - evil.len() - 1));
    bytes.splice(at..at + needle.len(), replacement.bytes());
    let path = dir.join("evil.pt");
    std::fs::write(&path, &bytes).unwrap();
    let err = saev::read_torch_checkpoint(&path).unwrap_err().to_string();
    // Either the zip's CRC catches the edit or the pickle reader refuses the global.
    assert!(
        err.contains("refusing to call os.system")
            || err.to_lowercase().contains("crc")
            || err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn truncated_or_foreign_files_are_named() {
    let dir = std::env::temp_dir().join(format!("saev-badckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(fixtures().join("paper.pt")).unwrap();
    let p = dir.join("cut.pt");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = saev::read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("cut.pt"), "{e}");
    let p = dir.join("text.pt");
    std::fs::write(&p, b"{\"a\": 1}\nnot a zip").unwrap();
    let e = saev::read_torch_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("text.pt") && e.contains("zip"), "{e}");
}

/// Closed form of the paper-era encoder, computed here with plain loops from the torch tensors:
/// f = relu((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec.
#[test]
fn imported_paper_sae_encodes_like_the_reference_formula() {
    let want =
        saev::candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let v = |n: &str| -> Vec<f32> { want[n].flat() };
    let (w_enc, b_enc, w_dec, b_dec) = (v("W_enc"), v("b_enc"), v("W_dec"), v("b_dec"));
    let (d, s) = (8usize, 32usize);
    let sae = saev::Sae::from_torch(&fixtures().join("paper.pt"), None).unwrap();
    assert_eq!((sae.d_model(), sae.d_sae()), (d, s));
    let x: Vec<f32> = (0..3 * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let xt = saev::candle_core::Tensor::from_vec(x.clone(), (3, d), &Device::Cpu).unwrap();
    let f: Vec<f32> = sae.encode(&xt).unwrap().flat();
    let xh: Vec<f32> = sae.decode(&sae.encode(&xt).unwrap()).unwrap().flat();
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
    sae.save(&dir).unwrap();
    let back = saev::Sae::load(&dir).unwrap();
    let f2: Vec<f32> = back.encode(&xt).unwrap().flat();
    assert_eq!(f, f2);
    let js = std::fs::read_to_string(dir.join("sae.json"))
        .unwrap()
        .replacen("\"schema\": 1", "\"schema\": 99", 1);
    std::fs::write(dir.join("sae.json"), js).unwrap();
    assert!(saev::Sae::load(&dir)
        .unwrap_err()
        .to_string()
        .contains("schema"));
}

#[test]
fn topk_keeps_k_latents() {
    let sae = saev::Sae::from_torch(&fixtures().join("schema5.pt"), None).unwrap();
    let cfg = saev::SaeConfig {
        activation: saev::SaeActivation::TopK { k: 3 },
        ..sae.config().clone()
    };
    let want =
        saev::candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let topk = saev::Sae::new(
        cfg,
        want["W_enc"].clone(),
        want["b_enc"].clone(),
        want["W_dec"].clone(),
        want["b_dec"].clone(),
    )
    .unwrap();
    let x = saev::candle_core::Tensor::randn(0f32, 1.0, (5, 8), &Device::Cpu).unwrap();
    let f: Vec<f32> = topk.encode(&x).unwrap().flat();
    for row in f.chunks(32) {
        assert!(row.iter().filter(|&&v| v > 0.0).count() <= 3);
    }
}
