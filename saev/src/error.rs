//! The one error type of saev.
//!
//! Every fallible call returns [`Result<T>`]. Variants carry the context a user needs to fix the
//! problem: the file, the checkpoint key, the expected and actual shapes, the config field.
//!
//! ```
//! use saev::Error;
//! let err = Error::LayerOutOfRange { layer: 14, n_layers: 12 };
//! assert!(err.to_string().contains("14"));
//! ```

use std::path::PathBuf;

/// saev's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in saev, with the context to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file that does not parse or does not have the expected fields.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A config value saev cannot use (unknown architecture, bad field value, …).
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file (or a description of where the config came from).
        path: PathBuf,
        /// The JSON field at fault.
        field: String,
        /// What is wrong with it.
        msg: String,
    },

    /// A checkpoint file that is missing, truncated or not a safetensors file.
    #[error("{path}: not a readable safetensors file: {msg}")]
    Safetensors {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },

    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The checkpoint key that was looked up.
        key: String,
    },

    /// A tensor of the checkpoint (or an input) has the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    Shape {
        /// Which tensor (a checkpoint key with its file, or an argument name).
        what: String,
        /// The shape saev needs.
        expected: Vec<usize>,
        /// The shape it got.
        actual: Vec<usize>,
    },

    /// A file that should be an image and cannot be decoded.
    #[error("{path}: not a readable image: {msg}")]
    Image {
        /// The file at fault (or `<memory>` for in-memory bytes).
        path: PathBuf,
        /// The decoder's message.
        msg: String,
    },

    /// A block index outside `-n_layers..n_layers`.
    #[error("layer {layer} is out of range for a model with {n_layers} blocks (valid: {lo}..={hi})", lo = -(*n_layers as i64), hi = *n_layers as i64 - 1)]
    LayerOutOfRange {
        /// The index asked for (Python style: negative counts from the end).
        layer: i64,
        /// The number of transformer blocks of the model.
        n_layers: usize,
    },

    /// An input image size the model cannot take.
    #[error("input size {height}x{width} is not a multiple of the patch size {patch_size}")]
    InputSize {
        /// Pixel height.
        height: usize,
        /// Pixel width.
        width: usize,
        /// The model's patch size.
        patch_size: usize,
    },

    /// A dataset that cannot be read (layout, labels, IDX header, …).
    #[error("{path}: dataset: {msg}")]
    Dataset {
        /// The file or folder at fault.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// An activation store that is inconsistent, truncated or of an unknown version.
    #[error("{path}: {msg}")]
    Store {
        /// The store file at fault.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// An SAE checkpoint that cannot be read.
    #[error("{path}: checkpoint: {msg}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// A model id that is neither a directory nor in the local Hugging Face cache.
    #[error("model `{id}` not found: {msg}")]
    ModelNotFound {
        /// The directory or `org/name` id asked for.
        id: String,
        /// Where saev looked.
        msg: String,
    },

    /// An ONNX file that cannot be parsed or lacks what the importer needs.
    #[error("{path}: ONNX: {msg}")]
    Onnx {
        /// The ONNX file (or the archive holding it).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// An external command (e.g. `python3 -m pip download`) failed.
    #[error("command `{cmd}` failed: {msg}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status and the tail of its output.
        msg: String,
    },

    /// An error from candle's tensor operations, with what saev was doing.
    #[error("{context}: {source}")]
    Candle {
        /// What saev was doing.
        context: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },

    /// A NaN or infinity in a store's activations (training, its normalisation statistics, the
    /// feature pass).
    #[error("{}: non-finite activation (value {value}) read by {during}{}: example {example}, token {token}, dimension {dim} (layer {layer}) — the store is damaged, or the model overflowed while recording", file.display(), if *during == "training" { format!(" at step {step}") } else { String::new() })]
    NonFinite {
        /// The shard file holding the value (in the store's directory).
        file: PathBuf,
        /// What was reading: `training`, `the normalisation statistics`, `the feature pass`.
        during: &'static str,
        /// The recorded layer.
        layer: i64,
        /// Training step (0-based).
        step: usize,
        /// Example index in the store.
        example: u64,
        /// Token position within the example's view (patch index for patches).
        token: u64,
        /// Dimension.
        dim: usize,
        /// The value (NaN or ±inf).
        value: f32,
    },

    /// A stop was requested (Ctrl-C, SIGTERM, [`crate::request_stop`]): the run wrote a
    /// checkpoint first.
    #[error("interrupted after {seen} of {total} patches: checkpoint written to {}; run the same command again to resume", checkpoint.display())]
    Interrupted {
        /// Patches trained on so far.
        seen: u64,
        /// Patches the run trains on.
        total: u64,
        /// The checkpoint directory written.
        checkpoint: std::path::PathBuf,
    },

    /// Training produced a non-finite loss or weights: that step is not saved.
    #[error("training diverged: setting {setting} ({detail}) at step {step} (lr {lr:e}): {what}; {} — lower the learning rate or λ, or clip gradients (max_grad_norm)", kept(checkpoint))]
    Diverged {
        /// Index of the setting in the sweep.
        setting: usize,
        /// The setting (lr, λ, k).
        detail: String,
        /// What went non-finite (`loss NaN`, `W_dec[12] after the update`).
        what: String,
        /// The training step (0-based).
        step: usize,
        /// The learning rate at that step.
        lr: f64,
        /// The checkpoint directory kept.
        checkpoint: std::path::PathBuf,
    },

    /// An index, count or setting outside its valid range.
    #[error("{what} {value} is out of range (valid: {valid})")]
    OutOfRange {
        /// What was given (`example`, `--class`, `train: lr`, …).
        what: String,
        /// The value given.
        value: String,
        /// The valid range.
        valid: String,
    },

    /// An output directory saev will not write into (it holds files saev did not write, or
    /// the result of other inputs).
    #[error("{path}: {problem}; {fix}")]
    OutputDir {
        /// The directory.
        path: PathBuf,
        /// What is there.
        problem: String,
        /// What to do instead.
        fix: String,
    },

    /// Two things that must belong together do not (an SAE of another layer or backbone, a
    /// feature pass of another store).
    #[error("{what}: {expected}, not {found}{fix}", fix = if fix.is_empty() { String::new() } else { format!("; {fix}") })]
    Mismatch {
        /// What is compared.
        what: String,
        /// What it was made for.
        expected: String,
        /// What it is used with.
        found: String,
        /// What to do (may be empty).
        fix: String,
    },

    /// A step needs something its input lacks (labels, held-out examples, feature maxima).
    #[error("{what}: {missing}{fix}", fix = if fix.is_empty() { String::new() } else { format!("; {fix}") })]
    Missing {
        /// The input or step at fault.
        what: String,
        /// What it lacks.
        missing: String,
        /// How to provide it (may be empty).
        fix: String,
    },

    /// Drawing a picture or chart, or building a table, failed.
    #[error("{what}: {msg}")]
    Render {
        /// What was being drawn or built.
        what: String,
        /// The underlying error.
        msg: String,
    },

    /// A state saev's own code should never reach (a bug: please report it).
    #[error("internal error (a bug in saev): {0}")]
    Internal(String),

    /// The machine lacks something saev needs (a program, write access, the network), with what
    /// to do about it.
    #[error("{problem}\n  fix: {fix}")]
    Setup {
        /// What is missing or refused.
        problem: String,
        /// How to fix it.
        fix: String,
    },
}

/// The context of a candle error raised by a bare `?`, before a caller names what it was
/// computing (see [`Computing`]).
const UNNAMED_TENSOR_OP: &str = "tensor op";

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Candle {
            context: UNNAMED_TENSOR_OP.into(),
            source,
        }
    }
}

impl Error {
    pub(crate) fn out_of_range(
        what: impl Into<String>,
        value: impl std::fmt::Display,
        valid: impl Into<String>,
    ) -> Self {
        Error::OutOfRange {
            what: what.into(),
            value: value.to_string(),
            valid: valid.into(),
        }
    }

    pub(crate) fn missing(
        what: impl Into<String>,
        missing: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::Missing {
            what: what.into(),
            missing: missing.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn mismatch(
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::Mismatch {
            what: what.into(),
            expected: expected.into(),
            found: found.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn output_dir(
        path: impl Into<PathBuf>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::OutputDir {
            path: path.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn render(what: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Render {
            what: what.into(),
            msg: msg.to_string(),
        }
    }
}

/// Create `dir` (and parents) and check that files can be written in it; a refusal becomes an
/// [`Error::Setup`] naming `what` the directory is for and `fix`.
pub(crate) fn writable_dir(dir: &std::path::Path, what: &str, fix: &str) -> Result<()> {
    let probe = crate::util::files::unique_sibling(&dir.join("saev-write-test"));
    let res = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b""));
    let _ = std::fs::remove_file(&probe);
    res.map_err(|e| Error::Setup {
        problem: format!("{}: cannot write {what} here ({e})", dir.display()),
        fix: fix.to_string(),
    })
}

/// Attach a path to `std::io::Error`s.
pub(crate) trait IoContext<T> {
    fn with_path(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn with_path(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}

/// Attach context to candle errors.
pub(crate) trait CandleContext<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for std::result::Result<T, candle_core::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: what.into(),
            source,
        })
    }
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: what(),
            source,
        })
    }
}

/// Name what a public entry point was computing on the candle errors its body raised with a
/// bare `?` (errors that already say what failed keep their own words):
/// `self.encode_inner(x).computing(|| format!("SAE encode of {:?}", x.dims()))`.
pub(crate) trait Computing<T> {
    fn computing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Computing<T> for Result<T> {
    fn computing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| match e {
            Error::Candle { context, source } if context == UNNAMED_TENSOR_OP => Error::Candle {
                context: what(),
                source,
            },
            e => e,
        })
    }
}

/// What a diverged run keeps: its last checkpoint, or nothing yet.
fn kept(checkpoint: &std::path::Path) -> String {
    if checkpoint.exists() {
        format!(
            "the last good checkpoint in {} is kept",
            checkpoint.display()
        )
    } else {
        format!(
            "no checkpoint had been written yet ({} does not exist)",
            checkpoint.display()
        )
    }
}
