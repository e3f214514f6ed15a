//! Serde helpers implementing protobuf's canonical JSON mapping.
//!
//! Output is what Go's `protojson` (and so envd) emits; input is as lenient as the
//! protobuf JSON parsers: `null` means the default value, integers may be numbers or
//! strings, bytes may be standard or URL-safe base64 with or without padding.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `skip_serializing_if` predicate: proto3 omits fields holding their default value.
pub fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Deserializes `null` as the type's default (protobuf JSON treats them alike).
pub fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Distinguishes an absent field (outer `None`, via `#[serde(default)]`) from an explicit
/// `null` (`Some(None)`).
pub fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<T>::deserialize(deserializer)?))
}

/// Integer visitor accepting JSON numbers, decimal strings and `null` (→ 0).
struct IntVisitor<T>(std::marker::PhantomData<T>);

impl<T> Visitor<'_> for IntVisitor<T>
where
    T: TryFrom<i64> + TryFrom<u64> + Default + std::str::FromStr,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "an integer (number or decimal string) in range for {}",
            std::any::type_name::<T>()
        )
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format!("integer {v} out of range")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format!("integer {v} out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // protobuf JSON allows `1.0` and `1e3` for integers as long as they are integral.
        if v.fract() != 0.0 || !v.is_finite() {
            return Err(E::custom(format!("{v} is not an integer")));
        }
        if v < 0.0 {
            self.visit_i64(v as i64)
        } else {
            self.visit_u64(v as u64)
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.trim()
            .parse::<T>()
            .map_err(|_| E::custom(format!("invalid integer string {v:?}")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
}

fn deserialize_int<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64> + Default + std::str::FromStr,
{
    deserializer.deserialize_any(IntVisitor(std::marker::PhantomData))
}

/// 32-bit integers: emitted as JSON numbers, accepted as numbers or strings.
pub mod int32 {
    use super::*;

    pub fn serialize<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(*value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        deserialize_int(d)
    }
}

/// Unsigned 32-bit integers: emitted as JSON numbers, accepted as numbers or strings.
pub mod uint32 {
    use super::*;

    pub fn serialize<S: Serializer>(value: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(*value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        deserialize_int(d)
    }
}

/// 64-bit integers: emitted as decimal strings (protobuf JSON), accepted as either.
pub mod int64 {
    use super::*;

    pub fn serialize<S: Serializer>(value: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        deserialize_int(d)
    }
}

/// Decodes base64 in any of the forms protobuf JSON parsers accept.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let url_safe = text.contains(['-', '_']);
    let padded = text.ends_with('=');
    match (url_safe, padded) {
        (false, true) => STANDARD.decode(text),
        (false, false) => STANDARD_NO_PAD.decode(text),
        (true, true) => URL_SAFE.decode(text),
        (true, false) => URL_SAFE_NO_PAD.decode(text),
    }
}

/// `bytes` fields: standard padded base64 on output; any base64 flavour on input.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        match text {
            None => Ok(Vec::new()),
            Some(text) => decode_base64(&text)
                .map_err(|e| de::Error::custom(format!("invalid base64 in bytes field: {e}"))),
        }
    }
}

/// `google.protobuf.Timestamp`: RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as
/// Go's protojson writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Nanoseconds within the second, `0..1_000_000_000`.
    pub nanos: u32,
}

impl Timestamp {
    /// Builds a timestamp, normalising `nanos` overflow into `seconds`.
    pub fn new(seconds: i64, nanos: u32) -> Self {
        Self {
            seconds: seconds + i64::from(nanos / 1_000_000_000),
            nanos: nanos % 1_000_000_000,
        }
    }

    fn to_datetime(self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.seconds, self.nanos)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(dt) = self.to_datetime() else {
            return write!(f, "<timestamp out of range: {}s>", self.seconds);
        };
        let digits = if self.nanos == 0 {
            SecondsFormat::Secs
        } else if self.nanos.is_multiple_of(1_000_000) {
            SecondsFormat::Millis
        } else if self.nanos.is_multiple_of(1_000) {
            SecondsFormat::Micros
        } else {
            SecondsFormat::Nanos
        };
        f.write_str(&dt.to_rfc3339_opts(digits, true))
    }
}

impl std::str::FromStr for Timestamp {
    type Err = chrono::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let dt = DateTime::parse_from_rfc3339(s)?.with_timezone(&Utc);
        Ok(Self {
            seconds: dt.timestamp(),
            nanos: dt.timestamp_subsec_nanos(),
        })
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.to_datetime().is_none() {
            return Err(serde::ser::Error::custom("timestamp out of range"));
        }
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| de::Error::custom(format!("invalid RFC 3339 timestamp {text:?}: {e}")))
    }
}

/// Declares a protobuf enum: serialized by name, deserialized from its name or number.
/// Unknown names and numbers decode as the default (zero) value, as protobuf JSON
/// parsers that ignore unknown values do.
#[macro_export]
macro_rules! pb_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $num:literal => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// The protobuf enum value name, e.g. `"SIGNAL_SIGKILL"`.
            pub fn as_str(self) -> &'static str {
                match self { $( Self::$variant => $text ),+ }
            }

            /// The protobuf enum number.
            pub fn number(self) -> i32 {
                match self { $( Self::$variant => $num ),+ }
            }

            /// Looks a value up by protobuf name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $( $text => Some(Self::$variant), )+ _ => None }
            }

            /// Looks a value up by protobuf number.
            pub fn from_number(number: i64) -> Option<Self> {
                match number { $( $num => Some(Self::$variant), )+ _ => None }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                match Self::from_number(0) {
                    Some(value) => value,
                    None => unreachable!("protobuf enums always have a zero value"),
                }
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl ::serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter) -> ::std::fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " name or number"))
                    }
                    fn visit_str<E: ::serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        Ok($name::from_name(v).unwrap_or_default())
                    }
                    fn visit_i64<E: ::serde::de::Error>(self, v: i64) -> Result<$name, E> {
                        Ok($name::from_number(v).unwrap_or_default())
                    }
                    fn visit_u64<E: ::serde::de::Error>(self, v: u64) -> Result<$name, E> {
                        Ok(i64::try_from(v).ok().and_then($name::from_number).unwrap_or_default())
                    }
                    fn visit_unit<E: ::serde::de::Error>(self) -> Result<$name, E> {
                        Ok($name::default())
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
    struct Ints {
        #[serde(default, with = "int64")]
        big: i64,
        #[serde(default, with = "uint32")]
        small: u32,
        #[serde(default, with = "int32")]
        signed: i32,
        #[serde(default, with = "bytes")]
        data: Vec<u8>,
    }

    #[test]
    fn int64_is_a_string_on_output_and_either_on_input() {
        let v = Ints {
            big: 3,
            small: 4,
            signed: -1,
            data: b"hi".to_vec(),
        };
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"big":"3","small":4,"signed":-1,"data":"aGk="}"#
        );
        let back: Ints =
            serde_json::from_str(r#"{"big":3,"small":"4","signed":"-1","data":"aGk"}"#).unwrap();
        assert_eq!(back, v);
        let nulls: Ints =
            serde_json::from_str(r#"{"big":null,"small":null,"signed":null,"data":null}"#).unwrap();
        assert_eq!(nulls, Ints::default());
    }

    #[test]
    fn integers_out_of_range_are_rejected() {
        assert!(serde_json::from_str::<Ints>(r#"{"small":-1}"#).is_err());
        assert!(serde_json::from_str::<Ints>(r#"{"small":"4294967296"}"#).is_err());
        assert!(serde_json::from_str::<Ints>(r#"{"small":1.5}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Ints>(r#"{"small":2.0}"#)
                .unwrap()
                .small,
            2
        );
    }

    #[test]
    fn base64_accepts_every_flavour() {
        for text in ["+/8=", "+/8", "-_8=", "-_8"] {
            assert_eq!(decode_base64(text).unwrap(), vec![0xfb, 0xff], "{text}");
        }
        assert!(decode_base64("!!!").is_err());
    }

    #[test]
    fn timestamps_use_go_fraction_widths() {
        let cases = [
            (Timestamp::new(0, 0), "1970-01-01T00:00:00Z"),
            (
                Timestamp::new(1_700_000_000, 120_000_000),
                "2023-11-14T22:13:20.120Z",
            ),
            (
                Timestamp::new(1_700_000_000, 123_456_000),
                "2023-11-14T22:13:20.123456Z",
            ),
            (
                Timestamp::new(1_700_000_000, 123_456_789),
                "2023-11-14T22:13:20.123456789Z",
            ),
        ];
        for (ts, text) in cases {
            assert_eq!(serde_json::to_value(ts).unwrap(), serde_json::json!(text));
            assert_eq!(text.parse::<Timestamp>().unwrap(), ts);
        }
        let offset: Timestamp = "2023-11-14T23:13:20+01:00".parse().unwrap();
        assert_eq!(offset, Timestamp::new(1_700_000_000, 0));
    }
}
