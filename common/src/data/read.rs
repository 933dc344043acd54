//! One entry point for every supported input format: [`detect_format`] tells the format of
//! a path (by extension, directory contents, or the groups of an HDF5 file) and
//! [`read_any`] reads it into a [`CellDataset`] with the options of [`ReadOptions`].

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use hdf5::{Group, LocationType};

use super::h5ad::{H5adOptions, read_h5ad};
use super::{CellDataset, CsrMatrix};
use crate::error::{Error, Result};

#[cfg(test)]
mod error_tests;
#[cfg(test)]
mod tests;

/// The file formats [`read_any`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// AnnData `.h5ad` ([`super::h5ad::read_h5ad`]).
    H5ad,
    /// 10x Genomics HDF5 feature-barcode matrix, CellRanger v2 or v3+ ([`super::tenx`]).
    TenxH5,
    /// 10x Genomics MatrixMarket folder ([`super::mtx`]).
    Mtx,
    /// Loom file ([`super::loom`]).
    Loom,
    /// Dense CSV/TSV text table, optionally gzip-compressed ([`super::csv`]).
    Csv,
}

impl fmt::Display for InputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputFormat::H5ad => "h5ad",
            InputFormat::TenxH5 => "10x h5",
            InputFormat::Mtx => "10x mtx",
            InputFormat::Loom => "loom",
            InputFormat::Csv => "csv",
        })
    }
}

/// Which gene identifier becomes the var names, where a format stores both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeneIdColumn {
    /// Gene symbols: 10x `name` / `gene_names` / second column of `features.tsv`,
    /// loom `row_attrs/Gene`.
    #[default]
    Symbols,
    /// Gene (Ensembl) ids: 10x `id` (`gene_id` for probe matrices) / `genes` / first
    /// column of `features.tsv`, loom `row_attrs/Accession`.
    Ids,
}

/// How [`read_any`] and the per-format readers read a file. Options that do not apply to
/// a format are ignored by its reader.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// 10x h5: the genome to read. CellRanger v2 files hold one group per genome and need
    /// it when there are several; in v3+ files it keeps only features of that genome.
    pub genome: Option<String>,
    /// 10x h5 v3+ and `features.tsv`: keep only features of this type (default
    /// `"Gene Expression"`, as scanpy's `gex_only`); `None` keeps all.
    pub feature_type: Option<String>,
    /// 10x and loom: gene symbols or gene ids as var names.
    pub gene_id_column: GeneIdColumn,
    /// Make var names unique by appending `-1`, `-2`, … to repeats (anndata's
    /// `make_index_unique`). Off by default: names are kept as stored.
    pub make_unique: bool,
    /// CSV/TSV: the file is genes × cells (a header row of cell ids, a gene per line).
    pub transpose: bool,
    /// What to read from an `.h5ad` file.
    pub h5ad: H5adOptions,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            genome: None,
            feature_type: Some("Gene Expression".into()),
            gene_id_column: GeneIdColumn::Symbols,
            make_unique: false,
            transpose: false,
            h5ad: H5adOptions::default(),
        }
    }
}

/// Reads `path` in the format [`detect_format`] finds.
pub fn read_any(path: &Path, opts: &ReadOptions) -> Result<CellDataset> {
    read_format(path, detect_format(path)?, opts)
}

/// Reads `path` as `format`.
pub fn read_format(path: &Path, format: InputFormat, opts: &ReadOptions) -> Result<CellDataset> {
    match format {
        InputFormat::H5ad => {
            let mut ds = read_h5ad(path, &opts.h5ad)?;
            if opts.make_unique {
                make_unique(&mut ds.var_names);
            }
            Ok(ds)
        }
        InputFormat::TenxH5 => super::tenx::read_tenx_h5(path, opts),
        InputFormat::Mtx => super::mtx::read_mtx(path, opts),
        InputFormat::Loom => super::loom::read_loom(path, opts),
        InputFormat::Csv => super::csv::read_csv(path, opts),
    }
}

/// The HDF5 signature at the start of a file without user block.
const HDF5_MAGIC: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// Tells the format of `path`: a directory with `matrix.mtx[.gz]` is a 10x mtx folder;
/// `.h5ad`, `.loom`, `.mtx[.gz]`, `.csv`/`.tsv`/`.tab`/`.txt` (optionally `.gz`) go by
/// extension; `.h5`/`.hdf5` files and HDF5 files with other extensions by their groups
/// (`matrix` group or genome groups: 10x; `X` and `obs`: h5ad; `matrix` dataset: loom).
pub fn detect_format(path: &Path) -> Result<InputFormat> {
    let meta = std::fs::metadata(path).map_err(io_error(path))?;
    if meta.is_dir() {
        if ["matrix.mtx", "matrix.mtx.gz"]
            .iter()
            .any(|f| path.join(f).is_file())
        {
            return Ok(InputFormat::Mtx);
        }
        return Err(Error::format(
            path,
            "directory without matrix.mtx or matrix.mtx.gz: not a 10x mtx folder",
        ));
    }
    let name = file_name(path).to_ascii_lowercase();
    let base = name.strip_suffix(".gz").unwrap_or(&name);
    let ext = base.rsplit_once('.').map_or("", |(_, e)| e);
    match ext {
        "h5ad" => return Ok(InputFormat::H5ad),
        "loom" => return Ok(InputFormat::Loom),
        "mtx" => return Ok(InputFormat::Mtx),
        "csv" | "tsv" | "tab" | "txt" => return Ok(InputFormat::Csv),
        "h5" | "hdf5" | "hdf" => return sniff_hdf5(path),
        _ => {}
    }
    let mut head = [0u8; 8];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(io_error(path))?;
    if n == 8 && &head == HDF5_MAGIC {
        return sniff_hdf5(path);
    }
    Err(Error::format(
        path,
        format!(
            "cannot tell the file format from extension `{ext}` (expected .h5ad, .h5 (10x), \
             .loom, .mtx[.gz], .csv/.tsv/.txt[.gz], or a 10x mtx folder)"
        ),
    ))
}

/// Tells 10x, h5ad and loom HDF5 files apart by their top-level members.
fn sniff_hdf5(path: &Path) -> Result<InputFormat> {
    let file = open_hdf5(path, "a .h5 file")?;
    let h5 = |source| Error::Hdf5 {
        path: path.into(),
        source,
    };
    let members = file.member_names().map_err(h5)?;
    if file.link_exists("matrix") {
        return match file.loc_type_by_name("matrix").map_err(h5)? {
            LocationType::Group => Ok(InputFormat::TenxH5),
            _ => Ok(InputFormat::Loom),
        };
    }
    let has = |n: &str| members.iter().any(|m| m == n);
    if has("X") && has("obs") {
        return Ok(InputFormat::H5ad);
    }
    if !tenx_genomes(&file).map_err(h5)?.is_empty() {
        return Ok(InputFormat::TenxH5);
    }
    Err(Error::format(
        path,
        format!(
            "HDF5 file of unknown layout: not 10x (`matrix` group or genome groups with \
             `indptr` and `barcodes`), h5ad (`X`, `obs`) or loom (`matrix` dataset); \
             top-level members: {}",
            list(&members)
        ),
    ))
}

/// Top-level groups of a CellRanger v2 file (one per genome, each with `indptr` and
/// `barcodes`), in file order.
pub(crate) fn tenx_genomes(file: &Group) -> hdf5::Result<Vec<String>> {
    let mut out = Vec::new();
    for name in file.member_names()? {
        if file.loc_type_by_name(&name)? != LocationType::Group {
            continue;
        }
        let g = file.group(&name)?;
        if g.link_exists("indptr") && g.link_exists("barcodes") {
            out.push(name);
        }
    }
    Ok(out)
}

/// Names joined with `, `, or `none`.
pub(crate) fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The file name of `path` as text (lossy), for extension checks and messages.
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Maps an I/O error on `path` to [`Error::Io`].
pub(crate) fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// Opens `path` read-only as HDF5; `what` (e.g. "a .loom file") completes the message
/// when the file is not HDF5.
pub(crate) fn open_hdf5(path: &Path, what: &str) -> Result<hdf5::File> {
    std::fs::metadata(path).map_err(io_error(path))?;
    hdf5::File::open(path).map_err(|source| {
        if source.contains_minor(hdf5::MinorErrorCode::NotHdf5) {
            Error::format(path, format!("not an HDF5 file ({what} must be HDF5)"))
        } else {
            Error::Hdf5 {
                path: path.into(),
                source,
            }
        }
    })
}

/// Opens a text file, decompressing it when it starts with the gzip signature.
pub(crate) fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let gz = reader
        .fill_buf()
        .map_err(io_error(path))?
        .starts_with(&[0x1f, 0x8b]);
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(reader),
        ))
    } else {
        Box::new(reader)
    })
}

/// A cells × genes matrix as a reader assembled it, before validation.
pub(crate) struct Parts {
    /// Number of cells.
    pub n_rows: usize,
    /// Number of genes.
    pub n_cols: usize,
    /// CSR row pointers.
    pub indptr: Vec<u64>,
    /// Column (gene) indices.
    pub indices: Vec<u32>,
    /// Values.
    pub data: Vec<f32>,
    /// Cell names.
    pub obs_names: Vec<String>,
    /// Gene names.
    pub var_names: Vec<String>,
}

/// Checks `p` (structure and name counts) and makes the dataset; `opts.make_unique`
/// applies here.
pub(crate) fn finish(path: &Path, p: Parts, opts: &ReadOptions) -> Result<CellDataset> {
    let x = CsrMatrix::new(
        &path.display().to_string(),
        p.n_rows,
        p.n_cols,
        p.indptr,
        p.indices,
        p.data,
    )?;
    for (what, n, want) in [
        ("cell", p.obs_names.len(), x.n_rows),
        ("gene", p.var_names.len(), x.n_cols),
    ] {
        if n != want {
            return Err(Error::format(
                path,
                format!("{n} {what} names for a matrix with {want} {what}s"),
            ));
        }
    }
    let mut var_names = p.var_names;
    if opts.make_unique {
        make_unique(&mut var_names);
    }
    Ok(CellDataset {
        x,
        obs_names: p.obs_names,
        var_names,
        labels: None,
    })
}

/// Makes `names` unique as anndata's `make_index_unique`: the first occurrence keeps its
/// name, later ones get `-1`, `-2`, … (skipping suffixed names already present).
pub(crate) fn make_unique(names: &mut [String]) {
    use std::collections::{HashMap, HashSet};
    let mut seen = HashSet::with_capacity(names.len());
    let dup: Vec<bool> = names.iter().map(|n| !seen.insert(n.clone())).collect();
    if !dup.contains(&true) {
        return;
    }
    let mut counter: HashMap<String, usize> = HashMap::new();
    for (name, _) in names.iter_mut().zip(&dup).filter(|(_, d)| **d) {
        let k = counter.entry(name.clone()).or_default();
        loop {
            *k += 1;
            let candidate = format!("{name}-{k}");
            if seen.insert(candidate.clone()) {
                *name = candidate;
                break;
            }
        }
    }
}

/// Whether `name` looks like a cell barcode: one of its `-`, `_`, `.` or `:`-separated
/// parts is a run of at least 8 of `ACGTN` (`AAACCTGAGAAGGCCT-1`, `s1_AAACCTGAGAAGGCCT`),
/// or it is `cell` followed by digits (`cell12`, `Cell_3`).
fn looks_like_cell(name: &str) -> bool {
    let barcode = name
        .split(['-', '_', '.', ':'])
        .any(|p| p.len() >= 8 && p.bytes().all(|b| b"ACGTN".contains(&b)));
    let lower = name.to_ascii_lowercase();
    let numbered = lower
        .strip_prefix("cell")
        .map(|r| r.trim_start_matches(['_', '-']))
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()));
    barcode || numbered
}

/// Whether `name` looks like a gene: an Ensembl gene id (`ENSG00000141510`,
/// `ENSMUSG00000051951.5`) or a mitochondrial gene symbol (`MT-CO1`, `mt-Co1`).
fn looks_like_gene(name: &str) -> bool {
    let ensembl = name.strip_prefix("ENS").is_some_and(|r| {
        let r = r.split('.').next().unwrap_or_default();
        let digits = r.trim_start_matches(|c: char| c.is_ascii_uppercase());
        r.len() > digits.len()
            && r[..r.len() - digits.len()].ends_with('G')
            && digits.len() >= 6
            && digits.bytes().all(|b| b.is_ascii_digit())
    });
    ensembl || name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("MT-"))
}

/// Why the cell names `obs` and the gene names `var` of a table look swapped (the rows of
/// a genes × cells file read as cells), or `None`: most gene names look like cell
/// barcodes while no cell name does, or most cell names look like genes (Ensembl ids),
/// or several cell names are mitochondrial gene symbols, while no gene name does.
pub fn names_look_swapped(obs: &[String], var: &[String]) -> Option<String> {
    let count = |names: &[String], f: fn(&str) -> bool| names.iter().filter(|n| f(n)).count();
    let frac = |n: usize, of: &[String]| n as f64 / of.len().max(1) as f64;
    let (cell_obs, cell_var) = (count(obs, looks_like_cell), count(var, looks_like_cell));
    let (gene_obs, gene_var) = (count(obs, looks_like_gene), count(var, looks_like_gene));
    if frac(cell_var, var) >= 0.5 && cell_obs == 0 {
        return Some(format!(
            "{cell_var} of the {} gene names look like cell names (e.g. `{}`), and no cell name does",
            var.len(),
            var.iter()
                .find(|n| looks_like_cell(n))
                .map_or("", String::as_str)
        ));
    }
    if (frac(gene_obs, obs) >= 0.5 || gene_obs >= 3) && gene_var == 0 {
        return Some(format!(
            "{gene_obs} of the {} cell names look like gene names (e.g. `{}`), and no gene name does",
            obs.len(),
            obs.iter()
                .find(|n| looks_like_gene(n))
                .map_or("", String::as_str)
        ));
    }
    None
}

/// Logs a warning naming `path` when [`names_look_swapped`] finds its names swapped;
/// `transposed` says whether the file was read as genes × cells.
pub(crate) fn warn_if_swapped(path: &Path, obs: &[String], var: &[String], transposed: bool) {
    if let Some(why) = names_look_swapped(obs, var) {
        let hint = if transposed {
            "it was read as genes x cells (transpose): is it cells x genes? Read it without transpose"
        } else {
            "is it genes x cells? Read it with transpose (`scfm prepare --transpose`, `data.transpose: true`, `scfm embed/evaluate --transpose`)"
        };
        tracing::warn!(file = %path.display(), "cell and gene names look swapped: {why}; {hint}");
    }
}
