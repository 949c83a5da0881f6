//! The Python saev's activation-shard format: protocol "2.1" (HEAD) written and read; the
//! paper-era layout (PyPI `saev==0.1.0`) and the protocols of 2025 ("1.0.0", "1.1", "2.0")
//! read (see [`Layout`]).
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
    /// How pixel masks became patch labels: `"majority"` or `"prefer-fg"`; `""` where Python
    /// wrote null (classification stores of October 2025), which is written back as null.
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
            "pixel_agg": if self.pixel_agg.is_empty() { Value::Null } else { self.pixel_agg.clone().into() },
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
        // Training, the feature pass and the heatmaps all work on patches: a store without
        // them (CLS only) has nothing for them, and per-patch arithmetic would divide by zero.
        if self.content_tokens_per_example == 0 {
            return Err(err(
                "content_tokens_per_example",
                "0: a store without patch tokens (saev records patches, with or without CLS)"
                    .into(),
            ));
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
        if !["majority", "prefer-fg", ""].contains(&self.pixel_agg.as_str()) {
            return Err(err(
                "pixel_agg",
                format!("{:?} (majority, prefer-fg or null)", self.pixel_agg),
            ));
        }
        Ok(())
    }
}

/// Which of the Python saev's layouts a store directory was written in. All of them hold the
/// same shard files (`[examples_per_shard, n_layers, T, d_model]` float32, full size); they
/// differ in `metadata.json`'s names and in whether `shards.json` exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// PyPI `saev==0.1.0` and the Python saev until June 2025: `vit_family` (`model_family`
    /// from December 2024 to March 2025), `n_patches_per_shard`, no `protocol`, no
    /// `shards.json`, always a CLS token.
    Paper,
    /// Protocol "1.0.0" (June to September 2025) or "1.1" (to 8 October 2025): the paper era's
    /// names with `max_patches_per_shard`, `dtype`, `protocol` and `shards.json`; 1.1 adds
    /// `pixel_agg` and writes `data` as a JSON object.
    V1,
    /// Protocol "2.0" (8 to 13 October 2025): 2.1's names, `data` a JSON object.
    V20,
    /// Protocol "2.1", what saev writes.
    V21,
}

impl Layout {
    /// How the layout is named in messages: `"paper era"`, `"protocol 1.x"`, `"protocol 2.0"`,
    /// `"protocol 2.1"`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Paper => "paper era",
            Layout::V1 => "protocol 1.x",
            Layout::V20 => "protocol 2.0",
            Layout::V21 => "protocol 2.1",
        }
    }
}

/// `data` as the 2.1 string: Python wrote a base64 pickle (a string) or, in protocols 1.1 and
/// 2.0, the dataset's fields as a JSON object (kept as its compact JSON text).
fn data_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Read `metadata.json` (and `shards.json` where the layout has one) of a store in any of the
/// Python saev's layouts; returns the metadata in 2.1 terms, the shard list and the layout.
pub(crate) fn read_store_json(dir: &Path) -> Result<(Metadata, Vec<ShardEntry>, Layout)> {
    let md_path = dir.join("metadata.json");
    let v: Value = read_json(&md_path)?;
    let store_err = |msg: String| Error::Store {
        path: md_path.clone(),
        msg,
    };
    let json_err = |source| Error::Json {
        path: md_path.clone(),
        source,
    };
    if v.get("vit_family").is_some() || v.get("model_family").is_some() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Before2 {
            #[serde(alias = "model_family")]
            vit_family: String,
            #[serde(alias = "model_ckpt")]
            vit_ckpt: String,
            layers: Vec<i64>,
            n_patches_per_img: usize,
            cls_token: bool,
            d_vit: usize,
            n_imgs: usize,
            #[serde(alias = "max_patches_per_shard")]
            n_patches_per_shard: usize,
            data: Value,
            #[allow(dead_code)] // part of the format; not needed to read it
            #[serde(default)]
            seed: Option<i64>,
            #[serde(default)]
            pixel_agg: Option<String>,
            #[serde(default)]
            dtype: Option<String>,
            #[serde(default)]
            protocol: Option<String>,
        }
        let p: Before2 = serde_json::from_value(v).map_err(json_err)?;
        let layout = match p.protocol.as_deref() {
            None => Layout::Paper,
            Some("1.0.0" | "1.1") => Layout::V1,
            Some(other) => {
                return Err(store_err(format!(
                    "field `protocol`: unknown protocol {other:?} for a store with `vit_family` \
                     (saev reads the paper era, 1.0.0, 1.1, 2.0 and 2.1)"
                )))
            }
        };
        if layout == Layout::Paper && !p.cls_token {
            return Err(store_err(
                "paper-era stores without a CLS token are not readable by saev 0.1.0 either".into(),
            ));
        }
        let md = Metadata {
            family: p.vit_family,
            ckpt: p.vit_ckpt,
            layers: p.layers,
            content_tokens_per_example: p.n_patches_per_img,
            cls_token: p.cls_token,
            d_model: p.d_vit,
            n_examples: p.n_imgs,
            max_tokens_per_shard: p.n_patches_per_shard,
            data: data_text(p.data),
            dataset: String::new(),
            // The paper era recorded no labels; 1.x writes null for classification data.
            pixel_agg: match layout {
                Layout::Paper => "majority".into(),
                _ => p.pixel_agg.unwrap_or_default(),
            },
            dtype: p.dtype.unwrap_or_else(|| "float32".into()),
            protocol: PROTOCOL.into(),
        };
        md.validate(&md_path)?;
        let sj = dir.join("shards.json");
        let shards = if layout == Layout::V1 {
            read_json(&sj)?
        } else {
            md.shard_entries()
        };
        return Ok((md, shards, layout));
    }
    let mut v = v;
    let mut layout = Layout::V21;
    if let Value::Object(m) = &mut v {
        if m.get("protocol").and_then(Value::as_str) == Some("2.0") {
            layout = Layout::V20;
            m.insert("protocol".into(), PROTOCOL.into());
        }
        if let Some(data) = m.get_mut("data") {
            if !data.is_string() {
                *data = Value::String(data_text(data.take()));
            }
        }
        // Null (a classification store, 8 to 14 October 2025) reads as "".
        if m.get("pixel_agg").is_some_and(Value::is_null) {
            m.insert("pixel_agg".into(), "".into());
        }
    }
    let md: Metadata = serde_json::from_value(v).map_err(json_err)?;
    md.validate(&md_path)?;
    let sj = dir.join("shards.json");
    let shards: Vec<ShardEntry> = read_json(&sj)?;
    Ok((md, shards, layout))
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
    fn a_store_without_patches_is_refused() {
        let mut md = example();
        md.content_tokens_per_example = 0;
        let e = md.validate(Path::new("m.json")).unwrap_err().to_string();
        assert!(
            e.contains("content_tokens_per_example") && e.contains("m.json"),
            "{e}"
        );
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
