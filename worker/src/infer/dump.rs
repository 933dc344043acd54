//! `scfm-worker tokens MODEL INPUT --out FILE.safetensors` (a hidden debugging command):
//! the inference tokens `scfm embed` feeds the model for every cell of an input, padded
//! to the longest cell, so that other implementations (the PyTorch package in `python/`)
//! can be checked against them bit for bit.
//!
//! The file holds `genes`, `bins` and `values`, each `[n_cells, L]` float32 (token ids and
//! bins are small integers, exact in float32), with the alignment in its metadata
//! (`matched_by`, `genes_matched`, `model_genes`).

use std::collections::HashMap;
use std::path::Path;

use scfm_common::data::h5ad::MatrixSource;
use scfm_common::tokenizer::Batch;
use tch::{Device, Kind, Tensor};

use super::embed::Embedder;
use super::input::{BLOCK_ROWS, CellInput, InputOptions};
use super::load::ModelBundle;
use super::run::check_alignment;
use crate::checkpoint::tensors_to_safetensors;
use crate::error::{Result, WorkerError};
use scfm_common::runtime::Rt;

/// Writes the padded inference tokens of every cell of `input` under `model` to `out`;
/// returns the number of cells.
pub fn run_tokens(
    model: &str,
    input: &str,
    source: MatrixSource,
    out: &Path,
    rt: &Rt,
) -> Result<usize> {
    let bundle = ModelBundle::load(model, Device::Cpu, None, rt)?;
    let cells = CellInput::open(
        input,
        &InputOptions {
            source,
            ..InputOptions::default()
        },
        rt,
    )?;
    let a = check_alignment(&cells, &bundle)?;
    let emb = Embedder::new(&bundle, 1);
    let mut toks = Vec::with_capacity(cells.n_cells());
    cells.for_each_block(BLOCK_ROWS, |_, counts| {
        toks.extend(emb.tokens(&emb.model_rows(&counts, &a)));
        Ok(())
    })?;
    let b = Batch::collate(&toks);
    let shape = [b.n as i64, b.len as i64];
    let named = [
        ("genes", Tensor::from_slice(&b.genes)),
        ("bins", Tensor::from_slice(&b.input_bins)),
        ("values", Tensor::from_slice(&b.input_values)),
    ]
    .map(|(name, t)| (name.to_string(), t.to_kind(Kind::Float).view(shape)));
    let meta = HashMap::from([
        ("matched_by".to_string(), a.by.to_string()),
        ("genes_matched".to_string(), a.matched.to_string()),
        ("model_genes".to_string(), a.n_model.to_string()),
    ]);
    let bytes = tensors_to_safetensors(&named, Some(meta))?;
    std::fs::write(out, bytes).map_err(|e| WorkerError::Data(format!("{}: {e}", out.display())))?;
    Ok(b.n)
}
