//! One gene vocabulary for several datasets, and the remapping of each dataset's columns
//! into vocabulary order.
//!
//! Names are compared exactly, so all datasets must use the same kind of name (symbols,
//! or Ensembl ids — [`strip_version`] drops `.N` version suffixes from ids). A name twice
//! in one dataset is an error naming the file and the gene; [`make_unique`] renames
//! duplicates as anndata's `var_names_make_unique` does, for callers that accept that.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::genelist::{index_unique, show_names};
use super::{CsrMatrix, remap_columns};
use crate::error::{Error, Result};

/// How the vocabulary is formed from the datasets' genes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VocabMode {
    /// Every gene of any dataset: the first dataset's genes in order, then each further
    /// dataset's new genes in its order.
    Union,
    /// The genes present in every dataset, in the first dataset's order.
    Intersection,
    /// This list as is (e.g. from [`super::genelist::load_gene_list`]); genes of a dataset
    /// outside it are dropped.
    Fixed(Vec<String>),
}

impl VocabMode {
    /// [`VocabMode::Fixed`] with the gene list in `path` (one name per line; errors name
    /// the file, see [`super::genelist::load_gene_list`]).
    pub fn fixed_from_file(path: &Path) -> Result<Self> {
        Ok(VocabMode::Fixed(super::genelist::load_gene_list(path)?))
    }
}

/// One dataset's gene names and the file they came from (named in errors).
#[derive(Debug, Clone, Copy)]
pub struct GeneSource<'a> {
    /// The dataset's file.
    pub path: &'a Path,
    /// Its gene names, one per column.
    pub names: &'a [String],
}

/// anndata's `make_index_unique(names, join="-")`: the second and later occurrences of a
/// name get `-1`, `-2`, ... appended, skipping suffixes that would collide with another
/// name; the first occurrence keeps its name.
pub fn make_unique(names: &[String]) -> Vec<String> {
    let mut taken: HashSet<String> = names.iter().cloned().collect();
    let mut seen: HashSet<&str> = HashSet::with_capacity(names.len());
    let mut counter: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if seen.insert(name.as_str()) {
            out.push(name.clone());
            continue;
        }
        let k = counter.entry(name.as_str()).or_insert(0);
        loop {
            *k += 1;
            let candidate = format!("{name}-{k}");
            if taken.insert(candidate.clone()) {
                out.push(candidate);
                break;
            }
        }
    }
    out
}

/// An Ensembl id without its version (`ENSG00000141510.16` → `ENSG00000141510`); other
/// names are returned unchanged.
pub fn strip_version(name: &str) -> &str {
    match name.split_once('.') {
        Some((id, v)) if name.starts_with("ENS") && v.bytes().all(|b| b.is_ascii_digit()) => id,
        _ => name,
    }
}

/// Builds the vocabulary of `sources` by `mode`.
///
/// Errors: a gene twice in one dataset (naming the file, gene and both columns) or in a
/// fixed vocabulary; no datasets for a union or intersection; an empty result.
pub fn build_vocab(sources: &[GeneSource], mode: &VocabMode) -> Result<Vec<String>> {
    for s in sources {
        index_unique(s.names, s.path, "columns")?;
    }
    let vocab: Vec<String> = match mode {
        VocabMode::Fixed(v) => {
            index_unique(v, Path::new("fixed vocabulary"), "entries")?;
            v.clone()
        }
        VocabMode::Union | VocabMode::Intersection if sources.is_empty() => {
            return Err(Error::config(
                "vocab",
                "no datasets to build a vocabulary from",
            ));
        }
        VocabMode::Union => {
            let mut seen = HashSet::new();
            sources
                .iter()
                .flat_map(|s| s.names.iter())
                .filter(|g| seen.insert(g.as_str()))
                .cloned()
                .collect()
        }
        VocabMode::Intersection => {
            let rest: Vec<HashSet<&str>> = sources[1..]
                .iter()
                .map(|s| s.names.iter().map(String::as_str).collect())
                .collect();
            sources[0]
                .names
                .iter()
                .filter(|g| rest.iter().all(|r| r.contains(g.as_str())))
                .cloned()
                .collect()
        }
    };
    if vocab.is_empty() {
        let files: Vec<String> = sources
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        return Err(Error::config(
            "vocab",
            format!("the {mode:?} vocabulary of [{}] is empty", files.join(", ")),
        ));
    }
    Ok(vocab)
}

/// Where each column of one dataset goes in the vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnRemap {
    /// The dataset's file.
    pub source: PathBuf,
    /// For each dataset column, its vocabulary index, or `None` if the gene is dropped.
    pub to_vocab: Vec<Option<u32>>,
    /// Size of the vocabulary.
    pub n_vocab: usize,
    /// The dataset's genes not in the vocabulary, in column order.
    pub dropped: Vec<String>,
}

impl ColumnRemap {
    /// Maps the columns of `src` into `vocab`. Errors name the file and gene if a name
    /// repeats in `src`, or the gene if it repeats in `vocab`.
    pub fn new(src: &GeneSource, vocab: &[String]) -> Result<Self> {
        index_unique(src.names, src.path, "columns")?;
        let index = index_unique(vocab, Path::new("vocabulary"), "entries")?;
        let to_vocab: Vec<Option<u32>> = src
            .names
            .iter()
            .map(|g| index.get(g.as_str()).map(|&i| i as u32))
            .collect();
        let dropped = src
            .names
            .iter()
            .zip(&to_vocab)
            .filter(|(_, v)| v.is_none())
            .map(|(g, _)| g.clone())
            .collect();
        Ok(ColumnRemap {
            source: src.path.to_path_buf(),
            to_vocab,
            n_vocab: vocab.len(),
            dropped,
        })
    }

    /// Number of the dataset's genes found in the vocabulary.
    pub fn n_kept(&self) -> usize {
        self.to_vocab.len() - self.dropped.len()
    }

    /// One line for logs: kept and dropped counts, with the first dropped genes.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} of {} genes in the vocabulary of {}, {} dropped",
            self.source.display(),
            self.n_kept(),
            self.to_vocab.len(),
            self.n_vocab,
            self.dropped.len()
        );
        if !self.dropped.is_empty() {
            s += &format!(" ({})", show_names(self.dropped.iter().map(String::as_str)));
        }
        s
    }

    /// The dataset's matrix with columns in vocabulary order (`n_vocab` columns; genes of
    /// the vocabulary absent from the dataset are all-zero columns, dropped genes' values
    /// are removed). Errors, naming the file, if `x` has a different number of columns.
    pub fn apply(&self, x: &CsrMatrix) -> Result<CsrMatrix> {
        if x.n_cols != self.to_vocab.len() {
            return Err(Error::format(
                &self.source,
                format!(
                    "matrix has {} columns but {} gene names were mapped",
                    x.n_cols,
                    self.to_vocab.len()
                ),
            ));
        }
        let map: Vec<u32> = self
            .to_vocab
            .iter()
            .map(|v| v.unwrap_or(u32::MAX))
            .collect();
        Ok(remap_columns(x, &map, self.n_vocab))
    }
}

/// A vocabulary and, per dataset, the remap of its columns into it.
#[derive(Debug, Clone, PartialEq)]
pub struct Harmonized {
    /// The vocabulary, in column order of the remapped matrices.
    pub vocab: Vec<String>,
    /// One remap per input dataset, in input order.
    pub remaps: Vec<ColumnRemap>,
}

/// Builds the vocabulary of `sources` by `mode` ([`build_vocab`]) and each dataset's
/// [`ColumnRemap`], logging each dataset's [`ColumnRemap::summary`].
pub fn harmonize(sources: &[GeneSource], mode: &VocabMode) -> Result<Harmonized> {
    let vocab = build_vocab(sources, mode)?;
    let remaps = sources
        .iter()
        .map(|s| ColumnRemap::new(s, &vocab))
        .collect::<Result<Vec<_>>>()?;
    for r in &remaps {
        tracing::info!("{}", r.summary());
    }
    Ok(Harmonized { vocab, remaps })
}
