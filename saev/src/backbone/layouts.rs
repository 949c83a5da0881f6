//! The checkpoint layouts researchers have, read into the one ViT: Hugging Face directories
//! (`model.safetensors`, sharded `model.safetensors.index.json`, `pytorch_model.bin`), the
//! original DINOv2 repository's torch-hub `.pth` (`blocks.N.attn.qkv`, `ls1.gamma`,
//! `register_tokens`; the paper's DINOv2 SAE was trained on `dinov2_vitb14_reg`), timm's
//! `VisionTransformer` (DINOv2 and CLIP variants) and OpenCLIP (`open_clip_config.json` +
//! `open_clip_pytorch_model.bin`: OpenAI CLIP, BioCLIP).
//!
//! Foreign layouts are renamed to the HF keys (fused `qkv` / `in_proj` split into q, k, v) in
//! memory; what differs in behaviour becomes a config switch: position-embedding resizing
//! (timm and OpenCLIP resize with antialiasing, the original DINOv2 without registers with a
//! `+0.1` scale offset), a CLS position folded into the token (timm DINOv2). torch files are read
//! by saev's pickle reader, which never executes code. Key maps: `scripts/make_layout_fixtures.py`
//! and the parity tests in `tests/backbone_layouts.rs`.
//!
//! ```no_run
//! let vit = saev::Backbone::open("dinov2_vitb14_reg4_pretrain.pth")?;   // torch hub weights
//! let clip = saev::Backbone::open("bioclip/")?;                          // open_clip repo
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::config::{check_heads, Family, HiddenAct, PosInterp, VitConfig};
use super::preprocess::{
    Filter, Preprocess, Resize, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
};
use super::weights::CheckedWeights;
use crate::error::{Error, Result};
use crate::util::files::read_json;
use crate::util::torch_load::read_torch_state_dict;

/// A model read from disk: its config, weights under HF keys, and the preprocessing its files
/// describe (None = the family's preset).
pub(crate) struct Opened {
    pub cfg: VitConfig,
    pub weights: CheckedWeights,
    pub preprocess: Option<Preprocess>,
    /// `"hf"`, `"dinov2-hub"`, `"timm"` or `"open_clip"`.
    pub layout: &'static str,
}

fn cfg_err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        field: field.into(),
        msg: msg.into(),
    }
}

/// The weights files saev can read in a model directory, in order of preference.
pub(crate) const HF_WEIGHTS: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// Whether `path` (a directory or a file) looks like a model saev can open.
pub(crate) fn is_model(path: &Path) -> bool {
    if path.is_file() {
        return is_torch_file(path);
    }
    path.join("open_clip_config.json").is_file()
        || (path.join("config.json").is_file() && HF_WEIGHTS.iter().any(|f| path.join(f).is_file()))
        || torch_file_in(path).is_some()
}

fn is_torch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pth" | "pt" | "bin")
    )
}

/// The single `.pth` in a directory (the original DINOv2 layout).
fn torch_file_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("pth"))
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

/// Open a model directory (HF, timm, OpenCLIP, or one holding a DINOv2 `.pth`) or a torch-hub
/// `.pth` file.
pub(crate) fn open(path: &Path, device: &Device) -> Result<Opened> {
    if path.is_file() {
        let sd = load_torch(path, device)?;
        return dinov2_hub(path, sd, None);
    }
    let config = path.join("config.json");
    if path.join("open_clip_config.json").is_file() {
        return open_clip(path, device);
    }
    let json: Option<Value> = if config.is_file() {
        Some(read_json(&config)?)
    } else {
        None
    };
    match json {
        Some(v) if v.get("model_type").is_some() => {
            let mut cfg = VitConfig::from_json(&v, &config)?;
            let weights = hf_weights(path, device)?;
            cfg.prefix = super::find_prefix(&cfg, &weights)?;
            let pp = path.join("preprocessor_config.json");
            let preprocess = if pp.is_file() {
                Some(Preprocess::from_hf_config(&pp)?)
            } else {
                None
            };
            Ok(Opened {
                cfg,
                weights,
                preprocess,
                layout: "hf",
            })
        }
        Some(v) if v.get("architecture").is_some() => timm(path, &v, device),
        Some(v) if v.get("format").and_then(Value::as_str) == Some("dinov2-hub") => {
            let pth = torch_file_in(path)
                .ok_or_else(|| cfg_err(&config, "format", "dinov2-hub, but no single .pth beside it"))?;
            let sd = load_torch(&pth, device)?;
            dinov2_hub(&pth, sd, Some((&v, &config)))
        }
        Some(_) => Err(cfg_err(
            &config,
            "model_type",
            "neither a Hugging Face config (model_type), a timm config (architecture) nor a DINOv2-hub description",
        )),
        None => match torch_file_in(path) {
            Some(pth) => {
                let sd = load_torch(&pth, device)?;
                dinov2_hub(&pth, sd, None)
            }
            None => Err(Error::Io {
                path: config,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json"),
            }),
        },
    }
}

/// HF weights: one safetensors file, a sharded one, or `pytorch_model.bin`.
fn hf_weights(dir: &Path, device: &Device) -> Result<CheckedWeights> {
    let st = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let bin = dir.join("pytorch_model.bin");
    if st.exists() || !(index.exists() || bin.exists()) {
        // The missing-file error names model.safetensors when there is nothing else.
        return CheckedWeights::open(&st);
    }
    if index.exists() {
        return CheckedWeights::open_sharded(&index);
    }
    Ok(CheckedWeights::from_tensors(
        &bin,
        load_torch(&bin, device)?,
    ))
}

/// A torch `state_dict` file as tensors.
fn load_torch(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    read_torch_state_dict(path)?
        .into_iter()
        .map(|(k, (shape, data))| Ok((k, Tensor::from_vec(data, shape.as_slice(), device)?)))
        .collect()
}

/// A safetensors file as tensors.
fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    CheckedWeights::open(path)?;
    candle_core::safetensors::load(path, device).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Take tensor `key` out of `sd`, checking its shape when given.
fn take(
    sd: &mut HashMap<String, Tensor>,
    path: &Path,
    key: &str,
    shape: Option<&[usize]>,
) -> Result<Tensor> {
    let t = sd.remove(key).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        key: key.into(),
    })?;
    if let Some(s) = shape {
        if t.dims() != s {
            return Err(Error::Shape {
                what: format!("{}: tensor `{key}`", path.display()),
                expected: s.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
    }
    Ok(t)
}

fn dims(sd: &HashMap<String, Tensor>, path: &Path, key: &str) -> Result<Vec<usize>> {
    sd.get(key)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            key: key.into(),
        })
}

/// The first dimension of tensor `key` (a weight's output size); a scalar is a shape error.
fn dim0(sd: &HashMap<String, Tensor>, path: &Path, key: &str) -> Result<usize> {
    let d = dims(sd, path, key)?;
    d.first().copied().ok_or_else(|| Error::Shape {
        what: format!("{}: tensor `{key}`", path.display()),
        expected: vec![0, 0],
        actual: d,
    })
}

/// Blocks `0..n` of keys `<prefix>N.…`.
fn count_blocks(sd: &HashMap<String, Tensor>, prefix: &str) -> usize {
    sd.keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// The side of a square patch grid of `n` positions.
fn grid(n: usize, path: &Path, key: &str) -> Result<usize> {
    let g = (n as f64).sqrt().round() as usize;
    if g * g != n || g == 0 {
        return Err(cfg_err(
            path,
            key,
            format!("{n} positions is not a square grid"),
        ));
    }
    Ok(g)
}

fn heads_for(d: usize, given: Option<usize>, path: &Path) -> Result<usize> {
    match given {
        Some(h) if h > 0 && d.is_multiple_of(h) => Ok(h),
        Some(h) => Err(cfg_err(
            path,
            "num_heads",
            format!("{h} does not divide width {d}"),
        )),
        // Every released DINOv2 / ViT-S/B/L has 64-wide heads.
        None if d.is_multiple_of(64) => Ok(d / 64),
        None => Err(cfg_err(
            path,
            "num_heads",
            format!("width {d} is not a multiple of 64; give num_heads in the config"),
        )),
    }
}

/// Split a fused `[3D, D]` projection (and `[3D]` bias) into HF q/k/v under `to`.
fn split_qkv(
    out: &mut HashMap<String, Tensor>,
    to: &str,
    names: [&str; 3],
    w: Tensor,
    b: Option<Tensor>,
    d: usize,
) -> Result<()> {
    for (i, n) in names.iter().enumerate() {
        out.insert(format!("{to}.{n}.weight"), w.narrow(0, i * d, d)?);
        if let Some(b) = &b {
            out.insert(format!("{to}.{n}.bias"), b.narrow(0, i * d, d)?);
        }
    }
    Ok(())
}

/// Move `from.{weight,bias}` to `to.{weight,bias}` (bias optional).
fn mv(
    sd: &mut HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    path: &Path,
    from: &str,
    to: &str,
) -> Result<()> {
    out.insert(
        format!("{to}.weight"),
        take(sd, path, &format!("{from}.weight"), None)?,
    );
    if let Some(b) = sd.remove(&format!("{from}.bias")) {
        out.insert(format!("{to}.bias"), b);
    }
    Ok(())
}

/// Source names of one pre-norm block's tensors (suffixes after `<prefix>N.`) and the HF block
/// they become.
struct BlockNames {
    /// `.weight`/`.bias` pairs: (source, HF).
    moves: [(&'static str, &'static str); 5],
    /// Fused q/k/v weight and bias.
    qkv: (&'static str, &'static str),
    /// HF attention module the q/k/v projections go under.
    attn: &'static str,
    /// LayerScale vectors (source), if the layout has them.
    layerscale: (&'static str, &'static str),
}

/// The original DINOv2 repository's and timm's block layout → HF `Dinov2Model`.
const DINOV2_BLOCK: BlockNames = BlockNames {
    moves: [
        ("norm1", "norm1"),
        ("norm2", "norm2"),
        ("attn.proj", "attention.o_proj"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    ],
    qkv: ("attn.qkv.weight", "attn.qkv.bias"),
    attn: "attention",
    layerscale: ("ls1.gamma", "ls2.gamma"),
};

/// timm's CLIP block → HF `CLIPVisionModel`.
const TIMM_CLIP_BLOCK: BlockNames = BlockNames {
    moves: [
        ("norm1", "layer_norm1"),
        ("norm2", "layer_norm2"),
        ("attn.proj", "self_attn.out_proj"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    ],
    qkv: ("attn.qkv.weight", "attn.qkv.bias"),
    attn: "self_attn",
    layerscale: ("ls1.gamma", "ls2.gamma"),
};

/// OpenCLIP's residual attention block → HF `CLIPVisionModel`.
const OPEN_CLIP_BLOCK: BlockNames = BlockNames {
    moves: [
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    ],
    qkv: ("attn.in_proj_weight", "attn.in_proj_bias"),
    attn: "self_attn",
    layerscale: ("ls_1.gamma", "ls_2.gamma"),
};

/// Map blocks `0..depth` (`from.N.…` → `to.N.…`) by `names`; returns whether every block had
/// LayerScale.
#[allow(clippy::too_many_arguments)] // one call per layout; the names say what each is
fn map_blocks(
    sd: &mut HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    path: &Path,
    depth: usize,
    d: usize,
    from: &str,
    to: &str,
    names: &BlockNames,
) -> Result<bool> {
    let mut layerscale = true;
    for n in 0..depth {
        let (f, t) = (format!("{from}.{n}"), format!("{to}.{n}"));
        for (a, b) in names.moves {
            mv(sd, out, path, &format!("{f}.{a}"), &format!("{t}.{b}"))?;
        }
        let w = take(sd, path, &format!("{f}.{}", names.qkv.0), Some(&[3 * d, d]))?;
        let b = sd.remove(&format!("{f}.{}", names.qkv.1));
        let attn = format!("{t}.{}", names.attn);
        split_qkv(out, &attn, ["q_proj", "k_proj", "v_proj"], w, b, d)?;
        let (l1, l2) = names.layerscale;
        match (
            sd.remove(&format!("{f}.{l1}")),
            sd.remove(&format!("{f}.{l2}")),
        ) {
            (Some(a), Some(b)) => {
                out.insert(format!("{t}.layer_scale1.lambda1"), a);
                out.insert(format!("{t}.layer_scale2.lambda1"), b);
            }
            _ => layerscale = false,
        }
    }
    Ok(layerscale)
}

/// A DINOv2-style block (`blocks.N.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1/2, ls2}`),
/// as in the original repository and timm, to HF `encoder.layer.N`.
fn dinov2_blocks(
    sd: &mut HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    path: &Path,
    depth: usize,
    d: usize,
) -> Result<bool> {
    if (0..depth).any(|n| sd.contains_key(&format!("blocks.{n}.mlp.w12.weight"))) {
        return Err(cfg_err(
            path,
            "ffn_layer",
            "SwiGLU MLPs (DINOv2-giant) are not supported yet",
        ));
    }
    map_blocks(
        sd,
        out,
        path,
        depth,
        d,
        "blocks",
        "encoder.layer",
        &DINOV2_BLOCK,
    )
}

/// The original DINOv2 repository's checkpoint (torch hub). It ships no config: the
/// architecture comes from the weights (heads = width / 64, as in every released DINOv2) unless
/// `args` (DinoVisionTransformer's arguments: `num_heads`, `interpolate_antialias`,
/// `interpolate_offset`, `layer_norm_eps`) says otherwise.
fn dinov2_hub(
    path: &Path,
    mut sd: HashMap<String, Tensor>,
    args: Option<(&Value, &Path)>,
) -> Result<Opened> {
    // Training checkpoints: `teacher.backbone.` / `student.backbone.` prefixes, chunked blocks.
    for prefix in [
        "teacher.backbone.",
        "student.backbone.",
        "backbone.",
        "module.",
    ] {
        if sd.keys().any(|k| k.starts_with(prefix)) && !sd.contains_key("cls_token") {
            sd = sd
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v)))
                .collect();
        }
    }
    sd = sd
        .into_iter()
        .map(|(k, v)| {
            // blocks.<chunk>.<N>.… → blocks.<N>.…
            let parts: Vec<&str> = k.splitn(4, '.').collect();
            if parts.len() == 4
                && parts[0] == "blocks"
                && parts[1].parse::<usize>().is_ok()
                && parts[2].parse::<usize>().is_ok()
            {
                (format!("blocks.{}.{}", parts[2], parts[3]), v)
            } else {
                (k, v)
            }
        })
        .collect();
    let arg_path = args.map_or(path, |a| a.1);
    let arg = |name: &str| args.and_then(|a| a.0.get(name));
    let cls = dims(&sd, path, "cls_token")?;
    let d = *cls.last().unwrap_or(&0);
    let pw = dims(&sd, path, "patch_embed.proj.weight")?;
    if pw.len() != 4 || pw[0] != d {
        return Err(Error::Shape {
            what: format!("{}: tensor `patch_embed.proj.weight`", path.display()),
            expected: vec![d, 3, 14, 14],
            actual: pw,
        });
    }
    let p = pw[2];
    let n_pos = dims(&sd, path, "pos_embed")?.get(1).copied().unwrap_or(0);
    let g = grid(n_pos.saturating_sub(1), path, "pos_embed")?;
    let n_reg = sd
        .get("register_tokens")
        .map_or(0, |t| t.dim(1).unwrap_or(0));
    let depth = count_blocks(&sd, "blocks.");
    let heads = heads_for(
        d,
        arg("num_heads").and_then(Value::as_u64).map(|h| h as usize),
        arg_path,
    )?;
    let inter = dim0(&sd, path, "blocks.0.mlp.fc1.weight")?;
    let eps = arg("layer_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-6);
    let antialias = arg("interpolate_antialias")
        .and_then(Value::as_bool)
        .unwrap_or(n_reg > 0);
    let offset = arg("interpolate_offset")
        .and_then(Value::as_f64)
        .unwrap_or(if n_reg > 0 { 0.0 } else { 0.1 });
    let pos_interp = match (antialias, offset) {
        (true, 0.0) => PosInterp::BicubicAntialias,
        (false, 0.0) => PosInterp::Bicubic,
        (false, o) if (o - 0.1).abs() < 1e-12 => PosInterp::BicubicOffset,
        (a, o) => {
            return Err(cfg_err(
                arg_path,
                "interpolate_offset",
                format!("antialias {a} with offset {o} is not a resizing saev reproduces"),
            ))
        }
    };
    let mut out = HashMap::new();
    out.insert(
        "embeddings.cls_token".into(),
        take(&mut sd, path, "cls_token", Some(&[1, 1, d]))?,
    );
    out.insert(
        "embeddings.position_embeddings".into(),
        take(&mut sd, path, "pos_embed", Some(&[1, 1 + g * g, d]))?,
    );
    if n_reg > 0 {
        out.insert(
            "embeddings.register_tokens".into(),
            take(&mut sd, path, "register_tokens", Some(&[1, n_reg, d]))?,
        );
    }
    mv(
        &mut sd,
        &mut out,
        path,
        "patch_embed.proj",
        "embeddings.patch_embeddings.projection",
    )?;
    let layerscale = dinov2_blocks(&mut sd, &mut out, path, depth, d)?;
    mv(&mut sd, &mut out, path, "norm", "layernorm")?;
    let qkv_bias = out.contains_key("encoder.layer.0.attention.q_proj.bias");
    let cfg = VitConfig {
        family: Family::Dinov2,
        hidden_size: d,
        num_hidden_layers: depth,
        num_attention_heads: heads,
        intermediate_size: inter,
        patch_size: p,
        image_size: g * p,
        num_channels: 3,
        layer_norm_eps: eps,
        hidden_act: HiddenAct::Gelu,
        qkv_bias,
        num_register_tokens: n_reg,
        cls_token: true,
        layerscale,
        pre_layernorm: false,
        use_head: false,
        pos_interp,
        rope_theta: None,
        gated_mlp: false,
        key_bias: true,
        prefix: String::new(),
    };
    Ok(Opened {
        cfg: check_heads(cfg, arg_path)?,
        weights: CheckedWeights::from_tensors(path, out),
        preprocess: None,
        layout: "dinov2-hub",
    })
}

/// A timm `VisionTransformer` saved for the hub (`config.json` with `architecture`,
/// `model_args`, `pretrained_cfg`; `model.safetensors` or `pytorch_model.bin`): the DINOv2
/// (`*_dinov2*`) and CLIP (`*_clip_*`) variants.
fn timm(dir: &Path, v: &Value, device: &Device) -> Result<Opened> {
    let config = dir.join("config.json");
    let arch = v["architecture"].as_str().unwrap_or_default().to_string();
    let st = dir.join("model.safetensors");
    let (wpath, mut sd) = if st.is_file() {
        let sd = load_safetensors(&st, device)?;
        (st, sd)
    } else {
        let bin = dir.join("pytorch_model.bin");
        let sd = load_torch(&bin, device)?;
        (bin, sd)
    };
    let margs = v.get("model_args");
    let num_heads = margs
        .and_then(|m| m.get("num_heads"))
        .and_then(Value::as_u64)
        .map(|h| h as usize);
    let cls = dims(&sd, &wpath, "cls_token")?;
    let d = *cls.last().unwrap_or(&0);
    let pw = dims(&sd, &wpath, "patch_embed.proj.weight")?;
    let p = *pw.get(2).unwrap_or(&0);
    let depth = count_blocks(&sd, "blocks.");
    let heads = heads_for(d, num_heads, &config)?;
    let inter = dim0(&sd, &wpath, "blocks.0.mlp.fc1.weight")?;
    let n_pos = dims(&sd, &wpath, "pos_embed")?.get(1).copied().unwrap_or(0);
    let mut out = HashMap::new();
    let (family, n_reg, g, eps, act, pre_ln, layerscale) = if arch.contains("dinov2") {
        let n_reg = sd.get("reg_token").map_or(0, |t| t.dim(1).unwrap_or(0));
        let pos = take(&mut sd, &wpath, "pos_embed", None)?;
        // `no_embed_class`: the CLS position is folded into the token; a zero row stands for it.
        let (g, pos) = match grid(n_pos, &wpath, "pos_embed") {
            Ok(g) => (
                g,
                Tensor::cat(&[pos.narrow(1, 0, 1)?.zeros_like()?, pos], 1)?,
            ),
            Err(_) => (grid(n_pos - 1, &wpath, "pos_embed")?, pos),
        };
        out.insert("embeddings.position_embeddings".into(), pos);
        out.insert(
            "embeddings.cls_token".into(),
            take(&mut sd, &wpath, "cls_token", Some(&[1, 1, d]))?,
        );
        if n_reg > 0 {
            out.insert(
                "embeddings.register_tokens".into(),
                take(&mut sd, &wpath, "reg_token", Some(&[1, n_reg, d]))?,
            );
        }
        mv(
            &mut sd,
            &mut out,
            &wpath,
            "patch_embed.proj",
            "embeddings.patch_embeddings.projection",
        )?;
        let ls = dinov2_blocks(&mut sd, &mut out, &wpath, depth, d)?;
        mv(&mut sd, &mut out, &wpath, "norm", "layernorm")?;
        (Family::Dinov2, n_reg, g, 1e-6, HiddenAct::Gelu, false, ls)
    } else if arch.contains("clip") {
        let g = grid(n_pos.saturating_sub(1), &wpath, "pos_embed")?;
        if sd.contains_key("patch_embed.proj.bias") {
            return Err(cfg_err(
                &config,
                "architecture",
                "a CLIP patch embedding with a bias is not the CLIP layout",
            ));
        }
        out.insert(
            "embeddings.class_embedding".into(),
            take(&mut sd, &wpath, "cls_token", Some(&[1, 1, d]))?.reshape(d)?,
        );
        out.insert(
            "embeddings.position_embedding.weight".into(),
            take(&mut sd, &wpath, "pos_embed", Some(&[1, 1 + g * g, d]))?.squeeze(0)?,
        );
        out.insert(
            "embeddings.patch_embedding.weight".into(),
            take(&mut sd, &wpath, "patch_embed.proj.weight", None)?,
        );
        mv(&mut sd, &mut out, &wpath, "norm_pre", "pre_layrnorm")?;
        let ls = map_blocks(
            &mut sd,
            &mut out,
            &wpath,
            depth,
            d,
            "blocks",
            "encoder.layers",
            &TIMM_CLIP_BLOCK,
        )?;
        mv(&mut sd, &mut out, &wpath, "norm", "post_layernorm")?;
        let act = if arch.contains("quickgelu") {
            HiddenAct::QuickGelu
        } else {
            HiddenAct::Gelu
        };
        (Family::Clip, 0, g, 1e-5, act, true, ls)
    } else {
        return Err(cfg_err(
            &config,
            "architecture",
            format!("timm `{arch}`: saev reads timm's DINOv2 (*_dinov2*) and CLIP (*_clip_*) ViTs"),
        ));
    };
    let qkv_bias = out.keys().any(|k| k.ends_with("q_proj.bias"));
    let cfg = VitConfig {
        family,
        hidden_size: d,
        num_hidden_layers: depth,
        num_attention_heads: heads,
        intermediate_size: inter,
        patch_size: p,
        image_size: g * p,
        num_channels: 3,
        layer_norm_eps: eps,
        hidden_act: act,
        qkv_bias,
        num_register_tokens: n_reg,
        cls_token: true,
        layerscale,
        pre_layernorm: pre_ln,
        use_head: false,
        // timm's resample_abs_pos_embed: bicubic with antialias.
        pos_interp: PosInterp::BicubicAntialias,
        rope_theta: None,
        gated_mlp: false,
        key_bias: true,
        prefix: String::new(),
    };
    let preprocess = timm_preprocess(v.get("pretrained_cfg"), &config, g * p)?;
    Ok(Opened {
        cfg: check_heads(cfg, &config)?,
        weights: CheckedWeights::from_tensors(&wpath, out),
        preprocess: Some(preprocess),
        layout: "timm",
    })
}

fn triple(v: Option<&Value>, default: [f32; 3]) -> [f32; 3] {
    match v.and_then(Value::as_array).map(Vec::as_slice) {
        Some([a, b, c]) => [a, b, c].map(|x| x.as_f64().unwrap_or(f64::NAN) as f32),
        _ => default,
    }
}

/// timm's eval transform: resize the shortest side to `floor(size / crop_pct)`, centre crop.
fn timm_preprocess(pc: Option<&Value>, config: &Path, native: usize) -> Result<Preprocess> {
    let pc = pc.cloned().unwrap_or(Value::Null);
    let size = pc
        .get("input_size")
        .and_then(Value::as_array)
        .and_then(|a| a.get(1))
        .and_then(Value::as_u64)
        .map_or(native, |s| s as usize);
    let crop_pct = pc.get("crop_pct").and_then(Value::as_f64).unwrap_or(0.875);
    if !(0.1..=1.0).contains(&crop_pct) {
        return Err(cfg_err(
            config,
            "pretrained_cfg.crop_pct",
            format!("{crop_pct} is not in 0.1..=1"),
        ));
    }
    let filter = match pc
        .get("interpolation")
        .and_then(Value::as_str)
        .unwrap_or("bicubic")
    {
        "bicubic" => Filter::Bicubic,
        "bilinear" => Filter::Bilinear,
        other => {
            return Err(cfg_err(
                config,
                "pretrained_cfg.interpolation",
                format!("{other:?} (bicubic or bilinear)"),
            ))
        }
    };
    match pc
        .get("crop_mode")
        .and_then(Value::as_str)
        .unwrap_or("center")
    {
        "center" => {}
        other => {
            return Err(cfg_err(
                config,
                "pretrained_cfg.crop_mode",
                format!("{other:?} (center only)"),
            ))
        }
    }
    Ok(Preprocess {
        resize: Resize::ShortestEdge((size as f64 / crop_pct).floor() as usize),
        crop: Some((size, size)),
        filter,
        mean: triple(pc.get("mean"), IMAGENET_MEAN),
        std: triple(pc.get("std"), IMAGENET_STD),
    })
}

/// An OpenCLIP repository: `open_clip_config.json` (`model_cfg.vision_cfg`, `quick_gelu`,
/// `preprocess_cfg`) and `open_clip_pytorch_model.bin` / `open_clip_model.safetensors` (the
/// whole CLIP state dict; the vision tower is under `visual.`).
fn open_clip(dir: &Path, device: &Device) -> Result<Opened> {
    let config = dir.join("open_clip_config.json");
    let v: Value = read_json(&config)?;
    let mc = v
        .get("model_cfg")
        .ok_or_else(|| cfg_err(&config, "model_cfg", "missing"))?;
    let vc = mc
        .get("vision_cfg")
        .ok_or_else(|| cfg_err(&config, "model_cfg.vision_cfg", "missing"))?;
    if vc.get("timm_model_name").is_some_and(|t| !t.is_null()) {
        return Err(cfg_err(
            &config,
            "model_cfg.vision_cfg.timm_model_name",
            "OpenCLIP towers built from timm are not supported; the ViT layout is",
        ));
    }
    let st = dir.join("open_clip_model.safetensors");
    let (wpath, sd) = if st.is_file() {
        let sd = load_safetensors(&st, device)?;
        (st, sd)
    } else {
        let bin = dir.join("open_clip_pytorch_model.bin");
        let sd = load_torch(&bin, device)?;
        (bin, sd)
    };
    let mut sd: HashMap<String, Tensor> = sd
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("visual.")?.to_string(), t)))
        .collect();
    let num = |key: &str| vc.get(key).and_then(Value::as_u64).map(|n| n as usize);
    let d =
        num("width").ok_or_else(|| cfg_err(&config, "model_cfg.vision_cfg.width", "missing"))?;
    let depth =
        num("layers").ok_or_else(|| cfg_err(&config, "model_cfg.vision_cfg.layers", "missing"))?;
    let head_width = num("head_width").unwrap_or(64);
    let p = num("patch_size")
        .ok_or_else(|| cfg_err(&config, "model_cfg.vision_cfg.patch_size", "missing"))?;
    let image = num("image_size").unwrap_or(224);
    if depth == 0 || head_width == 0 || d % head_width != 0 || p == 0 || image % p != 0 {
        return Err(cfg_err(
            &config,
            "model_cfg.vision_cfg",
            format!(
                "layers {depth}, width {d}, head_width {head_width}, patch {p}, image {image} do not fit"
            ),
        ));
    }
    let g = image / p;
    let mut out = HashMap::new();
    out.insert(
        "embeddings.class_embedding".into(),
        take(&mut sd, &wpath, "class_embedding", Some(&[d]))?,
    );
    out.insert(
        "embeddings.position_embedding.weight".into(),
        take(
            &mut sd,
            &wpath,
            "positional_embedding",
            Some(&[1 + g * g, d]),
        )?,
    );
    out.insert(
        "embeddings.patch_embedding.weight".into(),
        take(&mut sd, &wpath, "conv1.weight", Some(&[d, 3, p, p]))?,
    );
    mv(&mut sd, &mut out, &wpath, "ln_pre", "pre_layrnorm")?;
    let layerscale = map_blocks(
        &mut sd,
        &mut out,
        &wpath,
        depth,
        d,
        "transformer.resblocks",
        "encoder.layers",
        &OPEN_CLIP_BLOCK,
    )?;
    mv(&mut sd, &mut out, &wpath, "ln_post", "post_layernorm")?;
    let inter = out["encoder.layers.0.mlp.fc1.weight"].dim(0)?;
    let quick = mc
        .get("quick_gelu")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let cfg = VitConfig {
        family: Family::Clip,
        hidden_size: d,
        num_hidden_layers: depth,
        num_attention_heads: d / head_width,
        intermediate_size: inter,
        patch_size: p,
        image_size: image,
        num_channels: 3,
        layer_norm_eps: 1e-5,
        hidden_act: if quick {
            HiddenAct::QuickGelu
        } else {
            HiddenAct::Gelu
        },
        qkv_bias: out.contains_key("encoder.layers.0.self_attn.q_proj.bias"),
        num_register_tokens: 0,
        cls_token: true,
        layerscale,
        pre_layernorm: true,
        use_head: false,
        // open_clip's resize_pos_embed: bicubic with antialias.
        pos_interp: PosInterp::BicubicAntialias,
        rope_theta: None,
        gated_mlp: false,
        key_bias: true,
        prefix: String::new(),
    };
    let pc = v.get("preprocess_cfg").cloned().unwrap_or(Value::Null);
    let resize = match pc
        .get("resize_mode")
        .and_then(Value::as_str)
        .unwrap_or("shortest")
    {
        "shortest" => Resize::ShortestEdge(image),
        "squash" => Resize::Exact {
            height: image,
            width: image,
        },
        other => {
            return Err(cfg_err(
                &config,
                "preprocess_cfg.resize_mode",
                format!("{other:?} (shortest or squash)"),
            ))
        }
    };
    let filter = match pc
        .get("interpolation")
        .and_then(Value::as_str)
        .unwrap_or("bicubic")
    {
        "bicubic" => Filter::Bicubic,
        "bilinear" => Filter::Bilinear,
        other => {
            return Err(cfg_err(
                &config,
                "preprocess_cfg.interpolation",
                format!("{other:?} (bicubic or bilinear)"),
            ))
        }
    };
    let preprocess = Preprocess {
        crop: matches!(resize, Resize::ShortestEdge(_)).then_some((image, image)),
        resize,
        filter,
        mean: triple(pc.get("mean"), CLIP_MEAN),
        std: triple(pc.get("std"), CLIP_STD),
    };
    Ok(Opened {
        cfg: check_heads(cfg, &config)?,
        weights: CheckedWeights::from_tensors(&wpath, out),
        preprocess: Some(preprocess),
        layout: "open_clip",
    })
}
