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

/// The last (up to) 64 bytes of a file, or None when it cannot be read.
fn file_tail(path: &Path) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.seek(SeekFrom::End(0)).ok()?;
    let n = len.min(64);
    f.seek(SeekFrom::Start(len - n)).ok()?;
    let mut tail = vec![0u8; n as usize];
    f.read_exact(&mut tail).ok()?;
    Some(tail)
}

/// Whether a PNG file is whole: its `IEND` chunk is there (in its last bytes, as a rule; data
/// after it is allowed). A PNG cut short decodes to an error mid-recording otherwise.
pub(crate) fn png_file_complete(path: &Path) -> bool {
    let has_end = |b: &[u8]| b.windows(4).any(|w| w == b"IEND");
    match file_tail(path) {
        None => false,
        Some(t) if has_end(&t) => true,
        Some(_) => std::fs::read(path).is_ok_and(|b| has_end(&b)),
    }
}

/// Whether an image file that is a JPEG is whole (see `check_jpeg_complete`), reading only its
/// last bytes in the common case: what `--skip-bad` checks up front besides the header.
pub(crate) fn jpeg_file_complete(path: &Path) -> bool {
    let Some(tail) = file_tail(path) else {
        return false;
    };
    let end = tail
        .iter()
        .rposition(|&b| b != 0 && b != b'\n' && b != b'\r')
        .map_or(0, |i| i + 1);
    if end >= 2 && tail[end - 2..end] == [0xFF, 0xD9] {
        return true;
    }
    std::fs::read(path).is_ok_and(|b| check_jpeg_complete(&b).is_ok())
}

/// Decode a segmentation mask: one class index per pixel. A PNG is read without conversion: an
/// 8-bit greyscale one (ADE20K) as its values, a palette one (Pascal VOC) as its palette
/// indices, lower bit depths unpacked; RGB(A) whose channels are equal everywhere (grey saved
/// as colour) as one channel; another format likewise. Colour or 16-bit masks are refused by
/// name (converting them to grey would give luminance, not class indices).
pub fn load_mask(path: impl AsRef<Path>) -> Result<image::GrayImage> {
    let path = path.as_ref();
    let err = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    // Grey saved as colour: one channel, if every pixel's channels agree.
    let grey_of = |w: u32, h: u32, px: &[u8], ch: usize| -> Result<image::GrayImage> {
        let mut out = Vec::with_capacity(px.len() / ch);
        for (i, p) in px.chunks_exact(ch).enumerate() {
            if p[0] != p[1] || p[0] != p[2] {
                return Err(err(format!(
                    "a mask must hold one class index per pixel; this colour mask has pixel ({}, {}) = {:?}",
                    i % w as usize,
                    i / w as usize,
                    &p[..3]
                )));
            }
            out.push(p[0]);
        }
        image::GrayImage::from_raw(w, h, out)
            .ok_or_else(|| err("rows shorter than the image".into()))
    };
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return match load_image(path)? {
            DynamicImage::ImageLuma8(m) => Ok(m),
            DynamicImage::ImageRgb8(m) => grey_of(m.width(), m.height(), m.as_raw(), 3),
            DynamicImage::ImageRgba8(m) => grey_of(m.width(), m.height(), m.as_raw(), 4),
            other => Err(err(format!(
                "a mask must hold one class index per pixel (8-bit greyscale); this one is {:?}",
                other.color()
            ))),
        };
    }
    let mut dec =
        png::Decoder::new_with_limits(std::io::Cursor::new(&bytes), png::Limits { bytes: 1 << 30 });
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec.read_info().map_err(|e| err(format!("PNG: {e}")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| err("PNG: image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| err(format!("PNG: {e}")))?;
    use png::{BitDepth, ColorType};
    let bits = match (info.color_type, info.bit_depth) {
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::One) => 1,
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::Two) => 2,
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::Four) => 4,
        (ColorType::Grayscale | ColorType::Indexed, BitDepth::Eight) => 8,
        (ColorType::Rgb | ColorType::Rgba, BitDepth::Eight) => {
            let ch = if info.color_type == ColorType::Rgb { 3 } else { 4 };
            let (w, h) = (info.width as usize, info.height as usize);
            let px: Vec<u8> = buf
                .chunks(info.line_size)
                .take(h)
                .flat_map(|row| row[..w * ch].iter().copied())
                .collect();
            return grey_of(info.width, info.height, &px, ch);
        }
        (c, b) => {
            return Err(err(format!(
                "a mask must hold one class index per pixel (8-bit greyscale or palette PNG); this one is {c:?} at {b:?} bits"
            )))
        }
    };
    let (w, h) = (info.width as usize, info.height as usize);
    let per_byte = 8 / bits;
    let mut out = Vec::with_capacity(w * h);
    for row in buf.chunks(info.line_size).take(h) {
        if bits == 8 {
            out.extend_from_slice(&row[..w]);
        } else {
            out.extend((0..w).map(|x| {
                let byte = row[x / per_byte];
                let shift = 8 - bits * (x % per_byte + 1);
                (byte >> shift) & ((1u8 << bits) - 1)
            }));
        }
    }
    image::GrayImage::from_raw(info.width, info.height, out)
        .ok_or_else(|| err("PNG: rows shorter than the image".into()))
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

    /// Masks keep their class indices: a palette PNG (Pascal VOC) gives its indices, not the
    /// palette colours' luminance; a 4-bit palette is unpacked; an RGB mask is refused.
    #[test]
    fn masks_are_class_indices() {
        let dir = std::env::temp_dir().join(format!("saev-masks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (5u32, 3u32);
        let idx: Vec<u8> = (0..w * h).map(|i| (i % 4) as u8 * 5).collect();
        let write = |name: &str, color: png::ColorType, depth: png::BitDepth, data: &[u8]| {
            let p = dir.join(name);
            let f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
            let mut e = png::Encoder::new(f, w, h);
            e.set_color(color);
            e.set_depth(depth);
            if color == png::ColorType::Indexed {
                // A VOC-like palette: index i is a bright colour, never grey i.
                let pal: Vec<u8> = (0..16u8).flat_map(|i| [200, i * 10, 255 - i]).collect();
                e.set_palette(pal);
            }
            e.write_header().unwrap().write_image_data(data).unwrap();
            p
        };
        let grey = write(
            "grey.png",
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &idx,
        );
        assert_eq!(load_mask(&grey).unwrap().into_raw(), idx);
        let pal = write(
            "pal.png",
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            &idx,
        );
        assert_eq!(load_mask(&pal).unwrap().into_raw(), idx);
        // 4 bits: two pixels a byte, rows padded to whole bytes.
        let small: Vec<u8> = (0..w * h).map(|i| (i % 7) as u8).collect();
        let mut packed = Vec::new();
        for row in small.chunks(w as usize) {
            for pair in row.chunks(2) {
                packed.push(pair[0] << 4 | pair.get(1).copied().unwrap_or(0));
            }
        }
        let pal4 = write(
            "pal4.png",
            png::ColorType::Indexed,
            png::BitDepth::Four,
            &packed,
        );
        assert_eq!(load_mask(&pal4).unwrap().into_raw(), small);
        // Grey saved as RGB: its one channel; real colour: refused, naming a pixel.
        let rgb: Vec<u8> = idx.iter().flat_map(|&v| [v, v, v]).collect();
        let rgb = write("rgb.png", png::ColorType::Rgb, png::BitDepth::Eight, &rgb);
        assert_eq!(load_mask(&rgb).unwrap().into_raw(), idx);
        let col: Vec<u8> = idx.iter().flat_map(|&v| [v, 128, 0]).collect();
        let col = write("col.png", png::ColorType::Rgb, png::BitDepth::Eight, &col);
        let e = load_mask(&col).unwrap_err().to_string();
        assert!(
            e.contains("col.png") && e.contains("class index") && e.contains("(0, 0)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
