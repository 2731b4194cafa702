//! The key service's messages (proto/gybc/authz/v1/key_service.proto), compiled at build time,
//! with their protojson (pbjson) serde impls.

#![allow(clippy::all)]

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/gybc.authz.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/gybc.authz.v1.serde.rs"));
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
            expire_time: Some(pbjson_types::Timestamp {
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
        assert_eq!(v["keys"][0]["expireTime"], "2030-01-02T03:04:05+00:00");
        assert_eq!(v["keys"][0]["allowedOrigins"][0], "https://a.example");
    }
}
