//! IDX files (the MNIST / Fashion-MNIST format), gzipped or not, and the IDX dataset kind
//! (images + the sibling labels file; Fashion-MNIST class names when the path says so).
//!
//! Layout: big-endian magic `0x0000_08DD` (`08` = unsigned byte, `DD` = number of dims), then one
//! big-endian u32 per dimension, then the bytes in C order.
//!
//! ```text
//! let (dims, bytes) = read_idx_u8(Path::new("train-images-idx3-ubyte.gz"))?; // [60000, 28, 28]
//! ```

use std::io::Read;
use std::path::Path;

use super::{dataset_err, Source};
use crate::error::{Error, IoContext, Result};

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read an unsigned-byte IDX file; returns its dims and data.
pub(crate) fn read_idx_u8(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).with_path(path)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("gzip: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(bad(
            path,
            format!(
                "IDX data type 0x{:02x} is not unsigned byte (0x08)",
                bytes[2]
            ),
        ));
    }
    let n_dims = usize::from(bytes[3]);
    let header = 4 + 4 * n_dims;
    if bytes.len() < header {
        return Err(bad(path, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..n_dims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(path, format!("IDX dims {dims:?} overflow")))?;
    if bytes.len() - header != n {
        return Err(bad(
            path,
            format!(
                "IDX dims {dims:?} need {} data bytes, the file has {}",
                n,
                bytes.len() - header
            ),
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Fashion-MNIST class names (the Debian package's data is Fashion-MNIST when the path says so).
pub(super) const FASHION_MNIST: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

pub(super) fn open_idx(path: &Path) -> Result<(Vec<String>, Source)> {
    let (dims, pixels) = read_idx_u8(path)?;
    if dims.len() != 3 || dims.contains(&0) {
        return Err(dataset_err(
            path,
            format!("IDX images must be [n, rows, cols], none zero; got dims {dims:?}"),
        ));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let label_path = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
    let labels = if label_path != path && label_path.exists() {
        let (ldims, labels) = read_idx_u8(&label_path)?;
        if ldims != [dims[0]] {
            return Err(dataset_err(
                &label_path,
                format!("labels of dims {ldims:?} for {} images", dims[0]),
            ));
        }
        Some(labels)
    } else {
        None
    };
    let fashion = path
        .to_string_lossy()
        .to_ascii_lowercase()
        .contains("fashion");
    let classes = match (&labels, fashion) {
        (Some(_), true) => FASHION_MNIST.iter().map(|s| s.to_string()).collect(),
        (Some(l), false) => (0..=l.iter().copied().max().unwrap_or(0))
            .map(|c| c.to_string())
            .collect(),
        (None, _) => Vec::new(),
    };
    Ok((
        classes,
        Source::Idx {
            side: (dims[1], dims[2]),
            pixels,
            labels,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_idx(path: &Path, dims: &[u32], data: &[u8], gz: bool) {
        let mut b = vec![0u8, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&b).unwrap();
            b = e.finish().unwrap();
        }
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn reads_plain_and_gz() {
        let dir = std::env::temp_dir().join(format!("saev-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..24).collect();
        for gz in [false, true] {
            let p = dir.join(format!("x{gz}"));
            write_idx(&p, &[2, 3, 4], &data, gz);
            let (dims, got) = read_idx_u8(&p).unwrap();
            assert_eq!(dims, vec![2, 3, 4]);
            assert_eq!(got, data);
        }
        let p = dir.join("short");
        write_idx(&p, &[2, 3, 4], &data[..20], false);
        let err = read_idx_u8(&p).unwrap_err().to_string();
        assert!(err.contains("short") && err.contains("24"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
