//! Reader for dense text tables: CSV/TSV with a header row of gene names and one cell per
//! line (cell id first), or the transpose (a header row of cell ids, one gene per line).
//! Files are gunzipped when they start with the gzip signature (e.g. `counts.csv.gz`).

use std::borrow::Cow;
use std::io::BufRead;
use std::path::Path;

use super::CellDataset;
use super::h5ad::csc_to_csr;
use super::read::{Parts, ReadOptions, file_name, finish, io_error, open_text, warn_if_swapped};
use crate::error::{Error, Result};

/// How fields are separated.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Delim {
    /// One character (`,` or tab); fields may be double-quoted (`""` inside is a quote).
    Char(char),
    /// Runs of white space.
    Whitespace,
}

/// Reads a dense table as cells × genes, keeping non-zero values as `f32` (parsed as `f64`
/// and rounded, as numpy does).
///
/// The delimiter is `,` for `.csv`, tab for `.tsv`/`.tab`; for `.txt` and other names it
/// is tab if the header line has one, else `,` if it has one, else white space. Lines
/// starting with `#` before the header and empty lines are skipped. The header may or may
/// not have a corner cell above the row names (as pandas and R's `write.csv`, or R's
/// `write.table`, write them). With `opts.transpose` the file is genes × cells; without
/// it, a file whose names look swapped ([`super::read::names_look_swapped`]) is read as
/// given, with a warning. Values must be finite numbers; errors name the file, line,
/// column and the offending text.
pub fn read_csv(path: &Path, opts: &ReadOptions) -> Result<CellDataset> {
    let name = file_name(path).to_ascii_lowercase();
    let base = name.strip_suffix(".gz").unwrap_or(&name);
    let delim = match base.rsplit_once('.').map(|(_, e)| e) {
        Some("csv") => Some(Delim::Char(',')),
        Some("tsv" | "tab") => Some(Delim::Char('\t')),
        _ => None,
    };
    let t = read_table(path, delim)?;
    let p = if opts.transpose {
        let (n_genes, n_cells) = (t.row_names.len(), t.col_names.len());
        let (indptr, indices, data) = csc_to_csr(n_cells, n_genes, &t.indptr, &t.indices, &t.data);
        Parts {
            n_rows: n_cells,
            n_cols: n_genes,
            indptr,
            indices,
            data,
            obs_names: t.col_names,
            var_names: t.row_names,
        }
    } else {
        Parts {
            n_rows: t.row_names.len(),
            n_cols: t.col_names.len(),
            indptr: t.indptr,
            indices: t.indices,
            data: t.data,
            obs_names: t.row_names,
            var_names: t.col_names,
        }
    };
    warn_if_swapped(path, &p.obs_names, &p.var_names, opts.transpose);
    finish(path, p, opts)
}

/// A table as read: named rows of sparse values in CSR form.
struct Table {
    row_names: Vec<String>,
    col_names: Vec<String>,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    data: Vec<f32>,
}

/// Reads the table at `path` line by line; `delim` `None` detects it from the header.
fn read_table(path: &Path, delim: Option<Delim>) -> Result<Table> {
    let mut reader = open_text(path)?;
    let (mut buf, mut line_no) = (String::new(), 0usize);
    let mut next = |buf: &mut String, line_no: &mut usize| -> Result<bool> {
        buf.clear();
        *line_no += 1;
        let n = reader.read_line(buf).map_err(io_error(path))?;
        let len = buf.trim_end_matches(['\r', '\n']).len();
        buf.truncate(len);
        Ok(n > 0)
    };
    loop {
        if !next(&mut buf, &mut line_no)? {
            return Err(Error::format(path, "empty file: no header row"));
        }
        if !buf.trim().is_empty() && !buf.starts_with('#') {
            break;
        }
    }
    let delim = delim.unwrap_or(if buf.contains('\t') {
        Delim::Char('\t')
    } else if buf.contains(',') {
        Delim::Char(',')
    } else {
        Delim::Whitespace
    });
    let header: Vec<String> = split(&buf, delim)
        .into_iter()
        .map(Cow::into_owned)
        .collect();
    let mut t = Table {
        row_names: Vec::new(),
        col_names: Vec::new(),
        indptr: vec![0],
        indices: Vec::new(),
        data: Vec::new(),
    };
    // Values per line: known from the first data line (with or without a corner cell).
    let mut n_values: Option<usize> = None;
    while next(&mut buf, &mut line_no)? {
        if buf.trim().is_empty() {
            continue;
        }
        let fields = split(&buf, delim);
        let n = fields.len().saturating_sub(1);
        let want = *n_values.get_or_insert_with(|| {
            t.col_names = if n + 1 == header.len() {
                header[1..].to_vec()
            } else {
                header.clone()
            };
            t.col_names.len()
        });
        if n != want {
            return Err(Error::format(
                path,
                format!(
                    "line {line_no}: {} fields, expected {} (a name and {want} values, as the \
                     header has {} fields)",
                    fields.len(),
                    want + 1,
                    header.len()
                ),
            ));
        }
        let mut fields = fields.into_iter();
        let row_name = fields.next().unwrap_or_default().into_owned();
        for (j, f) in fields.enumerate() {
            let s = f.trim();
            let problem = match s.parse::<f64>() {
                Ok(v) if v.is_finite() => {
                    if v != 0.0 {
                        t.indices.push(j as u32);
                        t.data.push(v as f32);
                    }
                    continue;
                }
                Ok(_) => "non-finite value",
                Err(_) if s.is_empty() => "empty value",
                Err(_) => "non-numeric value",
            };
            return Err(Error::format(
                path,
                format!(
                    "line {line_no}, column {} (row `{row_name}`, column `{}`): {problem} `{s}`",
                    j + 2,
                    t.col_names[j]
                ),
            ));
        }
        t.row_names.push(row_name);
        t.indptr.push(t.data.len() as u64);
    }
    if n_values.is_none() {
        t.col_names = header.get(1..).unwrap_or_default().to_vec();
    }
    if t.col_names.len() > u32::MAX as usize {
        return Err(Error::format(path, "more than 2^32 columns"));
    }
    Ok(t)
}

/// Splits one line into fields. With a character delimiter, fields in double quotes may
/// contain the delimiter and `""` for a quote; white-space fields lose surrounding quotes.
fn split(line: &str, delim: Delim) -> Vec<Cow<'_, str>> {
    let d = match delim {
        Delim::Whitespace => {
            return line
                .split_whitespace()
                .map(|f| Cow::Borrowed(f.trim_matches('"')))
                .collect();
        }
        Delim::Char(d) => d,
    };
    if !line.contains('"') {
        return line.split(d).map(Cow::Borrowed).collect();
    }
    let (mut out, mut field, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) => quoted = true,
            (c, false) if c == d => out.push(Cow::Owned(std::mem::take(&mut field))),
            (c, _) => field.push(c),
        }
    }
    out.push(Cow::Owned(field));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_quotes_and_whitespace() {
        let c = Delim::Char(',');
        assert_eq!(split("a,b,,c", c), ["a", "b", "", "c"]);
        assert_eq!(
            split(r#""x,y",2,"say ""hi""""#, c),
            ["x,y", "2", r#"say "hi""#]
        );
        assert_eq!(split("  \"a\"  b\t3 ", Delim::Whitespace), ["a", "b", "3"]);
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A genes × cells table read as cells × genes is recognised by its names.
    #[test]
    fn swapped_names_are_recognised() {
        use crate::data::read::names_look_swapped;
        let barcodes = names(&[
            "AAACCTGAGAAGGCCT-1",
            "AAACCTGAGACAGACC-1",
            "s2_TTTGTCATCTTGCCGT",
        ]);
        let symbols = names(&["Xkr4", "Gm1992", "Sox17", "Mrpl15"]);
        let ensembl = names(&["ENSG00000141510", "ENSMUSG00000051951.5", "ENSG00000000003"]);
        let cells = names(&["cell1", "Cell_2", "cell-3"]);
        let mito = names(&["Actb", "MT-CO1", "mt-Nd1", "MT-ATP6", "Gapdh", "Cd3e"]);
        // Cells x genes as it should be: nothing to say.
        for (obs, var) in [(&barcodes, &symbols), (&cells, &ensembl), (&cells, &mito)] {
            assert_eq!(names_look_swapped(obs, var), None, "{obs:?} {var:?}");
        }
        // Genes x cells read as cells x genes.
        let e = names_look_swapped(&symbols, &barcodes).unwrap();
        assert!(
            e.starts_with("3 of the 3 gene names look like cell names (e.g. `AAACCTGAGAAGGCCT-1`)"),
            "{e}"
        );
        let e = names_look_swapped(&ensembl, &names(&["a", "b"])).unwrap();
        assert!(
            e.starts_with("3 of the 3 cell names look like gene names"),
            "{e}"
        );
        assert!(names_look_swapped(&mito, &names(&["x1", "x2"])).is_some());
        assert!(names_look_swapped(&symbols, &cells).is_some());
        // Ambiguous names on both sides: no claim.
        assert_eq!(names_look_swapped(&barcodes, &barcodes), None);
        assert_eq!(names_look_swapped(&names(&["AAAA"]), &names(&["b"])), None);
    }
}
