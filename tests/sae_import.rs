//! Python saev `sae.pt` checkpoints (made by torch: `scripts/make_sae_fixtures.py`) read without
//! executing pickle code.

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
        let w: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
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
