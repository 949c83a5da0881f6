//! Stores recorded in parts (`--part i/N`, on several machines or array tasks) and joined into
//! one: which shards and examples part `i` of `N` owns, its `part.json`, and [`merge_parts`],
//! which validates every part before it moves anything.
//!
//! ```no_run
//! let parts: Vec<std::path::PathBuf> = (0..3).map(|i| format!("parts/{i}/1a2b3c4d").into()).collect();
//! let store = saev::store::merge_parts(&parts, "acts")?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::Metadata;
use super::ojson;
use super::writer::{open_at_least, write_registers_info};
use super::{BF16_TAG, F16_TAG};
use crate::error::{Error, IoContext, Result};
use crate::util::files::{read_json, write_atomic};

/// Copy bytes `range` of `from` into the same place of `to` (created, at least `len` bytes).
fn copy_range(from: &Path, to: &Path, len: u64, range: std::ops::Range<u64>) -> Result<()> {
    let src = File::open(from).with_path(from)?;
    let dst = open_at_least(to, len)?;
    let mut buf = vec![0u8; 1 << 22];
    let mut at = range.start;
    while at < range.end {
        let n = ((range.end - at) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], at).with_path(from)?;
        dst.write_all_at(&buf[..n], at).with_path(to)?;
        at += n as u64;
    }
    dst.sync_all().with_path(to)
}

pub(super) const PART: &str = "part.json";

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PartInfo {
    pub(super) version: u32,
    pub(super) part: usize,
    pub(super) n_parts: usize,
}

/// Shards of part `i` of `n`: contiguous, as even as whole shards allow.
pub(super) fn part_shards(md: &Metadata, i: usize, n: usize) -> std::ops::Range<usize> {
    crate::util::cluster::contiguous_part(md.n_shards(), n, i)
}

pub(crate) fn part_examples(md: &Metadata, i: usize, n: usize) -> std::ops::Range<usize> {
    let s = part_shards(md, i, n);
    let eps = md.examples_per_shard();
    (s.start * eps).min(md.n_examples)..(s.end * eps).min(md.n_examples)
}

/// Join the parts written with [`crate::WriterConfig::part`] into one store under `root`. Shard files
/// are moved (renamed), not copied, when the parts are on the same file system as `root`; the
/// part directories are removed afterwards.
pub fn merge_parts(parts: &[PathBuf], root: impl AsRef<Path>) -> Result<PathBuf> {
    let root = root.as_ref();
    let first = parts
        .first()
        .ok_or_else(|| Error::out_of_range("merge: parts given:", 0, "≥ 1"))?;
    // A rerun after a finished merge: the parts are gone, the store `<hash>` is in `root`.
    if !first.exists() {
        let name = first
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some((hash, _)) = name.split_once(".part-") {
            let merged = root.join(hash);
            if merged.join("metadata.json").is_file() {
                return Err(Error::Store {
                    path: first.clone(),
                    msg: format!(
                        "no such part: already merged into {} (the parts are removed after a merge)",
                        merged.display()
                    ),
                });
            }
        }
    }
    let md_text = std::fs::read_to_string(first.join("metadata.json"))
        .with_path(first.join("metadata.json"))?;
    let md: Metadata = serde_json::from_str(&md_text).map_err(|source| Error::Json {
        path: first.join("metadata.json"),
        source,
    })?;
    let mut seen = Vec::new();
    for p in parts {
        let path = p.join(PART);
        let text = std::fs::read_to_string(&path).map_err(|_| Error::Store {
            path: path.clone(),
            msg: "not a finished part (no part.json)".into(),
        })?;
        let info: PartInfo = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let other =
            std::fs::read_to_string(p.join("metadata.json")).with_path(p.join("metadata.json"))?;
        if other != md_text {
            return Err(Error::Store {
                path: p.join("metadata.json"),
                msg: format!(
                    "differs from {}: parts of different stores",
                    first.display()
                ),
            });
        }
        // The files recorded, their labels and class names: a part recorded from another copy
        // of the dataset with the same count has the same metadata but may list other images.
        // (Not the files' stamp of sizes and times: each node of a cluster may hold its own
        // copy of the same files.)
        let prov = |q: &Path| {
            std::fs::read(q.join("provenance.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|mut v| {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("stamp");
                    }
                    v
                })
        };
        if prov(p) != prov(first) {
            return Err(Error::Store {
                path: p.join("provenance.json"),
                msg: format!(
                    "differs from {}'s: the parts were recorded from different files (another copy of the dataset, or files changed between parts)",
                    first.display()
                ),
            });
        }
        seen.push((info.part, info.n_parts, p.clone()));
    }
    seen.sort();
    let n_parts = seen[0].1;
    if seen.len() != n_parts
        || seen
            .iter()
            .enumerate()
            .any(|(k, (i, n, _))| *i != k || *n != n_parts)
    {
        let have: Vec<usize> = seen.iter().map(|s| s.0).collect();
        return Err(Error::out_of_range(
            "merge: parts",
            format!("{have:?}"),
            format!("0..{n_parts} exactly once each"),
        ));
    }
    // Parts recorded in bf16 / f16 (`<hash>-bf16.part-…`) merge into `<hash>-bf16`; mixed parts
    // are two stores.
    let tag_of = |p: &PathBuf| -> &'static str {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        [BF16_TAG, F16_TAG]
            .into_iter()
            .find(|t| name.contains(&format!("{t}.part-")))
            .unwrap_or("")
    };
    let tag = tag_of(first);
    if let Some(odd) = parts.iter().find(|p| tag_of(p) != tag) {
        return Err(Error::Store {
            path: odd.clone(),
            msg: format!(
                "recorded in another precision than {} (`{}` against `{tag}`): parts of different stores",
                first.display(),
                tag_of(odd)
            ),
        });
    }
    let dir = root.join(format!("{}{tag}", md.hash()));
    if dir.join("metadata.json").exists() {
        return Err(Error::Store {
            path: dir,
            msg: "a store already exists here".into(),
        });
    }
    // Validate every part completely before moving anything: a bad part leaves all parts as
    // they were, and the error names it. A shard already in the merged directory (a merge
    // interrupted after moving it) counts as its part's: a rerun finishes the merge.
    md.validate(&first.join("metadata.json"))?;
    let n_labels_total = md.n_examples * md.content_tokens_per_example;
    // Side files: in every part or in none (a part without labels would merge as class 0).
    let regs_of = |p: &Path| -> Result<Option<usize>> {
        let f = p.join("registers.json");
        if !f.exists() {
            return Ok(None);
        }
        let info: super::RegistersInfo = read_json(&f)?;
        Ok(Some(info.n_registers))
    };
    let first_regs = regs_of(first)?;
    // A part with no examples (more parts than shards) writes no labels: the others decide.
    let has_examples = |i: usize, n: usize| !part_examples(&md, i, n).is_empty();
    let labelled = seen
        .iter()
        .find(|(i, n, _)| has_examples(*i, *n))
        .is_some_and(|(_, _, p)| p.join("labels.bin").exists());
    for (i, n, p) in &seen {
        let labels_here = p.join("labels.bin").exists() || (!has_examples(*i, *n) && labelled);
        for (name, here, there) in [
            ("labels.bin", labels_here, labelled),
            (
                "registers.bin",
                p.join("registers.bin").exists(),
                first_regs.is_some(),
            ),
        ] {
            if here != there {
                return Err(Error::Store {
                    path: p.join(name),
                    msg: format!(
                        "{} in this part but {} in {}: every part has it or none does",
                        if here { "present" } else { "missing" },
                        if there { "present" } else { "missing" },
                        first.display()
                    ),
                });
            }
        }
        let regs = regs_of(p)?;
        if regs != first_regs {
            return Err(Error::Store {
                path: p.join("registers.json"),
                msg: format!(
                    "{regs:?} register tokens, {} has {first_regs:?}: parts of different stores",
                    first.display()
                ),
            });
        }
    }
    for (i, n, p) in &seen {
        for s in part_shards(&md, *i, *n) {
            let f = p.join(Metadata::shard_name(s));
            let moved = dir.join(Metadata::shard_name(s));
            let f = if !f.exists() && moved.exists() {
                moved
            } else {
                f
            };
            let len = std::fs::metadata(&f).with_path(&f)?.len();
            if len != md.shard_bytes() {
                return Err(Error::Store {
                    path: f,
                    msg: format!(
                        "{len} bytes, a shard is {} (truncated part?)",
                        md.shard_bytes()
                    ),
                });
            }
        }
        for (name, want) in [("labels.bin", n_labels_total as u64), ("registers.bin", 0)] {
            let f = p.join(name);
            if !f.exists() {
                continue;
            }
            let len = std::fs::metadata(&f).with_path(&f)?.len();
            let want = match (name, first_regs) {
                ("registers.bin", Some(r)) => [md.layers.len(), r, md.d_model, 4]
                    .iter()
                    .try_fold(md.n_examples as u64, |a, &b| a.checked_mul(b as u64))
                    .unwrap_or(u64::MAX),
                _ => want,
            };
            if len != want {
                return Err(Error::Store {
                    path: f,
                    msg: format!("{len} bytes, expected {want} (truncated part?)"),
                });
            }
        }
    }
    std::fs::create_dir_all(&dir).with_path(&dir)?;
    let n_labels = md.n_examples * md.content_tokens_per_example;
    let mut labels: Option<Vec<u8>> = None;
    for (i, n, p) in &seen {
        for s in part_shards(&md, *i, *n) {
            let name = Metadata::shard_name(s);
            let (from, to) = (p.join(&name), dir.join(&name));
            if !from.exists() && to.exists() {
                continue; // moved by an interrupted merge
            }
            if std::fs::rename(&from, &to).is_err() {
                std::fs::copy(&from, &to).with_path(&from)?;
            }
        }
        let lp = p.join("labels.bin");
        if lp.exists() {
            let bytes = std::fs::read(&lp).with_path(&lp)?;
            let r = part_examples(&md, *i, *n);
            let cp = md.content_tokens_per_example;
            let buf = labels.get_or_insert_with(|| vec![0u8; n_labels]);
            buf[r.start * cp..r.end * cp].copy_from_slice(&bytes[r.start * cp..r.end * cp]);
        }
    }
    if let Some(l) = labels {
        write_atomic(&dir.join("labels.bin"), &l)?;
    }
    // Register tokens (models with registers): each part holds its examples' rows.
    let reg_info = first.join("registers.json");
    if reg_info.exists() {
        let info: super::RegistersInfo = read_json(&reg_info)?;
        let per = (md.layers.len() * info.n_registers * md.d_model * 4) as u64;
        let len = md.n_examples as u64 * per;
        for (i, n, p) in &seen {
            let r = part_examples(&md, *i, *n);
            copy_range(
                &p.join("registers.bin"),
                &dir.join("registers.bin"),
                len,
                r.start as u64 * per..r.end as u64 * per,
            )?;
        }
        write_registers_info(&dir, info.n_registers)?;
    }
    if first.join("provenance.json").exists() {
        std::fs::copy(first.join("provenance.json"), dir.join("provenance.json"))
            .with_path(first.join("provenance.json"))?;
    }
    write_atomic(&dir.join("metadata.json"), md_text.as_bytes())?;
    let v = serde_json::to_value(md.shard_entries())
        .map_err(|e| Error::Internal(format!("serialising JSON: {e}")))?;
    write_atomic(
        &dir.join("shards.json"),
        ojson::dumps(&v, true, false).as_bytes(),
    )?;
    super::ActivationStore::open(&dir)?;
    for (_, _, p) in &seen {
        std::fs::remove_dir_all(p).with_path(p)?;
    }
    Ok(dir)
}
