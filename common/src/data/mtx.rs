//! Reader for 10x Genomics MatrixMarket folders (`filtered_feature_bc_matrix/`,
//! `filtered_gene_bc_matrices/<genome>/`): `matrix.mtx[.gz]` (genes × cells, coordinate
//! format), `features.tsv[.gz]` (CellRanger v3+: id, symbol, feature type) or
//! `genes.tsv[.gz]` (v2: id, symbol), and `barcodes.tsv[.gz]`. Files are gunzipped when
//! they start with the gzip signature, whatever their name.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::CellDataset;
use super::h5ad::canonicalize;
use super::read::{GeneIdColumn, Parts, ReadOptions, file_name, finish, io_error, open_text};
use crate::error::{Error, Result};

/// Reads a 10x mtx folder as cells × genes. `path` is the folder, or its
/// `[PREFIX]matrix.mtx[.gz]` file (then `[PREFIX]features.tsv` etc. are read beside it).
///
/// `opts.gene_id_column` picks the symbol (second) or id (first) column of the features
/// file; `opts.feature_type` (default `"Gene Expression"`) keeps features of that type
/// when the file has a third column. The MatrixMarket field may be `integer`, `real` or
/// `pattern` (values 1); only `general` symmetry is read. Entries may come in any order;
/// repeated entries are summed. Errors name the file and the line.
pub fn read_mtx(path: &Path, opts: &ReadOptions) -> Result<CellDataset> {
    let files = locate(path)?;
    let features = read_lines(&files.features)?;
    let barcodes = read_lines(&files.barcodes)?;
    let obs_names: Vec<String> = barcodes
        .iter()
        .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
        .collect();
    let (keep, var_names) = select_features(&files.features, &features, opts)?;
    let mut p = read_matrix(&files.matrix, &keep, features.len(), obs_names.len())?;
    p.obs_names = obs_names;
    p.var_names = var_names;
    finish(&files.matrix, p, opts)
}

/// The three files of a 10x mtx folder.
struct Files {
    matrix: PathBuf,
    features: PathBuf,
    barcodes: PathBuf,
}

/// Finds the files of the folder (or beside the matrix file) `path`.
fn locate(path: &Path) -> Result<Files> {
    let meta = std::fs::metadata(path).map_err(io_error(path))?;
    let (dir, prefix) = if meta.is_dir() {
        (path.to_path_buf(), String::new())
    } else {
        let name = file_name(path);
        let Some(prefix) = name
            .strip_suffix("matrix.mtx")
            .or_else(|| name.strip_suffix("matrix.mtx.gz"))
        else {
            return Err(Error::format(
                path,
                "a 10x mtx file must be named [PREFIX]matrix.mtx[.gz] (with \
                 [PREFIX]features.tsv[.gz] or genes.tsv[.gz] and barcodes.tsv[.gz] beside it)",
            ));
        };
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (dir, prefix.to_owned())
    };
    let find = |names: &[&str]| -> Result<PathBuf> {
        names
            .iter()
            .map(|n| dir.join(format!("{prefix}{n}")))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                let names: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
                Error::format(
                    &dir,
                    format!("10x mtx folder without {}", names.join(" or ")),
                )
            })
    };
    Ok(Files {
        matrix: find(&["matrix.mtx", "matrix.mtx.gz"])?,
        features: find(&[
            "features.tsv",
            "features.tsv.gz",
            "genes.tsv",
            "genes.tsv.gz",
        ])?,
        barcodes: find(&["barcodes.tsv", "barcodes.tsv.gz"])?,
    })
}

/// The lines of a small text file (trailing empty lines dropped).
fn read_lines(path: &Path) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for line in open_text(path)?.lines() {
        lines.push(line.map_err(io_error(path))?);
    }
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    Ok(lines)
}

/// Which features to keep (by feature type) and the var names of the kept ones.
fn select_features(
    path: &Path,
    lines: &[String],
    opts: &ReadOptions,
) -> Result<(Vec<bool>, Vec<String>)> {
    let col = match opts.gene_id_column {
        GeneIdColumn::Ids => 0,
        GeneIdColumn::Symbols => 1,
    };
    let rows: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
    let typed = rows.first().is_some_and(|r| r.len() >= 3);
    let mut keep = vec![true; rows.len()];
    if let (Some(ty), true) = (&opts.feature_type, typed) {
        for (i, r) in rows.iter().enumerate() {
            let Some(t) = r.get(2) else {
                return Err(Error::format(
                    path,
                    format!("line {}: no feature type (third column)", i + 1),
                ));
            };
            keep[i] = t == ty;
        }
        if !keep.contains(&true) {
            let mut types: Vec<&str> = Vec::new();
            for r in &rows {
                if !types.contains(&r[2]) {
                    types.push(r[2]);
                }
            }
            return Err(Error::format(
                path,
                format!("no features of type `{ty}` (types: {})", types.join(", ")),
            ));
        }
    }
    let mut names = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let Some(name) = r.get(col) else {
            return Err(Error::format(
                path,
                format!(
                    "line {}: {} column(s), gene symbols are the second (read gene ids instead)",
                    i + 1,
                    r.len()
                ),
            ));
        };
        if keep[i] {
            names.push((*name).to_owned());
        }
    }
    Ok((keep, names))
}

/// The value type of a MatrixMarket file.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    Integer,
    Real,
    Pattern,
}

/// Reads the genes × cells coordinate matrix at `path` as cells × genes CSR, keeping the
/// genes marked in `keep` (renumbered); `n_genes` and `n_cells` must match its size line.
fn read_matrix(path: &Path, keep: &[bool], n_genes: usize, n_cells: usize) -> Result<Parts> {
    let bad = |line: usize, msg: String| Error::format(path, format!("line {line}: {msg}"));
    let mut reader = open_text(path)?;
    let (mut buf, mut line_no) = (String::new(), 0usize);
    let mut next_line = |buf: &mut String, line_no: &mut usize| -> Result<bool> {
        buf.clear();
        *line_no += 1;
        Ok(reader.read_line(buf).map_err(io_error(path))? > 0)
    };
    next_line(&mut buf, &mut line_no)?;
    let header: Vec<String> = buf.split_whitespace().map(str::to_lowercase).collect();
    let field = match header.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["%%matrixmarket", "matrix", "coordinate", field, "general"] => match field {
            "integer" => Field::Integer,
            "real" | "double" => Field::Real,
            "pattern" => Field::Pattern,
            other => return Err(bad(1, format!("unsupported field `{other}`"))),
        },
        _ => {
            return Err(bad(
                1,
                format!(
                    "expected `%%MatrixMarket matrix coordinate integer|real|pattern general`, \
                     found `{}`",
                    buf.trim_end()
                ),
            ));
        }
    };
    // Comments, then the size line.
    let size_line = loop {
        if !next_line(&mut buf, &mut line_no)? {
            return Err(bad(
                1,
                "no size line after the header (file truncated?)".into(),
            ));
        }
        let t = buf.trim();
        if !t.is_empty() && !t.starts_with('%') {
            break line_no;
        }
    };
    let size: Vec<usize> = buf
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad(size_line, format!("malformed size line `{}`", buf.trim())))?;
    let [rows, cols, nnz] = size[..] else {
        return Err(bad(
            size_line,
            format!(
                "size line `{}` must hold rows, columns, entries",
                buf.trim()
            ),
        ));
    };
    if (rows, cols) != (n_genes, n_cells) {
        return Err(bad(
            size_line,
            format!(
                "matrix is {rows} × {cols}, but the folder lists {n_genes} features and \
                 {n_cells} barcodes"
            ),
        ));
    }
    let mut new = vec![u32::MAX; n_genes];
    let mut n_kept = 0u32;
    for (slot, _) in new.iter_mut().zip(keep).filter(|(_, k)| **k) {
        *slot = n_kept;
        n_kept += 1;
    }
    let cap = nnz.min(1 << 26);
    let (mut genes, mut cells, mut vals) = (
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
    );
    let mut seen = 0usize;
    while next_line(&mut buf, &mut line_no)? {
        let t = buf.trim();
        if t.is_empty() || t.starts_with('%') {
            continue;
        }
        seen += 1;
        if seen > nnz {
            return Err(bad(
                line_no,
                format!("more entries than the {nnz} of the size line"),
            ));
        }
        let mut it = t.split_ascii_whitespace();
        let mut index = |what: &str, n: usize| -> Result<usize> {
            let s = it.next().unwrap_or("");
            match s.parse::<usize>() {
                Ok(i) if (1..=n).contains(&i) => Ok(i - 1),
                _ => Err(bad(
                    line_no,
                    format!("{what} index `{s}` is not in 1..={n}"),
                )),
            }
        };
        let g = index("row (gene)", rows)?;
        let c = index("column (cell)", cols)?;
        let v = match (field, it.next()) {
            (Field::Pattern, _) => Some(1.0),
            (Field::Integer, Some(s)) => s.parse::<i64>().map(|v| v as f32).ok(),
            (Field::Real, Some(s)) => s.parse::<f64>().map(|v| v as f32).ok(),
            (_, None) => None,
        }
        .ok_or_else(|| bad(line_no, format!("malformed entry `{t}`")))?;
        if new[g] != u32::MAX {
            genes.push(new[g]);
            cells.push(c as u32);
            vals.push(v);
        }
    }
    if seen < nnz {
        return Err(bad(
            line_no,
            format!("file ends after {seen} of {nnz} entries (truncated?)"),
        ));
    }
    let (mut indptr, mut indices, mut data) = by_cell(n_cells, &cells, &genes, &vals);
    canonicalize(&mut indptr, &mut indices, &mut data);
    Ok(Parts {
        n_rows: n_cells,
        n_cols: n_kept as usize,
        indptr,
        indices,
        data,
        obs_names: Vec::new(),
        var_names: Vec::new(),
    })
}

/// Groups coordinate entries by cell (a counting sort that keeps the file order within a
/// cell), giving CSR parts.
fn by_cell(
    n_cells: usize,
    cells: &[u32],
    genes: &[u32],
    vals: &[f32],
) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
    let mut indptr = vec![0u64; n_cells + 1];
    for &c in cells {
        indptr[c as usize + 1] += 1;
    }
    for r in 0..n_cells {
        indptr[r + 1] += indptr[r];
    }
    let mut next = indptr[..n_cells].to_vec();
    let (mut indices, mut data) = (vec![0u32; vals.len()], vec![0f32; vals.len()]);
    for k in 0..vals.len() {
        let slot = &mut next[cells[k] as usize];
        (indices[*slot as usize], data[*slot as usize]) = (genes[k], vals[k]);
        *slot += 1;
    }
    (indptr, indices, data)
}
