//! File paths as text, losslessly: a UTF-8 path is itself; any other (Unix file names are bytes)
//! is `b64:` + the base64 of its bytes. Provenance records sources this way, so a store finds
//! every example again, whatever its file name.
//!
//! ```text
//! let s = path_to_text(Path::new("/data/caf\xe9.png")); // "b64:L2RhdGEvY2Fm6S5wbmc="
//! assert_eq!(text_to_path(&s), PathBuf::from(...));
//! ```

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::display::base64;

const PREFIX: &str = "b64:";

/// The text form of `path` (see the module docs).
pub(crate) fn path_to_text(path: &Path) -> String {
    match path.to_str() {
        Some(s) if !s.starts_with(PREFIX) => s.to_string(),
        _ => format!("{PREFIX}{}", base64(path.as_os_str().as_bytes())),
    }
}

/// The path a text form names (plain text is a path as it is).
pub(crate) fn text_to_path(text: &str) -> PathBuf {
    match text.strip_prefix(PREFIX).and_then(unbase64) {
        Some(bytes) => PathBuf::from(OsString::from_vec(bytes)),
        None => PathBuf::from(text),
    }
}

/// Standard base64 with padding; None when `s` is not.
fn unbase64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for chunk in b.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_utf8_and_raw_bytes() {
        for raw in [
            b"/data/cat.png".to_vec(),
            b"/data/caf\xe9.png".to_vec(),
            b"b64:looks-encoded".to_vec(),
            vec![0xff, 0xfe, b'/', 0x80],
        ] {
            let p = PathBuf::from(OsString::from_vec(raw.clone()));
            let t = path_to_text(&p);
            assert_eq!(
                text_to_path(&t).as_os_str().as_bytes(),
                raw.as_slice(),
                "{t}"
            );
        }
        assert_eq!(path_to_text(Path::new("/a/b.png")), "/a/b.png");
        assert_eq!(unbase64("TWFu"), Some(b"Man".to_vec()));
        assert_eq!(unbase64("TWE="), Some(b"Ma".to_vec()));
        assert_eq!(unbase64("TQ=="), Some(b"M".to_vec()));
        assert_eq!(unbase64("T@=="), None);
    }
}
