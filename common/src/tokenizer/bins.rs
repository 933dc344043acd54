//! Per-cell quantile expression bins: the edges from a partial order of the values, and a
//! branch-free lookup.

/// Per-cell quantile bins of expressed values, scGPT-style.
///
/// Bin edges are the quantiles of the cell's values at `n_bins - 1` evenly spaced
/// probabilities in [0, 1] (linear interpolation, as `numpy.quantile`); a value's bin is
/// `1 +` the number of edges strictly below it (`1 + np.digitize(v, edges, right=True)`),
/// so expressed values fall in `1..=n_bins-1` (the last edge is the maximum, so at most
/// `n_bins - 2` edges lie below any value) and bin 0 stays "not expressed". Tied values
/// share the lowest bin they span: the deterministic lower end of scGPT's random
/// tie-breaking, so the many count-1 genes of a sparse cell all sit in bin 1.
///
/// The values are ordered as by [`f32::total_cmp`].
pub fn quantile_bins(values: &[f32], n_bins: usize) -> Vec<i64> {
    let mut binner = Binner::default();
    binner.fit(values, n_bins);
    let mut bins = Vec::with_capacity(values.len());
    binner.bin_all(values, &mut bins);
    bins
}

/// Computes the bin edges of a cell (see [`quantile_bins`]) and looks bins up, keeping
/// its buffers from cell to cell.
///
/// The values are ordered as integer keys that order like [`f32::total_cmp`] (equal keys
/// are equal bit patterns), so the order statistics, hence the edges, are exactly those of
/// a stable `sort_by(f32::total_cmp)`. Only the order statistics the edges need are
/// computed: one counting-sort pass groups the keys into [`BUCKETS`] buckets of their range,
/// and only the buckets holding a needed rank are then sorted. A bin is then looked up by
/// bucket where the bucket spans a single bin (or holds a single value), and otherwise by a
/// branch-free binary search over the edges.
#[derive(Default)]
pub(super) struct Binner {
    /// The edges; none when `n_bins <= 2` or there are no values (every value in bin 1).
    edges: Vec<f32>,
    /// `edges` padded with `+inf` (never below a value) when they are at most 63 and
    /// non-decreasing: then `#edges < v` is a branch-free 6-step lower bound.
    table: Option<[f32; 64]>,
    /// With `table`: the bin of every value in each bucket of `ranks`, where it is one
    /// bin (0 where it is not, or the bucket is empty).
    bucket_bin: Vec<u8>,
    ranks: RankSelect,
}

impl Binner {
    /// Computes the edges of `values`.
    pub(super) fn fit(&mut self, values: &[f32], n_bins: usize) {
        self.edges.clear();
        self.table = None;
        if values.is_empty() || n_bins <= 2 {
            return;
        }
        self.ranks.load(values);
        let n_edges = n_bins - 1;
        let last = (values.len() - 1) as f64;
        // Lower and upper ranks each increase with i: one bucket cursor for each.
        let mut cursors = [0usize; 2];
        for i in 0..n_edges {
            // Edge i interpolates between the values of ranks floor(pos) and ceil(pos).
            let pos = last * i as f64 / (n_edges - 1) as f64;
            // floor and ceil of pos >= 0 (without libm calls).
            let lo = pos as usize;
            let hi = lo + usize::from((lo as f64) < pos);
            let frac = (pos - lo as f64) as f32;
            let a = self.ranks.at(lo, &mut cursors[0]);
            let b = self.ranks.at(hi, &mut cursors[1]);
            self.edges.push(a + (b - a) * frac);
        }
        // Interpolated edges are non-decreasing except in float corner cases (rounding
        // between values of opposite signs, infinities, NaN): those keep the binary search
        // of the reference definition.
        self.bucket_bin.clear();
        if n_edges < 64 && self.edges.windows(2).all(|w| w[0] <= w[1]) {
            let mut t = [f32::INFINITY; 64];
            t[..n_edges].copy_from_slice(&self.edges);
            self.table = Some(t);
            self.fill_bucket_bins(&t);
        }
    }

    /// Sets `bucket_bin` from the sorted table `t`: a bucket has one bin when its lowest
    /// and highest possible keys have (the bin is monotone in the key), or when it holds a
    /// single distinct value.
    fn fill_bucket_bins(&mut self, t: &[f32; 64]) {
        let r = &self.ranks;
        if r.starts.len() != BUCKETS + 1 {
            return;
        }
        self.bucket_bin.resize(BUCKETS, 0);
        // Entries of t below a key, for increasing keys: a pointer walk.
        let below = |ptr: &mut usize, k: u32| {
            let x = from_order_key(k);
            while *ptr < 63 && t[*ptr] < x {
                *ptr += 1;
            }
            *ptr
        };
        let (mut p_lo, mut p_hi) = (0usize, 0usize);
        for b in 0..BUCKETS {
            let (s, e) = (r.starts[b] as usize, r.starts[b + 1] as usize);
            if s == e {
                self.bucket_bin[b] = 0;
                continue;
            }
            // Keys of bucket b: first..=last (non-empty, so b << shift <= hi - lo).
            let first = r.lo + ((b as u32) << r.shift);
            let last = first.saturating_add((1u32 << r.shift) - 1).min(r.hi);
            let (c_lo, c_hi) = (below(&mut p_lo, first), below(&mut p_hi, last));
            self.bucket_bin[b] = if c_lo == c_hi {
                1 + c_lo as u8
            } else if r.sorted[b] && r.keys[s] == r.keys[e - 1] {
                1 + table_below(t, from_order_key(r.keys[s])) as u8
            } else {
                0
            };
        }
    }

    /// Appends the bins of `values` to `out`: `1 +` the edges strictly below each.
    pub(super) fn bin_all(&self, values: &[f32], out: &mut Vec<i64>) {
        match &self.table {
            Some(t) if !self.bucket_bin.is_empty() => {
                let (r, bb) = (&self.ranks, &self.bucket_bin[..]);
                out.extend(values.iter().map(|&v| {
                    let d = order_key(v).wrapping_sub(r.lo);
                    let known = if d <= r.hi - r.lo {
                        bb[(d >> r.shift) as usize & (BUCKETS - 1)]
                    } else {
                        0
                    };
                    if known != 0 {
                        i64::from(known)
                    } else {
                        1 + table_below(t, v) as i64
                    }
                }))
            }
            // A tight loop of independent branch-free lookups, which overlap.
            Some(t) => out.extend(values.iter().map(|&v| 1 + table_below(t, v) as i64)),
            None => out.extend(
                values
                    .iter()
                    .map(|&v| 1 + self.edges.partition_point(|&e| e < v) as i64),
            ),
        }
    }
}

/// The number of entries of a non-decreasing table strictly below `v`.
#[inline]
fn table_below(t: &[f32; 64], v: f32) -> usize {
    // After each step, `i` entries are known to be below `v`.
    let mut i = 0usize;
    for step in [32, 16, 8, 4, 2, 1] {
        i += step * usize::from(t[(i + step - 1) & 63] < v);
    }
    i
}

/// Buckets of [`RankSelect`] (a power of two).
const BUCKETS: usize = 256;

/// Order statistics of a list of values, computed on demand.
#[derive(Default)]
pub(super) struct RankSelect {
    /// The values' keys ([`order_key`]), grouped by bucket in increasing bucket order
    /// (the first `starts[BUCKETS]`).
    keys: Vec<u32>,
    /// The keys in the values' order.
    raw: Vec<u32>,
    /// Where each bucket starts in `keys` (`starts[BUCKETS]` = the number of values).
    starts: Vec<u32>,
    /// Whether each bucket is sorted yet.
    sorted: Vec<bool>,
    /// The smallest and largest keys; bucket of key k: `(k - lo) >> shift`.
    lo: u32,
    hi: u32,
    shift: u32,
}

impl RankSelect {
    /// Groups the keys of `values` by bucket: the top 8 bits of `key - min` within the
    /// keys' range, so bucket order is key order.
    pub(super) fn load(&mut self, values: &[f32]) {
        // Histograms per bucket (see below).
        const H: usize = 2;
        let n = values.len();
        self.starts.clear();
        self.sorted.clear();
        // The keys, then their range (vectorisable passes: signed compares, which SSE2
        // has, on the keys with the top bit flipped).
        self.raw.clear();
        self.raw.extend(values.iter().map(|&v| order_key(v)));
        let (mut lo, mut hi) = (i32::MAX, i32::MIN);
        for &k in &self.raw {
            let x = (k ^ 0x8000_0000) as i32;
            lo = lo.min(x);
            hi = hi.max(x);
        }
        let (lo, hi) = ((lo as u32) ^ 0x8000_0000, (hi as u32) ^ 0x8000_0000);
        if lo == hi || n > u32::MAX as usize {
            // All equal (or too many to count in u32): one bucket.
            std::mem::swap(&mut self.keys, &mut self.raw);
            self.starts.extend([0, n as u32]);
            self.sorted.push(lo == hi);
            (self.lo, self.hi, self.shift) = (lo, hi, 0);
            return;
        }
        let shift = (32 - (hi - lo).leading_zeros()).saturating_sub(BUCKETS.trailing_zeros());
        (self.lo, self.hi, self.shift) = (lo, hi, shift);
        let bucket = |k: u32| ((k - lo) >> shift) as usize & (BUCKETS - 1);
        // H histograms (key i counts in histogram i % H), so that runs of equal keys do
        // not serialise on one counter; each then owns a part of every bucket. A bucket's
        // H counters are adjacent (`counts[bucket][h]`): counters of one bucket a power of
        // two apart would falsely alias in the CPU's store forwarding.
        let mut counts = [[0u32; H]; BUCKETS];
        let mut chunks = self.raw.chunks_exact(H);
        for c in &mut chunks {
            for (h, &k) in c.iter().enumerate() {
                counts[bucket(k)][h] += 1;
            }
        }
        for &k in chunks.remainder() {
            counts[bucket(k)][0] += 1;
        }
        // Exclusive prefix sums in place: where each histogram's part of each bucket starts.
        self.starts.resize(BUCKETS + 1, 0);
        let mut total = 0u32;
        for (start, c) in self.starts[..BUCKETS].iter_mut().zip(counts.iter_mut()) {
            *start = total;
            for x in c.iter_mut() {
                let n = *x;
                *x = total;
                total += n;
            }
        }
        self.starts[BUCKETS] = total;
        // Every slot is written below: only grow.
        self.keys.resize(n, 0);
        // Local slices, so that the stores are known not to move the vectors.
        let keys = &mut self.keys[..n];
        let mut chunks = self.raw.chunks_exact(H);
        for c in &mut chunks {
            for (h, &k) in c.iter().enumerate() {
                let slot = &mut counts[bucket(k)][h];
                keys[*slot as usize] = k;
                *slot += 1;
            }
        }
        for &k in chunks.remainder() {
            let slot = &mut counts[bucket(k)][0];
            keys[*slot as usize] = k;
            *slot += 1;
        }
        self.sorted.resize(BUCKETS, false);
    }

    /// The value of rank `r` (0-based) in `total_cmp` order. `cursor` is a bucket at or
    /// before the one of rank `r` (start at 0 and pass the same one for increasing ranks).
    pub(super) fn at(&mut self, r: usize, cursor: &mut usize) -> f32 {
        let mut b = *cursor;
        while self.starts[b + 1] as usize <= r {
            b += 1;
        }
        *cursor = b;
        if !self.sorted[b] {
            let bucket = &mut self.keys[self.starts[b] as usize..self.starts[b + 1] as usize];
            // Buckets of one repeated value (counts) are common: a vectorised check.
            let first = bucket[0];
            if !bucket.iter().fold(true, |same, &k| same & (k == first)) {
                bucket.sort_unstable();
            }
            self.sorted[b] = true;
        }
        from_order_key(self.keys[r])
    }
}

/// A key whose unsigned order is the order of [`f32::total_cmp`].
#[inline]
pub(super) fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ ((((b as i32) >> 31) as u32 >> 1) | 0x8000_0000)
}

/// The inverse of [`order_key`].
#[inline]
pub(super) fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k ^ 0x8000_0000
    } else {
        !k
    })
}
