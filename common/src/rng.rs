//! Deterministic, platform-independent random numbers.
//!
//! scfm derives every random stream (data order, sub-sampling, masking, augmentations)
//! from the run seed and a few integers (epoch, step, cell index), so that a resumed run
//! draws exactly the numbers an uninterrupted run would have drawn, whatever the number
//! of workers. The generator is xoshiro256** seeded through SplitMix64.

/// SplitMix64 step: a good 64-bit mixer, used for seeding and stream derivation.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a seed with a list of stream identifiers into one 64-bit seed.
pub fn derive_seed(seed: u64, stream: &[u64]) -> u64 {
    let mut s = seed ^ 0x5CF3_0000_0000_0001;
    let mut out = splitmix64(&mut s);
    for &x in stream {
        s ^= x.wrapping_mul(0xD605_BBB5_8C8A_BBB5) ^ out;
        out = splitmix64(&mut s);
    }
    out
}

/// xoshiro256** generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed` and the stream identified by `stream`.
    pub fn new(seed: u64, stream: &[u64]) -> Self {
        let mut sm = derive_seed(seed, stream);
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[0, n)`, unbiased (Lemire's method). `n` must be > 0.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let lo = m as u64;
            // The rejection threshold `2^64 mod n` is below `n`: the division that computes
            // it is only needed when `lo` is too (same decisions, hence the same draws).
            if lo >= n || lo >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// `k` distinct indices from `0..n`, in increasing order.
    ///
    /// The first `k` steps of a Fisher–Yates shuffle of `0..n` (step `i` swaps position `i`
    /// with `i + below(n - i)`), whose first `k` entries are returned sorted: `min(k, n)`
    /// draws of [`Rng::below`].
    pub fn sample_sorted(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut bits = Vec::new();
        self.sample_sorted_bits(n, k, &mut Vec::new(), &mut bits);
        let mut out = Vec::with_capacity(k.min(n));
        for_each_set_bit(&bits, |i| out.push(i));
        out
    }

    /// The subset [`Rng::sample_sorted`] draws (with the same draws) as a bit set: bit
    /// `i % 64` of word `i / 64` of `bits` (resized to `n.div_ceil(64)` words) is set iff
    /// `i` is drawn. `perm` is scratch space; `n` must fit in a `u32`.
    pub fn sample_sorted_bits(
        &mut self,
        n: usize,
        k: usize,
        perm: &mut Vec<u32>,
        bits: &mut Vec<u64>,
    ) {
        let k = k.min(n);
        bits.clear();
        bits.resize(n.div_ceil(64), 0);
        if k == 0 {
            return;
        }
        let n32 = u32::try_from(n).expect("sample_sorted_bits: n must fit in a u32");
        perm.clear();
        perm.extend(0..n32);
        // A local copy of the state stays in registers (see the tokenizer's dropout).
        let mut r = self.clone();
        for i in 0..k {
            let j = i + r.below((n - i) as u64) as usize;
            perm.swap(i, j);
        }
        *self = r;
        for &x in &perm[..k] {
            bits[x as usize / 64] |= 1 << (x % 64);
        }
    }
}

/// Calls `f` with the index of every set bit of `bits` (bit `i % 64` of word `i / 64`),
/// in increasing order.
#[inline]
pub fn for_each_set_bit(bits: &[u64], mut f: impl FnMut(usize)) {
    for (w, &word) in bits.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            f(w * 64 + x.trailing_zeros() as usize);
            x &= x - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, &[1, 2]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::new(7, &[1, 2]).next_u64(),
            Rng::new(7, &[2, 1]).next_u64()
        );
        assert_ne!(Rng::new(7, &[1]).next_u64(), Rng::new(8, &[1]).next_u64());
    }

    #[test]
    fn below_and_uniform_ranges() {
        let mut r = Rng::new(1, &[]);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[r.below(5) as usize] += 1;
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(3, &[]);
        let xs: Vec<f64> = (0..100_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    #[test]
    fn sample_sorted_is_distinct_subset() {
        let mut r = Rng::new(5, &[]);
        let s = r.sample_sorted(100, 30);
        assert_eq!(s.len(), 30);
        assert!(s.windows(2).all(|w| w[0] < w[1]) && *s.last().unwrap() < 100);
        assert_eq!(r.sample_sorted(3, 10), vec![0, 1, 2]);
    }

    /// `sample_sorted` as it was first written: the reference for the draws.
    fn reference_sample_sorted(r: &mut Rng, n: usize, k: usize) -> Vec<usize> {
        let k = k.min(n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + r.below((n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx.sort_unstable();
        idx
    }

    /// `below` as it was first written (the threshold computed on every draw).
    fn reference_below(r: &mut Rng, n: u64) -> u64 {
        loop {
            let m = (r.next_u64() as u128) * (n as u128);
            if m as u64 >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    #[test]
    fn below_and_sample_sorted_draw_as_the_reference() {
        let mut sizes = vec![1u64, 2, 3, 5, 7, 64, 511, 1800, 1 << 20];
        // Bounds that reject often (just over 2^63) and powers of two.
        sizes.extend([(1 << 63) + 1, (1 << 63) + (1 << 62), 1 << 40, u64::MAX]);
        for (s, &n) in sizes.iter().enumerate() {
            let (mut a, mut b) = (Rng::new(20, &[s as u64]), Rng::new(20, &[s as u64]));
            for _ in 0..2000 {
                assert_eq!(a.below(n), reference_below(&mut b, n), "n {n}");
            }
            assert_eq!(a, b);
        }
        let mut p = Rng::new(21, &[]);
        let (mut perm, mut bits) = (Vec::new(), Vec::new());
        for case in 0..3000u64 {
            let n = match case % 4 {
                0 => p.below(10) as usize,
                1 => p.below(200) as usize,
                2 => 1800 + p.below(400) as usize,
                _ => 64 * (1 + p.below(4) as usize),
            };
            let k = match case % 3 {
                0 => p.below(n as u64 + 3) as usize,
                1 => n.saturating_sub(p.below(3) as usize),
                _ => 511.min(n + 1),
            };
            let (mut a, mut b) = (Rng::new(22, &[case]), Rng::new(22, &[case]));
            let want = reference_sample_sorted(&mut b, n, k);
            a.sample_sorted_bits(n, k, &mut perm, &mut bits);
            let mut got = Vec::new();
            for_each_set_bit(&bits, |i| got.push(i));
            assert_eq!(got, want, "n {n} k {k}");
            assert_eq!(bits.len(), n.div_ceil(64));
            assert_eq!(a, b, "same draws: n {n} k {k}");
            let (mut a, mut b) = (Rng::new(23, &[case]), Rng::new(23, &[case]));
            assert_eq!(a.sample_sorted(n, k), reference_sample_sorted(&mut b, n, k));
            assert_eq!(a, b);
        }
    }
}
