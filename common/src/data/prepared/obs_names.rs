//! Unique cell names across the inputs of `scfm prepare`, as anndata makes them.

use std::collections::{HashMap, HashSet};

/// Makes the cell names of all inputs, taken in order, unique as anndata's
/// `obs_names_make_unique` does on the concatenation: the first occurrence of a name keeps
/// it, later ones get `-1`, `-2`, … (skipping names that exist already). Built in pass 1
/// from 64-bit hashes of the names (8 bytes per cell, so atlases stay within bounded
/// memory), applied input by input in pass 4.
pub(crate) struct UniqueObsNames {
    /// Hashes of every original name, sorted.
    all: Vec<u64>,
    /// Hashes that occur more than once.
    dup: HashSet<u64>,
    /// Names with a repeated hash seen so far (the first occurrence keeps its name).
    seen: HashSet<String>,
    /// Names given so far to repeats.
    made: HashSet<String>,
    /// The last suffix tried per name.
    counter: HashMap<String, usize>,
    /// Names renamed so far, and a first example, for the warning.
    renamed: usize,
    example: Option<(String, String)>,
}

/// Collects the hashes of [`UniqueObsNames`].
pub(crate) struct UniqueObsNamesBuilder(Vec<u64>);

impl UniqueObsNamesBuilder {
    /// Adds the cell names of the next input.
    pub(crate) fn add_input(&mut self, names: &[String]) {
        self.0.extend(names.iter().map(|n| name_hash(n)));
    }

    /// The renamer, once every input was added.
    pub(crate) fn finish(mut self) -> UniqueObsNames {
        self.0.sort_unstable();
        let dup = self
            .0
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        UniqueObsNames {
            all: self.0,
            dup,
            seen: Default::default(),
            made: Default::default(),
            counter: HashMap::new(),
            renamed: 0,
            example: None,
        }
    }
}

/// A 64-bit hash of a cell name (the standard library's hasher with fixed keys).
fn name_hash(name: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(name)
}

impl UniqueObsNames {
    /// A builder to add every input's names to, in order.
    pub(crate) fn builder() -> UniqueObsNamesBuilder {
        UniqueObsNamesBuilder(Vec::new())
    }

    /// The names of the next input's cells (all of them, in file order).
    pub(crate) fn next_input(&mut self, names: &[String]) -> Vec<String> {
        let mut out = names.to_vec();
        if self.dup.is_empty() {
            return out;
        }
        for name in &mut out {
            if !self.dup.contains(&name_hash(name)) || self.seen.insert(name.clone()) {
                continue; // unique, or the first occurrence
            }
            let k = self.counter.entry(name.clone()).or_default();
            let new = loop {
                *k += 1;
                let candidate = format!("{name}-{k}");
                // A candidate whose hash an original name has is taken to exist (a false
                // match needs a 64-bit hash collision).
                if self.all.binary_search(&name_hash(&candidate)).is_err()
                    && !self.made.contains(&candidate)
                {
                    break candidate;
                }
            };
            self.made.insert(new.clone());
            self.renamed += 1;
            if self.example.is_none() {
                self.example = Some((name.clone(), new.clone()));
            }
            *name = new;
        }
        out
    }

    /// Logs how many cells were renamed.
    pub(crate) fn report(&self) {
        if let Some((from, to)) = &self.example {
            tracing::warn!(
                renamed = self.renamed,
                "{} cells repeat the name of an earlier cell (e.g. `{from}`): made unique as anndata's obs_names_make_unique (`{from}` became `{to}`)",
                self.renamed
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The expected names are what anndata 0.12's `obs_names_make_unique` gives on the
    /// concatenated names (run in the venv); the inputs are split where shown.
    #[test]
    fn matches_anndata_obs_names_make_unique_across_inputs() {
        for (inputs, want) in [
            (
                vec![
                    names(&["a", "b", "a", "a-1"]),
                    names(&["c", "a", "b", "a-2", "c"]),
                ],
                names(&["a", "b", "a-3", "a-1", "c", "a-4", "b-1", "a-2", "c-1"]),
            ),
            (
                vec![names(&["x", "x"]), names(&["x-1"]), names(&["x"])],
                names(&["x", "x-2", "x-1", "x-3"]),
            ),
            (
                vec![names(&["u", "v"]), names(&["w"])],
                names(&["u", "v", "w"]),
            ),
        ] {
            let mut b = UniqueObsNames::builder();
            for i in &inputs {
                b.add_input(i);
            }
            let mut u = b.finish();
            let got: Vec<String> = inputs.iter().flat_map(|i| u.next_input(i)).collect();
            assert_eq!(got, want);
            let renamed = want
                .iter()
                .zip(inputs.concat())
                .filter(|(a, b)| *a != b)
                .count();
            assert_eq!(u.renamed, renamed);
        }
    }
}
