//! Comparing the typed model's serialization with the JSON it was parsed from, without
//! building the serialized tree: a `serde::Serializer` that walks the original tree (a
//! [`crate::Json`]) alongside the typed model's output. Same rules as `first_difference` on
//! two serialized trees (which the tests keep as the reference): every element sent must
//! come back with an equal value; elements the model adds are ignored.

use std::fmt::{self, Write as _};

use serde::ser::{self, Serialize};
use serde_json::Number;

use crate::tree::{Json as Value, Object};

/// The first element of `orig` (in key order) that the typed value does not reproduce, as
/// a path below `path`; `Err` if the typed value could not be serialized at all.
pub(crate) fn first_mismatch<T: Serialize + ?Sized>(orig: &Value, typed: &T, path: &mut String) -> Result<Option<String>, Error> {
    typed.serialize(Cmp { orig, path })
}

/// A serialization failure of the typed model (not a mismatch).
#[derive(Debug)]
pub(crate) struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        Error(msg.to_string())
    }
}

type Found = Result<Option<String>, Error>;

struct Cmp<'a, 'p> {
    orig: &'a Value,
    path: &'p mut String,
}

impl<'a, 'p> Cmp<'a, 'p> {
    fn here(&self) -> Found {
        Ok(Some(self.path.clone()))
    }

    fn scalar(self, same: bool) -> Found {
        if same { Ok(None) } else { self.here() }
    }

    fn number(self, n: Number) -> Found {
        let Value::Number(a) = self.orig else { return self.here() };
        let (x, y) = (a.as_f64().unwrap_or(f64::NAN), n.as_f64().unwrap_or(f64::NAN));
        let same = *a == n || x == y || ((x - y).abs() <= 1e-9 * x.abs().max(y.abs()));
        self.scalar(same)
    }

    fn float(self, y: f64) -> Found {
        match Number::from_f64(y) {
            Some(n) => self.number(n),
            // serde_json writes NaN and infinities as null.
            None => {
                let same = self.orig.is_null();
                self.scalar(same)
            }
        }
    }

    fn object(self) -> Result<Obj<'a, 'p>, Error> {
        Ok(Obj { orig: self.orig.as_object(), path: self.path, seen: Seen::default(), first: None, key_at: None })
    }
}

/// The typed model's string against the original: equal, the same instant spelled
/// differently, or base64 with whitespace that the model dropped.
fn same_string(a: &str, b: &str) -> bool {
    a == b || crate::typed::same_instant(a, b) || (a.contains(|c: char| c.is_ascii_whitespace()) && a.split_ascii_whitespace().eq_by_str(b))
}

trait EqByStr {
    fn eq_by_str(self, b: &str) -> bool;
}

impl<'x, I: Iterator<Item = &'x str>> EqByStr for I {
    fn eq_by_str(self, b: &str) -> bool {
        let mut rest = b;
        for part in self {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }
}

/// `fn $name(self, v: $ty)` comparing an integer as a JSON number.
macro_rules! integers {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name(self, v: $ty) -> Found {
            self.number(Number::from(v))
        }
    )*};
}

/// `fn $name(self, _: $ty)` refusing a non-string map key.
macro_rules! not_keys {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name(self, _: $ty) -> Result<(), Error> {
            Err(non_string_key())
        }
    )*};
}

impl<'a, 'p> ser::Serializer for Cmp<'a, 'p> {
    type Ok = Option<String>;
    type Error = Error;
    type SerializeSeq = Seq<'a, 'p>;
    type SerializeTuple = Seq<'a, 'p>;
    type SerializeTupleStruct = Seq<'a, 'p>;
    type SerializeTupleVariant = ser::Impossible<Option<String>, Error>;
    type SerializeMap = Obj<'a, 'p>;
    type SerializeStruct = Obj<'a, 'p>;
    type SerializeStructVariant = ser::Impossible<Option<String>, Error>;

    fn serialize_bool(self, v: bool) -> Found {
        let same = self.orig.as_bool() == Some(v);
        self.scalar(same)
    }
    integers!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64);
    fn serialize_i128(self, v: i128) -> Found {
        match i64::try_from(v) {
            Ok(v) => self.number(Number::from(v)),
            Err(_) => self.float(v as f64),
        }
    }
    integers!(serialize_u8: u8, serialize_u16: u16, serialize_u32: u32, serialize_u64: u64);
    fn serialize_u128(self, v: u128) -> Found {
        match u64::try_from(v) {
            Ok(v) => self.number(Number::from(v)),
            Err(_) => self.float(v as f64),
        }
    }
    fn serialize_f32(self, v: f32) -> Found {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Found {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Found {
        let mut b = [0; 4];
        self.serialize_str(v.encode_utf8(&mut b))
    }
    fn serialize_str(self, v: &str) -> Found {
        let same = matches!(self.orig, Value::String(a) if same_string(a, v));
        self.scalar(same)
    }
    fn serialize_bytes(self, v: &[u8]) -> Found {
        // serde_json writes bytes as an array of numbers.
        let same = matches!(self.orig, Value::Array(a) if a.len() == v.len() && a.iter().zip(v).all(|(x, y)| x.as_u64() == Some(u64::from(*y))));
        self.scalar(same)
    }
    fn serialize_none(self) -> Found {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Found {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Found {
        let same = self.orig.is_null();
        self.scalar(same)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Found {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Found {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Found {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(self, _name: &'static str, _index: u32, variant: &'static str, value: &T) -> Found {
        // `{variant: value}`
        let mut obj = self.object()?;
        ser::SerializeStruct::serialize_field(&mut obj, variant, value)?;
        ser::SerializeStruct::end(obj)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Seq<'a, 'p>, Error> {
        let items = match self.orig {
            Value::Array(items) => Some(&items[..]),
            _ => None,
        };
        // A known length that differs is a mismatch at the array itself; decided at the end.
        Ok(Seq { items, path: self.path, next: 0, first: None, len_hint: len })
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq<'a, 'p>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Seq<'a, 'p>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Self::SerializeTupleVariant, Error> {
        Err(ser::Error::custom("tuple variants do not occur in the FHIR models"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Obj<'a, 'p>, Error> {
        self.object()
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Obj<'a, 'p>, Error> {
        self.object()
    }
    fn serialize_struct_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Self::SerializeStructVariant, Error> {
        Err(ser::Error::custom("struct variants do not occur in the FHIR models"))
    }
}

struct Seq<'a, 'p> {
    /// None when the original is not an array (a mismatch, reported at the end).
    items: Option<&'a [Value]>,
    path: &'p mut String,
    next: usize,
    first: Option<String>,
    len_hint: Option<usize>,
}

impl Seq<'_, '_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let i = self.next;
        self.next += 1;
        let Some(items) = self.items else { return Ok(()) };
        if self.first.is_some() || self.len_hint.is_some_and(|n| n != items.len()) {
            return Ok(());
        }
        let Some(orig) = items.get(i) else { return Ok(()) };
        let len = self.path.len();
        let _ = write!(self.path, "[{i}]");
        self.first = value.serialize(Cmp { orig, path: &mut *self.path })?;
        self.path.truncate(len);
        Ok(())
    }

    fn finish(self) -> Found {
        match self.items {
            Some(items) if items.len() == self.next => Ok(self.first),
            _ => Ok(Some(self.path.clone())),
        }
    }
}

/// serde's three sequence traits, all comparing element by element.
macro_rules! sequences {
    ($($tr:ident::$method:ident),*) => {$(
        impl ser::$tr for Seq<'_, '_> {
            type Ok = Option<String>;
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.element(value)
            }
            fn end(self) -> Found {
                self.finish()
            }
        }
    )*};
}

sequences!(SerializeSeq::serialize_element, SerializeTuple::serialize_element, SerializeTupleStruct::serialize_field);

struct Obj<'a, 'p> {
    /// None when the original is not an object (a mismatch, reported at the end).
    orig: Option<&'a Object>,
    path: &'p mut String,
    /// Keys of `orig` that came back.
    seen: Seen,
    /// The earliest mismatch so far: (position of its key in `orig`, path).
    first: Option<(usize, String)>,
    /// Where the path ended before the key of a map entry whose value comes next.
    key_at: Option<usize>,
}

impl Obj<'_, '_> {
    /// Compares one element; its key is on the path after `path[len]` (a '.'), and is
    /// taken off again.
    fn field<T: Serialize + ?Sized>(&mut self, len: usize, value: &T) -> Result<(), Error> {
        let found = self.compare(len, value);
        self.path.truncate(len);
        found
    }

    fn compare<T: Serialize + ?Sized>(&mut self, len: usize, value: &T) -> Result<(), Error> {
        let Some(map) = self.orig else { return Ok(()) };
        // Elements the model adds (a default resourceType, say) are not compared.
        let Some((pos, _, orig)) = map.get_full(&self.path[len + 1..]) else { return Ok(()) };
        if !self.seen.insert(pos) {
            return Err(ser::Error::custom("the typed model wrote an element twice"));
        }
        // Of several mismatches, the earliest in key order wins.
        if self.first.as_ref().is_some_and(|(first, _)| *first < pos) {
            return Ok(());
        }
        if let Some(p) = value.serialize(Cmp { orig, path: &mut *self.path })? {
            self.first = Some((pos, p));
        }
        Ok(())
    }

    fn finish(self) -> Found {
        let Some(map) = self.orig else { return Ok(Some(self.path.clone())) };
        // A key of the original that never came back is dropped content.
        let missing = if self.seen.len() == map.len() { None } else { (0..map.len()).find(|&i| !self.seen.contains(i)) };
        match (missing, self.first) {
            (Some(m), first) if first.as_ref().is_none_or(|(p, _)| m < *p) => {
                let key = map.keys().nth(m).unwrap_or("");
                Ok(Some(format!("{}.{key}", self.path)))
            }
            (_, first) => Ok(first.map(|(_, p)| p)),
        }
    }
}

/// The members of one object that came back, by their position in key order: a bit set,
/// inline for the first 64, which covers every FHIR element.
#[derive(Default)]
struct Seen {
    inline: u64,
    more: Vec<usize>,
}

impl Seen {
    /// False if `pos` was there already.
    fn insert(&mut self, pos: usize) -> bool {
        if self.contains(pos) {
            return false;
        }
        if pos < 64 {
            self.inline |= 1 << pos;
        } else {
            self.more.push(pos);
        }
        true
    }

    fn contains(&self, pos: usize) -> bool {
        if pos < 64 { self.inline & (1 << pos) != 0 } else { self.more.contains(&pos) }
    }

    fn len(&self) -> usize {
        self.inline.count_ones() as usize + self.more.len()
    }
}

impl ser::SerializeStruct for Obj<'_, '_> {
    type Ok = Option<String>;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        let len = self.path.len();
        self.path.push('.');
        self.path.push_str(key);
        self.field(len, value)
    }
    fn end(self) -> Found {
        self.finish()
    }
}

impl ser::SerializeMap for Obj<'_, '_> {
    type Ok = Option<String>;
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        // A key without its value before it (serde's rules broken) is dropped from the path.
        if let Some(len) = self.key_at.take() {
            self.path.truncate(len);
        }
        let len = self.path.len();
        self.path.push('.');
        if let Err(e) = key.serialize(KeyInto(&mut *self.path)) {
            self.path.truncate(len);
            return Err(e);
        }
        self.key_at = Some(len);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let len = self.key_at.take().ok_or_else(|| ser::Error::custom("a map value without a key"))?;
        self.field(len, value)
    }
    fn end(self) -> Found {
        self.finish()
    }
}

/// Map keys: strings only, as in JSON; written onto the end of the path.
struct KeyInto<'s>(&'s mut String);

impl ser::Serializer for KeyInto<'_> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = ser::Impossible<(), Error>;
    type SerializeTuple = ser::Impossible<(), Error>;
    type SerializeTupleStruct = ser::Impossible<(), Error>;
    type SerializeTupleVariant = ser::Impossible<(), Error>;
    type SerializeMap = ser::Impossible<(), Error>;
    type SerializeStruct = ser::Impossible<(), Error>;
    type SerializeStructVariant = ser::Impossible<(), Error>;

    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.0.push_str(v);
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<(), Error> {
        self.0.push_str(variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    not_keys!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64, serialize_u8: u8,
        serialize_u16: u16, serialize_u32: u32, serialize_u64: u64, serialize_f32: f32, serialize_f64: f64, serialize_bytes: &[u8]);
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.0.push(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Error> {
        Err(non_string_key())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        Err(non_string_key())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        Err(non_string_key())
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(self, _: &'static str, _: u32, _: &'static str, _: &T) -> Result<(), Error> {
        Err(non_string_key())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(non_string_key())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Error> {
        Err(non_string_key())
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, Error> {
        Err(non_string_key())
    }
    fn serialize_tuple_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Self::SerializeTupleVariant, Error> {
        Err(non_string_key())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(non_string_key())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Error> {
        Err(non_string_key())
    }
    fn serialize_struct_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Self::SerializeStructVariant, Error> {
        Err(non_string_key())
    }
}

fn non_string_key() -> Error {
    ser::Error::custom("map keys must be strings")
}
