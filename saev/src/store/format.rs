//! The Python saev's activation-shard format: protocol "2.1" (HEAD) written and read, and the
//! paper-era layout (PyPI `saev==0.1.0`) read.
//!
//! A store directory holds `metadata.json`, `shards.json` and `acts%06d.bin` files — headerless
//! little-endian float32 arrays `[examples_per_shard, n_layers, T, d_model]`, every file full
//! size — plus `labels.bin` (`u8[n_examples, content_tokens]`) for segmentation data. 2.1 names
//! the directory by the first 8 hex digits of the SHA-256 of the compact, key-sorted orjson text
//! of the metadata. saev adds `provenance.json` (where each example came from), which Python
//! ignores.
//!
//! ```text
//! let md = Metadata { family: "dinov2".into(), layers: vec![-2], content_tokens_per_example: 256, … };
//! md.examples_per_shard();   // 2_400_000 / (257 · 1) = 9338
//! md.hash();                 // "1a2b3c4d"
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::ojson;
use crate::error::{Error, Result};
use crate::util::files::read_json;

/// The protocol saev writes.
pub const PROTOCOL: &str = "2.1";

/// Store metadata, field for field the Python saev's `Metadata` (protocol 2.1), in its order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Model family (`"dinov2"`, `"clip"`, `"siglip"`, …).
    pub family: String,
    /// Model checkpoint (a model id or directory).
    pub ckpt: String,
    /// Recorded blocks, as given (negative = from the end).
    pub layers: Vec<i64>,
    /// Patch tokens per example (CLS excluded).
    pub content_tokens_per_example: usize,
    /// Whether token 0 of each example is the CLS token.
    pub cls_token: bool,
    /// Residual-stream width.
    pub d_model: usize,
    /// Examples in the store.
    pub n_examples: usize,
    /// Shard capacity in vectors (tokens × layers); Python's default is 2,400,000.
    pub max_tokens_per_shard: usize,
    /// Dataset description (Python stores a base64 pickle of its dataset config here).
    pub data: String,
    /// Dataset root path.
    pub dataset: String,
    /// How pixel masks became patch labels: `"majority"` or `"prefer-fg"`.
    pub pixel_agg: String,
    /// Always `"float32"`.
    pub dtype: String,
    /// Protocol version.
    pub protocol: String,
}

/// One entry of `shards.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name (`acts000000.bin`).
    pub name: String,
    /// Valid examples in that file.
    pub n_examples: usize,
}

impl Metadata {
    /// Tokens per example: content tokens plus CLS when present.
    pub fn tokens_per_example(&self) -> usize {
        self.content_tokens_per_example
            .saturating_add(usize::from(self.cls_token))
    }

    /// Examples per shard file.
    pub fn examples_per_shard(&self) -> usize {
        self.max_tokens_per_shard
            / self
                .tokens_per_example()
                .saturating_mul(self.layers.len())
                .max(1)
    }

    /// Number of shard files.
    pub fn n_shards(&self) -> usize {
        self.n_examples.div_ceil(self.examples_per_shard().max(1))
    }

    /// Floats per example (`n_layers · T · d`).
    pub fn floats_per_example(&self) -> usize {
        self.layers
            .len()
            .saturating_mul(self.tokens_per_example())
            .saturating_mul(self.d_model)
    }

    /// Bytes of one full shard file.
    pub fn shard_bytes(&self) -> u64 {
        (self.examples_per_shard() * self.floats_per_example() * 4) as u64
    }

    /// Shard file name for shard `i`.
    pub fn shard_name(i: usize) -> String {
        format!("acts{i:06}.bin")
    }

    /// The `shards.json` a complete store has.
    pub fn shard_entries(&self) -> Vec<ShardEntry> {
        let eps = self.examples_per_shard();
        (0..self.n_shards())
            .map(|i| ShardEntry {
                name: Self::shard_name(i),
                n_examples: eps.min(self.n_examples - i * eps),
            })
            .collect()
    }

    fn to_value(&self) -> Value {
        json!({
            "family": self.family,
            "ckpt": self.ckpt,
            "layers": self.layers,
            "content_tokens_per_example": self.content_tokens_per_example,
            "cls_token": self.cls_token,
            "d_model": self.d_model,
            "n_examples": self.n_examples,
            "max_tokens_per_shard": self.max_tokens_per_shard,
            "data": self.data,
            "dataset": self.dataset,
            "pixel_agg": self.pixel_agg,
            "dtype": self.dtype,
            "protocol": self.protocol,
        })
    }

    /// The `metadata.json` text (orjson, 2-space indent, declaration order).
    pub fn to_json(&self) -> String {
        ojson::dumps(&self.to_value(), true, false)
    }

    /// The store directory name: first 8 hex digits of SHA-256 of the compact sorted JSON.
    pub fn hash(&self) -> String {
        let text = ojson::dumps(&self.to_value(), false, true);
        let digest = Sha256::digest(text.as_bytes());
        digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
    }

    /// Check internal consistency.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |field: &str, msg: String| Error::Store {
            path: path.to_path_buf(),
            msg: format!("field `{field}`: {msg}"),
        };
        if self.protocol != PROTOCOL {
            return Err(err(
                "protocol",
                format!(
                    "unknown protocol {:?} (saev reads \"2.1\" and the paper-era layout)",
                    self.protocol
                ),
            ));
        }
        if self.dtype != "float32" {
            return Err(err(
                "dtype",
                format!("{:?} is not supported (float32 only)", self.dtype),
            ));
        }
        // Absurd numbers are refused before anything is allocated or mapped from them.
        for (field, v, max) in [
            ("d_model", self.d_model, 1usize << 16),
            ("layers", self.layers.len(), 1 << 10),
            (
                "content_tokens_per_example",
                self.content_tokens_per_example,
                1 << 20,
            ),
            ("n_examples", self.n_examples, 1 << 40),
            ("max_tokens_per_shard", self.max_tokens_per_shard, 1 << 36),
        ] {
            if v > max {
                return Err(err(
                    field,
                    format!("{v} is larger than saev accepts ({max})"),
                ));
            }
        }
        if self.layers.is_empty() || self.d_model == 0 || self.tokens_per_example() == 0 {
            return Err(err("layers", "empty layers, d_model or tokens".into()));
        }
        let shard_bytes =
            (self.examples_per_shard() as u128) * (self.floats_per_example() as u128) * 4;
        if shard_bytes > 1 << 40 {
            return Err(err(
                "max_tokens_per_shard",
                format!("a shard of {shard_bytes} bytes is larger than saev accepts (1 TiB)"),
            ));
        }
        if self.examples_per_shard() == 0 {
            return Err(err(
                "max_tokens_per_shard",
                format!(
                    "{} is smaller than one example ({} vectors)",
                    self.max_tokens_per_shard,
                    self.tokens_per_example() * self.layers.len()
                ),
            ));
        }
        if !["majority", "prefer-fg"].contains(&self.pixel_agg.as_str()) {
            return Err(err(
                "pixel_agg",
                format!("{:?} (majority or prefer-fg)", self.pixel_agg),
            ));
        }
        Ok(())
    }
}

/// Read `metadata.json` of a 2.1 or paper-era store; returns the metadata (paper era mapped to
/// 2.1 terms) and the shard list.
pub(crate) fn read_store_json(dir: &Path) -> Result<(Metadata, Vec<ShardEntry>, bool)> {
    let md_path = dir.join("metadata.json");
    let v: Value = read_json(&md_path)?;
    let store_err = |msg: String| Error::Store {
        path: md_path.clone(),
        msg,
    };
    if v.get("vit_family").is_some() || v.get("model_family").is_some() {
        // Paper era (saev 0.1.0): CLS always present, no shards.json, no labels. From December
        // 2024 to March 2025 the Python saev wrote the same layout with `model_family` and
        // `model_ckpt` for the first two fields.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Paper {
            #[serde(alias = "model_family")]
            vit_family: String,
            #[serde(alias = "model_ckpt")]
            vit_ckpt: String,
            layers: Vec<i64>,
            n_patches_per_img: usize,
            cls_token: bool,
            d_vit: usize,
            n_imgs: usize,
            n_patches_per_shard: usize,
            data: Value,
            #[allow(dead_code)] // part of the format; not needed to read it
            seed: Option<i64>,
        }
        let p: Paper = serde_json::from_value(v).map_err(|source| Error::Json {
            path: md_path.clone(),
            source,
        })?;
        if !p.cls_token {
            return Err(store_err(
                "paper-era stores without a CLS token are not readable by saev 0.1.0 either".into(),
            ));
        }
        let md = Metadata {
            family: p.vit_family,
            ckpt: p.vit_ckpt,
            layers: p.layers,
            content_tokens_per_example: p.n_patches_per_img,
            cls_token: true,
            d_model: p.d_vit,
            n_examples: p.n_imgs,
            max_tokens_per_shard: p.n_patches_per_shard,
            data: match p.data {
                Value::String(s) => s,
                other => other.to_string(),
            },
            dataset: String::new(),
            pixel_agg: "majority".into(),
            dtype: "float32".into(),
            protocol: PROTOCOL.into(),
        };
        md.validate(&md_path)?;
        let shards = md.shard_entries();
        return Ok((md, shards, true));
    }
    let md: Metadata = serde_json::from_value(v).map_err(|source| Error::Json {
        path: md_path.clone(),
        source,
    })?;
    md.validate(&md_path)?;
    let sj = dir.join("shards.json");
    let shards: Vec<ShardEntry> = read_json(&sj)?;
    Ok((md, shards, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn example() -> Metadata {
        Metadata {
            family: "dinov2".into(),
            ckpt: "facebook/dinov2-small".into(),
            layers: vec![-2, -1],
            content_tokens_per_example: 4,
            cls_token: true,
            d_model: 3,
            n_examples: 7,
            max_tokens_per_shard: 30,
            data: "fake".into(),
            dataset: "/data".into(),
            pixel_agg: "majority".into(),
            dtype: "float32".into(),
            protocol: "2.1".into(),
        }
    }

    #[test]
    fn geometry() {
        let md = example();
        assert_eq!(md.tokens_per_example(), 5);
        assert_eq!(md.examples_per_shard(), 3); // 30 // (5 · 2)
        assert_eq!(md.n_shards(), 3);
        let e = md.shard_entries();
        assert_eq!(
            e.iter().map(|s| s.n_examples).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        assert_eq!(e[2].name, "acts000002.bin");
        assert_eq!(md.shard_bytes(), 3 * 2 * 5 * 3 * 4);
    }

    #[test]
    fn json_field_order_and_hash_input() {
        let md = example();
        let text = md.to_json();
        assert!(
            text.starts_with("{\n  \"family\": \"dinov2\",\n  \"ckpt\""),
            "{text}"
        );
        assert!(!text.ends_with('\n'));
        assert_eq!(md.hash().len(), 8);
        let mut other = md.clone();
        other.n_examples = 8;
        assert_ne!(md.hash(), other.hash());
    }

    #[test]
    fn unknown_protocol_and_dtype_rejected() {
        let mut md = example();
        md.protocol = "3.0".into();
        let e = md.validate(Path::new("m.json")).unwrap_err().to_string();
        assert!(e.contains("protocol") && e.contains("3.0"), "{e}");
        let mut md = example();
        md.dtype = "bfloat16".into();
        assert!(md
            .validate(Path::new("m.json"))
            .unwrap_err()
            .to_string()
            .contains("bfloat16"));
    }
}
