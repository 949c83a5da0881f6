//! The training history: one row per setting every `log_every` steps, written as
//! `history.parquet` (polars) and `history.csv` beside the run.

use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// One history row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub(super) struct Row {
    pub(super) step: u64,
    pub(super) n_patches: u64,
    pub(super) setting: u32,
    pub(super) lr: f64,
    pub(super) lambda: f64,
    pub(super) loss: f64,
    pub(super) mse: f64,
    pub(super) nmse: f64,
    pub(super) l0: f64,
    pub(super) l1: f64,
    pub(super) aux: f64,
    pub(super) dead: u32,
    pub(super) dense: u32,
    pub(super) dense_kernels: bool,
}

pub(super) fn history_frame(rows: &[Row]) -> Result<DataFrame> {
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    DataFrame::new_infer_height(vec![
        col!("step", |r: &Row| r.step),
        col!("n_patches", |r: &Row| r.n_patches),
        col!("setting", |r: &Row| r.setting),
        col!("lr", |r: &Row| r.lr),
        col!("lambda", |r: &Row| r.lambda),
        col!("loss", |r: &Row| r.loss),
        col!("mse", |r: &Row| r.mse),
        col!("nmse", |r: &Row| r.nmse),
        col!("l0", |r: &Row| r.l0),
        col!("l1", |r: &Row| r.l1),
        col!("aux", |r: &Row| r.aux),
        col!("dead", |r: &Row| r.dead),
        col!("dense", |r: &Row| r.dense),
        col!("dense_kernels", |r: &Row| r.dense_kernels),
    ])
    .map_err(|e| Error::render("history table", e))
}

pub(super) fn save_history(out: &Path, rows: &[Row]) -> Result<DataFrame> {
    let mut df = history_frame(rows)?;
    let pq = out.join("history.parquet");
    let tmp = out.join("history.parquet.tmp");
    let file = std::fs::File::create(&tmp).with_path(&tmp)?;
    ParquetWriter::new(file)
        .finish(&mut df)
        .map_err(|e| Error::render(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, &pq).with_path(&pq)?;
    let mut csv = String::from(
        "step,n_patches,setting,lr,lambda,loss,mse,nmse,l0,l1,aux,dead,dense,dense_kernels\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.step,
            r.n_patches,
            r.setting,
            r.lr,
            r.lambda,
            r.loss,
            r.mse,
            r.nmse,
            r.l0,
            r.l1,
            r.aux,
            r.dead,
            r.dense,
            r.dense_kernels
        ));
    }
    let p = out.join("history.csv");
    std::fs::write(&p, csv).with_path(&p)?;
    Ok(df)
}
