//! The checkpoint layouts researchers have, against the libraries that define them (fixtures
//! from `scripts/make_layout_fixtures.py`, tiny random models, outputs from each library's own
//! forward): the original DINOv2 repository's torch-hub `.pth` (with and without registers),
//! timm's DINOv2 and CLIP ViTs, OpenCLIP, and HF checkpoints sharded or saved as
//! `pytorch_model.bin`. Every block output and the pooled output within 1e-4, at the native size
//! and (where the library resizes position embeddings) at a non-square size.

mod common;

use common::max_abs_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::TestResult;
use saev::candle_core::{Device, Tensor};
use saev::{backbone::Family, Backbone};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/layouts")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    saev::candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Block outputs and pooled output of `vit` against the library's own on `sizes`.
fn check(vit: &Backbone, io_dir: &Path, sizes: &[&str], what: &str) {
    let io = load(&io_dir.join("io.safetensors"));
    for size in sizes {
        let px = &io[&format!("{size}.pixel_values")];
        let states = vit.hidden_states(px).unwrap();
        let d = max_abs_diff(&states[0], &io[&format!("{size}.embed")]);
        assert!(d <= 1e-4, "{what} {size} embeddings: {d}");
        for i in 0..vit.n_layers() {
            let d = max_abs_diff(&states[i + 1], &io[&format!("{size}.hidden.{i}")]);
            assert!(d <= 1e-4, "{what} {size} block {i}: {d}");
        }
        let out = vit.forward(px).unwrap();
        let d = max_abs_diff(out.pooled.as_ref().unwrap(), &io[&format!("{size}.pooled")]);
        assert!(d <= 1e-4, "{what} {size} pooled: {d}");
    }
}

#[test]
fn original_dinov2_hub_checkpoints_match_the_dinov2_repository() -> TestResult {
    for (dir, n_reg) in [("dinov2-hub-reg", 4usize), ("dinov2-hub", 0)] {
        // A directory with the .pth and the arguments of the tiny model (4 heads of 8).
        let vit = Backbone::from_dir(fixtures().join(dir), &Device::Cpu)?;
        assert_eq!(vit.layout(), "dinov2-hub");
        assert_eq!(vit.family(), Family::Dinov2);
        assert_eq!(vit.config().num_register_tokens, n_reg);
        assert_eq!(vit.config().num_attention_heads, 4);
        // "resized" exercises the position-embedding resize: antialiased with registers, the
        // +0.1 scale offset without.
        check(&vit, &fixtures().join(dir), &["native", "resized"], dir);
    }
    // The bare .pth (no config, as torch hub ships it): the architecture is read from the
    // weights, heads = width / 64 — 32 wide here, so it asks for num_heads.
    let e = Backbone::open(
        fixtures()
            .join("dinov2-hub-reg/model.pth")
            .to_str()
            .unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("num_heads") && e.contains("64"), "{e}");
    Ok(())
}

#[test]
fn timm_dinov2_and_clip_vits_match_timm() -> TestResult {
    for (dir, family, n_reg) in [
        ("timm-vit/reg4-dinov2", Family::Dinov2, 4usize),
        ("timm-vit/clip-quickgelu", Family::Clip, 0),
    ] {
        let vit = Backbone::open(fixtures().join(dir).to_str().unwrap())?;
        assert_eq!(vit.layout(), "timm");
        assert_eq!(
            (vit.family(), vit.config().num_register_tokens),
            (family, n_reg)
        );
        check(&vit, &fixtures().join(dir), &["native", "resized"], dir);
    }
    Ok(())
}

#[test]
fn open_clip_vision_tower_matches_open_clip() -> TestResult {
    let vit = Backbone::open(fixtures().join("open_clip").to_str().unwrap())?;
    assert_eq!(vit.layout(), "open_clip");
    assert_eq!(vit.family(), Family::Clip);
    assert_eq!(vit.config().num_attention_heads, 4); // width 32 / head_width 8
    check(
        &vit,
        &fixtures().join("open_clip"),
        &["native"],
        "open_clip",
    );
    // Preprocessing from open_clip_config.json: shortest side to 64, centre crop, OpenAI stats.
    assert_eq!(vit.input_size(), (64, 64));
    assert_eq!(vit.preprocess().mean, saev::backbone::CLIP_MEAN);
    // A config with zero layers or a zero head width is refused by name (it used to panic on
    // a division by zero or a missing block).
    for (field, value) in [("head_width", 0), ("layers", 0)] {
        let tmp = std::env::temp_dir().join(format!("saev-oc-{field}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        for f in ["open_clip_config.json", "open_clip_pytorch_model.bin"] {
            std::fs::copy(fixtures().join("open_clip").join(f), tmp.join(f))?;
        }
        let cfg = tmp.join("open_clip_config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg)?)?;
        v["model_cfg"]["vision_cfg"][field] = value.into();
        std::fs::write(&cfg, v.to_string())?;
        let e = Backbone::from_dir(&tmp, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("open_clip_config.json") && e.contains(&format!("{field} 0")),
            "{e}"
        );
        std::fs::remove_dir_all(&tmp)?;
    }
    Ok(())
}

#[test]
fn sharded_and_pytorch_bin_hf_checkpoints_load_like_safetensors() -> TestResult {
    let io = load(&fixtures().join("../backbone/tiny-dinov2/io.safetensors"));
    let px = &io["native.pixel_values"];
    for dir in ["hf-formats/sharded", "hf-formats/bin"] {
        let vit = Backbone::open(fixtures().join(dir).to_str().unwrap())?;
        let states = vit.hidden_states(px)?;
        for (i, s) in states.iter().enumerate() {
            let d = max_abs_diff(s, &io[&format!("native.hidden_states.{i}")]);
            assert!(d <= 1e-4, "{dir} hidden_states[{i}]: {d}");
        }
    }
    // A shard named in the index but missing is named.
    let tmp = std::env::temp_dir().join(format!("saev-shards-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
    ] {
        std::fs::copy(fixtures().join("hf-formats/sharded").join(f), tmp.join(f))?;
    }
    let e = Backbone::from_dir(&tmp, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// DINOv3 (HF `DINOv3ViTModel`: rotary embeddings on the patch tokens, four register tokens,
/// key without bias, plain GELU or gated SiLU MLP) against transformers, at the native size and
/// on a non-square grid (RoPE needs no resizing).
#[test]
fn dinov3_matches_transformers() -> TestResult {
    for dir in ["dinov3", "dinov3-gated"] {
        let vit = Backbone::open(fixtures().join(dir).to_str().unwrap())?;
        assert_eq!(vit.family(), Family::Dinov3);
        assert_eq!(vit.config().num_register_tokens, 4);
        check(&vit, &fixtures().join(dir), &["native", "resized"], dir);
        // Resuming from a recorded block (tokens + registers) gives the whole model's output.
        let io = load(&fixtures().join(dir).join("io.safetensors"));
        let px = &io["native.pixel_values"];
        let vit = vit
            .clone()
            .with_preprocess(vit.preprocess().clone().with_size(64));
        let (acts, regs) = vit.record_with_registers(px, &[0])?;
        let res = saev::Residual::from_recorded(
            &vit,
            0,
            &acts.squeeze(1)?,
            Some(&regs.unwrap().squeeze(1)?),
        )?;
        let a = vit.forward_from(&res)?.pooled.unwrap();
        let b = vit.forward(px)?.pooled.unwrap();
        assert!(max_abs_diff(&a, &b) <= 1e-5, "{dir}");
    }
    Ok(())
}
