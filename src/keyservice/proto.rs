//! The key service's messages (proto/gybc/authz/v1/key_service.proto), compiled at build time,
//! with their protojson (pbjson) serde impls; and `Timestamp`, the one well-known type whose
//! protojson this crate writes itself. Protojson's canonical form is UTC with `Z` and 0, 3, 6
//! or 9 fractional digits (`2026-12-03T10:00:00Z`); pbjson-types writes `+00:00` and has no
//! switch, so `build.rs` maps `google.protobuf.Timestamp` here. Its input side is pbjson's
//! (any RFC 3339 offset). Duration stays pbjson's: `"3600s"` is canonical.

use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[allow(clippy::all)]
pub mod v1 {
    /// The API's timestamps (`build.rs` maps `google.protobuf.Timestamp` to it).
    pub use super::Timestamp;

    include!(concat!(env!("OUT_DIR"), "/gybc.authz.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/gybc.authz.v1.serde.rs"));
}

// === impl Timestamp ===

/// `google.protobuf.Timestamp`, field for field (prost's wire format is unchanged).
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// protojson's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !(MIN_SECONDS..=MAX_SECONDS).contains(&self.seconds)
            || !(0..1_000_000_000).contains(&self.nanos)
        {
            return Err(serde::ser::Error::custom(
                "Timestamp out of protojson's range (years 1 to 9999, nanos 0 to 999999999)",
            ));
        }
        let (days, secs) = (
            self.seconds.div_euclid(86_400),
            self.seconds.rem_euclid(86_400),
        );
        let (y, m, d) = civil_from_days(days);
        let mut text = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let n = self.nanos;
        let _ = match n {
            0 => Ok(()),
            _ if n % 1_000_000 == 0 => write!(text, ".{:03}", n / 1_000_000),
            _ if n % 1_000 == 0 => write!(text, ".{:06}", n / 1_000),
            _ => write!(text, ".{n:09}"),
        };
        text.push('Z');
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let t = pbjson_types::Timestamp::deserialize(deserializer)?;
        Ok(Timestamp {
            seconds: t.seconds,
            nanos: t.nanos,
        })
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, exact for every day in protojson's range).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn requests_are_protojson_and_unknown_fields_are_refused() {
        let r: CreateKeyRequest = serde_json::from_str(
            r#"{"kind":"KEY_KIND_SECRET","name":"n","rateLimit":"10/60s","expireTime":"2030-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        assert_eq!(r.kind(), KeyKind::Secret);
        assert_eq!(r.rate_limit, "10/60s");
        assert_eq!(r.expire_time.unwrap().seconds, 1_893_553_445);

        let e =
            serde_json::from_str::<CreateKeyRequest>(r#"{"kind":"KEY_KIND_SECRET","nmae":"x"}"#)
                .unwrap_err();
        assert!(e.to_string().contains("unknown field `nmae`"), "{e}");
        let e =
            serde_json::from_str::<CreateKeyRequest>(r#"{"kind":"KEY_KIND_NOPE"}"#).unwrap_err();
        assert!(e.to_string().contains("KEY_KIND_NOPE"), "{e}");

        let g: RotateKeyRequest =
            serde_json::from_str(r#"{"id":"key_1","gracePeriod":"3600s"}"#).unwrap();
        assert_eq!(g.grace_period.unwrap().seconds, 3600);
    }

    #[test]
    fn answers_use_lower_camel_case_names_rfc3339_times_and_enum_names() {
        let k = ApiKey {
            id: "key_1".into(),
            kind: KeyKind::Publishable as i32,
            state: KeyState::Active as i32,
            expire_time: Some(Timestamp {
                seconds: 1_893_553_445,
                nanos: 0,
            }),
            allowed_origins: vec!["https://a.example".into()],
            ..Default::default()
        };
        let v = serde_json::to_value(ListKeysResponse {
            keys: vec![k],
            next_page_token: "t".into(),
        })
        .unwrap();
        assert_eq!(v["nextPageToken"], "t");
        assert_eq!(v["keys"][0]["kind"], "KEY_KIND_PUBLISHABLE");
        assert_eq!(v["keys"][0]["state"], "KEY_STATE_ACTIVE");
        assert_eq!(v["keys"][0]["expireTime"], "2030-01-02T03:04:05Z");
        assert_eq!(v["keys"][0]["allowedOrigins"][0], "https://a.example");
    }
}

#[cfg(test)]
mod timestamp_tests {
    use super::*;

    fn json(seconds: i64, nanos: i32) -> String {
        serde_json::to_value(Timestamp { seconds, nanos })
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn parse(text: &str) -> Timestamp {
        serde_json::from_value(serde_json::Value::String(text.into())).unwrap()
    }

    #[test]
    fn answers_are_utc_with_z_and_0_3_6_or_9_fractional_digits() {
        let t = 1_796_292_000; // 2026-12-03T10:00:00Z
        assert_eq!(json(t, 0), "2026-12-03T10:00:00Z");
        assert_eq!(json(t, 500_000_000), "2026-12-03T10:00:00.500Z");
        assert_eq!(json(t, 120_000), "2026-12-03T10:00:00.000120Z");
        assert_eq!(json(t, 7), "2026-12-03T10:00:00.000000007Z");
        assert_eq!(json(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(json(-315_619_200, 0), "1960-01-01T00:00:00Z");
        assert_eq!(json(1_709_164_799, 0), "2024-02-28T23:59:59Z");
        assert_eq!(json(1_709_251_199, 0), "2024-02-29T23:59:59Z");
        assert_eq!(json(MIN_SECONDS, 0), "0001-01-01T00:00:00Z");
        assert_eq!(
            json(MAX_SECONDS, 999_999_999),
            "9999-12-31T23:59:59.999999999Z"
        );
    }

    #[test]
    fn out_of_range_is_an_error_not_a_strange_date() {
        for (s, n) in [
            (MIN_SECONDS - 1, 0),
            (MAX_SECONDS + 1, 0),
            (0, -1),
            (0, 1_000_000_000),
        ] {
            assert!(
                serde_json::to_value(Timestamp {
                    seconds: s,
                    nanos: n
                })
                .is_err(),
                "{s} {n}"
            );
        }
    }

    #[test]
    fn requests_may_use_any_offset_and_answers_normalise_it() {
        let t = parse("2026-12-03T11:30:00.25+01:30");
        assert_eq!((t.seconds, t.nanos), (1_796_292_000, 250_000_000));
        assert_eq!(json(t.seconds, t.nanos), "2026-12-03T10:00:00.250Z");
        assert_eq!(
            parse("2026-12-03T10:00:00Z"),
            parse("2026-12-03T10:00:00+00:00")
        );
        assert!(serde_json::from_str::<Timestamp>(r#""2026-12-03 10:00""#).is_err());
    }

    #[test]
    fn every_day_of_four_centuries_round_trips_through_an_independent_parser() {
        // Day by day across 1900..2300 (leap centuries and not), at a time with nanos: what
        // this module writes, pbjson's (chrono's) RFC 3339 parser reads back to the same instant.
        let start = -2_208_988_800; // 1900-01-01T00:00:00Z
        for day in 0..146_097 {
            let seconds = start + day * 86_400 + (day * 7_919) % 86_400;
            let text = json(seconds, 123_456_000);
            let back = parse(&text);
            assert_eq!((back.seconds, back.nanos), (seconds, 123_456_000), "{text}");
        }
    }
}
