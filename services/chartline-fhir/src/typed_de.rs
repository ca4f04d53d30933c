//! A `serde::Deserializer` over a [`crate::Json`] tree whose error carries no message,
//! for the typed check's first attempt.
//!
//! fhir-model maps every choice element (`value[x]`, `effective[x]`, an Extension's
//! `value[x]`…) as a flattened `Option` of an enum. For each one that is absent, serde
//! tries the enum, builds the error "no variant of enum … found in flattened data" and
//! throws it away. With serde_json's error type that is a formatted message, a heap
//! allocation and a search of the message for a position, several times per object of
//! every Observation, Condition and Extension. Serde only looks at whether such an
//! attempt failed, never at the message, so this deserializer's errors carry none; a parse
//! that fails is run again with messages on, for the OperationOutcome. Otherwise it
//! answers as serde_json's `&Value` deserializer does (the same kinds accepted by each
//! method, the same visitor calls), and a test holds the two to the same results over the
//! fixtures.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Visitor};
use serde_json::Number;

use crate::tree::{Json as Value, Object};

thread_local! {
    /// Set while a failed parse is run again for its message.
    static LOUD: Cell<bool> = const { Cell::new(false) };
}

/// A parse failure: without a message on the first attempt, with serde's message when the
/// parse is run again by [`explain`].
#[derive(Debug)]
pub(crate) struct Failed(pub(crate) Option<String>);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("does not fit the typed model"))
    }
}

impl std::error::Error for Failed {}

impl de::Error for Failed {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Failed(LOUD.with(Cell::get).then(|| msg.to_string()))
    }
}

/// Runs `parse` (a parse through [`Quiet`] that failed) again with messages kept.
pub(crate) fn explain<R>(parse: impl FnOnce() -> Result<R, Failed>) -> Failed {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            LOUD.with(|l| l.set(false));
        }
    }
    LOUD.with(|l| l.set(true));
    let _reset = Reset;
    match parse() {
        Err(e) => e,
        // Cannot happen (the same parse of the same tree); said plainly if it does.
        Ok(_) => Failed(Some("the typed parse failed once and passed when repeated".to_owned())),
    }
}

/// The deserializer: `T::deserialize(Quiet(&value))`.
#[derive(Clone, Copy)]
pub(crate) struct Quiet<'de>(pub(crate) &'de Value);

/// serde's "invalid type: …, expected …" (formatted only when messages are on).
fn wrong(v: &Value, expected: &dyn de::Expected) -> Failed {
    let unexpected = match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => de::Unexpected::Unsigned(u),
            (None, Some(i)) => de::Unexpected::Signed(i),
            _ => de::Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    };
    de::Error::invalid_type(unexpected, expected)
}

fn visit_number<'de, V: Visitor<'de>>(n: &Number, visitor: V) -> Result<V::Value, Failed> {
    if let Some(u) = n.as_u64() {
        visitor.visit_u64(u)
    } else if let Some(i) = n.as_i64() {
        visitor.visit_i64(i)
    } else if let Some(f) = n.as_f64() {
        visitor.visit_f64(f)
    } else {
        Err(Failed(None))
    }
}

fn visit_array<'de, V: Visitor<'de>>(items: &'de [Value], visitor: V) -> Result<V::Value, Failed> {
    let mut seq = Seq { items: items.iter() };
    let out = visitor.visit_seq(&mut seq)?;
    // As serde_json: a visitor that stops early has not taken the whole array.
    if seq.items.len() == 0 { Ok(out) } else { Err(de::Error::invalid_length(items.len(), &"fewer elements in array")) }
}

fn visit_object<'de, V: Visitor<'de>>(map: &'de Object, visitor: V) -> Result<V::Value, Failed> {
    let mut access = Entries { entries: map.members().iter(), value: None };
    let out = visitor.visit_map(&mut access)?;
    if access.entries.len() == 0 { Ok(out) } else { Err(de::Error::invalid_length(map.len(), &"fewer elements in map")) }
}

/// Methods that accept one JSON kind only, as serde_json's `&Value` deserializer does
/// (a visitor may accept more kinds than the method asked for).
macro_rules! only {
    ($kind:ident => $($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
            match self.0 {
                Value::$kind(_) => self.deserialize_any(visitor),
                other => Err(wrong(other, &visitor)),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Quiet<'de> {
    type Error = Failed;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => visit_number(n, visitor),
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => visit_array(items, visitor),
            Value::Object(map) => visit_object(map, visitor),
        }
    }

    only!(Bool => deserialize_bool);
    only!(Number =>
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
        deserialize_f32 deserialize_f64
    );
    only!(String => deserialize_char deserialize_str deserialize_string deserialize_identifier);

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => visit_array(items, visitor),
            other => Err(wrong(other, &visitor)),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            other => Err(wrong(other, &visitor)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Failed> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Failed> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::Array(items) => visit_array(items, visitor),
            other => Err(wrong(other, &visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Failed> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _name: &'static str, _len: usize, visitor: V) -> Result<V::Value, Failed> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::Object(map) => visit_object(map, visitor),
            other => Err(wrong(other, &visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(self, _name: &'static str, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Value::Array(items) => visit_array(items, visitor),
            Value::Object(map) => visit_object(map, visitor),
            other => Err(wrong(other, &visitor)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(self, _name: &'static str, _variants: &'static [&'static str], visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            // `{"Variant": value}`, exactly one key.
            Value::Object(map) => {
                let mut entries = map.iter();
                match (entries.next(), entries.next()) {
                    (Some((variant, value)), None) => visitor.visit_enum(Variant { name: variant, value: Some(value) }),
                    _ => Err(de::Error::invalid_value(de::Unexpected::Map, &"map with a single key")),
                }
            }
            Value::String(variant) => visitor.visit_enum(Variant { name: variant, value: None }),
            other => Err(wrong(other, &visitor)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        visitor.visit_unit()
    }
}

struct Seq<'de> {
    items: std::slice::Iter<'de, Value>,
}

impl<'de> de::SeqAccess<'de> for Seq<'de> {
    type Error = Failed;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Failed> {
        self.items.next().map(|v| seed.deserialize(Quiet(v))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Entries<'de> {
    entries: std::slice::Iter<'de, (Box<str>, Value)>,
    value: Option<&'de Value>,
}

impl<'de> de::MapAccess<'de> for Entries<'de> {
    type Error = Failed;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Failed> {
        match self.entries.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(Key(k)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Failed> {
        match self.value.take() {
            Some(v) => seed.deserialize(Quiet(v)),
            None => Err(Failed(None)),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An object key: a borrowed string, whatever type is asked for. serde_json also turns
/// keys into numbers or booleans on request and hands enum variant names over as
/// transient strings; FHIR's models have string keys and identifier visitors only, for
/// which the outcome is the same. Nor is serde_json's `RawValue` supported (the models
/// have none); the numbers are those of serde_json without `arbitrary_precision`.
struct Key<'de>(&'de str);

impl<'de> de::Deserializer<'de> for Key<'de> {
    type Error = Failed;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        visitor.visit_borrowed_str(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Failed> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Failed> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(self, _name: &'static str, _variants: &'static [&'static str], visitor: V) -> Result<V::Value, Failed> {
        visitor.visit_enum(de::value::BorrowedStrDeserializer::new(self.0))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

struct Variant<'de> {
    name: &'de str,
    value: Option<&'de Value>,
}

impl<'de> de::EnumAccess<'de> for Variant<'de> {
    type Error = Failed;
    type Variant = VariantValue<'de>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, VariantValue<'de>), Failed> {
        let tag = seed.deserialize(Key(self.name))?;
        Ok((tag, VariantValue(self.value)))
    }
}

struct VariantValue<'de>(Option<&'de Value>);

impl<'de> de::VariantAccess<'de> for VariantValue<'de> {
    type Error = Failed;

    fn unit_variant(self) -> Result<(), Failed> {
        match self.0 {
            None | Some(Value::Null) => Ok(()),
            Some(_) => Err(Failed(None)),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Failed> {
        match self.0 {
            Some(v) => seed.deserialize(Quiet(v)),
            None => Err(Failed(None)),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            // As serde_json: an empty array is a unit.
            Some(Value::Array(items)) if items.is_empty() => visitor.visit_unit(),
            Some(Value::Array(items)) => visit_array(items, visitor),
            _ => Err(Failed(None)),
        }
    }

    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, Failed> {
        match self.0 {
            Some(Value::Object(map)) => visit_object(map, visitor),
            _ => Err(Failed(None)),
        }
    }
}
