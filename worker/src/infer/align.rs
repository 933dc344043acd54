//! Matching an input's genes to a model's vocabulary.

use std::collections::HashMap;

use scfm_common::data::prepared::VocabEntry;

/// How an input's columns map onto the model's genes.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneAlignment {
    /// Model gene (vocabulary column) of each input column, if any.
    pub map: Vec<Option<u32>>,
    /// Model genes found in the input.
    pub matched: usize,
    /// Genes of the model.
    pub n_model: usize,
    /// What matched: `gene_id` or `gene_symbol` of the vocabulary.
    pub by: &'static str,
}

impl GeneAlignment {
    /// The fraction of the model's genes the input has.
    pub fn fraction(&self) -> f64 {
        self.matched as f64 / self.n_model.max(1) as f64
    }
}

/// Maps `input` gene names onto `vocab`, by the vocabulary's gene ids or by its symbols,
/// whichever matches more genes (ids win ties). Each model gene takes the first input
/// column that names it; later duplicates are left unmapped.
pub fn align(input: &[String], vocab: &[VocabEntry]) -> GeneAlignment {
    let by_id = map_by(input, vocab.iter().map(|e| e.gene_id.as_str()));
    let by_symbol = map_by(input, vocab.iter().map(|e| e.symbol.as_str()));
    let count = |m: &[Option<u32>]| m.iter().filter(|x| x.is_some()).count();
    let (map, by) = if count(&by_symbol) > count(&by_id) {
        (by_symbol, "gene_symbol")
    } else {
        (by_id, "gene_id")
    };
    GeneAlignment {
        matched: count(&map),
        map,
        n_model: vocab.len(),
        by,
    }
}

fn map_by<'a>(input: &[String], keys: impl Iterator<Item = &'a str>) -> Vec<Option<u32>> {
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut n = 0;
    for (c, k) in keys.enumerate() {
        index.entry(k).or_insert(c as u32);
        n = c + 1;
    }
    let mut taken = vec![false; n];
    input
        .iter()
        .map(|g| {
            let c = *index.get(g.as_str())?;
            let t = taken.get_mut(c as usize)?;
            if *t {
                return None;
            }
            *t = true;
            Some(c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pairs: &[(&str, &str)]) -> Vec<VocabEntry> {
        pairs
            .iter()
            .map(|(i, s)| VocabEntry {
                gene_id: i.to_string(),
                symbol: s.to_string(),
            })
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn matches_ids_or_symbols_whichever_covers_more() {
        let v = vocab(&[("ENSG1", "CD3E"), ("ENSG2", "MS4A1"), ("ENSG3", "LYZ")]);
        let a = align(&names(&["LYZ", "X", "CD3E"]), &v);
        assert_eq!((a.by, a.matched, a.n_model), ("gene_symbol", 2, 3));
        assert_eq!(a.map, vec![Some(2), None, Some(0)]);
        let a = align(&names(&["ENSG2", "ENSG3"]), &v);
        assert_eq!((a.by, a.matched), ("gene_id", 2));
        assert_eq!(a.map, vec![Some(1), Some(2)]);
        assert!((a.fraction() - 2.0 / 3.0).abs() < 1e-12);
        // Nothing in common.
        assert_eq!(align(&names(&["A", "B"]), &v).matched, 0);
        // A duplicated input gene maps once.
        let a = align(&names(&["LYZ", "LYZ"]), &v);
        assert_eq!(a.map, vec![Some(2), None]);
    }
}
