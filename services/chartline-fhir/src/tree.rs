//! The JSON tree that ingest works on: [`Json`].
//!
//! `serde_json::Value` keeps objects in a B-tree: every object is at least one node of
//! room for eleven entries, lookups compare along the tree, iteration follows node links,
//! and dropping a tree visits all of that again. Ingest parses every request into a tree,
//! walks it several times (validation, references, the typed model, the canonical text,
//! the timeline rows) and drops it, so the tree's shape is a large part of its cost.
//!
//! Here an object is one exactly-sized allocation of its entries sorted by key (lookups
//! are a binary search over a few entries, iteration is a slice, the order is the one
//! serde_json's B-tree gives, so serialization is byte-identical), an array is one
//! exactly-sized allocation, and strings are boxed without spare capacity. The parser
//! builds each object and array on a shared stack and allocates it once, at its end.
//! Numbers are serde_json's own `Number`, so they read and print exactly as before.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
pub use serde_json::Number;

/// A JSON value: objects sorted by key, no spare capacity anywhere.
#[derive(Clone, PartialEq, Default)]
pub enum Json {
    /// `null`.
    #[default]
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as serde_json holds it.
    Number(Number),
    /// A string.
    String(Box<str>),
    /// An array.
    Array(Box<[Json]>),
    /// An object.
    Object(Object),
}

/// A JSON object: its members sorted by key, each key once.
#[derive(Clone, PartialEq, Default)]
pub struct Object(Box<[(Box<str>, Json)]>);

static NULL: Json = Json::Null;

impl Json {
    /// The member `key` of an object; None for a missing key or a value that is not an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(o) => o.get(key),
            _ => None,
        }
    }

    /// The member `key` of an object, mutable.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        match self {
            Json::Object(o) => o.get_mut(key),
            _ => None,
        }
    }

    /// The value at a JSON Pointer (RFC 6901), as `serde_json::Value::pointer`.
    pub fn pointer(&self, pointer: &str) -> Option<&Json> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        let mut at = self;
        for token in rest.split('/') {
            let unescaped;
            let token = if token.contains('~') {
                unescaped = token.replace("~1", "/").replace("~0", "~");
                unescaped.as_str()
            } else {
                token
            };
            at = match at {
                Json::Object(o) => o.get(token)?,
                Json::Array(items) => items.get(array_index(token)?)?,
                _ => return None,
            };
        }
        Some(at)
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number as f64, if this is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Number(n) => n.as_f64(),
            _ => None,
        }
    }

    /// The number as u64, if this is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// Whether this is an object.
    pub fn is_object(&self) -> bool {
        matches!(self, Json::Object(_))
    }

    /// Takes the value out, leaving `null`.
    pub fn take(&mut self) -> Json {
        std::mem::take(self)
    }

    /// The compact JSON text (keys in order, as serde_json writes a `Value`).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// serde_json's rule for array indices in a pointer: digits, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

impl Object {
    /// Builds an object from members in any order; for a key given twice the last wins
    /// (as serde_json's parser does).
    pub fn from_members(mut members: Vec<(Box<str>, Json)>) -> Self {
        if !members.windows(2).all(|w| w[0].0 < w[1].0) {
            // Stable: of equal keys, the last sent is last.
            members.sort_by(|a, b| a.0.cmp(&b.0));
            let mut kept: Vec<(Box<str>, Json)> = Vec::with_capacity(members.len());
            for m in members {
                match kept.last_mut() {
                    Some(last) if last.0 == m.0 => *last = m,
                    _ => kept.push(m),
                }
            }
            members = kept;
        }
        Object(members.into_boxed_slice())
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where `key` is in key order, or where it would go.
    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Json> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// The value of `key`, mutable.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    /// The position of `key` in key order with the object's own key and the value.
    pub fn get_full(&self, key: &str) -> Option<(usize, &str, &Json)> {
        self.find(key).ok().map(|i| (i, &*self.0[i].0, &self.0[i].1))
    }

    /// Whether `key` is a member.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value` (replacing a value there), keeping the key order.
    pub fn insert(&mut self, key: &str, value: Json) {
        match self.find(key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => {
                let mut members = std::mem::take(&mut self.0).into_vec();
                members.insert(i, (key.into(), value));
                self.0 = members.into_boxed_slice();
            }
        }
    }

    /// The members in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Json)> + DoubleEndedIterator + Clone {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    /// The members in key order, values mutable.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = (&str, &mut Json)> {
        self.0.iter_mut().map(|(k, v)| (&**k, v))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.0.iter().map(|(k, _)| &**k)
    }

    /// The members as a slice, in key order.
    pub fn members(&self) -> &[(Box<str>, Json)] {
        &self.0
    }
}

impl<'a> IntoIterator for &'a Object {
    type Item = (&'a str, &'a Json);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (Box<str>, Json)>, fn(&'a (Box<str>, Json)) -> (&'a str, &'a Json)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, v))
    }
}

impl FromIterator<(Box<str>, Json)> for Object {
    fn from_iter<I: IntoIterator<Item = (Box<str>, Json)>>(iter: I) -> Self {
        Object::from_members(iter.into_iter().collect())
    }
}

impl std::ops::Index<&str> for Json {
    type Output = Json;

    /// The member `key`, or `null` (as serde_json's `Value` indexes).
    fn index(&self, key: &str) -> &Json {
        self.get(key).unwrap_or(&NULL)
    }
}

impl std::ops::Index<usize> for Json {
    type Output = Json;

    /// The item `i`, or `null` (as serde_json's `Value` indexes).
    fn index(&self, i: usize) -> &Json {
        self.as_array().and_then(|a| a.get(i)).unwrap_or(&NULL)
    }
}

impl PartialEq<str> for Json {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == Some(other)
    }
}

impl PartialEq<&str> for Json {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == Some(*other)
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Json::Null => f.write_str("Null"),
            Json::Bool(b) => write!(f, "Bool({b})"),
            Json::Number(n) => write!(f, "Number({n})"),
            Json::String(s) => write!(f, "String({s:?})"),
            Json::Array(items) => f.debug_list().entries(items.iter()).finish(),
            Json::Object(o) => o.fmt(f),
        }
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl fmt::Display for Json {
    /// Compact JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json_string())
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items.iter() {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            Json::Object(o) => o.serialize(s),
        }
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl From<serde_json::Value> for Json {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(b),
            serde_json::Value::Number(n) => Json::Number(n),
            serde_json::Value::String(s) => Json::String(s.into_boxed_str()),
            serde_json::Value::Array(items) => Json::Array(items.into_iter().map(Json::from).collect()),
            // A serde_json Map iterates in key order, each key once.
            serde_json::Value::Object(m) => Json::Object(Object(m.into_iter().map(|(k, v)| (k.into_boxed_str(), Json::from(v))).collect())),
        }
    }
}

impl From<&serde_json::Value> for Json {
    fn from(v: &serde_json::Value) -> Self {
        Json::from(v.clone())
    }
}

impl From<&Json> for serde_json::Value {
    fn from(v: &Json) -> Self {
        match v {
            Json::Null => serde_json::Value::Null,
            Json::Bool(b) => serde_json::Value::Bool(*b),
            Json::Number(n) => serde_json::Value::Number(n.clone()),
            Json::String(s) => serde_json::Value::String(s.to_string()),
            Json::Array(items) => serde_json::Value::Array(items.iter().map(serde_json::Value::from).collect()),
            Json::Object(o) => serde_json::Value::Object(o.iter().map(|(k, v)| (k.to_owned(), serde_json::Value::from(v))).collect()),
        }
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Self {
        Json::String(s.into())
    }
}

/// The parser's scratch: the members of every object and the items of every array still
/// open, innermost last. Each finished object or array moves its own tail into one
/// exactly-sized allocation.
#[derive(Default)]
pub(crate) struct Stacks {
    members: RefCell<Vec<(Box<str>, Json)>>,
    items: RefCell<Vec<Json>>,
}

/// Builds a [`Json`] from any serde deserializer (serde_json's text parser in
/// [`crate::parse_json`]), refusing nesting past `max_depth` at the first object or array
/// beyond it, before recursing into it. One difference from serde_json's own `Value`
/// visitor: with its `raw_value` feature (on in this workspace) that one reads an object
/// whose key is `$serde_json::private::RawValue` as JSON text embedded in the key's string
/// and parses it, unbounded by our limit; this one keeps the object as sent.
#[derive(Clone, Copy)]
pub(crate) struct TreeSeed<'c> {
    pub(crate) depth: usize,
    pub(crate) max_depth: usize,
    pub(crate) too_deep: &'c std::cell::Cell<bool>,
    pub(crate) stacks: &'c Stacks,
}

impl TreeSeed<'_> {
    fn enter<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= self.max_depth {
            self.too_deep.set(true);
            return Err(E::custom("nested too deep"));
        }
        Ok(TreeSeed { depth: self.depth + 1, ..self })
    }
}

impl<'de> DeserializeSeed<'de> for TreeSeed<'_> {
    type Value = Json;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TreeSeed<'_> {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        // Non-finite numbers cannot come out of JSON text; serde_json maps them to null too.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.into()))
    }

    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v.into_boxed_str()))
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        DeserializeSeed::deserialize(self, d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let inner = self.enter()?;
        let start = self.stacks.items.borrow().len();
        let result = (|| {
            while let Some(item) = seq.next_element_seed(inner)? {
                self.stacks.items.borrow_mut().push(item);
            }
            Ok(())
        })();
        let mut items = self.stacks.items.borrow_mut();
        match result {
            Ok(()) => Ok(Json::Array(items.drain(start..).collect())),
            Err(e) => {
                items.truncate(start);
                Err(e)
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let inner = self.enter()?;
        let start = self.stacks.members.borrow().len();
        let result = (|| {
            while let Some(key) = map.next_key_seed(KeySeed)? {
                let value = map.next_value_seed(inner)?;
                self.stacks.members.borrow_mut().push((key, value));
            }
            Ok(())
        })();
        let mut members = self.stacks.members.borrow_mut();
        match result {
            Ok(()) => {
                if members[start..].windows(2).all(|w| w[0].0 < w[1].0) {
                    Ok(Json::Object(Object(members.drain(start..).collect())))
                } else {
                    Ok(Json::Object(Object::from_members(members.drain(start..).collect())))
                }
            }
            Err(e) => {
                members.truncate(start);
                Err(e)
            }
        }
    }
}

/// An object key, boxed exactly.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Box<str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Box<str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Box<str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E>(self, v: &str) -> Result<Box<str>, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Box<str>, E> {
        Ok(v.into_boxed_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn n(x: u64) -> Json {
        Json::Number(x.into())
    }

    #[test]
    fn objects_keep_keys_sorted_and_unique() {
        let mut o = Object::from_members(vec![("b".into(), n(1)), ("a".into(), n(2)), ("b".into(), n(3))]);
        assert_eq!(o.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(o.get("b"), Some(&n(3)), "the last of a repeated key wins");
        o.insert("ab", Json::from("x"));
        o.insert("a", Json::Null);
        assert_eq!(o.keys().collect::<Vec<_>>(), ["a", "ab", "b"]);
        assert_eq!(o.get("a"), Some(&Json::Null));
        assert_eq!(o.get_full("b").map(|(i, k, _)| (i, k)), Some((2, "b")));
        assert!(!o.contains_key("c"));
    }

    #[test]
    fn conversions_and_text_agree_with_serde_json() {
        let v = json!({"z": [1, -2, 2.5, "s\"\u{1}", null, true, {}], "a": {"y": {"x": []}}, "é": 1e300, "m": u64::MAX});
        let j = Json::from(v.clone());
        assert_eq!(j.to_json_string(), v.to_string());
        assert_eq!(serde_json::Value::from(&j), v);
        assert_eq!(j.pointer("/z/3"), Some(&Json::from("s\"\u{1}")));
        assert_eq!(j.pointer("/a/y/x").and_then(Json::as_array).map(<[Json]>::len), Some(0));
        assert_eq!(j.pointer("/z/01"), None);
        assert_eq!(j["z"][0].as_u64(), Some(1));
        assert!(j["z"][9].is_null());
        assert!(j["missing"].is_null());
    }

    #[test]
    fn pointers_unescape_as_rfc_6901_says() {
        let j = Json::from(json!({"a/b": {"m~n": 1}}));
        assert_eq!(j.pointer("/a~1b/m~0n").and_then(Json::as_u64), Some(1));
        assert_eq!(j.pointer(""), Some(&j));
        assert_eq!(j.pointer("a"), None);
    }
}
