//! Decoding of chunk bytes for [`super`]: HDF5's byte unshuffle, LZF, and the
//! conversion of stored little-endian numbers to `u32` column indices and `f32` values.

use std::mem::MaybeUninit;

use hdf5::types::{FloatSize, IntSize, TypeDescriptor};

use super::super::typed::{R, bad};

/// A stored numeric type (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
}

impl Kind {
    /// The kind of a stored type, or `None` if it is not a plain number.
    pub(super) fn of(desc: &TypeDescriptor) -> Option<Kind> {
        use {FloatSize as F, IntSize as I, TypeDescriptor as T};
        Some(match desc {
            T::Integer(I::U1) => Kind::I8,
            T::Integer(I::U2) => Kind::I16,
            T::Integer(I::U4) => Kind::I32,
            T::Integer(I::U8) => Kind::I64,
            T::Unsigned(I::U1) => Kind::U8,
            T::Unsigned(I::U2) => Kind::U16,
            T::Unsigned(I::U4) => Kind::U32,
            T::Unsigned(I::U8) => Kind::U64,
            T::Float(F::U4) => Kind::F32,
            T::Float(F::U8) => Kind::F64,
            _ => return None,
        })
    }

    /// Bytes per value.
    pub(super) fn size(self) -> usize {
        match self {
            Kind::I8 | Kind::U8 => 1,
            Kind::I16 | Kind::U16 => 2,
            Kind::I32 | Kind::U32 | Kind::F32 => 4,
            Kind::I64 | Kind::U64 | Kind::F64 => 8,
        }
    }

    /// Whether values are integers.
    pub(super) fn is_int(self) -> bool {
        !matches!(self, Kind::F32 | Kind::F64)
    }
}

/// A stored numeric type, read from little-endian bytes.
trait Le: Copy {
    /// The value of the first `size_of::<Self>()` bytes of `b`.
    fn from_le(b: &[u8]) -> Self;
    /// The value as `f32`, rounded as `as` does (the conversion of libhdf5's path).
    fn f32(self) -> f32;
    /// The value as `u64` by `as` (negative integers wrap to values ≥ 2⁶³).
    fn wide(self) -> u64;
    /// The exact value of an integer.
    fn exact(self) -> i128;
}

macro_rules! le {
    ($($t:ty),*) => {$(
        impl Le for $t {
            fn from_le(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..size_of::<$t>()].try_into().expect("enough bytes"))
            }
            fn f32(self) -> f32 { self as f32 }
            fn wide(self) -> u64 { self as u64 }
            fn exact(self) -> i128 { self as i128 }
        }
    )*};
}
le!(i8, i16, i32, i64, u8, u16, u32, u64, f32, f64);

/// Calls `$f::<T>($args)` with the Rust type `T` of `$kind`.
macro_rules! with_kind {
    ($kind:expr, $f:ident($($args:expr),*)) => {
        match $kind {
            Kind::I8 => $f::<i8>($($args),*),
            Kind::I16 => $f::<i16>($($args),*),
            Kind::I32 => $f::<i32>($($args),*),
            Kind::I64 => $f::<i64>($($args),*),
            Kind::U8 => $f::<u8>($($args),*),
            Kind::U16 => $f::<u16>($($args),*),
            Kind::U32 => $f::<u32>($($args),*),
            Kind::U64 => $f::<u64>($($args),*),
            Kind::F32 => $f::<f32>($($args),*),
            Kind::F64 => $f::<f64>($($args),*),
        }
    };
}

/// Values as `f32`.
pub(super) fn to_f32(kind: Kind, bytes: &[u8], out: &mut [MaybeUninit<f32>]) {
    fn go<T: Le>(bytes: &[u8], out: &mut [MaybeUninit<f32>]) {
        // Every element of `out` is written (the caller relies on it).
        assert_eq!(bytes.len(), out.len() * size_of::<T>());
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(size_of::<T>())) {
            o.write(T::from_le(b).f32());
        }
    }
    with_kind!(kind, go(bytes, out))
}

/// Column indices (of an integer `kind`) of dataset `name` as `u32`; fails on a value out of
/// `u32`'s range (as libhdf5's path does) or not below `cols` (as
/// [`super::super::rows::H5adRows::read`] checks).
pub(super) fn to_u32(
    name: &str,
    kind: Kind,
    cols: u64,
    bytes: &[u8],
    out: &mut [MaybeUninit<u32>],
) -> R<()> {
    fn go<T: Le>(name: &str, cols: u64, bytes: &[u8], out: &mut [MaybeUninit<u32>]) -> R<()> {
        // Every element of `out` is written (the caller relies on it when this succeeds).
        assert_eq!(bytes.len(), out.len() * size_of::<T>());
        // Converted and checked in one pass, which vectorizes.
        let lim = cols.min(1 << 32);
        let mut ok = true;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(size_of::<T>())) {
            let v = T::from_le(b).wide();
            ok &= v < lim;
            o.write(v as u32);
        }
        if ok {
            return Ok(());
        }
        let chunks = bytes.chunks_exact(size_of::<T>());
        let v = chunks.map(|b| T::from_le(b)).find(|v| v.wide() >= lim);
        let v = v.map_or(0, T::exact);
        if (0..=i128::from(u32::MAX)).contains(&v) {
            bad(format!(
                "{name} has column index {v}, but the matrix has {cols} columns"
            ))
        } else {
            bad(format!("{name} has value {v} out of range"))
        }
    }
    if !kind.is_int() {
        return bad(format!("{name} holds floats, expected integers"));
    }
    with_kind!(kind, go(name, cols, bytes, out))
}

/// Undoes HDF5's byte shuffle into `out`: byte `j` of element `i` is stored at `j * n + i`,
/// and bytes past the last whole element are stored as they are.
pub(super) fn unshuffle(src: &[u8], size: usize, out: &mut Vec<u8>) {
    if size <= 1 {
        out.clear();
        out.extend_from_slice(src);
        return;
    }
    // Every byte is overwritten below, so a reused buffer is not cleared first.
    out.truncate(src.len());
    out.resize(src.len(), 0);
    let n = src.len() / size;
    match size {
        // The common widths get a transposition the compiler unrolls and vectorizes.
        4 => unshuffle_n::<4>(&src[..n * 4], &mut out[..n * 4]),
        8 => unshuffle_n::<8>(&src[..n * 8], &mut out[..n * 8]),
        2 => unshuffle_n::<2>(&src[..n * 2], &mut out[..n * 2]),
        _ => {
            for (j, plane) in src[..n * size].chunks_exact(n.max(1)).enumerate() {
                for (o, &b) in out.chunks_exact_mut(size).zip(plane) {
                    o[j] = b;
                }
            }
        }
    }
    out[n * size..].copy_from_slice(&src[n * size..]);
}

/// [`unshuffle`] of whole elements of `S` bytes (`src.len() == out.len()`, a multiple of `S`).
fn unshuffle_n<const S: usize>(src: &[u8], out: &mut [u8]) {
    let n = src.len() / S;
    let planes: [&[u8]; S] = std::array::from_fn(|j| &src[j * n..(j + 1) * n]);
    for (i, o) in out.chunks_exact_mut(S).enumerate() {
        let v: [u8; S] = std::array::from_fn(|j| planes[j][i]);
        o.copy_from_slice(&v);
    }
}

/// Decompresses LZF data (liblzf's format, as written by h5py's `lzf` filter) into `out`;
/// `false` if it is malformed or does not expand to exactly `n` bytes.
///
/// Literal runs (≤ 32 bytes) and back references are copied as fixed 32- or 16-byte
/// blocks when the buffers have room (bytes written past the token are overwritten by the
/// next ones), runs of one repeated byte (distance 1: the zero planes of shuffled data)
/// as fills; only short overlapping references are copied byte by byte.
pub fn lzf_decompress(src: &[u8], n: usize, out: &mut Vec<u8>) -> bool {
    // Every byte is overwritten when the stream is valid, so a reused buffer is not
    // cleared first (only grown).
    out.truncate(n);
    out.resize(n, 0);
    let dst = &mut out[..];
    let (mut i, mut o) = (0, 0);
    while i < src.len() {
        let ctrl = usize::from(src[i]);
        i += 1;
        if ctrl < 32 {
            // A literal run of `ctrl + 1` bytes.
            let len = ctrl + 1;
            if i + len > src.len() || o + len > n {
                return false;
            }
            if i + 32 <= src.len() && o + 32 <= n {
                let block: &[u8; 32] = src[i..i + 32].try_into().expect("32 bytes");
                dst[o..o + 32].copy_from_slice(block);
            } else {
                dst[o..o + len].copy_from_slice(&src[i..i + len]);
            }
            i += len;
            o += len;
        } else {
            // A back reference: length `ctrl >> 5` (+ an extra byte when 7), then + 2.
            let mut len = ctrl >> 5;
            if len == 7 {
                let Some(&extra) = src.get(i) else {
                    return false;
                };
                len += usize::from(extra);
                i += 1;
            }
            len += 2;
            let Some(&low) = src.get(i) else {
                return false;
            };
            let dist = ((ctrl & 0x1f) << 8) + usize::from(low) + 1;
            i += 1;
            if dist > o || o + len > n {
                return false;
            }
            let from = o - dist;
            if dist >= 16 && o + len.next_multiple_of(16) <= n {
                // Each 16-byte block reads bytes written before it (dist ≥ 16).
                for k in (0..len).step_by(16) {
                    let block: [u8; 16] = dst[from + k..from + k + 16].try_into().expect("16");
                    dst[o + k..o + k + 16].copy_from_slice(&block);
                }
            } else if dist >= len {
                dst.copy_within(from..from + len, o);
            } else if dist == 1 {
                let b = dst[from];
                dst[o..o + len].fill(b);
            } else {
                // Overlapping: a repeated pattern.
                for k in 0..len {
                    dst[o + k] = dst[from + k];
                }
            }
            o += len;
        }
    }
    o == n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The LZF format decoded byte by byte: the reference for [`lzf_decompress`].
    fn lzf_reference(src: &[u8], n: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < src.len() {
            let ctrl = usize::from(src[i]);
            i += 1;
            if ctrl < 32 {
                out.extend_from_slice(src.get(i..i + ctrl + 1)?);
                i += ctrl + 1;
            } else {
                let mut len = ctrl >> 5;
                if len == 7 {
                    len += usize::from(*src.get(i)?);
                    i += 1;
                }
                let dist = ((ctrl & 0x1f) << 8) + usize::from(*src.get(i)?) + 1;
                i += 1;
                let from = out.len().checked_sub(dist)?;
                for p in from..from + len + 2 {
                    out.push(out[p]);
                }
            }
        }
        (out.len() == n).then_some(out)
    }

    /// A valid LZF stream of random tokens (literals of 1–32 bytes, references of every
    /// length class at short, overlapping and long distances) and its length.
    fn random_stream(rng: &mut Rng, tokens: usize) -> (Vec<u8>, usize) {
        let (mut s, mut n) = (Vec::new(), 0usize);
        for _ in 0..tokens {
            if n == 0 || rng.below(3) == 0 {
                let len = 1 + (rng.next_u64() % 32) as usize;
                s.push((len - 1) as u8);
                s.extend((0..len).map(|_| rng.next_u64() as u8));
                n += len;
            } else {
                let len = 3 + (rng.next_u64() % 270) as usize; // 3..=264 (+ some too long)
                let len = len.min(264);
                let max_dist = n.min(8192);
                let dist = match rng.next_u64() % 4 {
                    0 => 1,
                    1 => 1 + (rng.next_u64() as usize % max_dist.min(15)),
                    _ => 1 + (rng.next_u64() as usize % max_dist),
                };
                let (d, l) = (dist - 1, len - 2);
                if l < 7 {
                    s.push(((l << 5) | (d >> 8)) as u8);
                } else {
                    s.push(((7 << 5) | (d >> 8)) as u8);
                    s.push((l - 7) as u8);
                }
                s.push(d as u8);
                n += len;
            }
        }
        (s, n)
    }

    #[test]
    fn lzf_matches_the_bytewise_reference() {
        let mut rng = Rng::new(7, &[]);
        let mut out = Vec::new();
        for case in 0..400 {
            let (s, n) = random_stream(&mut rng, 1 + case % 97);
            let want = lzf_reference(&s, n).expect("valid stream");
            assert!(lzf_decompress(&s, n, &mut out), "case {case}");
            assert_eq!(out, want, "case {case}");
            // Wrong expected sizes and truncated streams are refused.
            assert!(!lzf_decompress(&s, n + 1, &mut out), "case {case}");
            if n > 1 {
                assert!(!lzf_decompress(&s, n - 1, &mut out), "case {case}");
            }
            let cut = &s[..s.len() - 1];
            assert_eq!(
                lzf_decompress(cut, n, &mut out),
                lzf_reference(cut, n).is_some(),
                "case {case}"
            );
        }
        // A reference before the start of the output is malformed.
        assert!(!lzf_decompress(&[0, 7, 0x20, 5], 4, &mut out));
    }

    #[test]
    fn unshuffle_inverts_the_byte_shuffle() {
        let mut rng = Rng::new(3, &[]);
        let mut out = Vec::new();
        for size in [1, 2, 3, 4, 8] {
            for len in [0, 1, 5, 64, 1001] {
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                let n = len / size;
                let mut shuffled = vec![0; len];
                for i in 0..n {
                    for j in 0..size {
                        shuffled[j * n + i] = data[i * size + j];
                    }
                }
                shuffled[n * size..].copy_from_slice(&data[n * size..]);
                unshuffle(&shuffled, size, &mut out);
                assert_eq!(out, data, "size {size}, {len} bytes");
            }
        }
    }
}
