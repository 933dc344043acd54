//! The library-size augmentation: binomial thinning of a cell's counts.
//!
//! A view keeps each of the cell's counts independently with probability `p`, as if the
//! library had been sequenced less deeply, and is normalised again. Counts come back from
//! the normalised values exactly: `count = round(expm1(value) * depth)` with the depth that
//! normalisation divided by; a source that kept the counts hands them over instead (the
//! same numbers without the two transcendental calls per gene, which were most of the
//! loader's time).

use scfm_common::rng::Rng;

/// Counts above this are thinned with the normal approximation of the binomial (mean
/// `np`, variance `np(1-p)`); below it, one Bernoulli draw per count.
const EXACT_UP_TO: u32 = 64;

/// A draw of `Binomial(n, p)` from `rng`.
pub fn binomial(n: u32, p: f64, rng: &mut Rng) -> u32 {
    if p >= 1.0 {
        return n;
    }
    if p <= 0.0 || n == 0 {
        return 0;
    }
    if n <= EXACT_UP_TO {
        return (0..n).filter(|_| rng.uniform() < p).count() as u32;
    }
    let nf = f64::from(n);
    let x = nf * p + (nf * p * (1.0 - p)).sqrt() * rng.normal();
    x.round().clamp(0.0, nf) as u32
}

/// The view of a cell (`genes`, log1p-normalised `values`, `depth` = total / target_sum,
/// and its raw `counts` when the source kept them) that keeps each count with probability
/// `p`, normalised again to the same target sum. Genes left without counts are dropped.
/// Returns `None` (use the cell as it is) when the depth is unknown or not positive, or
/// when no count would be left.
pub fn thin(
    genes: &[u32],
    values: &[f32],
    counts: Option<&[u32]>,
    depth: f32,
    p: f64,
    rng: &mut Rng,
) -> Option<(Vec<u32>, Vec<f32>)> {
    let t = thin_counts(genes, values, counts, depth, p, rng)?;
    // The thinned cell's depth: kept / target_sum = depth * kept / total.
    let kept: u64 = t.counts.iter().map(|&k| u64::from(k)).sum();
    let thinned_depth = (f64::from(depth) * kept as f64 / t.total as f64) as f32;
    // Most kept counts are small: each small count's value is computed once.
    let mut table = [f32::NAN; 64];
    let values = t
        .counts
        .iter()
        .map(|&k| match table.get_mut(k as usize) {
            Some(v) if !v.is_nan() => *v,
            Some(v) => {
                *v = (k as f32 / thinned_depth).ln_1p();
                *v
            }
            None => (k as f32 / thinned_depth).ln_1p(),
        })
        .collect();
    Some((t.genes, values))
}

/// The counts a thinned view keeps.
#[derive(Debug, Clone, PartialEq)]
struct Thinned {
    /// Genes with at least one count left.
    genes: Vec<u32>,
    /// Their counts.
    counts: Vec<u32>,
    /// The cell's total count before thinning.
    total: u64,
}

/// [`thin`] before normalising: the kept counts (one draw per gene, in gene order).
fn thin_counts(
    genes: &[u32],
    values: &[f32],
    counts: Option<&[u32]>,
    depth: f32,
    p: f64,
    rng: &mut Rng,
) -> Option<Thinned> {
    if !(depth.is_finite() && depth > 0.0) {
        return None;
    }
    let mut t = Thinned {
        genes: Vec::with_capacity(genes.len()),
        counts: Vec::with_capacity(genes.len()),
        total: 0,
    };
    let mut keep = |g: u32, c: u32| {
        t.total += u64::from(c);
        let k = binomial(c, p, rng);
        if k > 0 {
            t.genes.push(g);
            t.counts.push(k);
        }
    };
    match counts {
        Some(counts) => {
            for (&g, &c) in genes.iter().zip(counts) {
                keep(g, c);
            }
        }
        None => {
            for (&g, &v) in genes.iter().zip(values) {
                keep(g, (v.exp_m1() * depth).round().max(1.0) as u32);
            }
        }
    }
    (!t.counts.is_empty()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts_to_values(counts: &[u32], target_sum: f32) -> (Vec<f32>, f32) {
        let total: u32 = counts.iter().sum();
        let depth = total as f32 / target_sum;
        (
            counts.iter().map(|&c| (c as f32 / depth).ln_1p()).collect(),
            depth,
        )
    }

    #[test]
    fn keeping_everything_gives_the_cell_back() {
        let counts = [1, 2, 5, 300, 1, 7];
        let genes: Vec<u32> = vec![0, 3, 4, 9, 10, 20];
        let (values, depth) = counts_to_values(&counts, 1e4);
        let (g, v) = thin(&genes, &values, None, depth, 1.0, &mut Rng::new(1, &[2])).unwrap();
        assert_eq!(g, genes);
        for (a, b) in v.iter().zip(&values) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn thinned_views_are_normalised_counts_of_a_shallower_cell() {
        let counts: Vec<u32> = (0..500u32)
            .map(|i| 1 + i * 37 % 11 + if i % 50 == 0 { 400 } else { 0 })
            .collect();
        let genes: Vec<u32> = (0..500).collect();
        let (values, depth) = counts_to_values(&counts, 1e4);
        // The counts come back exactly, about 30% of them are kept, and the genes seen
        // once are lost most often.
        let t = thin_counts(&genes, &values, None, depth, 0.3, &mut Rng::new(7, &[1])).unwrap();
        let total: u32 = counts.iter().sum();
        assert_eq!(t.total, u64::from(total));
        let kept: u32 = t.counts.iter().sum();
        let frac = f64::from(kept) / f64::from(total);
        assert!((0.27..0.33).contains(&frac), "kept {frac} of the counts");
        for (g, k) in t.genes.iter().zip(&t.counts) {
            assert!(*k <= counts[*g as usize]);
        }
        assert!(t.genes.len() < genes.len() && t.genes.windows(2).all(|w| w[0] < w[1]));
        // The view: those counts normalised to the same target sum, from the same stream.
        let (g, v) = thin(&genes, &values, None, depth, 0.3, &mut Rng::new(7, &[1])).unwrap();
        assert_eq!(g, t.genes);
        let thinned_depth = kept as f32 / 1e4;
        for (x, k) in v.iter().zip(&t.counts) {
            let want = (*k as f32 / thinned_depth).ln_1p();
            assert!((x - want).abs() < 1e-5, "{x} vs {want}");
        }
        let s: f64 = v.iter().map(|x| f64::from(x.exp_m1())).sum();
        assert!((s - 1e4).abs() < 1.0, "{s}");
    }

    #[test]
    fn unknown_depth_or_nothing_left_leaves_the_cell_alone() {
        let (values, depth) = counts_to_values(&[1, 1], 1e4);
        assert!(
            thin(
                &[0, 1],
                &values,
                None,
                f32::NAN,
                0.5,
                &mut Rng::new(1, &[1])
            )
            .is_none()
        );
        assert!(thin(&[0, 1], &values, None, depth, 0.0, &mut Rng::new(1, &[1])).is_none());
    }

    #[test]
    fn binomial_has_the_right_mean_and_variance() {
        let mut rng = Rng::new(3, &[4]);
        for (n, p) in [(10u32, 0.3), (1000, 0.6)] {
            let xs: Vec<f64> = (0..20_000)
                .map(|_| f64::from(binomial(n, p, &mut rng)))
                .collect();
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
            let (em, ev) = (f64::from(n) * p, f64::from(n) * p * (1.0 - p));
            assert!((m - em).abs() < 0.02 * em, "mean {m} vs {em}");
            assert!((var - ev).abs() < 0.06 * ev, "variance {var} vs {ev}");
            assert!(xs.iter().all(|&x| x >= 0.0 && x <= f64::from(n)));
        }
    }

    /// Counts handed over give the same view, bit for bit, as counts recovered from the
    /// values (the recovery is exact).
    #[test]
    fn kept_counts_give_the_same_views_as_recovered_ones() {
        let counts: Vec<u32> = (0..2000u32)
            .map(|i| 1 + (i * 7919) % 13 + if i % 97 == 0 { 900 + i } else { 0 })
            .collect();
        let genes: Vec<u32> = (0..2000).map(|i| 3 * i + 1).collect();
        let (values, depth) = counts_to_values(&counts, 1e4);
        for (seed, p) in [(1, 0.2), (2, 0.55), (3, 0.93), (4, 1.0)] {
            let a = thin(&genes, &values, None, depth, p, &mut Rng::new(seed, &[5])).unwrap();
            let b = thin(
                &genes,
                &values,
                Some(&counts),
                depth,
                p,
                &mut Rng::new(seed, &[5]),
            )
            .unwrap();
            assert_eq!(a.0, b.0);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.1), bits(&b.1), "p {p}");
        }
    }
}
