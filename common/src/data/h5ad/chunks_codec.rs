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
    out.clear();
    if size <= 1 {
        out.extend_from_slice(src);
        return;
    }
    out.resize(src.len(), 0);
    let n = src.len() / size;
    for (j, plane) in src[..n * size].chunks_exact(n.max(1)).enumerate() {
        for (o, &b) in out.chunks_exact_mut(size).zip(plane) {
            o[j] = b;
        }
    }
    out[n * size..].copy_from_slice(&src[n * size..]);
}

/// Decompresses LZF data (liblzf's format, as written by h5py's `lzf` filter) into `out`;
/// `false` if it is malformed or does not expand to exactly `n` bytes.
pub(super) fn lzf_decompress(src: &[u8], n: usize, out: &mut Vec<u8>) -> bool {
    out.clear();
    out.reserve(n);
    let mut i = 0;
    while i < src.len() {
        let ctrl = usize::from(src[i]);
        i += 1;
        if ctrl < 32 {
            // A literal run of `ctrl + 1` bytes.
            let Some(run) = src.get(i..i + ctrl + 1) else {
                return false;
            };
            if out.len() + run.len() > n {
                return false;
            }
            out.extend_from_slice(run);
            i += ctrl + 1;
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
            if dist > out.len() || out.len() + len > n {
                return false;
            }
            let from = out.len() - dist;
            if dist >= len {
                out.extend_from_within(from..from + len);
            } else {
                for p in from..from + len {
                    out.push(out[p]);
                }
            }
        }
    }
    out.len() == n
}
