//! Helpers shared by the end-to-end tests: tensor → numbers without the unwrap chains.

#![allow(dead_code)] // each test crate uses a subset

use std::path::{Path, PathBuf};

use saev::candle_core::Tensor;

/// `tests/fixtures`.
pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The Python-written protocol-2.1 store fixture (d_model 8, layers [-2, -1], 7 examples of CLS
/// + 4 patches, shards of 3): its one hash directory under `tests/fixtures/store/py21`.
pub fn py21_store() -> PathBuf {
    std::fs::read_dir(fixtures_root().join("store/py21"))
        .unwrap()
        .next()
        .expect("tests/fixtures/store/py21 holds the store's hash directory")
        .unwrap()
        .path()
}

/// A fresh, empty scratch directory `saev-<name>-<pid>` under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("saev-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copy a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Conveniences on tensors for assertions.
pub trait TensorExt {
    /// All elements, flattened, as f32.
    fn flat(&self) -> Vec<f32>;
    /// max |x|.
    fn max_abs(&self) -> f32;
}

impl TensorExt for Tensor {
    fn flat(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_abs(&self) -> f32 {
        self.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}

/// max |a − b|, asserting equal shapes.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().max_abs()
}

/// max |a − b| over two slices of equal length.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a − b| / max |b|.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / b.max_abs()
}

/// What a test returns: any error fails it with its message (`?` instead of `unwrap()`).
pub type TestResult = Result<(), Box<dyn std::error::Error>>;
