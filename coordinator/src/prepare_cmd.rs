//! `scfm prepare`: command-line flags → [`PrepareSettings`], with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use scfm_common::data::h5ad::MatrixSource;
use scfm_common::data::h5ad::write::Codec;
use scfm_common::data::prepared::{PrepareProgress, PrepareSettings, prepare};
use scfm_common::data::read::GeneIdColumn;

/// Flags of `scfm prepare` (each overrides the `--settings` file).
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Input files: .h5ad, 10x .h5, 10x mtx folders, .loom, .csv/.tsv[.gz].
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output: a local directory or an object-store URL.
    #[arg(long)]
    out: String,
    /// YAML file with prepare settings (the `preprocessing` section of dataset.json).
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Gene vocabulary: `union`, `intersection`, or a gene list file.
    #[arg(long)]
    vocab: Option<String>,
    /// Gene identifiers of 10x/loom inputs: `symbols` or `ids`.
    #[arg(long, value_parser = ["symbols", "ids"])]
    gene_ids: Option<String>,
    /// .h5ad matrix with the counts: `X`, `raw`, or `layer:NAME`.
    #[arg(long)]
    source: Option<String>,
    /// 10x h5: genome to read.
    #[arg(long)]
    genome: Option<String>,
    /// Make repeated gene names unique instead of failing.
    #[arg(long)]
    make_unique: bool,
    /// CSV/TSV inputs are genes x cells (a header row of cell names, one gene per line).
    #[arg(long)]
    transpose: bool,
    /// Keep cells with at least this many expressed genes.
    #[arg(long)]
    min_genes: Option<u32>,
    /// Keep cells with at most this many expressed genes.
    #[arg(long)]
    max_genes: Option<u32>,
    /// Keep cells with at least this total count.
    #[arg(long)]
    min_counts: Option<f32>,
    /// Keep cells with at most this total count.
    #[arg(long)]
    max_counts: Option<f32>,
    /// Keep cells with at most this percentage of mitochondrial counts.
    #[arg(long)]
    max_pct_mt: Option<f32>,
    /// Prefix of mitochondrial gene symbols (case-insensitive; default `MT-`).
    #[arg(long)]
    mt_prefix: Option<String>,
    /// Drop genes expressed in fewer cells than this (one more pass over the inputs).
    #[arg(long)]
    min_cells_per_gene: Option<u32>,
    /// Keep the N most variable genes (scanpy's seurat_v3 on the counts; two more passes).
    #[arg(long, value_name = "N")]
    hvg: Option<usize>,
    /// Accept non-integer values (default: raw integer counts only).
    #[arg(long)]
    allow_non_integer: bool,
    /// Cells per shard.
    #[arg(long)]
    shard_cells: Option<usize>,
    /// Shard compression: `lzf` (default), `none` or `gzip`.
    #[arg(long, value_parser = ["lzf", "none", "gzip"])]
    codec: Option<String>,
    /// Byte-shuffle values before compressing them (default true; ignored by `none`).
    #[arg(long)]
    shuffle: Option<bool>,
}

impl PrepareArgs {
    fn settings(&self) -> Result<PrepareSettings> {
        let mut s = match &self.settings {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                serde_norway::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => PrepareSettings::default(),
        };
        if let Some(v) = &self.vocab {
            s.vocab = v.clone();
        }
        if let Some(g) = &self.gene_ids {
            s.gene_ids = if g == "ids" {
                GeneIdColumn::Ids
            } else {
                GeneIdColumn::Symbols
            };
        }
        if let Some(src) = &self.source {
            s.source = match src.as_str() {
                "X" | "x" => MatrixSource::X,
                "raw" | "Raw" => MatrixSource::Raw,
                other => match other.strip_prefix("layer:") {
                    Some(l) if !l.is_empty() => MatrixSource::Layer(l.into()),
                    _ => bail!("--source `{other}`: expected X, raw or layer:NAME"),
                },
            };
        }
        if self.genome.is_some() {
            s.genome = self.genome.clone();
        }
        s.make_unique |= self.make_unique;
        s.transpose |= self.transpose;
        s.allow_non_integer |= self.allow_non_integer;
        macro_rules! set {
            ($($f:ident),*) => {$( if self.$f.is_some() { s.$f = self.$f; } )*};
        }
        set!(
            min_genes,
            max_genes,
            min_counts,
            max_counts,
            max_pct_mt,
            min_cells_per_gene,
            hvg
        );
        if let Some(p) = &self.mt_prefix {
            s.mt_prefix = p.clone();
        }
        if let Some(n) = self.shard_cells {
            s.shard_cells = n;
        }
        if let Some(c) = &self.codec {
            s.codec = match c.as_str() {
                "none" => Codec::None,
                "gzip" => Codec::Gzip,
                _ => Codec::Lzf,
            };
        }
        if let Some(v) = self.shuffle {
            s.shuffle = v;
        }
        Ok(s)
    }

    /// Runs `scfm prepare`.
    pub fn run(&self) -> Result<()> {
        let settings = self.settings()?;
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>24} {bar:30} {pos}/{len} cells [{elapsed_precise}<{eta_precise}]",
            )
            .expect("template"),
        );
        let start = std::time::Instant::now();
        let m = prepare(
            &self.inputs,
            &self.out,
            &settings,
            &mut |p: &PrepareProgress| {
                bar.set_length(p.cells_total as u64);
                bar.set_position(p.cells_read as u64);
                bar.set_message(format!(
                    "{} {}/{} ({} shards)",
                    p.pass,
                    (p.file + 1).min(p.n_files),
                    p.n_files,
                    p.shards
                ));
            },
        )
        .with_context(|| format!("preparing {}", self.out))?;
        bar.finish_and_clear();
        eprintln!(
            "prepared {} cells x {} genes in {} shards at {} ({:.1} s)",
            m.n_cells,
            m.n_genes,
            m.shards.len(),
            self.out,
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
