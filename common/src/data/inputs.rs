//! One input file read in blocks of cells: `.h5ad` files with a CSR matrix are streamed
//! from disk (only `indptr` and the names in memory); every other layout and format is
//! read whole by its reader ([`super::read::read_format`]) and then served in blocks, so
//! memory is bounded by the largest such file.

use std::path::{Path, PathBuf};

use super::CsrMatrix;
use super::h5ad::read_h5ad_header;
use super::h5ad::rows::{H5adRows, read_obs_names, read_var_column};
use super::preprocess::vocab::make_unique;
use super::read::{GeneIdColumn, InputFormat, ReadOptions, detect_format, read_format};
use crate::error::Result;

/// `var` columns that hold gene symbols in `.h5ad` files (first present wins).
const SYMBOL_COLUMNS: &[&str] = &["gene_symbols", "feature_name", "gene_name", "symbol"];

enum Body {
    Streamed(H5adRows),
    InMemory(CsrMatrix),
}

/// An input file open for block reads of its cells.
pub struct InputReader {
    path: PathBuf,
    format: InputFormat,
    body: Body,
    obs_names: Vec<String>,
    var_names: Vec<String>,
    symbols: Option<Vec<String>>,
}

impl std::fmt::Debug for InputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("streamed", &self.is_streamed())
            .field("n_rows", &self.n_rows())
            .finish()
    }
}

impl InputReader {
    /// Opens `path` (format detected as by [`detect_format`]).
    pub fn open(path: &Path, opts: &ReadOptions) -> Result<InputReader> {
        let format = detect_format(path)?;
        if format == InputFormat::H5ad
            && let Some(rows) = H5adRows::open(path, &opts.h5ad.source)?
        {
            let (_, mut var_names) = read_h5ad_header(path, &opts.h5ad)?;
            if opts.make_unique {
                var_names = make_unique(&var_names);
            }
            let obs_names = read_obs_names(path)?;
            let mut symbols = None;
            for col in SYMBOL_COLUMNS {
                if let Some(s) = read_var_column(path, &opts.h5ad.source, col)? {
                    symbols = Some(s);
                    break;
                }
            }
            return Ok(InputReader {
                path: path.to_path_buf(),
                format,
                obs_names,
                var_names,
                symbols,
                body: Body::Streamed(rows),
            });
        }
        let ds = read_format(path, format, opts)?;
        // 10x files carry both identifiers: keep the other one as symbols when ids are used.
        let symbols = match (format, opts.gene_id_column) {
            (InputFormat::TenxH5 | InputFormat::Mtx, GeneIdColumn::Ids) => {
                let o = ReadOptions {
                    gene_id_column: GeneIdColumn::Symbols,
                    ..opts.clone()
                };
                read_format(path, format, &o).ok().map(|d| d.var_names)
            }
            _ => None,
        };
        Ok(InputReader {
            path: path.to_path_buf(),
            format,
            obs_names: ds.obs_names,
            var_names: ds.var_names,
            symbols,
            body: Body::InMemory(ds.x),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its detected format.
    pub fn format(&self) -> InputFormat {
        self.format
    }

    /// Whether blocks are read from disk on demand (`false`: the matrix is in memory).
    pub fn is_streamed(&self) -> bool {
        matches!(self.body, Body::Streamed(_))
    }

    /// Number of cells.
    pub fn n_rows(&self) -> usize {
        self.obs_names.len()
    }

    /// Cell names.
    pub fn obs_names(&self) -> &[String] {
        &self.obs_names
    }

    /// Gene names (the identifiers the vocabulary is built from).
    pub fn var_names(&self) -> &[String] {
        &self.var_names
    }

    /// Gene symbols, one per gene, when the file has them besides the var names.
    pub fn gene_symbols(&self) -> Option<&[String]> {
        self.symbols.as_deref()
    }

    /// Cells `a..b` as CSR over [`Self::var_names`].
    pub fn read(&self, a: usize, b: usize) -> Result<CsrMatrix> {
        match &self.body {
            Body::Streamed(r) => r.read(a, b),
            Body::InMemory(x) => Ok(x.select_rows(&(a..b).collect::<Vec<_>>())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read::read_any;

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data")
            .join(name)
    }

    /// Blocks of the streamed reader put together equal the whole-file reader's matrix.
    #[test]
    fn streamed_blocks_equal_whole_read() {
        let p = data("mouse10k.h5ad");
        let opts = ReadOptions::default();
        let r = InputReader::open(&p, &opts).unwrap();
        assert!(r.is_streamed());
        let whole = read_any(&p, &opts).unwrap();
        assert_eq!(r.var_names(), &whole.var_names[..]);
        assert_eq!(r.obs_names(), &whole.obs_names[..]);
        assert_eq!(r.gene_symbols().map(|s| s.len()), Some(whole.x.n_cols));
        for (a, b) in [(0, 1), (0, 997), (997, 5000), (9990, 10000), (10000, 10000)] {
            let blk = r.read(a, b).unwrap();
            assert_eq!(
                blk,
                whole.x.select_rows(&(a..b).collect::<Vec<_>>()),
                "{a}..{b}"
            );
        }
        let e = r.read(5, 10_001).unwrap_err().to_string();
        assert!(e.contains("mouse10k.h5ad") && e.contains("10001"), "{e}");
    }

    #[test]
    fn other_formats_are_served_from_memory() {
        let p = data("10x_v3.h5");
        let r = InputReader::open(&p, &ReadOptions::default()).unwrap();
        assert!(!r.is_streamed());
        let whole = read_any(&p, &ReadOptions::default()).unwrap();
        assert_eq!(
            r.read(3, 50).unwrap(),
            whole.x.select_rows(&(3..50).collect::<Vec<_>>())
        );
        let ids = ReadOptions {
            gene_id_column: GeneIdColumn::Ids,
            ..ReadOptions::default()
        };
        let r = InputReader::open(&p, &ids).unwrap();
        assert!(r.var_names()[0].starts_with("ENSG"), "{}", r.var_names()[0]);
        assert_eq!(r.gene_symbols().unwrap(), &whole.var_names[..]);
    }
}
