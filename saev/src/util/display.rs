//! Rendering helpers shared by every module that shows something: HTML escaping, base64, and
//! evcxr's rich-output blocks (`EVCXR_BEGIN_CONTENT <mime>` … `EVCXR_END_CONTENT`), so a type
//! renders itself inline in a Rust notebook.
//!
//! ```text
//! emit_text("text/html", &format!("<b>{}</b>", html_escape(name)));
//! show_png(picture.png());
//! ```

use std::path::Path;

use crate::error::{IoContext, Result};

/// Escape text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Write a rendered picture (or return its rendering error).
pub(crate) fn write_out(path: &Path, bytes: Result<impl AsRef<[u8]>>) -> Result<()> {
    std::fs::write(path, bytes?).with_path(path)
}

/// evcxr display of a rendered PNG, or the rendering error as text.
pub(crate) fn show_png(bytes: Result<Vec<u8>>) {
    match bytes {
        Ok(b) => emit_png(&b),
        Err(e) => println!("{e}"),
    }
}

/// evcxr display of rendered text of `mime` (SVG, HTML), or the rendering error as text.
pub(crate) fn show_text(mime: &str, text: Result<String>) {
    match text {
        Ok(t) => emit_text(mime, &t),
        Err(e) => println!("{e}"),
    }
}

/// Print evcxr's rich-output block for a PNG.
pub(crate) fn emit_png(bytes: &[u8]) {
    println!(
        "EVCXR_BEGIN_CONTENT image/png\n{}\nEVCXR_END_CONTENT",
        base64(bytes)
    );
}

/// Print evcxr's rich-output block for SVG or HTML text.
pub(crate) fn emit_text(mime: &str, text: &str) {
    println!("EVCXR_BEGIN_CONTENT {mime}\n{text}\nEVCXR_END_CONTENT");
}

/// Standard base64 (RFC 4648, with padding).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_vectors() {
        // RFC 4648 §10.
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
