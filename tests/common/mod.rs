//! Helpers shared by the end-to-end tests: tensor → numbers without the unwrap chains.

#![allow(dead_code)] // each test crate uses a subset

use saev::candle_core::Tensor;

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

/// max |a − b| / max |b|.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / b.max_abs()
}
