//! Typed reading of HDF5 datasets, attributes and compound-dataset fields, in the
//! type they are stored in (converting through HDF5 was measured ~3× slower).

use std::cell::RefCell;

use hdf5::types::{
    CompoundField, CompoundType, FixedAscii, FixedUnicode, FloatSize, IntSize, TypeDescriptor,
    VarLenAscii, VarLenUnicode,
};
use hdf5::{Attribute, Container, Dataset, H5Type, Location};

/// Large datasets are read and converted this many elements at a time, which bounds the
/// extra memory of a conversion (e.g. `f64` → `f32`) to one block. Small in tests so that
/// they cover block boundaries.
pub(crate) const BLOCK: usize = if cfg!(test) { 1000 } else { 1 << 22 };

/// Errors of this module, turned into [`crate::Error`] (with the file path) by the caller.
#[derive(Debug)]
pub(crate) enum E {
    /// The HDF5 library failed while reading the element `elem`.
    H5 { elem: String, err: hdf5::Error },
    /// The file's content is not what the format requires; the message names the element.
    Bad(String),
}

/// Result of this module.
pub(crate) type R<T> = Result<T, E>;

/// Shorthand for [`E::Bad`].
pub(crate) fn bad<T>(msg: impl Into<String>) -> R<T> {
    Err(E::Bad(msg.into()))
}

/// Attaches the element name to an HDF5 error.
pub(crate) trait At<T> {
    /// Converts an HDF5 result, naming `elem` in the error.
    fn at(self, elem: &str) -> R<T>;
}

impl<T> At<T> for hdf5::Result<T> {
    fn at(self, elem: &str) -> R<T> {
        self.map_err(|err| E::H5 {
            elem: elem.to_owned(),
            err,
        })
    }
}

/// The name of an HDF5 object as shown in messages (`X/data`, without the leading `/`).
pub(crate) fn display_name(loc: &Location) -> String {
    loc.name().trim_start_matches('/').to_owned()
}

/// A string attribute of `loc` (variable- or fixed-length; a one-element array is accepted),
/// or `None` if there is no such attribute.
pub(crate) fn str_attr(loc: &Location, name: &str) -> R<Option<String>> {
    let Some(attr) = opt_attr(loc, name)? else {
        return Ok(None);
    };
    let src = Src::attr(&attr, loc, name);
    match src.strings()?.as_slice() {
        [s] => Ok(Some(s.clone())),
        other => bad(format!(
            "{} has {} values, expected one string",
            src.name,
            other.len()
        )),
    }
}

/// An attribute of `loc`, or `None` if there is no such attribute.
pub(crate) fn opt_attr(loc: &Location, name: &str) -> R<Option<Attribute>> {
    let elem = format!("attributes of `{}`", display_name(loc));
    if !loc.attr_names().at(&elem)?.iter().any(|n| n == name) {
        return Ok(None);
    }
    loc.attr(name).at(&elem).map(Some)
}

thread_local! {
    /// Name of the compound field that [`Field::type_descriptor`] describes. `H5Type`'s
    /// descriptor is a static function, so the field name chosen at run time travels here;
    /// it is set right before each read on the same thread.
    static FIELD: RefCell<String> = const { RefCell::new(String::new()) };
}

/// One field of a compound record: a memory type with just that field, so that HDF5
/// reads only that member of each record.
#[repr(transparent)]
struct Field<T>(T);

// SAFETY: `Field<T>` is `repr(transparent)` over `T`; the descriptor is a compound with a
// single member of `T`'s type at offset 0 and the size of `T`.
unsafe impl<T: H5Type> H5Type for Field<T> {
    fn type_descriptor() -> TypeDescriptor {
        let name = FIELD.with(|f| f.borrow().clone());
        TypeDescriptor::Compound(CompoundType {
            fields: vec![CompoundField::new(&name, T::type_descriptor(), 0, 0)],
            size: std::mem::size_of::<T>(),
        })
    }
}

/// Something to read values from: a dataset, an attribute, or one field of a compound dataset.
pub(crate) struct Src<'a> {
    c: &'a Container,
    field: Option<&'a str>,
    /// Whether block-wise reading is possible (plain 1-D datasets).
    blocks: bool,
    /// Only the elements `a..b` of a 1-D dataset (see [`Src::slice`]).
    range: Option<(usize, usize)>,
    /// Name for messages.
    pub name: String,
}

impl<'a> Src<'a> {
    /// A whole dataset.
    pub fn dataset(ds: &'a Dataset) -> Self {
        let blocks = ds.ndim() == 1;
        Src {
            c: ds,
            field: None,
            blocks,
            range: None,
            name: format!("`{}`", display_name(ds)),
        }
    }

    /// Field `field` of a compound dataset.
    pub fn field(ds: &'a Dataset, field: &'a str) -> Self {
        let name = format!("field `{field}` of `{}`", display_name(ds));
        Src {
            c: ds,
            field: Some(field),
            blocks: false,
            range: None,
            name,
        }
    }

    /// Attribute `name` of `loc`.
    pub fn attr(attr: &'a Attribute, loc: &Location, name: &str) -> Self {
        let name = format!("attribute `{name}` of `{}`", display_name(loc));
        Src {
            c: attr,
            field: None,
            blocks: false,
            range: None,
            name,
        }
    }

    /// Elements `a..b` only (a 1-D dataset; `a <= b <= len`).
    pub fn slice(mut self, a: usize, b: usize) -> R<Self> {
        let n = self.c.size();
        if !self.blocks || a > b || b > n {
            return bad(format!(
                "cannot read elements {a}..{b} of {} ({n} values)",
                self.name
            ));
        }
        self.range = Some((a, b));
        Ok(self)
    }

    /// Number of values (of the slice, for a slice).
    pub fn len(&self) -> usize {
        match self.range {
            Some((a, b)) => b - a,
            None => self.c.size(),
        }
    }

    /// The stored type of the values (of the field, for a field).
    pub fn descriptor(&self) -> R<TypeDescriptor> {
        let desc = self
            .c
            .dtype()
            .and_then(|t| t.to_descriptor())
            .at(&self.name)?;
        let Some(field) = self.field else {
            return Ok(desc);
        };
        match desc {
            TypeDescriptor::Compound(ct) => match ct.fields.into_iter().find(|f| f.name == field) {
                Some(f) => Ok(f.ty),
                None => bad(format!("no {}", self.name)),
            },
            other => bad(format!(
                "{} is {other}, expected compound records",
                self.name
            )),
        }
    }

    /// Names of the fields of a compound dataset in stored order, or `None` if it is not compound.
    pub fn field_names(&self) -> R<Option<Vec<String>>> {
        match self
            .c
            .dtype()
            .and_then(|t| t.to_descriptor())
            .at(&self.name)?
        {
            TypeDescriptor::Compound(ct) => {
                let mut fields = ct.fields;
                fields.sort_by_key(|f| f.index);
                Ok(Some(fields.into_iter().map(|f| f.name).collect()))
            }
            _ => Ok(None),
        }
    }

    /// All values as `T` (which must match the stored type, up to string lengths).
    fn read_vec<T: H5Type>(&self) -> R<Vec<T>> {
        if self.len() == 0 {
            return Ok(Vec::new());
        }
        if let Some((a, b)) = self.range {
            return Ok(self
                .c
                .read_slice_1d::<T, _>(a..b)
                .at(&self.name)?
                .into_raw_vec_and_offset()
                .0);
        }
        let Some(field) = self.field else {
            return self.c.read_raw::<T>().at(&self.name);
        };
        FIELD.with(|f| *f.borrow_mut() = field.to_owned());
        let v = self.c.read_raw::<Field<T>>().at(&self.name)?;
        Ok(v.into_iter().map(|f| f.0).collect())
    }

    /// All values converted by `f`; large 1-D datasets are read block by block.
    fn read_map<S: Stored, D>(&self, mut f: impl FnMut(S) -> R<D>) -> R<Vec<D>> {
        let n = self.len();
        if !self.blocks || n <= BLOCK {
            return self.read_vec::<S>()?.into_iter().map(f).collect();
        }
        let base = self.range.map_or(0, |r| r.0);
        let mut out = Vec::with_capacity(n);
        for a in (0..n).step_by(BLOCK) {
            let block = self
                .c
                .read_slice_1d::<S, _>(base + a..base + (a + BLOCK).min(n))
                .at(&self.name)?;
            for &v in block.iter() {
                out.push(f(v)?);
            }
        }
        Ok(out)
    }

    /// Numeric values as `f32`.
    pub fn f32s(&self) -> R<Vec<f32>> {
        let desc = self.descriptor()?;
        if desc == TypeDescriptor::Float(FloatSize::U4) {
            return self.read_vec::<f32>();
        }
        dispatch(&desc, ToF32(self)).unwrap_or_else(|| bad(self.not_numeric(&desc, "numbers")))
    }

    /// Integer values converted to `D`; fails on floats and on values out of `D`'s range.
    pub fn ints<D: TryFrom<i64>>(&self) -> R<Vec<D>> {
        let desc = self.descriptor()?;
        if matches!(desc, TypeDescriptor::Float(_)) {
            return bad(self.not_numeric(&desc, "integers"));
        }
        dispatch(&desc, ToInt::<D>(self, std::marker::PhantomData))
            .unwrap_or_else(|| bad(self.not_numeric(&desc, "integers")))
    }

    fn int_to<D: TryFrom<i64>>(&self, v: i64) -> R<D> {
        D::try_from(v).or_else(|_| bad(format!("{} has value {v} out of range", self.name)))
    }

    fn not_numeric(&self, desc: &TypeDescriptor, what: &str) -> String {
        format!("{} holds {desc}, expected {what}", self.name)
    }

    /// Whether the stored values are strings.
    pub fn is_strings(&self) -> R<bool> {
        use TypeDescriptor as T;
        let d = self.descriptor()?;
        Ok(matches!(
            d,
            T::VarLenUnicode | T::VarLenAscii | T::FixedAscii(_) | T::FixedUnicode(_)
        ))
    }

    /// String values (variable- or fixed-length, ASCII or UTF-8; invalid UTF-8 is replaced).
    pub fn strings(&self) -> R<Vec<String>> {
        fn conv<T: H5Type>(src: &Src, bytes: impl Fn(&T) -> &[u8]) -> R<Vec<String>> {
            let v = src.read_vec::<T>()?;
            Ok(v.iter()
                .map(|s| String::from_utf8_lossy(bytes(s)).into_owned())
                .collect())
        }
        // Fixed-length strings are read into the next larger of a few capacities (HDF5 pads
        // or keeps them; nothing is cut since the capacity is at least the stored size).
        macro_rules! fixed {
            ($n:expr, $ty:ident) => {
                match $n {
                    0..=16 => conv::<$ty<16>>(self, |s| s.as_bytes()),
                    17..=64 => conv::<$ty<64>>(self, |s| s.as_bytes()),
                    65..=256 => conv::<$ty<256>>(self, |s| s.as_bytes()),
                    257..=1024 => conv::<$ty<1024>>(self, |s| s.as_bytes()),
                    1025..=8192 => conv::<$ty<8192>>(self, |s| s.as_bytes()),
                    n => bad(format!(
                        "{} holds strings of {n} bytes, at most 8192 supported",
                        self.name
                    )),
                }
            };
        }
        match self.descriptor()? {
            TypeDescriptor::VarLenUnicode => conv::<VarLenUnicode>(self, |s| s.as_bytes()),
            TypeDescriptor::VarLenAscii => conv::<VarLenAscii>(self, |s| s.as_bytes()),
            TypeDescriptor::FixedAscii(n) => fixed!(n, FixedAscii),
            TypeDescriptor::FixedUnicode(n) => fixed!(n, FixedUnicode),
            other => bad(format!("{} holds {other}, expected strings", self.name)),
        }
    }
}

/// A numeric type values can be stored in.
pub(crate) trait Stored: H5Type + Copy {
    /// The value as `f32` (rounded).
    fn to_f32(self) -> f32;
    /// The value as `i64`, if it is an integer in range.
    fn to_i64(self) -> Option<i64>;
}

macro_rules! stored_int {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            fn to_f32(self) -> f32 { self as f32 }
            fn to_i64(self) -> Option<i64> { i64::try_from(self).ok() }
        }
    )*};
}
stored_int!(i8, i16, i32, i64, u8, u16, u32, u64);

impl Stored for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn to_i64(self) -> Option<i64> {
        None
    }
}

impl Stored for f64 {
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_i64(self) -> Option<i64> {
        None
    }
}

impl Stored for bool {
    fn to_f32(self) -> f32 {
        f32::from(u8::from(self))
    }
    fn to_i64(self) -> Option<i64> {
        Some(i64::from(self))
    }
}

/// An operation generic over the stored numeric type, chosen at run time by [`dispatch`].
pub(crate) trait Visit {
    /// What the operation returns.
    type Out;
    /// Runs the operation with values stored as `S`.
    fn visit<S: Stored>(self) -> Self::Out;
}

/// Runs `v` with the Rust type matching `desc`, or returns `None` if `desc` is not numeric.
pub(crate) fn dispatch<V: Visit>(desc: &TypeDescriptor, v: V) -> Option<V::Out> {
    use {FloatSize as F, IntSize as I, TypeDescriptor as T};
    Some(match desc {
        T::Integer(I::U1) => v.visit::<i8>(),
        T::Integer(I::U2) => v.visit::<i16>(),
        T::Integer(I::U4) => v.visit::<i32>(),
        T::Integer(I::U8) => v.visit::<i64>(),
        T::Unsigned(I::U1) => v.visit::<u8>(),
        T::Unsigned(I::U2) => v.visit::<u16>(),
        T::Unsigned(I::U4) => v.visit::<u32>(),
        T::Unsigned(I::U8) => v.visit::<u64>(),
        T::Float(F::U4) => v.visit::<f32>(),
        T::Float(F::U8) => v.visit::<f64>(),
        T::Boolean => v.visit::<bool>(),
        _ => return None,
    })
}

/// Reads values as `f32`.
struct ToF32<'s, 'a>(&'s Src<'a>);

impl Visit for ToF32<'_, '_> {
    type Out = R<Vec<f32>>;
    fn visit<S: Stored>(self) -> Self::Out {
        self.0.read_map(|v: S| Ok(v.to_f32()))
    }
}

/// Reads integers as `D`.
struct ToInt<'s, 'a, D>(&'s Src<'a>, std::marker::PhantomData<D>);

impl<D: TryFrom<i64>> Visit for ToInt<'_, '_, D> {
    type Out = R<Vec<D>>;
    fn visit<S: Stored>(self) -> Self::Out {
        let src = self.0;
        src.read_map(|v: S| match v.to_i64() {
            Some(i) => src.int_to(i),
            None => bad(format!(
                "{} has value {} out of range",
                src.name,
                v.to_f32()
            )),
        })
    }
}
