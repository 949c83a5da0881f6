//! Where a model's files come from: a local directory (HF: `config.json` + weights; timm;
//! OpenCLIP), a torch-hub `.pth`, or a model id (`facebook/dinov2-small`) resolved in the local Hugging
//! Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), or — with
//! the `hub` cargo feature — downloaded from the hub.
//!
//! ```no_run
//! let dir = saev::backbone::resolve_model("facebook/dinov2-small")?;
//! assert!(dir.join("config.json").exists());
//! # Ok::<(), saev::Error>(())
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The Hugging Face hub cache directory this process would use.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p).join("hub"));
    }
    dirs::home_dir().map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// Turn a directory path or a model id (optionally `id@revision`) into a directory holding
/// `config.json` and `model.safetensors`.
pub fn resolve_model(model: impl AsRef<Path>) -> Result<PathBuf> {
    let as_path = model.as_ref();
    let text = as_path.display().to_string();
    let model = text.as_str();
    if as_path.is_dir() {
        return check_dir(model, as_path);
    }
    if as_path.is_file() && super::layouts::is_model(as_path) {
        return Ok(as_path.to_path_buf());
    }
    let (id, revision) = match model.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (model, "main"),
    };
    let mut looked = vec![format!("no directory `{model}`")];
    if let Some(cache) = hf_hub_cache() {
        match from_cache(&cache, id, revision) {
            Some(dir) => return check_dir(model, &dir),
            None => looked.push(format!(
                "not in the Hugging Face cache {}",
                cache
                    .join(format!("models--{}", id.replace('/', "--")))
                    .display()
            )),
        }
    }
    #[cfg(feature = "hub")]
    {
        match download(id, revision) {
            Ok(dir) => return check_dir(model, &dir),
            Err(e) => looked.push(format!("download failed: {e}")),
        }
    }
    #[cfg(not(feature = "hub"))]
    looked.push("downloading needs the `hub` cargo feature".into());
    Err(Error::ModelNotFound {
        id: model.into(),
        msg: looked.join("; "),
    })
}

fn from_cache(cache: &Path, id: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    // A revision is a ref name (refs/<name> holds the commit) or a commit hash.
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let dir = snapshots.join(&commit);
    if dir.join("config.json").exists() {
        return Some(dir);
    }
    // No ref: fall back to the newest snapshot that has a config.
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("config.json").exists())
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p)
}

fn check_dir(model: &str, dir: &Path) -> Result<PathBuf> {
    if super::layouts::is_model(dir) {
        return Ok(dir.to_path_buf());
    }
    let msg = if !dir.join("config.json").exists() {
        format!(
            "{} has no config.json (nor open_clip_config.json, nor a DINOv2 .pth)",
            dir.display()
        )
    } else {
        format!(
            "{} has no model.safetensors (nor model.safetensors.index.json, pytorch_model.bin)",
            dir.display()
        )
    };
    Err(Error::ModelNotFound {
        id: model.into(),
        msg,
    })
}

#[cfg(feature = "hub")]
fn download(id: &str, revision: &str) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let config = repo.get("config.json").map_err(|e| e.to_string())?;
    repo.get("model.safetensors").map_err(|e| e.to_string())?;
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "no parent directory".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_from_a_fake_cache() {
        let root = std::env::temp_dir().join(format!("saev-hfcache-{}", std::process::id()));
        let snap = root.join("models--org--tiny/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("models--org--tiny/refs")).unwrap();
        std::fs::write(root.join("models--org--tiny/refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(from_cache(&root, "org/tiny", "main"), Some(snap.clone()));
        // Missing weights is an error naming the file.
        let err = check_dir("org/tiny", &snap).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        assert_eq!(from_cache(&root, "org/other", "main"), None);
        std::fs::remove_dir_all(&root).ok();
    }
}
