//! What a Python saev `sae.pt` header means: every generation the Python loader has read, mapped
//! to saev's [`SaeActivation`] with the forward that checkpoint's own code computed.
//!
//! Generations (facts from the Python saev's history; fixtures in `tests/fixtures/sae-headers`,
//! written by each era's own `dump`):
//!
//! | header | era | encoder | activation |
//! |---|---|---|---|
//! | no `schema` (`d_vit`, `exp_factor`, …) | PyPI 0.1.0 = the paper, to Apr 2025 | `(x − b_dec) W_enc + b_enc` | ReLU |
//! | `schema: 1`, `"cls": "Relu" / "TopK" / "BatchTopK"`, cfg with `d_vit` | Apr–Jul 2025 | minus `b_dec` before saev@e7ca004 | per `cls`, `top_k` in cfg |
//! | `schema: 1`, `"cls": "SparseAutoencoderConfig"` + activation dict | — | `x W_enc + b_enc` | the dict |
//! | `schema: 2–4` (`d_vit` or `d_model`, `exp_factor` or `d_sae`) | Jul–Nov 2025 | `x W_enc + b_enc` | `{"cls", "params"}` |
//! | `schema: 5` (`{"cls", "params": {"key", …}}`, nested) | Nov 2025 → today | `x W_enc + b_enc` | the dict |
//!
//! Activation dicts name `Relu`, `TopK` or `BatchTopK`; a legacy `"kind"` means `"key"`. The
//! Python TopK keeps the k largest pre-activations **without a ReLU** (codes can be negative):
//! imported TopK SAEs do the same (`relu: false`), while saev's own TopK applies a ReLU. The
//! Python BatchTopK keeps `h > threshold` (strictly; `h > 0` when threshold ≤ 0) with the
//! `activation.threshold` buffer of the state dict; saev's BatchTopK keeps `h ≥ threshold`, so the
//! imported threshold is the next float above the stored one — the same codes, bit for bit.
//! BatchTopK files written before that buffer existed coded each row with its own top-k (the
//! Python saev from Sep to Nov 2025), and import as TopK; those of the batch-coupled eras
//! (schema 1, saev@8d38c23, saev@b94e5ea) and `AbsBatchTopK` depend on the batch at inference
//! and are refused. Anything else is an error naming the field, never a default.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::model::SaeActivation;
use crate::error::{Error, Result};

/// A header, understood.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PyHeader {
    /// Input width.
    pub d_model: usize,
    /// Dictionary size.
    pub d_sae: usize,
    /// The activation the checkpoint's code applied.
    pub activation: SaeActivation,
    /// Whether the encoder computed `(x − b_dec) W_enc + b_enc` (folded into `b_enc` on import).
    pub subtract_b_dec: bool,
    /// Which generation (for provenance): `"paper"`, `"schema1"`, … `"schema5"`.
    pub generation: String,
    /// Anything the user should know about how it was read.
    pub notes: Vec<String>,
}

/// saev commits from saev@e7ca004 ("don't remove decoder bias") to the first schema-2 commit:
/// schema-1 files written by these do not subtract `b_dec`.
const S1_NO_BDEC_SUBTRACTION: &[&str] = &[
    "e7ca004", "ab690dc", "fad9929", "795479b", "5056de4", "9f39cf8", "6845bc2", "5fee417",
    "ea2c9f5", "8aecac1", "f5d892c", "65c5a2b",
];

/// Commits whose BatchTopK (without a threshold buffer) coded the whole batch jointly.
const BATCH_COUPLED_BATCHTOPK: &[&str] = &["8d38c23", "b94e5ea"];

fn err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        field: field.into(),
        msg: msg.into(),
    }
}

fn positive(v: &Value, path: &Path, field: &str) -> Result<usize> {
    v.as_u64()
        .filter(|&n| n > 0 && n <= 1 << 31)
        .map(|n| n as usize)
        .ok_or_else(|| err(path, field, format!("{v} is not a positive integer")))
}

/// `(d_model, d_sae)` from a cfg object: `d_model` or `d_vit`, and `d_sae` or `exp_factor`.
fn widths(cfg: &Value, path: &Path, prefix: &str) -> Result<(usize, usize)> {
    let f = |name: &str| format!("{prefix}{name}");
    let d = match (cfg.get("d_model"), cfg.get("d_vit")) {
        (Some(d), None) => positive(d, path, &f("d_model"))?,
        (None, Some(d)) => positive(d, path, &f("d_vit"))?,
        (Some(_), Some(_)) => return Err(err(path, &f("d_vit"), "both d_model and d_vit given")),
        (None, None) => {
            return Err(err(
                path,
                &f("d_model"),
                "missing (neither d_model nor d_vit)",
            ))
        }
    };
    let s = match (cfg.get("d_sae"), cfg.get("exp_factor")) {
        (Some(s), None) => positive(s, path, &f("d_sae"))?,
        (None, Some(e)) => d * positive(e, path, &f("exp_factor"))?,
        (Some(_), Some(_)) => {
            return Err(err(
                path,
                &f("exp_factor"),
                "both d_sae and exp_factor given",
            ))
        }
        (None, None) => {
            return Err(err(
                path,
                &f("d_sae"),
                "missing (neither d_sae nor exp_factor)",
            ))
        }
    };
    Ok((d, s))
}

/// The activation of an `{"cls", "params"}` dict (schema 1 config form, 2–5).
fn activation_dict(
    act: &Value,
    path: &Path,
    threshold: Option<f32>,
    commit: &str,
    notes: &mut Vec<String>,
) -> Result<SaeActivation> {
    let field = "cfg.activation";
    let cls = act.get("cls").and_then(Value::as_str).ok_or_else(|| {
        err(
            path,
            &format!("{field}.cls"),
            "missing (expected Relu, TopK or BatchTopK)",
        )
    })?;
    let params = match act.get("params") {
        None => return Err(err(path, &format!("{field}.params"), "missing")),
        Some(p) if p.is_object() => p,
        Some(p) => {
            return Err(err(
                path,
                &format!("{field}.params"),
                format!("{p} is not an object"),
            ))
        }
    };
    let key = match (params.get("key"), params.get("kind")) {
        (Some(_), Some(_)) => {
            return Err(err(
                path,
                &format!("{field}.params"),
                "both `key` and legacy `kind` given",
            ))
        }
        (Some(k), None) | (None, Some(k)) => Some(k.as_str().ok_or_else(|| {
            err(
                path,
                &format!("{field}.params.key"),
                format!("{k} is not a string"),
            )
        })?),
        (None, None) => None,
    };
    let expect_key = match cls {
        "Relu" => "relu",
        "TopK" => "top-k",
        "BatchTopK" => "batch-top-k",
        "AbsBatchTopK" => {
            return Err(err(
                path,
                &format!("{field}.cls"),
                "AbsBatchTopK codes the whole batch jointly, even at inference; saev (like the Python saev today) cannot import it",
            ))
        }
        other => {
            return Err(err(
                path,
                &format!("{field}.cls"),
                format!("{other:?} is not an activation saev knows (Relu, TopK, BatchTopK)"),
            ))
        }
    };
    if let Some(k) = key {
        if k != expect_key {
            return Err(err(
                path,
                &format!("{field}.params.key"),
                format!("{k:?} does not match cls {cls} (expected {expect_key:?})"),
            ));
        }
    }
    let top_k = || -> Result<usize> {
        let v = params.get("top_k").ok_or_else(|| {
            err(
                path,
                &format!("{field}.params.top_k"),
                format!("missing for {cls}"),
            )
        })?;
        positive(v, path, &format!("{field}.params.top_k"))
    };
    Ok(match cls {
        "Relu" => SaeActivation::Relu,
        "TopK" => SaeActivation::TopK {
            k: top_k()?,
            relu: false,
        },
        _ => batch_topk(top_k()?, threshold, commit, path, notes)?,
    })
}

/// A BatchTopK of the given era: thresholded (strict `>`, as the Python saev) when the state
/// dict has the buffer, per-row top-k for the eras that coded that way, refused otherwise.
fn batch_topk(
    k: usize,
    threshold: Option<f32>,
    commit: &str,
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<SaeActivation> {
    match threshold {
        Some(t) if !t.is_finite() => Err(err(
            path,
            "activation.threshold",
            format!("{t} is not finite"),
        )),
        Some(t) => {
            // Python keeps h > t (t > 0), else h > 0; saev keeps h ≥ t' and h > 0.
            let t_ge = if t > 0.0 { f32::from_bits(t.to_bits() + 1) } else { 0.0 };
            notes.push(format!(
                "BatchTopK threshold {t} (kept: h > {t}); stored as {t_ge:e} for saev's h ≥ threshold"
            ));
            Ok(SaeActivation::BatchTopK { k, threshold: t_ge })
        }
        None if BATCH_COUPLED_BATCHTOPK.contains(&commit) => Err(err(
            path,
            "activation.threshold",
            format!(
                "missing: this BatchTopK (saev@{commit}) coded the whole batch jointly and has no inference threshold; saev cannot import it"
            ),
        )),
        None => {
            notes.push(format!(
                "BatchTopK without a threshold buffer (saev before ce1add2 coded each row with its own top-{k}): imported as TopK"
            ));
            Ok(SaeActivation::TopK { k, relu: false })
        }
    }
}

/// Read a `sae.pt` header (`tensors` for the BatchTopK threshold buffer).
pub(crate) fn parse_header(
    header: &Value,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    path: &Path,
) -> Result<PyHeader> {
    let threshold = match tensors.get("activation.threshold") {
        None => None,
        Some((shape, data)) if data.len() == 1 && shape.iter().product::<usize>() == 1 => {
            Some(data[0])
        }
        Some((shape, _)) => {
            return Err(Error::Shape {
                what: format!("{}: tensor `activation.threshold`", path.display()),
                expected: vec![],
                actual: shape.clone(),
            })
        }
    };
    let commit = header
        .get("commit")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .chars()
        .take(7)
        .collect::<String>();
    let mut notes = Vec::new();
    let Some(schema) = header.get("schema") else {
        // Paper era: the whole line is the config.
        let (d_model, d_sae) = widths(header, path, "")?;
        if header.get("activation").is_some() {
            return Err(err(
                path,
                "activation",
                "a paper-era header (no schema) has no activation",
            ));
        }
        return Ok(PyHeader {
            d_model,
            d_sae,
            activation: SaeActivation::Relu,
            subtract_b_dec: true,
            generation: "paper".into(),
            notes,
        });
    };
    let schema = schema
        .as_u64()
        .filter(|s| (1..=5).contains(s))
        .ok_or_else(|| {
            err(
                path,
                "schema",
                format!("{schema} is not a schema saev knows (1 to 5)"),
            )
        })?;
    let cfg = header
        .get("cfg")
        .filter(|c| c.is_object())
        .ok_or_else(|| err(path, "cfg", "missing or not an object"))?;
    let (d_model, d_sae) = widths(cfg, path, "cfg.")?;
    let cls = header
        .get("cls")
        .and_then(Value::as_str)
        .unwrap_or("SparseAutoencoderConfig");
    let (activation, subtract_b_dec) = if schema == 1 && cls != "SparseAutoencoderConfig" {
        // Schema 1, first form: `cls` names the activation, `top_k` sits in cfg.
        let subtract = !S1_NO_BDEC_SUBTRACTION.contains(&commit.as_str());
        if subtract {
            notes.push(format!(
                "schema 1 written by saev@{commit}: encoder subtracts b_dec (before saev@e7ca004)"
            ));
        }
        let k = || -> Result<usize> {
            let v = cfg
                .get("top_k")
                .ok_or_else(|| err(path, "cfg.top_k", format!("missing for {cls}")))?;
            positive(v, path, "cfg.top_k")
        };
        let act = match cls {
            "Relu" => SaeActivation::Relu,
            "TopK" => SaeActivation::TopK {
                k: k()?,
                relu: false,
            },
            "BatchTopK" if threshold.is_some() => batch_topk(k()?, threshold, &commit, path, &mut notes)?,
            "BatchTopK" => {
                return Err(err(
                    path,
                    "cls",
                    "a schema-1 BatchTopK coded the whole batch jointly (top k over the flattened batch) and has no inference threshold; saev cannot import it",
                ))
            }
            other => {
                return Err(err(
                    path,
                    "cls",
                    format!("{other:?} is neither an activation (Relu, TopK, BatchTopK) nor SparseAutoencoderConfig"),
                ))
            }
        };
        (act, subtract)
    } else {
        let act = cfg
            .get("activation")
            .ok_or_else(|| err(path, "cfg.activation", "missing"))?;
        (
            activation_dict(act, path, threshold, &commit, &mut notes)?,
            false,
        )
    };
    if threshold.is_some() && !matches!(activation, SaeActivation::BatchTopK { .. }) {
        return Err(err(
            path,
            "activation.threshold",
            "a threshold tensor in a checkpoint whose activation is not BatchTopK",
        ));
    }
    if let SaeActivation::TopK { k, .. } | SaeActivation::BatchTopK { k, .. } = activation {
        if k > d_sae {
            notes.push(format!("top_k {k} > d_sae {d_sae}: every latent is kept"));
        }
    }
    Ok(PyHeader {
        d_model,
        d_sae,
        activation,
        subtract_b_dec,
        generation: format!("schema{schema}"),
        notes,
    })
}

/// Import a Python saev `sae.pt` into a saev SAE directory `out` (`sae.safetensors` +
/// `sae.json`, provenance "imported from …" with the file's sha256). With `norm_from`, the
/// SAE normalises its inputs with that store's statistics at `layer` (the paper's recipe:
/// mean and scalar from 2^19 patch vectors), and records the store, layer and backbone, so the
/// feature pass, browser and interventions know where it belongs. An `out` that already holds
/// this import is reused; one holding anything else is refused, never overwritten.
pub fn import_python_sae(
    pt: impl AsRef<Path>,
    out: impl AsRef<Path>,
    norm_from: Option<(&crate::store::ActivationStore, i64)>,
) -> Result<super::model::Sae> {
    use sha2::{Digest, Sha256};
    let (pt, out) = (pt.as_ref(), out.as_ref());
    let bytes = std::fs::read(pt).map_err(|source| Error::Io {
        path: pt.to_path_buf(),
        source,
    })?;
    let sha = format!("{:x}", Sha256::digest(&bytes));
    let norm_tag = norm_from.map(|(s, l)| (s.dir().display().to_string(), l));
    // What `out` holds when it holds an SAE: this import (reused), or another (refused).
    let existing = || -> Result<super::model::Sae> {
        let old = super::model::Sae::load(out)?;
        let p = &old.config().provenance;
        let same = p.get("sha256").and_then(Value::as_str) == Some(sha.as_str())
            && p.get("norm_store").and_then(Value::as_str)
                == norm_tag.as_ref().map(|t| t.0.as_str())
            && p.get("layer").and_then(Value::as_i64) == norm_tag.as_ref().map(|t| t.1);
        if same {
            return Ok(old);
        }
        Err(Error::output_dir(
            out,
            format!(
                "already holds another SAE (not this import of {})",
                pt.display()
            ),
            "choose another --out",
        ))
    };
    if out.join("sae.json").exists() {
        return existing();
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::output_dir(
            out,
            "exists and is not empty",
            "choose another --out",
        ));
    }
    // The widths first (before the store's statistics are computed or attached).
    let sae = super::model::Sae::from_torch(pt, None)?;
    if let Some((store, _)) = norm_from {
        if store.d_model() != sae.d_model() {
            return Err(Error::Shape {
                what: format!(
                    "{} d_model vs store {}",
                    pt.display(),
                    store.dir().display()
                ),
                expected: vec![store.d_model()],
                actual: vec![sae.d_model()],
            });
        }
    }
    let norm = match norm_from {
        Some((store, layer)) => {
            let s = store.norm_stats(layer, crate::store::Tokens::Patches)?;
            Some(super::model::SaeNorm {
                mean: s.mean,
                scalar: s.scalar,
            })
        }
        None => None,
    };
    let sae = match norm {
        Some(n) => super::model::Sae::from_torch(pt, Some(n))?,
        None => sae,
    };
    let mut cfg = sae.config().clone();
    let prov = cfg
        .provenance
        .as_object_mut()
        .ok_or_else(|| Error::Internal("import provenance is not an object".into()))?;
    prov.insert("sha256".into(), Value::from(sha.clone()));
    if let Some((store, layer)) = norm_from {
        prov.insert(
            "norm_store".into(),
            Value::from(store.dir().display().to_string()),
        );
        prov.insert(
            "store".into(),
            Value::from(store.dir().display().to_string()),
        );
        prov.insert("layer".into(), Value::from(layer));
        prov.insert(
            "family".into(),
            Value::from(store.metadata().family.clone()),
        );
        prov.insert("ckpt".into(), Value::from(store.metadata().ckpt.clone()));
    }
    let [w_enc, b_enc, w_dec, b_dec] = sae.weights();
    let sae = super::model::Sae::new(
        cfg,
        w_enc.clone(),
        b_enc.clone(),
        w_dec.clone(),
        b_dec.clone(),
    )?;
    // Written to a sibling temp dir of its own and renamed, so a killed import leaves nothing
    // half-made and concurrent imports (Slurm array tasks given one `.pt`, or `layer.10.pt`
    // and `layer.11.pt` side by side) never share or delete each other's temp dir.
    let tmp = crate::util::files::unique_sibling(out);
    sae.save(&tmp)?;
    // The directory could not be taken: another process may have finished an import there
    // meanwhile (the same one is kept, another refused).
    let taken = |source: std::io::Error| {
        let _ = std::fs::remove_dir_all(&tmp);
        if out.join("sae.json").exists() {
            return existing();
        }
        Err(Error::Io {
            path: out.to_path_buf(),
            source,
        })
    };
    if out.exists() {
        if let Err(e) = std::fs::remove_dir(out) {
            return taken(e);
        }
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        return taken(e);
    }
    Ok(sae)
}

/// What a `--sae` argument names, as an SAE directory: a directory as is; a Python `sae.pt`
/// imported once into saev's cache (`<cache>/imported-saes/<stem>-<sha256 prefix>[-<store
/// hash>-L<layer>]`) and reused from there. Paper-era checkpoints (no schema) were trained on
/// normalised activations, so they take `store`'s statistics at `layer`; later generations
/// were trained on raw activations (the Python saev stopped normalising) and take none. Use
/// [`import_python_sae`] to choose otherwise. Returns the directory and a line saying what was
/// done.
pub fn resolve_sae(
    sae: impl AsRef<Path>,
    store: &crate::store::ActivationStore,
    layer: i64,
) -> Result<(std::path::PathBuf, Option<String>)> {
    use sha2::{Digest, Sha256};
    let sae = sae.as_ref();
    if sae.is_dir() {
        return Ok((sae.to_path_buf(), None));
    }
    let bytes = std::fs::read(sae).map_err(|source| Error::Io {
        path: sae.to_path_buf(),
        source,
    })?;
    let sha = format!("{:x}", Sha256::digest(&bytes));
    let ck = crate::util::torch_load::read_torch_checkpoint(sae)?;
    let paper = ck.header.get("schema").is_none();
    let stem = sae
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sae".into());
    let store_hash = format!(
        "{:x}",
        Sha256::digest(store.dir().display().to_string().as_bytes())
    );
    let name = if paper {
        format!("{stem}-{}-{}-L{layer}", &sha[..12], &store_hash[..8])
    } else {
        format!("{stem}-{}", &sha[..12])
    };
    let out = crate::util::cache::saev_cache_dir()
        .join("imported-saes")
        .join(name);
    let norm_from = paper.then_some((store, layer));
    import_python_sae(sae, &out, norm_from)?;
    let how = if paper {
        format!(
            "{}: paper-era checkpoint, normalised with the statistics of {} at layer {layer}; imported to {}",
            sae.display(),
            store.dir().display(),
            out.display()
        )
    } else {
        format!(
            "{}: {} checkpoint, raw activations (no normalisation); imported to {} (`saev sae import --norm-from-store` to normalise)",
            sae.display(),
            ck.header.get("schema").map_or("?".into(), |s| format!("schema-{s}")),
            out.display()
        )
    };
    Ok((out, Some(how)))
}
