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

/// A JPEG must hold its end-of-image marker after its first scan: a truncated file is refused,
/// as Pillow refuses it, instead of decoding to grey rows. Data after the marker is allowed, as
/// Pillow allows it (motion photos append a video, Samsung and MPO files more images or
/// trailers). The segments before the first scan are walked by their lengths, so a thumbnail
/// inside EXIF (with its own end marker) does not count; inside the entropy-coded data a 0xFF
/// byte is always followed by 0x00 or a marker, so 0xFF 0xD9 there is the end.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    const TRUNCATED: &str = "JPEG is truncated (no end-of-image marker)";
    // The common case: the file ends with the marker (trailing padding allowed).
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != b'\n' && b != b'\r')
        .map_or(0, |i| i + 1);
    if end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9] {
        return Ok(());
    }
    let mut i = 2; // after the start-of-image marker
    loop {
        while bytes.get(i + 1) == Some(&0xFF) && bytes[i] == 0xFF {
            i += 1; // fill bytes before a marker
        }
        let (Some(&0xFF), Some(&m)) = (bytes.get(i), bytes.get(i + 1)) else {
            return Err(TRUNCATED.into());
        };
        match m {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => i += 2,
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return Err(TRUNCATED.into());
                };
                i += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                if m == 0xDA {
                    break; // start of scan: the entropy-coded data follows its header
                }
            }
        }
    }
    match bytes.get(i..) {
        Some(rest) if rest.windows(2).any(|w| w == [0xFF, 0xD9]) => Ok(()),
        _ => Err(TRUNCATED.into()),
    }
}

/// Whether an image file that is a JPEG is whole (see `check_jpeg_complete`), reading only its
/// last bytes in the common case: what `--skip-bad` checks up front besides the header.
pub(crate) fn jpeg_file_complete(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut tail = [0u8; 64];
    let Ok(len) = f.seek(SeekFrom::End(0)) else {
        return false;
    };
    let n = len.min(tail.len() as u64) as usize;
    if f.seek(SeekFrom::Start(len - n as u64)).is_err() || f.read_exact(&mut tail[..n]).is_err() {
        return false;
    }
    let tail = &tail[..n];
    let end = tail
        .iter()
        .rposition(|&b| b != 0 && b != b'\n' && b != b'\r')
        .map_or(0, |i| i + 1);
    if end >= 2 && tail[end - 2..end] == [0xFF, 0xD9] {
        return true;
    }
    std::fs::read(path).is_ok_and(|b| check_jpeg_complete(&b).is_ok())
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

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    }

    /// Data after the end-of-image marker (a motion photo's video, an MPO's second image) is
    /// allowed; a file cut short is refused, even when an EXIF thumbnail before the scan holds
    /// an end marker of its own.
    #[test]
    fn trailing_data_is_allowed_and_truncation_is_refused() {
        let full = jpeg(40, 24);
        let want = decode_image(&full).unwrap().to_rgb8();
        let mut motion = full.clone();
        motion.extend_from_slice(b"\x00\x00\x00\x18ftypmp42 a video follows here");
        assert_eq!(decode_image(&motion).unwrap().to_rgb8(), want);
        let mut mpo = full.clone();
        mpo.extend_from_slice(&jpeg(8, 8));
        assert_eq!(decode_image(&mpo).unwrap().to_rgb8(), want);

        let cut = &full[..full.len() * 2 / 3];
        let e = decode_image(cut).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // An APP1 segment holding a whole thumbnail (with its end marker), then the cut image.
        let thumb = jpeg(4, 4);
        let mut with_thumb = full[..2].to_vec();
        with_thumb.extend_from_slice(&[0xFF, 0xE1]);
        with_thumb.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
        with_thumb.extend_from_slice(&thumb);
        with_thumb.extend_from_slice(&full[2..full.len() * 2 / 3]);
        let e = decode_image(&with_thumb).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        // The same file whole decodes.
        with_thumb.extend_from_slice(&full[full.len() * 2 / 3..]);
        with_thumb.extend_from_slice(b"trailer");
        assert_eq!(decode_image(&with_thumb).unwrap().to_rgb8(), want);
    }
}
