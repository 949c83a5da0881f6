//! Stores written by the Python saev's format rules (`scripts/make_store_fixtures.py`): read
//! identically, and reproduced byte for byte by saev's writer from the same activations.

mod common;

use common::TensorExt;

use std::path::{Path, PathBuf};

use common::TestResult;
use saev::candle_core::Device;
use saev::{store::Metadata, store::StoreWriter, ActivationStore};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/store")
}

fn only_dir(p: &Path) -> PathBuf {
    std::fs::read_dir(p)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

fn raw() -> (Vec<f32>, Vec<u8>) {
    let t = saev::candle_core::safetensors::load(fixtures().join("raw.safetensors"), &Device::Cpu)
        .unwrap();
    (
        t["acts"].flat(),
        t["labels"].flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn python_21_store_reads_identically() -> TestResult {
    let (acts, labels) = raw();
    let store = ActivationStore::open(only_dir(&fixtures().join("py21")))?;
    assert!(!store.is_paper_era());
    assert_eq!(
        (
            store.n_examples(),
            store.tokens_per_example(),
            store.d_model()
        ),
        (7, 5, 8)
    );
    assert_eq!(
        store
            .shards()
            .iter()
            .map(|s| s.n_examples)
            .collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    for e in 0..7 {
        assert_eq!(store.example(e)?, &acts[e * 80..(e + 1) * 80]);
        assert_eq!(store.patch_labels(e).unwrap(), &labels[e * 4..(e + 1) * 4]);
    }
    assert_eq!(
        store.patch(-1, 6, 2)?,
        &acts[6 * 80 + (5 + 2) * 8..6 * 80 + (5 + 3) * 8]
    );
    Ok(())
}

#[test]
fn paper_era_store_reads_identically() -> TestResult {
    let (acts, _) = raw();
    let store = ActivationStore::open(only_dir(&fixtures().join("paper")))?;
    assert!(store.is_paper_era());
    assert_eq!(store.metadata().family, "clip");
    for e in 0..7 {
        assert_eq!(store.example(e)?, &acts[e * 80..(e + 1) * 80]);
    }
    Ok(())
}

/// The same layout as the Python saev wrote it between December 2024 and March 2025
/// (`model_family` / `model_ckpt` instead of `vit_family` / `vit_ckpt`).
#[test]
fn feb_2025_store_reads_like_the_paper_era() -> TestResult {
    let (acts, _) = raw();
    let store = ActivationStore::open(only_dir(&fixtures().join("feb2025")))?;
    assert!(store.is_paper_era());
    assert_eq!(store.metadata().family, "clip");
    assert_eq!(store.metadata().ckpt, "ViT-B-16/openai");
    for e in 0..7 {
        assert_eq!(store.example(e)?, &acts[e * 80..(e + 1) * 80]);
    }
    Ok(())
}

#[test]
fn our_writer_reproduces_the_python_store_byte_for_byte() -> TestResult {
    let (acts, labels) = raw();
    let py_dir = only_dir(&fixtures().join("py21"));
    let py = ActivationStore::open(&py_dir)?;
    let md: Metadata = py.metadata().clone();
    let root = std::env::temp_dir().join(format!("saev-pystore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut w = StoreWriter::create(&root, md, None)?;
    // In uneven pieces, as a batched writer would.
    w.write_examples(0, &acts[..2 * 80])?;
    w.write_examples(2, &acts[2 * 80..5 * 80])?;
    w.write_examples(5, &acts[5 * 80..])?;
    w.write_labels(0, &labels)?;
    let ours = w.finish()?;
    assert_eq!(ours.file_name(), py_dir.file_name(), "directory hash");
    let mut names: Vec<_> = std::fs::read_dir(&py_dir)?
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut our_names: Vec<_> = std::fs::read_dir(&ours)?
        .map(|e| e.unwrap().file_name())
        .collect();
    our_names.sort();
    assert_eq!(names, our_names);
    for name in names {
        let a = std::fs::read(py_dir.join(&name))?;
        let b = std::fs::read(ours.join(&name))?;
        assert!(
            a == b,
            "{name:?} differs:\n{}\n{}",
            String::from_utf8_lossy(&a[..a.len().min(400)]),
            String::from_utf8_lossy(&b[..b.len().min(400)])
        );
    }
    // A second create on the same store is refused, not overwritten.
    let md = py.metadata().clone();
    assert!(StoreWriter::create(&root, md, None).is_err());
    Ok(())
}
