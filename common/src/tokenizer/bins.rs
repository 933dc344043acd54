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
/// and only the buckets holding a needed rank are then sorted. A bin is then looked up in
/// two branch-free steps over a 64-entry table of the edges (see [`Table`]).
#[derive(Default)]
pub(super) struct Binner {
    /// The edges; none when `n_bins <= 2` or there are no values (every value in bin 1).
    edges: Vec<f32>,
    /// The edges as a [`Table`] when they are at most 63 and non-decreasing.
    table: Option<Table>,
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
        if n_edges < 64 && self.edges.windows(2).all(|w| w[0] <= w[1]) {
            self.table = Some(Table::new(&self.edges));
        }
    }

    /// Appends the bins of `values` to `out`: `1 +` the edges strictly below each.
    pub(super) fn bin_all(&self, values: &[f32], out: &mut Vec<i64>) {
        match &self.table {
            // Independent branch-free lookups, which overlap.
            Some(t) => out.extend(values.iter().map(|&v| 1 + t.below(v) as i64)),
            None => out.extend(
                values
                    .iter()
                    .map(|&v| 1 + self.edges.partition_point(|&e| e < v) as i64),
            ),
        }
    }
}

/// At most 63 non-decreasing edges padded with `+inf` (never below a value) to 64, in
/// blocks of 8: `#edges < v` is 8 times the number of blocks whose last entry is below `v`
/// (every entry of those blocks is, and no entry after the next block) plus the entries
/// of the next block below `v`. Both counts are 8-wide compares that vectorise.
#[derive(Debug, Clone, Copy)]
struct Table {
    /// Last entry of each block (`blocks[7][7] = +inf`, so at most 7 are below a value).
    tops: [f32; 8],
    blocks: [[f32; 8]; 8],
}

impl Table {
    /// The table of `edges` (at most 63, non-decreasing).
    fn new(edges: &[f32]) -> Self {
        let mut blocks = [[f32::INFINITY; 8]; 8];
        for (i, &e) in edges.iter().enumerate() {
            blocks[i / 8][i % 8] = e;
        }
        Table {
            tops: blocks.map(|b| b[7]),
            blocks,
        }
    }

    /// The number of edges strictly below `v`.
    #[inline]
    fn below(&self, v: f32) -> usize {
        let block = count_below(&self.tops, v);
        8 * block + count_below(&self.blocks[block & 7], v)
    }
}

/// The number of entries of a non-decreasing `x` strictly below `v`: they are a prefix,
/// so the count is the number of trailing ones of the comparison mask.
#[cfg(target_arch = "x86_64")]
#[inline]
fn count_below(x: &[f32; 8], v: f32) -> usize {
    use std::arch::x86_64::{_mm_cmplt_ps, _mm_loadu_ps, _mm_movemask_ps, _mm_set1_ps};
    // SAFETY: SSE2 is part of every x86_64 target; the loads read x[0..4] and x[4..8].
    let mask = unsafe {
        let v = _mm_set1_ps(v);
        let (a, b) = (_mm_loadu_ps(x.as_ptr()), _mm_loadu_ps(x.as_ptr().add(4)));
        _mm_movemask_ps(_mm_cmplt_ps(a, v)) | (_mm_movemask_ps(_mm_cmplt_ps(b, v)) << 4)
    };
    (!(mask as u32)).trailing_zeros() as usize
}

/// The number of entries of `x` strictly below `v`.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn count_below(x: &[f32; 8], v: f32) -> usize {
    x.iter().map(|&e| u32::from(e < v)).sum::<u32>() as usize
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
    /// The bucket of each of `raw`.
    bucket: Vec<u8>,
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
        const H: usize = 4;
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
        // Each key's bucket, once (a vectorisable pass).
        self.bucket.clear();
        self.bucket
            .extend(self.raw.iter().map(|&k| ((k - lo) >> shift) as u8));
        // H histograms (key i counts in histogram i % H), so that runs of equal keys do
        // not serialise on one counter; each then owns a part of every bucket. A bucket's
        // H counters are adjacent (`counts[bucket][h]`): counters of one bucket a power of
        // two apart would falsely alias in the CPU's store forwarding.
        let mut counts = [[0u32; H]; BUCKETS];
        let mut chunks = self.bucket.chunks_exact(H);
        for c in &mut chunks {
            for (h, &b) in c.iter().enumerate() {
                counts[b as usize][h] += 1;
            }
        }
        for &b in chunks.remainder() {
            counts[b as usize][0] += 1;
        }
        // Where each bucket starts: an exclusive prefix sum of the bucket totals (a chain of
        // BUCKETS adds, not BUCKETS * H).
        self.starts.resize(BUCKETS + 1, 0);
        let mut total = 0u32;
        for (start, c) in self.starts[..BUCKETS].iter_mut().zip(&counts) {
            *start = total;
            total += c.iter().sum::<u32>();
        }
        self.starts[BUCKETS] = total;
        // Then where each histogram's part of each bucket starts, in place.
        for (&start, c) in self.starts[..BUCKETS].iter().zip(counts.iter_mut()) {
            let mut at = start;
            for x in c.iter_mut() {
                let n = *x;
                *x = at;
                at += n;
            }
        }
        // Every slot is written below: only grow.
        self.keys.resize(n, 0);
        // Local slices, so that the stores are known not to move the vectors.
        let keys = &mut self.keys[..n];
        let mut chunks = self.raw.chunks_exact(H).zip(self.bucket.chunks_exact(H));
        for (c, bs) in &mut chunks {
            for (h, (&k, &b)) in c.iter().zip(bs).enumerate() {
                let slot = &mut counts[b as usize][h];
                keys[*slot as usize] = k;
                *slot += 1;
            }
        }
        let tail = n - n % H;
        for (&k, &b) in self.raw[tail..].iter().zip(&self.bucket[tail..]) {
            let slot = &mut counts[b as usize][0];
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
