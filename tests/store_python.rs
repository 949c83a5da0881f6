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

/// The layouts the Python saev wrote between June and October 2025 (`scripts/make_store_fixtures.py`
/// names the commits): protocol 1.0.0 and 1.1 (the paper era's names with
/// `max_patches_per_shard` and `shards.json`; 1.1 without a CLS token and with patch labels
/// here), 2.0 (`data` a JSON object) and the 2.1 of 13–14 October (`pixel_agg` null).
#[test]
fn stores_of_the_2025_protocols_read_identically() -> TestResult {
    use saev::store::Layout;
    let (acts, labels) = raw();
    for (dir, layout, cls) in [
        ("v100", Layout::V1, true),
        ("v11", Layout::V1, false),
        ("py20", Layout::V20, true),
        ("py21null", Layout::V21, true),
    ] {
        let store = ActivationStore::open(only_dir(&fixtures().join(dir)))?;
        assert_eq!(store.layout(), layout, "{dir}");
        assert!(!store.is_paper_era());
        assert_eq!(store.metadata().family, "dinov2", "{dir}");
        let t = 4 + usize::from(cls);
        assert_eq!(
            (
                store.n_examples(),
                store.tokens_per_example(),
                store.d_model()
            ),
            (7, t, 8),
            "{dir}"
        );
        for e in 0..7 {
            let got = store.example(e)?;
            for l in 0..2 {
                // The fixture's tokens are [CLS, 4 patches]; without CLS the store has the 4.
                let want = &acts[e * 80 + l * 40 + (5 - t) * 8..e * 80 + (l + 1) * 40];
                assert_eq!(&got[l * t * 8..(l + 1) * t * 8], want, "{dir} example {e}");
            }
        }
        if dir == "v11" {
            for e in 0..7 {
                assert_eq!(store.patch_labels(e).unwrap(), &labels[e * 4..(e + 1) * 4]);
            }
        } else {
            assert!(store.patch_labels(0).is_none(), "{dir}");
        }
        assert!(format!("{store:?}").contains(layout.name()) || layout == Layout::V21);
    }
    // A null pixel_agg is written back as null: the directory name is still the metadata's hash.
    let dir = only_dir(&fixtures().join("py21null"));
    let store = ActivationStore::open(&dir)?;
    assert_eq!(store.metadata().pixel_agg, "");
    assert_eq!(
        dir.file_name().unwrap().to_str().unwrap(),
        store.metadata().hash()
    );
    Ok(())
}

/// A protocol this reader does not know is refused by name, in either family of field names.
#[test]
fn unknown_protocols_are_refused_by_name() -> TestResult {
    for (src, from, to) in [
        ("v100", "\"1.0.0\"", "\"1.7\""),
        ("py20", "\"2.0\"", "\"2.7\""),
    ] {
        let tmp = std::env::temp_dir().join(format!("saev-proto-{}-{src}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for e in std::fs::read_dir(only_dir(&fixtures().join(src)))? {
            let e = e?;
            std::fs::copy(e.path(), tmp.join(e.file_name()))?;
        }
        let md = std::fs::read_to_string(tmp.join("metadata.json"))?;
        assert!(md.contains(from));
        std::fs::write(tmp.join("metadata.json"), md.replace(from, to))?;
        let e = ActivationStore::open(&tmp).unwrap_err().to_string();
        assert!(
            e.contains("protocol") && e.contains(&to[1..4]) && e.contains("metadata.json"),
            "{e}"
        );
        std::fs::remove_dir_all(&tmp)?;
    }
    Ok(())
}

/// The directory that holds a store (what `--out` was) instead of the store: the error says
/// which stores are inside.
#[test]
fn a_root_of_stores_is_named_as_such() {
    let root = fixtures().join("py21");
    let e = ActivationStore::open(&root).unwrap_err().to_string();
    assert!(
        e.contains("directory of stores") && e.contains("feaf74a7"),
        "{e}"
    );
    let e = ActivationStore::open(fixtures()).unwrap_err().to_string();
    assert!(e.contains("not a store (no metadata.json)"), "{e}");
}
