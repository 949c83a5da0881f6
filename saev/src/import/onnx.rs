//! A minimal, zero-copy reader for the parts of an ONNX model (`onnx.proto`, protobuf wire
//! format) a weight importer needs: the graph's nodes (name, op type, inputs, outputs) and its
//! initializers (name, dims, float data).
//!
//! Only what is read is decoded; other fields are skipped by wire type. Tensors stored outside
//! the file (`data_location = EXTERNAL`) and non-float initializers are reported, not guessed.
//!
//! ```text
//! let model = OnnxModel::parse(&bytes)?;
//! for init in &model.initializers { println!("{} {:?}", init.name, init.dims); }
//! ```

use std::fmt;

/// A protobuf decoding problem, with the byte offset where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset in the buffer.
    pub offset: usize,
    /// What went wrong.
    pub msg: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.msg)
    }
}

type DResult<T> = std::result::Result<T, DecodeError>;

/// A graph node.
#[derive(Debug, Clone, Default)]
pub struct Node<'a> {
    /// Node name (e.g. `/backbone/encoder/layer.3/attention/attention/query/MatMul`).
    pub name: &'a str,
    /// Operator (e.g. `MatMul`).
    pub op_type: &'a str,
    /// Input value names.
    pub inputs: Vec<&'a str>,
    /// Output value names.
    pub outputs: Vec<&'a str>,
}

/// Where a tensor's elements are.
#[derive(Debug, Clone)]
pub enum TensorData<'a> {
    /// Little-endian bytes (`raw_data`).
    Raw(&'a [u8]),
    /// Decoded `float_data`.
    Floats(Vec<f32>),
    /// Stored in an external file (not supported).
    External,
}

/// An initializer (a constant tensor).
#[derive(Debug, Clone)]
pub struct Initializer<'a> {
    /// Name (possibly auto-generated, e.g. `onnx::MatMul_1966`).
    pub name: &'a str,
    /// Dimensions.
    pub dims: Vec<usize>,
    /// ONNX `TensorProto.DataType` (1 = FLOAT).
    pub data_type: i32,
    /// The elements.
    pub data: TensorData<'a>,
}

impl Initializer<'_> {
    /// Number of elements (`usize::MAX` when the dims' product overflows: no buffer has it).
    pub fn numel(&self) -> usize {
        self.dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// The elements as f32, checking type and length.
    pub fn to_f32(&self) -> std::result::Result<Vec<f32>, String> {
        if self.data_type != 1 {
            return Err(format!(
                "initializer `{}` has data type {} (only FLOAT = 1 is supported)",
                self.name, self.data_type
            ));
        }
        let v = match &self.data {
            TensorData::Raw(b) => {
                if Some(b.len()) != self.numel().checked_mul(4) {
                    return Err(format!(
                        "initializer `{}`: {} bytes of raw data for dims {:?}",
                        self.name,
                        b.len(),
                        self.dims
                    ));
                }
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            TensorData::Floats(f) => f.clone(),
            TensorData::External => {
                return Err(format!(
                    "initializer `{}` is stored in an external file",
                    self.name
                ))
            }
        };
        if v.len() != self.numel() {
            return Err(format!(
                "initializer `{}`: {} values for dims {:?}",
                self.name,
                v.len(),
                self.dims
            ));
        }
        Ok(v)
    }
}

/// The decoded graph of an ONNX model.
#[derive(Debug, Clone, Default)]
pub struct OnnxModel<'a> {
    /// Nodes in graph order.
    pub nodes: Vec<Node<'a>>,
    /// Initializers.
    pub initializers: Vec<Initializer<'a>>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8], usize),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn err<T>(&self, msg: impl Into<String>) -> DResult<T> {
        Err(DecodeError {
            offset: self.base + self.pos,
            msg: msg.into(),
        })
    }

    fn varint(&mut self) -> DResult<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return self.err("truncated varint");
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        self.err("varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> DResult<(&'a [u8], usize)> {
        if self.buf.len() - self.pos < n {
            return self.err(format!("field of {n} bytes runs past the end"));
        }
        let start = self.pos;
        self.pos += n;
        Ok((&self.buf[start..start + n], self.base + start))
    }

    fn next(&mut self) -> DResult<Option<(u32, Field<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        let f = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                let (b, off) = self.take(n)?;
                Field::Bytes(b, off)
            }
            5 => {
                let (b, _) = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return self.err(format!("unsupported wire type {w} (field {field})")),
        };
        Ok(Some((field, f)))
    }
}

fn utf8(b: &[u8], off: usize) -> DResult<&str> {
    std::str::from_utf8(b).map_err(|_| DecodeError {
        offset: off,
        msg: "string is not UTF-8".into(),
    })
}

impl<'a> OnnxModel<'a> {
    /// Decode a serialized `ModelProto`.
    pub fn parse(bytes: &'a [u8]) -> DResult<Self> {
        let mut r = Reader::new(bytes, 0);
        let mut graph = None;
        while let Some((field, f)) = r.next()? {
            if let (7, Field::Bytes(b, off)) = (field, f) {
                graph = Some(parse_graph(b, off)?);
            }
        }
        graph.ok_or(DecodeError {
            offset: 0,
            msg: "no graph (is this an ONNX ModelProto?)".into(),
        })
    }
}

fn parse_graph(buf: &[u8], base: usize) -> DResult<OnnxModel<'_>> {
    let mut r = Reader::new(buf, base);
    let mut model = OnnxModel::default();
    while let Some((field, f)) = r.next()? {
        match (field, f) {
            (1, Field::Bytes(b, off)) => model.nodes.push(parse_node(b, off)?),
            (5, Field::Bytes(b, off)) => model.initializers.push(parse_tensor(b, off)?),
            _ => {}
        }
    }
    Ok(model)
}

fn parse_node(buf: &[u8], base: usize) -> DResult<Node<'_>> {
    let mut r = Reader::new(buf, base);
    let mut n = Node::default();
    while let Some((field, f)) = r.next()? {
        if let Field::Bytes(b, off) = f {
            match field {
                1 => n.inputs.push(utf8(b, off)?),
                2 => n.outputs.push(utf8(b, off)?),
                3 => n.name = utf8(b, off)?,
                4 => n.op_type = utf8(b, off)?,
                _ => {}
            }
        }
    }
    Ok(n)
}

fn parse_tensor(buf: &[u8], base: usize) -> DResult<Initializer<'_>> {
    let mut r = Reader::new(buf, base);
    let mut t = Initializer {
        name: "",
        dims: Vec::new(),
        data_type: 0,
        data: TensorData::Floats(Vec::new()),
    };
    let mut floats = Vec::new();
    while let Some((field, f)) = r.next()? {
        match (field, f) {
            (1, Field::Varint(v)) => t.dims.push(v as usize),
            (1, Field::Bytes(b, off)) => {
                let mut p = Reader::new(b, off);
                while p.pos < b.len() {
                    t.dims.push(p.varint()? as usize);
                }
            }
            (2, Field::Varint(v)) => t.data_type = v as i32,
            (4, Field::Fixed32(v)) => floats.push(f32::from_bits(v)),
            (4, Field::Bytes(b, off)) => {
                if b.len() % 4 != 0 {
                    return Err(DecodeError {
                        offset: off,
                        msg: "packed float_data length not a multiple of 4".into(),
                    });
                }
                floats.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            (8, Field::Bytes(b, off)) => t.name = utf8(b, off)?,
            (9, Field::Bytes(b, _)) => t.data = TensorData::Raw(b),
            (14, Field::Varint(1)) => t.data = TensorData::External,
            _ => {}
        }
    }
    if !floats.is_empty() {
        t.data = TensorData::Floats(floats);
    }
    Ok(t)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Tiny protobuf writer for building test models.
    pub(crate) fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    pub(crate) fn bytes_field(field: u32, b: &[u8], out: &mut Vec<u8>) {
        varint(u64::from(field << 3 | 2), out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    pub(crate) fn tensor(name: &str, dims: &[usize], vals: &[f32]) -> Vec<u8> {
        let mut t = Vec::new();
        for &d in dims {
            varint(1 << 3, &mut t);
            varint(d as u64, &mut t);
        }
        varint(2 << 3, &mut t);
        varint(1, &mut t);
        bytes_field(8, name.as_bytes(), &mut t);
        let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes_field(9, &raw, &mut t);
        t
    }

    pub(crate) fn node(name: &str, op: &str, inputs: &[&str]) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            bytes_field(1, i.as_bytes(), &mut n);
        }
        bytes_field(2, format!("{name}_out").as_bytes(), &mut n);
        bytes_field(3, name.as_bytes(), &mut n);
        bytes_field(4, op.as_bytes(), &mut n);
        n
    }

    pub(crate) fn model(nodes: &[Vec<u8>], inits: &[Vec<u8>]) -> Vec<u8> {
        let mut g = Vec::new();
        for n in nodes {
            bytes_field(1, n, &mut g);
        }
        for t in inits {
            bytes_field(5, t, &mut g);
        }
        let mut m = Vec::new();
        varint(1 << 3, &mut m); // ir_version = 7
        varint(7, &mut m);
        bytes_field(7, &g, &mut m);
        m
    }

    #[test]
    fn round_trip_small_model() {
        let bytes = model(
            &[node("/a/MatMul", "MatMul", &["x", "w"])],
            &[tensor("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5])],
        );
        let m = OnnxModel::parse(&bytes).unwrap();
        assert_eq!(m.nodes.len(), 1);
        assert_eq!(m.nodes[0].name, "/a/MatMul");
        assert_eq!(m.nodes[0].inputs, vec!["x", "w"]);
        assert_eq!(m.initializers[0].dims, vec![2, 3]);
        assert_eq!(m.initializers[0].to_f32().unwrap()[5], -6.5);
    }

    #[test]
    fn truncated_input_is_an_error_with_offset() {
        let mut bytes = model(&[], &[tensor("w", &[4], &[1.0; 4])]);
        bytes.truncate(bytes.len() - 3);
        let err = OnnxModel::parse(&bytes).unwrap_err();
        assert!(err.msg.contains("past the end"), "{err}");
    }

    #[test]
    fn not_onnx() {
        assert!(OnnxModel::parse(b"").is_err());
    }
}
