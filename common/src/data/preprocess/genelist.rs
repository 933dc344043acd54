//! Gene lists on disk: UTF-8 text, one gene name (symbol or id) per line, e.g. the
//! selected highly variable genes or a fixed vocabulary.
//!
//! Reading trims surrounding whitespace (so `\r\n` line ends work) and skips blank lines;
//! a name may appear only once.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// How many names an error message lists before "and N more".
const SHOW: usize = 10;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lists up to [`SHOW`] names as "`a`, `b` and 3 more".
pub(crate) fn show_names<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = names.len();
    let mut s: Vec<String> = names.take(SHOW).map(|g| format!("`{g}`")).collect();
    if n > SHOW {
        s.push(format!("and {} more", n - SHOW));
    }
    s.join(", ")
}

/// Errors (naming `what` and the duplicated name with both positions, 1-based) if a name
/// occurs twice in `names`; returns each name's index.
pub(crate) fn index_unique<'a>(
    names: &'a [String],
    what: &Path,
    unit: &str,
) -> Result<HashMap<&'a str, usize>> {
    let mut map = HashMap::with_capacity(names.len());
    for (i, g) in names.iter().enumerate() {
        if let Some(j) = map.insert(g.as_str(), i) {
            return Err(Error::format(
                what,
                format!(
                    "gene `{g}` appears twice ({unit} {} and {}); make the names unique \
                     (vocab::make_unique, like anndata's var_names_make_unique) or remove one",
                    j + 1,
                    i + 1
                ),
            ));
        }
    }
    Ok(map)
}

/// Writes `genes` to `path`, one per line. Errors (naming the file and the gene) on an
/// empty name, a name with a line break or surrounding whitespace, or a repeated name.
pub fn save_gene_list(path: &Path, genes: &[String]) -> Result<()> {
    for (i, g) in genes.iter().enumerate() {
        if g.is_empty() || g.contains(['\n', '\r']) || g.trim() != g {
            return Err(Error::format(
                path,
                format!(
                    "gene {} {g:?} cannot be written one per line (empty, line break or \
                     surrounding whitespace)",
                    i + 1
                ),
            ));
        }
    }
    index_unique(genes, path, "entries")?;
    let mut text = genes.join("\n");
    text.push('\n');
    std::fs::write(path, text).map_err(io(path))
}

/// Reads a gene list written by [`save_gene_list`] (or by hand). Errors name the file:
/// unreadable, not UTF-8, no genes, or a gene on two lines.
pub fn load_gene_list(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::format(path, format!("not UTF-8 text: {e}")))?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut genes = Vec::new();
    for (line, g) in text.lines().enumerate() {
        let g = g.trim();
        if g.is_empty() {
            continue;
        }
        if let Some(first) = seen.insert(g, line + 1) {
            return Err(Error::format(
                path,
                format!("gene `{g}` appears on lines {first} and {}", line + 1),
            ));
        }
        genes.push(g.to_owned());
    }
    if genes.is_empty() {
        return Err(Error::format(path, "no gene names (one per line expected)"));
    }
    Ok(genes)
}

/// The column of each gene of `genes` (read from `list`) in a dataset whose genes are
/// `var_names` (read from `data`), in list order.
///
/// Errors name the list file and every missing gene (up to ten, then a count), or the
/// data file and a gene that occurs twice among its `var_names`.
pub fn resolve_gene_list(
    genes: &[String],
    list: &Path,
    var_names: &[String],
    data: &Path,
) -> Result<Vec<usize>> {
    let index = index_unique(var_names, data, "columns")?;
    let missing: Vec<&str> = genes
        .iter()
        .map(String::as_str)
        .filter(|g| !index.contains_key(g))
        .collect();
    if !missing.is_empty() {
        return Err(Error::format(
            list,
            format!(
                "{} of its {} genes are not among the {} genes of {}: {}",
                missing.len(),
                genes.len(),
                var_names.len(),
                data.display(),
                show_names(missing.into_iter())
            ),
        ));
    }
    Ok(genes.iter().map(|g| index[g.as_str()]).collect())
}
