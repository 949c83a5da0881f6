//! Vision-transformer configuration: one [`VitConfig`] for every family, read from the Hugging
//! Face `config.json` of `Dinov2Model`, `Dinov2WithRegistersModel`, `CLIPVisionModel` /
//! `CLIPModel` and `SiglipVisionModel` / `SiglipModel`.
//!
//! The HF field names are kept (`hidden_size`, `num_hidden_layers`, …); what differs between
//! families (CLS token, registers, pre-encoder LayerNorm, LayerScale, GELU variant, final norm,
//! checkpoint key prefix) becomes explicit switches, so one ViT implementation serves all.
//!
//! ```no_run
//! let cfg = saev::backbone::VitConfig::from_file("dinov2-small/config.json")?;
//! assert_eq!(cfg.family, saev::backbone::Family::Dinov2);
//! # Ok::<(), saev::Error>(())
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::util::files::read_json;

/// The ViT families saev can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// DINOv2 (HF `Dinov2Model`, `Dinov2WithRegistersModel`).
    Dinov2,
    /// The CLIP vision tower (HF `CLIPVisionModel`).
    Clip,
    /// The SigLIP vision tower (HF `SiglipVisionModel`).
    Siglip,
    /// DINOv3 (HF `DINOv3ViTModel`): rotary position embeddings on the patch tokens, register
    /// ("storage") tokens, LayerScale, plain or gated MLP.
    Dinov3,
}

impl Family {
    /// The name used in store metadata (`"dinov2"`, `"clip"`, `"siglip"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Dinov2 => "dinov2",
            Family::Clip => "clip",
            Family::Siglip => "siglip",
            Family::Dinov3 => "dinov3",
        }
    }
}

/// The MLP non-linearity (HF `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// tanh-approximated GELU (`"gelu_pytorch_tanh"`, `"gelu_new"`).
    GeluTanh,
    /// `x · sigmoid(1.702 x)` (`"quick_gelu"`, OpenAI CLIP).
    QuickGelu,
    /// `x · sigmoid(x)` (`"silu"`; DINOv3's gated MLP).
    Silu,
}

impl HiddenAct {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" | "gelu_python" => Some(HiddenAct::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(HiddenAct::GeluTanh),
            "quick_gelu" => Some(HiddenAct::QuickGelu),
            "silu" | "swish" => Some(HiddenAct::Silu),
            _ => None,
        }
    }
}

/// How position embeddings are resized for an input grid other than the pre-training one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosInterp {
    /// torch `interpolate(size=(h, w), mode="bicubic", align_corners=False)` — HF `Dinov2Model`,
    /// CLIP and SigLIP with `interpolate_pos_encoding=True`.
    Bicubic,
    /// The same with `antialias=True` — HF `Dinov2WithRegistersModel`, timm, OpenCLIP.
    BicubicAntialias,
    /// torch bicubic without antialias called with `scale_factor = (n + 0.1) / G` — the
    /// original DINOv2 repository's models without registers (`interpolate_offset = 0.1`).
    BicubicOffset,
}

/// Everything the ViT needs to know, across families.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Which family (decides checkpoint names and pre/post-processing).
    pub family: Family,
    /// Residual-stream width `d_model`.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Square patch side in pixels.
    pub patch_size: usize,
    /// Pre-training input side in pixels (sets the position-embedding grid).
    pub image_size: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP non-linearity.
    pub hidden_act: HiddenAct,
    /// Whether q/k/v projections have biases.
    pub qkv_bias: bool,
    /// Register tokens (DINOv2 with registers); dropped when recording.
    pub num_register_tokens: usize,
    /// Whether the model has a CLS token (all but SigLIP).
    pub cls_token: bool,
    /// DINOv2 LayerScale after attention and MLP.
    pub layerscale: bool,
    /// CLIP's `pre_layrnorm` before the encoder.
    pub pre_layernorm: bool,
    /// SigLIP's attention-pooling head (`vision_use_head`).
    pub use_head: bool,
    /// How position embeddings are resized.
    pub pos_interp: PosInterp,
    /// Rotary position embeddings on the patch tokens' queries and keys with this base period
    /// (DINOv3's `rope_theta`); None = absolute position embeddings.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Gated MLP `down(act(gate x) ⊙ up x)` (DINOv3 `use_gated_mlp`).
    #[serde(default)]
    pub gated_mlp: bool,
    /// Whether the key projection has a bias (false for DINOv3).
    #[serde(default = "yes")]
    pub key_bias: bool,
    /// Key prefix of the vision tower in the checkpoint (`""`, `"vision_model."`, …); found from
    /// the checkpoint when loading.
    #[serde(default)]
    pub prefix: String,
}

impl VitConfig {
    /// Read a HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json: Value = read_json(path)?;
        Self::from_json(&json, path)
    }

    /// Interpret a HF config JSON value; `path` is used in error messages only.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let p = path.to_path_buf();
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| config_err(&p, "model_type", "missing (is this a HF config.json?)"))?;
        match model_type {
            "dinov2" | "dinov2_with_registers" => dinov2(json, &p, model_type),
            "dinov3_vit" => dinov3(json, &p),
            "clip_vision_model" => clip(json, &p),
            "clip" => clip(sub_config(json, &p)?, &p),
            "siglip_vision_model" => siglip(json, &p),
            "siglip" => siglip(sub_config(json, &p)?, &p),
            other => Err(config_err(
                &p,
                "model_type",
                format!(
                    "unknown architecture `{other}`; saev loads dinov2, dinov2_with_registers, \
                     dinov3_vit, clip, clip_vision_model, siglip, siglip_vision_model"
                ),
            )),
        }
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Side of the pre-training patch grid.
    pub fn grid_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens before the patches: CLS (if any) plus registers.
    pub fn n_prefix_tokens(&self) -> usize {
        usize::from(self.cls_token) + self.num_register_tokens
    }

    /// A tiny random-init config, handy for tests and examples.
    pub fn tiny(family: Family) -> Self {
        let mut cfg = VitConfig {
            family,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            patch_size: 4,
            image_size: 16,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: HiddenAct::Gelu,
            qkv_bias: true,
            num_register_tokens: 0,
            cls_token: true,
            layerscale: true,
            pre_layernorm: false,
            use_head: false,
            pos_interp: PosInterp::Bicubic,
            rope_theta: None,
            gated_mlp: false,
            key_bias: true,
            prefix: String::new(),
        };
        match family {
            Family::Dinov2 => {}
            Family::Clip => {
                cfg.layerscale = false;
                cfg.pre_layernorm = true;
                cfg.hidden_act = HiddenAct::QuickGelu;
                cfg.layer_norm_eps = 1e-5;
            }
            Family::Siglip => {
                cfg.layerscale = false;
                cfg.cls_token = false;
                cfg.hidden_act = HiddenAct::GeluTanh;
                cfg.use_head = true;
            }
            Family::Dinov3 => {
                cfg.num_register_tokens = 4;
                cfg.rope_theta = Some(100.0);
                cfg.key_bias = false;
                cfg.layer_norm_eps = 1e-5;
            }
        }
        cfg
    }
}

fn yes() -> bool {
    true
}

fn config_err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        field: field.into(),
        msg: msg.into(),
    }
}

fn sub_config<'a>(json: &'a Value, path: &Path) -> Result<&'a Value> {
    json.get("vision_config").ok_or_else(|| {
        config_err(
            path,
            "vision_config",
            "missing in a full CLIP/SigLIP config",
        )
    })
}

fn get_usize(json: &Value, path: &Path, field: &str, default: Option<usize>) -> Result<usize> {
    match json.get(field) {
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                config_err(path, field, format!("expected a positive integer, got {v}"))
            }),
        None => default.ok_or_else(|| config_err(path, field, "missing")),
    }
}

fn get_f64(json: &Value, path: &Path, field: &str, default: f64) -> Result<f64> {
    match json.get(field) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| config_err(path, field, format!("expected a number, got {v}"))),
        None => Ok(default),
    }
}

fn get_bool(json: &Value, path: &Path, field: &str, default: bool) -> Result<bool> {
    match json.get(field) {
        Some(v) => v
            .as_bool()
            .ok_or_else(|| config_err(path, field, format!("expected true/false, got {v}"))),
        None => Ok(default),
    }
}

fn get_act(json: &Value, path: &Path, default: &str) -> Result<HiddenAct> {
    let name = match json.get("hidden_act") {
        Some(v) => v
            .as_str()
            .ok_or_else(|| config_err(path, "hidden_act", format!("expected a string, got {v}")))?,
        None => default,
    };
    HiddenAct::parse(name).ok_or_else(|| {
        config_err(
            path,
            "hidden_act",
            format!("unsupported activation `{name}` (gelu, gelu_pytorch_tanh, quick_gelu)"),
        )
    })
}

/// Check what every config must satisfy (heads divide the width, RGB, a usable LayerNorm
/// epsilon, sizes in range), whichever layout it came from.
pub(crate) fn check_heads(cfg: VitConfig, path: &Path) -> Result<VitConfig> {
    let eps = cfg.layer_norm_eps;
    if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
        return Err(config_err(
            path,
            "layer_norm_eps",
            format!("{eps} (expected a small positive number, e.g. 1e-6)"),
        ));
    }
    for (field, v, max) in [
        ("hidden_size", cfg.hidden_size, 1usize << 16),
        ("num_hidden_layers", cfg.num_hidden_layers, 1 << 10),
        ("intermediate_size", cfg.intermediate_size, 1 << 18),
        ("patch_size", cfg.patch_size, 1 << 10),
        ("image_size", cfg.image_size, 1 << 14),
        ("num_register_tokens", cfg.num_register_tokens, 1 << 10),
    ] {
        if v > max || (v == 0 && field != "num_register_tokens") {
            return Err(config_err(
                path,
                field,
                format!("{v} is out of range (1..={max})"),
            ));
        }
    }
    if cfg.image_size < cfg.patch_size {
        return Err(config_err(
            path,
            "image_size",
            format!(
                "{} is smaller than patch_size {}",
                cfg.image_size, cfg.patch_size
            ),
        ));
    }
    if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(config_err(
            path,
            "num_attention_heads",
            format!(
                "{} does not divide hidden_size {}",
                cfg.num_attention_heads, cfg.hidden_size
            ),
        ));
    }
    if cfg.num_channels != 3 {
        return Err(config_err(
            path,
            "num_channels",
            "saev handles RGB (3) only",
        ));
    }
    Ok(cfg)
}

fn dinov2(json: &Value, path: &Path, model_type: &str) -> Result<VitConfig> {
    if get_bool(json, path, "use_swiglu_ffn", false)? {
        return Err(config_err(
            path,
            "use_swiglu_ffn",
            "SwiGLU MLPs (DINOv2-giant) are not supported yet",
        ));
    }
    let hidden_size = get_usize(json, path, "hidden_size", Some(768))?;
    let mlp_ratio = get_f64(json, path, "mlp_ratio", 4.0)?;
    let with_regs = model_type == "dinov2_with_registers";
    let cfg = VitConfig {
        family: Family::Dinov2,
        hidden_size,
        num_hidden_layers: get_usize(json, path, "num_hidden_layers", Some(12))?,
        num_attention_heads: get_usize(json, path, "num_attention_heads", Some(12))?,
        intermediate_size: (hidden_size as f64 * mlp_ratio) as usize,
        patch_size: get_usize(json, path, "patch_size", Some(14))?,
        image_size: get_usize(json, path, "image_size", Some(518))?,
        num_channels: get_usize(json, path, "num_channels", Some(3))?,
        layer_norm_eps: get_f64(json, path, "layer_norm_eps", 1e-6)?,
        hidden_act: get_act(json, path, "gelu")?,
        qkv_bias: get_bool(json, path, "qkv_bias", true)?,
        num_register_tokens: if with_regs {
            get_usize(json, path, "num_register_tokens", Some(4))?
        } else {
            0
        },
        cls_token: true,
        layerscale: true,
        pre_layernorm: false,
        use_head: false,
        pos_interp: if with_regs {
            PosInterp::BicubicAntialias
        } else {
            PosInterp::Bicubic
        },
        rope_theta: None,
        gated_mlp: false,
        key_bias: true,
        prefix: String::new(),
    };
    check_heads(cfg, path)
}

fn clip(json: &Value, path: &Path) -> Result<VitConfig> {
    let cfg = VitConfig {
        family: Family::Clip,
        hidden_size: get_usize(json, path, "hidden_size", Some(768))?,
        num_hidden_layers: get_usize(json, path, "num_hidden_layers", Some(12))?,
        num_attention_heads: get_usize(json, path, "num_attention_heads", Some(12))?,
        intermediate_size: get_usize(json, path, "intermediate_size", Some(3072))?,
        patch_size: get_usize(json, path, "patch_size", Some(32))?,
        image_size: get_usize(json, path, "image_size", Some(224))?,
        num_channels: get_usize(json, path, "num_channels", Some(3))?,
        layer_norm_eps: get_f64(json, path, "layer_norm_eps", 1e-5)?,
        hidden_act: get_act(json, path, "quick_gelu")?,
        qkv_bias: true,
        num_register_tokens: 0,
        cls_token: true,
        layerscale: false,
        pre_layernorm: true,
        use_head: false,
        pos_interp: PosInterp::Bicubic,
        rope_theta: None,
        gated_mlp: false,
        key_bias: true,
        prefix: String::new(),
    };
    check_heads(cfg, path)
}

fn siglip(json: &Value, path: &Path) -> Result<VitConfig> {
    let cfg = VitConfig {
        family: Family::Siglip,
        hidden_size: get_usize(json, path, "hidden_size", Some(768))?,
        num_hidden_layers: get_usize(json, path, "num_hidden_layers", Some(12))?,
        num_attention_heads: get_usize(json, path, "num_attention_heads", Some(12))?,
        intermediate_size: get_usize(json, path, "intermediate_size", Some(3072))?,
        patch_size: get_usize(json, path, "patch_size", Some(16))?,
        image_size: get_usize(json, path, "image_size", Some(224))?,
        num_channels: get_usize(json, path, "num_channels", Some(3))?,
        layer_norm_eps: get_f64(json, path, "layer_norm_eps", 1e-6)?,
        hidden_act: get_act(json, path, "gelu_pytorch_tanh")?,
        qkv_bias: true,
        num_register_tokens: 0,
        cls_token: false,
        layerscale: false,
        pre_layernorm: false,
        use_head: get_bool(json, path, "vision_use_head", true)?,
        pos_interp: PosInterp::Bicubic,
        rope_theta: None,
        gated_mlp: false,
        key_bias: true,
        prefix: String::new(),
    };
    check_heads(cfg, path)
}

/// HF `DINOv3ViTConfig` (`model_type: dinov3_vit`).
fn dinov3(json: &Value, path: &Path) -> Result<VitConfig> {
    for (field, want) in [
        ("query_bias", true),
        ("value_bias", true),
        ("proj_bias", true),
        ("mlp_bias", true),
    ] {
        if get_bool(json, path, field, want)? != want {
            return Err(config_err(
                path,
                field,
                format!(
                    "{} is not supported (released DINOv3 models have {want})",
                    !want
                ),
            ));
        }
    }
    let gated = get_bool(json, path, "use_gated_mlp", false)?;
    let theta = get_f64(json, path, "rope_theta", 100.0)?;
    if !(theta.is_finite() && theta > 0.0) {
        return Err(config_err(
            path,
            "rope_theta",
            format!("{theta} is not a positive number"),
        ));
    }
    let cfg = VitConfig {
        family: Family::Dinov3,
        hidden_size: get_usize(json, path, "hidden_size", Some(384))?,
        num_hidden_layers: get_usize(json, path, "num_hidden_layers", Some(12))?,
        num_attention_heads: get_usize(json, path, "num_attention_heads", Some(6))?,
        intermediate_size: get_usize(json, path, "intermediate_size", Some(1536))?,
        patch_size: get_usize(json, path, "patch_size", Some(16))?,
        image_size: get_usize(json, path, "image_size", Some(224))?,
        num_channels: get_usize(json, path, "num_channels", Some(3))?,
        layer_norm_eps: get_f64(json, path, "layer_norm_eps", 1e-5)?,
        hidden_act: get_act(json, path, if gated { "silu" } else { "gelu" })?,
        qkv_bias: true,
        num_register_tokens: match json.get("num_register_tokens") {
            Some(v) if v.as_u64() == Some(0) => 0,
            _ => get_usize(json, path, "num_register_tokens", Some(4))?,
        },
        cls_token: true,
        layerscale: true,
        pre_layernorm: false,
        use_head: false,
        pos_interp: PosInterp::Bicubic,
        rope_theta: Some(theta),
        gated_mlp: gated,
        key_bias: get_bool(json, path, "key_bias", false)?,
        prefix: String::new(),
    };
    if !cfg.head_dim().is_multiple_of(4) {
        return Err(config_err(
            path,
            "num_attention_heads",
            format!(
                "head width {} is not a multiple of 4 (RoPE needs it)",
                cfg.head_dim()
            ),
        ));
    }
    check_heads(cfg, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<VitConfig> {
        VitConfig::from_json(&v, Path::new("config.json"))
    }

    #[test]
    fn dinov2_small_hub_config() {
        let cfg = parse(json!({
            "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384,
            "num_attention_heads": 6, "num_hidden_layers": 12, "mlp_ratio": 4,
            "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6, "hidden_act": "gelu"
        }))
        .unwrap();
        assert_eq!(cfg.intermediate_size, 1536);
        assert_eq!(cfg.head_dim(), 64);
        assert_eq!(cfg.grid_side(), 37);
        assert_eq!(cfg.n_prefix_tokens(), 1);
    }

    #[test]
    fn clip_full_config_uses_vision_config() {
        let cfg = parse(json!({
            "model_type": "clip",
            "vision_config": {"hidden_size": 768, "patch_size": 16, "intermediate_size": 3072}
        }))
        .unwrap();
        assert_eq!(cfg.family, Family::Clip);
        assert_eq!(cfg.patch_size, 16);
        assert_eq!(cfg.hidden_act, HiddenAct::QuickGelu);
        assert!(cfg.pre_layernorm);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = parse(json!({"model_type": "swin"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json") && err.contains("swin"), "{err}");
    }

    #[test]
    fn bad_heads_rejected() {
        let err =
            parse(json!({"model_type": "dinov2", "hidden_size": 100, "num_attention_heads": 3}))
                .unwrap_err()
                .to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
    }
}
