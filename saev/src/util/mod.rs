//! Helpers at the bottom of the dependency order: every other module may use them, they use
//! none of the others (only `error`).

pub(crate) mod cache;
pub(crate) mod checkpoint;
pub(crate) mod cluster;
pub(crate) mod device;
pub(crate) mod display;
pub(crate) mod files;
pub(crate) mod image_io;
pub(crate) mod interrupt;
pub(crate) mod paths;
pub(crate) mod progress;
pub(crate) mod rng;
pub(crate) mod simd;
pub(crate) mod torch_load;

/// Parse `s` as the serde name of a unit enum variant (what the CLI's `FromStr` impls use); the
/// error lists the `valid` names.
pub(crate) fn parse_name<T: serde::de::DeserializeOwned>(
    s: &str,
    valid: &[&str],
) -> std::result::Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("`{s}` (valid: {})", valid.join(", ")))
}
