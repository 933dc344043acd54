//! Reader for 10x Genomics HDF5 feature-barcode matrices (`filtered_feature_bc_matrix.h5`).
//!
//! CellRanger v3+ writes one group `matrix/{data,indices,indptr,shape,barcodes,
//! features/{id,name,feature_type,genome,…}}`; v2 writes one group per genome,
//! `<genome>/{data,indices,indptr,shape,barcodes,genes,gene_names}`. Both store the
//! genes × cells matrix as CSC, which is the cells × genes matrix as CSR: `indptr` has one
//! entry per cell. Values and indices of any stored numeric type are read in blocks and
//! converted to `f32`/`u32` as they are read; rows are then sorted by gene and duplicate
//! entries summed, as scipy's canonical form.

use std::path::Path;

use hdf5::{Dataset, Group, LocationType};

use super::CellDataset;
use super::h5ad::typed::{At, R, Src, bad};
use super::h5ad::{canonicalize, check_indptr, to_error};
use super::read::{GeneIdColumn, Parts, ReadOptions, finish, list, open_hdf5, tenx_genomes};
use crate::error::Result;

/// Reads a 10x h5 file (v2 or v3+) as cells × genes.
///
/// `opts.genome` chooses the genome group of a v2 file (required when it has several; the
/// error lists them) or keeps the features of that genome in a v3+ file;
/// `opts.feature_type` (default `"Gene Expression"`) keeps features of that type (v3+);
/// `opts.gene_id_column` picks symbols (v3+ `name`, v2 `gene_names`) or ids (v3+ `id`, or
/// `gene_id` in probe-barcode matrices as scanpy's `gene_ids`; v2 `genes`). Cell names are
/// the barcodes. Gene names are kept as stored (repeats too) unless `opts.make_unique`.
/// Errors name the file and the missing or malformed element.
pub fn read_tenx_h5(path: &Path, opts: &ReadOptions) -> Result<CellDataset> {
    let file = open_hdf5(path, "a 10x .h5 file")?;
    let parts = read_file(&file, opts).map_err(|e| to_error(path, e))?;
    finish(path, parts, opts)
}

/// Chooses the v3+ `matrix` group or a v2 genome group and reads it.
fn read_file(file: &Group, opts: &ReadOptions) -> R<Parts> {
    if file.link_exists("matrix")
        && file.loc_type_by_name("matrix").at("`matrix`")? == LocationType::Group
    {
        return read_v3(&file.group("matrix").at("`matrix`")?, opts);
    }
    let genomes = tenx_genomes(file).at("the top-level groups")?;
    let genome = match (&opts.genome, genomes.as_slice()) {
        (_, []) => {
            let members = file.member_names().at("the top-level members")?;
            return bad(format!(
                "not a 10x Genomics HDF5 file: no `matrix` group and no genome group with \
                 `indptr` and `barcodes` (top-level members: {})",
                list(&members)
            ));
        }
        (None, [g]) => g.clone(),
        (None, _) => {
            return bad(format!(
                "the file holds several genomes ({}); choose one with the genome option",
                list(&genomes)
            ));
        }
        (Some(g), _) if genomes.contains(g) => g.clone(),
        (Some(g), _) => {
            return bad(format!(
                "no genome `{g}` in file (genomes: {})",
                list(&genomes)
            ));
        }
    };
    let g = file.group(&genome).at(&format!("`{genome}`"))?;
    read_v2(&g, &genome, opts)
}

/// Reads a CellRanger v2 genome group.
fn read_v2(g: &Group, genome: &str, opts: &ReadOptions) -> R<Parts> {
    let m = read_matrix(g, genome)?;
    let column = match opts.gene_id_column {
        GeneIdColumn::Symbols => "gene_names",
        GeneIdColumn::Ids => "genes",
    };
    let var_names = strings(g, genome, column, m.n_genes)?;
    let obs_names = strings(g, genome, "barcodes", m.n_cells)?;
    Ok(m.into_parts(obs_names, var_names))
}

/// Reads a CellRanger v3+ `matrix` group, keeping the features `opts` asks for.
fn read_v3(g: &Group, opts: &ReadOptions) -> R<Parts> {
    let mut m = read_matrix(g, "matrix")?;
    let n = m.n_genes;
    if !g.link_exists("features") {
        return bad("no `matrix/features` in file");
    }
    let f = g.group("features").at("`matrix/features`")?;
    let fname = "matrix/features";
    let mut keep = vec![true; n];
    if let Some(genome) = &opts.genome {
        if !f.link_exists("genome") {
            return bad(format!(
                "genome `{genome}` was asked for, but there is no `{fname}/genome`"
            ));
        }
        let genomes = strings(&f, fname, "genome", n)?;
        if !genomes.contains(genome) {
            return bad(format!(
                "no genome `{genome}` in `{fname}/genome` (genomes: {})",
                list(&distinct(&genomes))
            ));
        }
        keep.iter_mut()
            .zip(&genomes)
            .for_each(|(k, g)| *k &= g == genome);
    }
    if let Some(ty) = &opts.feature_type {
        if !f.link_exists("feature_type") {
            return bad(format!(
                "no `{fname}/feature_type` to keep features of type `{ty}` (ask for all types \
                 to read this file)"
            ));
        }
        let types = strings(&f, fname, "feature_type", n)?;
        let kept: Vec<bool> = keep
            .iter()
            .zip(&types)
            .map(|(k, t)| *k && t == ty)
            .collect();
        if !kept.contains(&true) && n > 0 {
            return bad(format!(
                "no features of type `{ty}` in `{fname}/feature_type` (types: {})",
                list(&distinct(&types))
            ));
        }
        keep = kept;
    }
    let column = match opts.gene_id_column {
        GeneIdColumn::Symbols => "name",
        GeneIdColumn::Ids if f.link_exists("gene_id") => "gene_id",
        GeneIdColumn::Ids => "id",
    };
    let names = strings(&f, fname, column, n)?;
    let var_names = names
        .into_iter()
        .zip(&keep)
        .filter_map(|(name, k)| k.then_some(name))
        .collect();
    let obs_names = strings(g, "matrix", "barcodes", m.n_cells)?;
    m.keep_genes(&keep);
    Ok(m.into_parts(obs_names, var_names))
}

/// The distinct values of `v` in order of first appearance.
fn distinct(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// Dataset `name` of group `g` (named `parent/name` in messages).
fn dataset(g: &Group, parent: &str, name: &str) -> R<Dataset> {
    let elem = format!("`{parent}/{name}`");
    if !g.link_exists(name) {
        return bad(format!("no {elem} in file"));
    }
    g.dataset(name).at(&elem)
}

/// The `n` strings of dataset `parent/name`.
fn strings(g: &Group, parent: &str, name: &str, n: usize) -> R<Vec<String>> {
    let v = Src::dataset(&dataset(g, parent, name)?).strings()?;
    if v.len() != n {
        return bad(format!(
            "`{parent}/{name}` has {} entries, expected {n}",
            v.len()
        ));
    }
    Ok(v)
}

/// The matrix of a 10x group as cells × genes CSR.
struct Matrix {
    n_cells: usize,
    n_genes: usize,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    data: Vec<f32>,
}

/// Reads and checks `data`, `indices`, `indptr` and `shape` of group `g` (named `name`).
fn read_matrix(g: &Group, name: &str) -> R<Matrix> {
    let shape_src = dataset(g, name, "shape")?;
    let shape = Src::dataset(&shape_src).ints::<usize>()?;
    let [n_genes, n_cells] = shape[..] else {
        return bad(format!(
            "`{name}/shape` has {} entries, expected 2 (genes, cells)",
            shape.len()
        ));
    };
    let indptr = Src::dataset(&dataset(g, name, "indptr")?).ints::<u64>()?;
    let indices = Src::dataset(&dataset(g, name, "indices")?).ints::<u32>()?;
    let data = Src::dataset(&dataset(g, name, "data")?).f32s()?;
    if indices.len() != data.len() {
        return bad(format!(
            "`{name}` has {} indices but {} values",
            indices.len(),
            data.len()
        ));
    }
    check_indptr(&indptr, n_cells, data.len(), name)?;
    if let Some(&i) = indices.iter().find(|&&i| i as usize >= n_genes) {
        return bad(format!(
            "`{name}/indices` has gene index {i}, but the shape is {n_genes} genes × {n_cells} cells"
        ));
    }
    let mut m = Matrix {
        n_cells,
        n_genes,
        indptr,
        indices,
        data,
    };
    canonicalize(&mut m.indptr, &mut m.indices, &mut m.data);
    Ok(m)
}

impl Matrix {
    /// Keeps the genes (columns) marked in `keep`, renumbering them, in place.
    fn keep_genes(&mut self, keep: &[bool]) {
        if keep.iter().all(|&k| k) {
            return;
        }
        let mut new = vec![u32::MAX; keep.len()];
        let mut next = 0u32;
        for (slot, _) in new.iter_mut().zip(keep).filter(|(_, k)| **k) {
            *slot = next;
            next += 1;
        }
        let (mut w, mut a) = (0usize, 0usize);
        for r in 0..self.n_cells {
            let b = self.indptr[r + 1] as usize;
            for k in a..b {
                let c = new[self.indices[k] as usize];
                if c != u32::MAX {
                    (self.indices[w], self.data[w]) = (c, self.data[k]);
                    w += 1;
                }
            }
            self.indptr[r + 1] = w as u64;
            a = b;
        }
        self.indices.truncate(w);
        self.data.truncate(w);
        self.n_genes = next as usize;
    }

    fn into_parts(self, obs_names: Vec<String>, var_names: Vec<String>) -> Parts {
        Parts {
            n_rows: self.n_cells,
            n_cols: self.n_genes,
            indptr: self.indptr,
            indices: self.indices,
            data: self.data,
            obs_names,
            var_names,
        }
    }
}
