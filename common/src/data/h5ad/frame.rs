//! anndata dataframes (`obs`, `var`, `raw/var`): the index and one label column.
//!
//! Layouts: a group with an `_index` attribute naming the index column (anndata ≥ 0.7;
//! categorical columns as `categorical` groups since 0.8, as integer codes with a
//! `categories` attribute and `__categories/<col>` in 0.7), or a compound dataset whose
//! first field is the index (anndata < 0.7; categorical columns as integer-code fields
//! with the categories in `uns/<col>_categories`).

use hdf5::{Dataset, Group};

use super::typed::{At, R, Src, bad, opt_attr, str_attr};
use super::{Elem, encoding, member, open_elem};

/// The row names of dataframe `frame`.
pub(super) fn index(file: &Group, frame: &str) -> R<Vec<String>> {
    match open_elem(file, frame)? {
        None => bad(format!("no `{frame}` in file")),
        Some(Elem::Group(g)) => {
            let Some(key) = str_attr(&g, "_index")? else {
                return bad(format!(
                    "`{frame}` has no `_index` attribute naming its index column"
                ));
            };
            Src::dataset(&member(&g, frame, &key)?).strings()
        }
        Some(Elem::Dataset(ds)) => {
            let fields = record_fields(&ds, frame)?;
            match fields.first() {
                Some(first) => Src::field(&ds, first).strings(),
                None => bad(format!("`{frame}` has no fields")),
            }
        }
    }
}

/// The values of column `col` of dataframe `frame` as strings, checked to have `n` entries.
pub(super) fn labels(file: &Group, frame: &str, col: &str, n: usize) -> R<Vec<String>> {
    let labels = match open_elem(file, frame)? {
        None => return bad(format!("no `{frame}` in file")),
        Some(Elem::Group(g)) => group_column(&g, frame, col)?,
        Some(Elem::Dataset(ds)) => record_column(file, &ds, frame, col)?,
    };
    if labels.len() != n {
        return bad(format!(
            "column `{frame}/{col}` has {} values, expected {n}",
            labels.len()
        ));
    }
    Ok(labels)
}

/// Whether dataframe `frame` has a column `col`.
pub(super) fn has_column(file: &Group, frame: &str, col: &str) -> R<bool> {
    Ok(match open_elem(file, frame)? {
        None => false,
        Some(Elem::Group(g)) => g.link_exists(col),
        Some(Elem::Dataset(ds)) => record_fields(&ds, frame)?.iter().any(|f| f == col),
    })
}

/// Field names of compound dataset `ds` (dataframe `frame`), in stored order.
fn record_fields(ds: &Dataset, frame: &str) -> R<Vec<String>> {
    match Src::dataset(ds).field_names()? {
        Some(fields) => Ok(fields),
        None => bad(format!(
            "`{frame}` is a dataset but not compound records (expected a dataframe)"
        )),
    }
}

/// Column `col` of a dataframe group `g` (anndata ≥ 0.7).
fn group_column(g: &Group, frame: &str, col: &str) -> R<Vec<String>> {
    let elem = format!("{frame}/{col}");
    match open_elem(g, col)? {
        None => {
            let mut cols = g.member_names().at(&format!("`{frame}`"))?;
            let index = str_attr(g, "_index")?;
            cols.retain(|c| c != "__categories" && Some(c) != index.as_ref());
            bad(format!(
                "no column `{col}` in `{frame}` (columns: {})",
                cols.join(", ")
            ))
        }
        Some(Elem::Group(cg)) => match encoding(&cg)?.as_deref() {
            Some("categorical") => {
                let codes = Src::dataset(&member(&cg, &elem, "codes")?).ints::<i64>()?;
                let cats = categories(&Src::dataset(&member(&cg, &elem, "categories")?))?;
                decode(&codes, &cats, &elem)
            }
            Some("nullable-string-array") => {
                let values = Src::dataset(&member(&cg, &elem, "values")?).strings()?;
                let mask = Src::dataset(&member(&cg, &elem, "mask")?).ints::<u8>()?;
                if mask.len() != values.len() {
                    return bad(format!(
                        "`{elem}/mask` and `{elem}/values` differ in length"
                    ));
                }
                let na = |(v, m): (String, u8)| if m != 0 { "nan".to_owned() } else { v };
                Ok(values.into_iter().zip(mask).map(na).collect())
            }
            Some(other) => bad(format!(
                "unsupported encoding-type `{other}` for column `{elem}`"
            )),
            None => bad(format!(
                "column `{elem}` is a group without `encoding-type`"
            )),
        },
        Some(Elem::Dataset(ds)) => {
            let src = Src::dataset(&ds);
            if opt_attr(&ds, "categories")?.is_some() {
                // anndata 0.7: codes here, categories in `__categories/<col>`.
                let cats = member(g, frame, &format!("__categories/{col}"))?;
                return decode(
                    &src.ints::<i64>()?,
                    &categories(&Src::dataset(&cats))?,
                    &elem,
                );
            }
            if !src.is_strings()? {
                let desc = src.descriptor()?;
                return bad(format!(
                    "column `{elem}` holds {desc}; labels must be strings or categorical"
                ));
            }
            src.strings()
        }
    }
}

/// Field `col` of a compound-records dataframe `ds` (anndata < 0.7).
fn record_column(file: &Group, ds: &Dataset, frame: &str, col: &str) -> R<Vec<String>> {
    let fields = record_fields(ds, frame)?;
    if !fields.iter().any(|f| f == col) {
        let cols = fields.get(1..).unwrap_or_default().join(", ");
        return bad(format!("no column `{col}` in `{frame}` (columns: {cols})"));
    }
    let src = Src::field(ds, col);
    if src.is_strings()? {
        return src.strings();
    }
    let cats_name = format!("uns/{col}_categories");
    match open_elem(file, &cats_name)? {
        Some(Elem::Dataset(cats)) => decode(
            &src.ints::<i64>()?,
            &categories(&Src::dataset(&cats))?,
            &format!("{frame}/{col}"),
        ),
        _ => {
            let desc = src.descriptor()?;
            bad(format!(
                "column `{col}` of `{frame}` holds {desc} without `{cats_name}`; labels must be strings or categorical"
            ))
        }
    }
}

/// Category values as strings (string categories, or integers written in decimal).
fn categories(src: &Src) -> R<Vec<String>> {
    if src.is_strings()? {
        src.strings()
    } else {
        Ok(src
            .ints::<i64>()?
            .into_iter()
            .map(|i| i.to_string())
            .collect())
    }
}

/// Maps categorical codes to their categories; code -1 (missing) becomes `"nan"`.
fn decode(codes: &[i64], cats: &[String], elem: &str) -> R<Vec<String>> {
    codes
        .iter()
        .map(|&c| match c {
            -1 => Ok("nan".to_owned()),
            c if c >= 0 && (c as usize) < cats.len() => Ok(cats[c as usize].clone()),
            c => bad(format!(
                "`{elem}` has code {c} but {} categories",
                cats.len()
            )),
        })
        .collect()
}
