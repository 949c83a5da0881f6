//! Read `torch.save` state dicts without executing pickle code: the Python saev's `sae.pt`
//! checkpoints, and model weights saved by torch (`pytorch_model.bin`, torch-hub `.pth`,
//! open_clip's `open_clip_pytorch_model.bin`).
//!
//! `sae.pt` layout: one UTF-8 JSON line (the config: saev 0.1.0's `vars(cfg)` or HEAD's
//! `{"schema": 5, "cfg": …}`), then a `torch.save` zip archive (`<name>/data.pkl`,
//! `<name>/data/<key>`, …); model weights are the zip alone. The pickle is interpreted by a
//! small stack machine that knows the opcodes torch emits and only a whitelist of globals
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, float32 / float16 / bfloat16 storages); anything else is
//! an error, never a call. Tensors are rebuilt from their storage, offset, size and stride into
//! contiguous f32.
//!
//! ```text
//! let ckpt = read_torch_checkpoint(Path::new("sae.pt"))?;
//! let (shape, data) = &ckpt.tensors["W_enc"];
//! let weights = read_torch_state_dict(Path::new("pytorch_model.bin"))?;
//! ```

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// A decoded checkpoint: the JSON header and the state dict's tensors.
#[derive(Debug, Clone)]
pub struct TorchCheckpoint {
    /// The first line, parsed.
    pub header: serde_json::Value,
    /// Tensor name → (shape, contiguous f32 data).
    pub tensors: StateDict,
}

/// Pickle values; scalars are kept as decoded even where the reader does not need them.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(String, String),
    Storage {
        key: String,
        dtype: String,
    },
    Tensor {
        key: String,
        dtype: String,
        offset: usize,
        size: Vec<usize>,
        stride: Vec<usize>,
    },
    Mark,
}

struct Pickle<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Pickle<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Checkpoint {
            path: self.path.to_path_buf(),
            msg: format!("pickle at byte {}: {}", self.pos, msg.into()),
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.b.len() - self.pos < n {
            return Err(self.err("truncated"));
        }
        self.pos += n;
        Ok(&self.b[self.pos - n..self.pos])
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        while self.pos < self.b.len() && self.b[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.b[start..self.pos]).into_owned();
        self.take(1)?;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        let s = self.take(n)?.to_vec();
        String::from_utf8(s).map_err(|_| self.err("string is not UTF-8"))
    }
}

fn as_usize(v: &V) -> Option<usize> {
    match v {
        V::Int(i) if *i >= 0 => Some(*i as usize),
        _ => None,
    }
}

fn usizes(v: &V) -> Option<Vec<usize>> {
    match v {
        V::Tuple(xs) | V::List(xs) => xs.iter().map(as_usize).collect(),
        _ => None,
    }
}

/// Values in `v` (itself included), counting no further than `limit + 1`.
fn nodes_up_to(v: &V, limit: usize) -> usize {
    let mut n = 1;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if n > limit {
            break;
        }
        match v {
            V::Tuple(xs) | V::List(xs) => {
                n += xs.len();
                stack.extend(xs.iter());
            }
            V::Dict(kv) => {
                n += 2 * kv.len();
                stack.extend(kv.iter().flat_map(|(k, v)| [k, v]));
            }
            _ => {}
        }
    }
    n
}

/// Values that memo references may copy in all: a state dict's pickle copies a few thousand;
/// a crafted one that references a list of itself again and again would grow exponentially.
const MEMO_COPY_BUDGET: usize = 1 << 20;

fn run(p: &mut Pickle) -> Result<V> {
    let mut stack: Vec<V> = Vec::new();
    let mut memo: BTreeMap<u32, V> = BTreeMap::new();
    let mut copied = 0usize;
    let pop = |stack: &mut Vec<V>, p: &Pickle| stack.pop().ok_or_else(|| p.err("stack underflow"));
    let pop_mark = |stack: &mut Vec<V>, p: &Pickle| -> Result<Vec<V>> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, V::Mark))
            .ok_or_else(|| p.err("no MARK"))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = p.u8()?;
        match op {
            0x80 => {
                p.u8()?; // PROTO
            }
            0x95 => {
                p.take(8)?; // FRAME
            }
            b'.' => return pop(&mut stack, p),
            b'(' => stack.push(V::Mark),
            b'N' => stack.push(V::None),
            0x88 => stack.push(V::Bool(true)),
            0x89 => stack.push(V::Bool(false)),
            b'J' => {
                let v = p.u32()? as i32;
                stack.push(V::Int(i64::from(v)));
            }
            b'K' => {
                let v = p.u8()?;
                stack.push(V::Int(i64::from(v)));
            }
            b'M' => {
                let s = p.take(2)?;
                stack.push(V::Int(i64::from(u16::from_le_bytes([s[0], s[1]]))));
            }
            0x8a => {
                // LONG1
                let n = usize::from(p.u8()?);
                let s = p.take(n)?;
                if n > 8 {
                    return Err(p.err("integer too large"));
                }
                let mut buf = [if s.last().is_some_and(|&b| b & 0x80 != 0) {
                    0xff
                } else {
                    0
                }; 8];
                buf[..n].copy_from_slice(s);
                stack.push(V::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                let s = p.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                stack.push(V::Float(f64::from_be_bytes(a)));
            }
            b'X' => {
                let n = p.u32()? as usize;
                let s = p.string(n)?;
                stack.push(V::Str(s));
            }
            0x8c => {
                let n = usize::from(p.u8()?);
                let s = p.string(n)?;
                stack.push(V::Str(s));
            }
            b'c' => {
                let module = p.line()?;
                let name = p.line()?;
                stack.push(V::Global(module, name));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop(&mut stack, p)?;
                let module = pop(&mut stack, p)?;
                match (module, name) {
                    (V::Str(m), V::Str(n)) => stack.push(V::Global(m, n)),
                    _ => return Err(p.err("STACK_GLOBAL needs two strings")),
                }
            }
            b')' => stack.push(V::Tuple(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack, p)?;
                stack.push(V::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err(p.err("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(V::Tuple(items));
            }
            b']' => stack.push(V::List(Vec::new())),
            b'}' => stack.push(V::Dict(Vec::new())),
            b'a' => {
                let x = pop(&mut stack, p)?;
                if let Some(V::List(l)) = stack.last_mut() {
                    l.push(x);
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack, p)?;
                if let Some(V::List(l)) = stack.last_mut() {
                    l.extend(items);
                }
            }
            b's' => {
                let v = pop(&mut stack, p)?;
                let k = pop(&mut stack, p)?;
                match stack.last_mut() {
                    Some(V::Dict(d)) => d.push((k, v)),
                    _ => return Err(p.err("SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack, p)?;
                let Some(V::Dict(d)) = stack.last_mut() else {
                    return Err(p.err("SETITEMS on a non-dict"));
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            b'q' => {
                let i = u32::from(p.u8()?);
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| p.err("BINPUT on empty stack"))?;
                memo.insert(i, top);
            }
            b'r' => {
                let i = p.u32()?;
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| p.err("LONG_BINPUT on empty stack"))?;
                memo.insert(i, top);
            }
            0x94 => {
                let i = memo.len() as u32;
                let top = stack
                    .last()
                    .cloned()
                    .ok_or_else(|| p.err("MEMOIZE on empty stack"))?;
                memo.insert(i, top);
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    u32::from(p.u8()?)
                } else {
                    p.u32()?
                };
                let v = memo
                    .get(&i)
                    .ok_or_else(|| p.err(format!("memo {i} missing")))?;
                copied += nodes_up_to(v, MEMO_COPY_BUDGET);
                if copied > MEMO_COPY_BUDGET {
                    return Err(p.err(format!(
                        "memo references copy more than {MEMO_COPY_BUDGET} values (a pickle built to exhaust memory?)"
                    )));
                }
                stack.push(v.clone());
            }
            b'Q' => {
                // BINPERSID: ('storage', <storage type>, key, location, numel)
                let pid = pop(&mut stack, p)?;
                let V::Tuple(t) = pid else {
                    return Err(p.err("persistent id is not a tuple"));
                };
                match (t.first(), t.get(1), t.get(2)) {
                    (Some(V::Str(kind)), Some(V::Global(_, ty)), Some(V::Str(key)))
                        if kind == "storage" =>
                    {
                        stack.push(V::Storage {
                            key: key.clone(),
                            dtype: ty.clone(),
                        });
                    }
                    _ => return Err(p.err("unknown persistent id")),
                }
            }
            b'R' => {
                let args = pop(&mut stack, p)?;
                let f = pop(&mut stack, p)?;
                let V::Global(module, name) = f else {
                    return Err(p.err("REDUCE on a non-global"));
                };
                let V::Tuple(a) = args else {
                    return Err(p.err("REDUCE args not a tuple"));
                };
                let v = match (module.as_str(), name.as_str()) {
                    ("collections", "OrderedDict") => V::Dict(Vec::new()),
                    ("torch._utils", "_rebuild_tensor_v2") => {
                        let (Some(V::Storage { key, dtype }), Some(off), Some(size), Some(stride)) = (
                            a.first(),
                            a.get(1).and_then(as_usize),
                            a.get(2).and_then(usizes),
                            a.get(3).and_then(usizes),
                        ) else {
                            return Err(p.err("bad _rebuild_tensor_v2 arguments"));
                        };
                        V::Tensor {
                            key: key.clone(),
                            dtype: dtype.clone(),
                            offset: off,
                            size,
                            stride,
                        }
                    }
                    ("torch._utils", "_rebuild_parameter") => a
                        .into_iter()
                        .next()
                        .ok_or_else(|| p.err("bad _rebuild_parameter"))?,
                    (m, n) => {
                        return Err(p.err(format!(
                            "refusing to call {m}.{n} (not a tensor state dict)"
                        )))
                    }
                };
                stack.push(v);
            }
            b'b' => {
                pop(&mut stack, p)?; // BUILD: the state (e.g. OrderedDict _metadata) is ignored
            }
            other => return Err(p.err(format!("unsupported opcode 0x{other:02x}"))),
        }
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Interpret pickle bytes (the `data.pkl` of a torch zip) as saev does, for fuzzing: Ok when
/// they decode to a value, an error otherwise — never a call, never a panic.
#[doc(hidden)]
pub fn parse_pickle(bytes: &[u8]) -> Result<()> {
    run(&mut Pickle {
        b: bytes,
        pos: 0,
        path: Path::new("<fuzz>"),
    })
    .map(|_| ())
}

/// Tensor name → (shape, contiguous f32 data).
pub type StateDict = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Read a `sae.pt` (JSON line + torch zip).
pub fn read_torch_checkpoint(path: impl AsRef<Path>) -> Result<TorchCheckpoint> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_path(path)?;
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad(path, "no JSON header line"))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[..nl])
        .map_err(|e| bad(path, format!("header line is not JSON: {e}")))?;
    let tensors = read_zip(&bytes[nl + 1..], path, "after the header")?;
    Ok(TorchCheckpoint { header, tensors })
}

/// Read a plain `torch.save(state_dict)` zip (`pytorch_model.bin`, a torch-hub `.pth`); a
/// state dict nested under `"state_dict"` or `"model"` is found too.
pub fn read_torch_state_dict(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_path(path)?;
    if bytes.starts_with(&[0x80]) {
        return Err(bad(
            path,
            "a legacy (pre-1.6, non-zip) torch file; re-save it with a current torch or as safetensors",
        ));
    }
    read_zip(&bytes, path, "")
}

fn read_zip(bytes: &[u8], path: &Path, where_: &str) -> Result<StateDict> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        bad(
            path,
            format!("not a torch.save zip {where_}: {e}").replace("  ", " "),
        )
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| bad(path, "no data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let read_entry = |zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>> {
        let mut e = zip
            .by_name(name)
            .map_err(|e| bad(path, format!("{name}: {e}")))?;
        let mut out = Vec::new();
        e.read_to_end(&mut out)
            .map_err(|e| bad(path, format!("{name}: {e}")))?;
        Ok(out)
    };
    let pkl = read_entry(&mut zip, &pkl_name)?;
    let root = run(&mut Pickle {
        b: &pkl,
        pos: 0,
        path,
    })?;
    let V::Dict(mut items) = root else {
        return Err(bad(path, "the pickle is not a state dict"));
    };
    // {"state_dict": {...}} / {"model": {...}}: the usual wrappers of training checkpoints.
    if !items.iter().any(|(_, v)| matches!(v, V::Tensor { .. })) {
        if let Some((_, V::Dict(inner))) = items.iter().find(|(k, v)| {
            matches!((k, v), (V::Str(name), V::Dict(_)) if name == "state_dict" || name == "model")
        }) {
            items = inner.clone();
        }
    }
    let mut storages: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (k, v) in items {
        let (
            V::Str(name),
            V::Tensor {
                key,
                dtype,
                offset,
                size,
                stride,
            },
        ) = (k, v)
        else {
            continue;
        };
        // Integer and bool tensors are buffers, never weights (`position_ids`, BatchNorm's
        // `num_batches_tracked`, masks): left out, so a state dict holding them still loads;
        // a caller that needs one finds it missing by name.
        const FLOAT: [&str; 4] = [
            "FloatStorage",
            "HalfStorage",
            "BFloat16Storage",
            "DoubleStorage",
        ];
        const NOT_WEIGHTS: [&str; 9] = [
            "LongStorage",
            "IntStorage",
            "ShortStorage",
            "CharStorage",
            "ByteStorage",
            "BoolStorage",
            "UInt16Storage",
            "UInt32Storage",
            "UInt64Storage",
        ];
        if NOT_WEIGHTS.contains(&dtype.as_str()) {
            continue;
        }
        if !FLOAT.contains(&dtype.as_str()) {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` is {dtype}; saev reads float32, float16, bfloat16 and float64 tensors (and skips integer and bool ones)"
                ),
            ));
        }
        if !storages.contains_key(&key) {
            let raw = read_entry(&mut zip, &format!("{prefix}data/{key}"))?;
            let values: Vec<f32> = match dtype.as_str() {
                "FloatStorage" => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                "HalfStorage" => raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                "BFloat16Storage" => raw
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                // Float64 weights (rare: a model trained or saved in double) are read as f32.
                _ => raw
                    .chunks_exact(8)
                    .map(|c| {
                        f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                    })
                    .collect(),
            };
            storages.insert(key.clone(), values);
        }
        let storage = &storages[&key];
        if size.len() != stride.len() {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}`: {} sizes, {} strides",
                    size.len(),
                    stride.len()
                ),
            ));
        }
        let numel = size
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| bad(path, format!("tensor `{name}`: size {size:?} overflows")))?;
        if numel > 0 {
            // The largest index read must be inside the storage, checked before allocating.
            let last = size
                .iter()
                .zip(&stride)
                .map(|(n, s)| (n - 1).saturating_mul(*s))
                .fold(offset, usize::saturating_add);
            if last >= storage.len() {
                return Err(bad(path, format!("tensor `{name}` reads past its storage")));
            }
        }
        // A stride-0 (expanded) tensor may claim more elements than its storage holds; past
        // 2^32 it is no checkpoint saev could use, and the copy below would exhaust memory.
        if numel > 1 << 32 {
            return Err(bad(
                path,
                format!("tensor `{name}`: size {size:?} is {numel} elements, more than saev reads (2^32)"),
            ));
        }
        let mut data = Vec::with_capacity(numel);
        let mut idx = vec![0usize; size.len()];
        for _ in 0..numel {
            let at = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            data.push(storage[at]);
            for d in (0..size.len()).rev() {
                idx[d] += 1;
                if idx[d] < size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        tensors.insert(name, (size, data));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_bytes(b: &[u8]) -> Result<V> {
        run(&mut Pickle {
            b,
            pos: 0,
            path: Path::new("x.pt"),
        })
    }

    #[test]
    fn globals_outside_the_whitelist_are_refused() {
        // pickle.dumps of os.system("ls") as a REDUCE, protocol 2.
        let evil = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let e = run_bytes(evil).unwrap_err().to_string();
        assert!(e.contains("refusing to call os.system"), "{e}");
    }

    #[test]
    fn small_values_decode() {
        // {"a": (1, 300, -2)} with SHORT_BINUNICODE, BININT1, BININT2, BININT (protocol 4 style).
        let b = b"\x80\x04}(\x8c\x01a(K\x01M,\x01J\xfe\xff\xff\xfftu.";
        match run_bytes(b).unwrap() {
            V::Dict(d) => match &d[0].1 {
                V::Tuple(t) => assert_eq!(
                    t.iter()
                        .filter_map(|v| if let V::Int(i) = v { Some(*i) } else { None })
                        .collect::<Vec<_>>(),
                    vec![1, 300, -2]
                ),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    /// A `torch.save` state dict with integer and bool buffers next to the weights
    /// (`scripts/make_torch_fixtures.py`): the float tensors (f32, f16, bf16, f64, a transposed
    /// view) read as torch reads them, the others left out.
    #[test]
    fn integer_and_bool_buffers_are_left_out_and_floats_read_as_torch_reads_them() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/torch");
        let sd = read_torch_state_dict(dir.join("mixed_dtypes.bin")).unwrap();
        let want: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("mixed_dtypes.json")).unwrap()).unwrap();
        let want = want.as_object().unwrap();
        let mut names: Vec<&String> = want.keys().collect();
        names.sort();
        assert_eq!(sd.keys().collect::<Vec<_>>(), names);
        for (k, w) in want {
            let (shape, values) = &sd[k];
            let ws: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
            let wv: Vec<f32> = serde_json::from_value(w["values"].clone()).unwrap();
            assert_eq!((shape, values), (&ws, &wv), "{k}");
        }
    }

    /// A pickle that appends a list to itself through memo references, doubling it each time:
    /// refused once the copies pass the budget, not an exhausted machine.
    #[test]
    fn memo_bombs_are_refused() {
        // PROTO 2, EMPTY_LIST, BINPUT 0, then 40 × (BINGET 0, BINGET 0, TUPLE2, BINPUT 0), STOP:
        // each step's tuple holds two copies of the last, 2^40 values in the end.
        let mut b = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            b.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        b.push(b'.');
        let e = run_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("memo references copy more than"), "{e}");
    }
}
