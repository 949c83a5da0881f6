//! Reading images from outside: files and in-memory bytes, decoded with limits (a small file
//! declaring a huge image is refused before allocating) and strictly (a truncated JPEG is
//! refused, as Pillow refuses it). Every error names the file.
//!
//! ```no_run
//! let img = saev::load_image("photo.jpg")?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::path::Path;

use image::DynamicImage;

use crate::error::{Error, Result};

/// Decode an image file; a file that is not an image is an [`Error::Image`] naming it.
pub fn load_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?
        .with_guessed_format()
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    let mut reader = reader;
    reader.limits(image_limits());
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        let bytes = std::fs::read(path).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        check_jpeg_complete(&bytes).map_err(|msg| Error::Image {
            path: path.to_path_buf(),
            msg,
        })?;
    }
    reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// A JPEG must end with its end-of-image marker (trailing padding allowed): a truncated file
/// is refused, as Pillow refuses it, instead of decoding to grey rows.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != b'\n' && b != b'\r')
        .map_or(0, |i| i + 1);
    if end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9] {
        Ok(())
    } else {
        Err("JPEG is truncated (no end-of-image marker)".into())
    }
}

/// Decoding limits: a small file declaring a huge image is refused before allocating.
fn image_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(1 << 15);
    l.max_image_height = Some(1 << 15);
    l.max_alloc = Some(1 << 30);
    l
}

/// Decode an image held in memory (e.g. a parquet cell).
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let err = |e: image::ImageError| Error::Image {
        path: "<memory>".into(),
        msg: e.to_string(),
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(image::ImageError::IoError(e)))?;
    reader.limits(image_limits());
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        check_jpeg_complete(bytes).map_err(|msg| Error::Image {
            path: "<memory>".into(),
            msg,
        })?;
    }
    reader.decode().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_an_image_is_named() {
        let dir = std::env::temp_dir().join(format!("saev-notimg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notes.jpg");
        std::fs::write(&path, b"this is text").unwrap();
        let err = load_image(&path).unwrap_err().to_string();
        assert!(err.contains("notes.jpg"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
