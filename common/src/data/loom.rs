//! Reader for loom files (HDF5): the dense genes × cells `/matrix`, gene names in
//! `/row_attrs/Gene` (or ids in `/row_attrs/Accession`) and cell names in
//! `/col_attrs/CellID`. Only the main matrix is read (not `/layers`).
//!
//! The matrix is read in blocks of whole chunk columns (all genes × a multiple of the chunk
//! width in cells), each turned into CSR rows of cells before the next is read, so neither
//! the dense matrix nor a transposed copy is ever held whole.

use std::path::Path;

use hdf5::{Dataset, Group, LocationType};

use super::CellDataset;
use super::h5ad::to_error;
use super::h5ad::typed::{At, BLOCK, R, Src, Stored, Visit, bad, dispatch};
use super::read::{GeneIdColumn, Parts, ReadOptions, finish, list, open_hdf5};
use crate::error::Result;

/// Reads a loom file as cells × genes, dropping zeros; values of any numeric stored type
/// become `f32`.
///
/// `opts.gene_id_column` picks `row_attrs/Gene` (symbols) or `row_attrs/Accession` (ids).
/// String attributes are XML-unescaped as loompy does (`&#228;` → `ä`). Errors name the
/// file and the missing or malformed element.
pub fn read_loom(path: &Path, opts: &ReadOptions) -> Result<CellDataset> {
    let file = open_hdf5(path, "a .loom file")?;
    let p = read_file(&file, opts).map_err(|e| to_error(path, e))?;
    finish(path, p, opts)
}

/// Reads names, then the matrix.
fn read_file(file: &Group, opts: &ReadOptions) -> R<Parts> {
    if !file.link_exists("matrix")
        || file.loc_type_by_name("matrix").at("`matrix`")? != LocationType::Dataset
    {
        let members = file.member_names().at("the top-level members")?;
        return bad(format!(
            "no `matrix` dataset: not a loom file (top-level members: {})",
            list(&members)
        ));
    }
    let ds = file.dataset("matrix").at("`matrix`")?;
    let [n_genes, n_cells] = ds.shape()[..] else {
        return bad(format!(
            "`matrix` has {} dimensions, expected 2 (genes × cells)",
            ds.ndim()
        ));
    };
    let gene_attr = match opts.gene_id_column {
        GeneIdColumn::Symbols => "Gene",
        GeneIdColumn::Ids => "Accession",
    };
    let var_names = attr(file, "row_attrs", gene_attr, n_genes)?;
    let obs_names = attr(file, "col_attrs", "CellID", n_cells)?;
    let desc = Src::dataset(&ds).descriptor()?;
    let visit = Columns {
        ds: &ds,
        n_genes,
        n_cells,
    };
    let (indptr, indices, data) = dispatch(&desc, visit)
        .unwrap_or_else(|| bad(format!("`matrix` holds {desc}, expected numbers")))?;
    Ok(Parts {
        n_rows: n_cells,
        n_cols: n_genes,
        indptr,
        indices,
        data,
        obs_names,
        var_names,
    })
}

/// The `n` strings of attribute `group/name`, unescaped.
fn attr(file: &Group, group: &str, name: &str, n: usize) -> R<Vec<String>> {
    let elem = format!("`{group}/{name}`");
    let g = match file.link_exists(group) {
        true => file.group(group).at(&format!("`{group}`"))?,
        false => return bad(format!("no `{group}` group: not a loom file")),
    };
    if !g.link_exists(name) {
        let names = g.member_names().at(&format!("`{group}`"))?;
        return bad(format!("no {elem} in file (attributes: {})", list(&names)));
    }
    let v = Src::dataset(&g.dataset(name).at(&elem)?).strings()?;
    if v.len() != n {
        return bad(format!("{elem} has {} entries, expected {n}", v.len()));
    }
    Ok(v.into_iter().map(unescape).collect())
}

/// Undoes loompy's escaping of non-ASCII text as XML character references (`&#228;`,
/// `&#xe4;`) and the five XML entities, as `html.unescape` does for these.
fn unescape(s: String) -> String {
    if !s.contains('&') {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').and_then(|end| {
            let ent = &rest[1..end];
            let c = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let num = ent.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Reads a genes × cells dense dataset in column blocks into cells × genes CSR parts.
struct Columns<'a> {
    ds: &'a Dataset,
    n_genes: usize,
    n_cells: usize,
}

impl Visit for Columns<'_> {
    type Out = R<(Vec<u64>, Vec<u32>, Vec<f32>)>;

    fn visit<S: Stored>(self) -> Self::Out {
        let (n_genes, n_cells) = (self.n_genes, self.n_cells);
        let mut indptr = Vec::with_capacity(n_cells + 1);
        indptr.push(0u64);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        if n_genes == 0 || n_cells == 0 {
            indptr.resize(n_cells + 1, 0);
            return Ok((indptr, indices, data));
        }
        // Whole chunks per block: each chunk is read and inflated once.
        let chunk_w = self
            .ds
            .chunk()
            .and_then(|c| c.get(1).copied())
            .filter(|&w| w > 0)
            .unwrap_or(64);
        let width = ((BLOCK / n_genes) / chunk_w).max(1) * chunk_w;
        let mut offsets = vec![0usize; width];
        for a in (0..n_cells).step_by(width) {
            let b = (a + width).min(n_cells);
            let w = b - a;
            let block = self.ds.read_slice_2d::<S, _>((.., a..b)).at("`matrix`")?;
            let block = block.as_standard_layout();
            let values = block.as_slice().expect("standard layout is contiguous");
            // Count the non-zeros of each cell, then place them gene by gene, so that
            // each cell's genes come out in increasing order.
            offsets[..w].fill(0);
            for row in values.chunks_exact(w) {
                for (c, &v) in row.iter().enumerate() {
                    offsets[c] += usize::from(v.to_f32() != 0.0);
                }
            }
            let mut end = data.len();
            for off in &mut offsets[..w] {
                let n = *off;
                *off = end;
                end += n;
                indptr.push(end as u64);
            }
            indices.resize(end, 0u32);
            data.resize(end, 0f32);
            for (g, row) in values.chunks_exact(w).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    let v = v.to_f32();
                    if v != 0.0 {
                        (indices[offsets[c]], data[offsets[c]]) = (g as u32, v);
                        offsets[c] += 1;
                    }
                }
            }
        }
        Ok((indptr, indices, data))
    }
}
