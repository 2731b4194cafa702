//! Key record parsers: the key file (YAML or JSON, `KeyFile` + `parse_entries`) and the protobuf
//! record the platform's key service writes to Redis (`decode_record`). Accepted records hold the
//! invariants the decision relies on, and survive a round trip through the Redis format.
//!
//! Input: `R` + the 32-byte key hash + a protobuf `KeyRecord`; anything else is key-file text.
#![no_main]

use gybc_authz_engine::authn::apikey::KeyHash;
use gybc_authz_engine::store::redis::{decode_record, encode_record};
use gybc_authz_engine::store::{KeyFile, KeyRecord, parse_entries};
use libfuzzer_sys::fuzz_target;

/// proto3 has no "absent" string: an empty optional string reads back as absent.
fn normalised(mut r: KeyRecord) -> KeyRecord {
    for field in [
        &mut r.name,
        &mut r.jwt_provider,
        &mut r.identity_platform_tenant,
    ] {
        if field.as_deref() == Some("") {
            *field = None;
        }
    }
    r
}

fn usable_fields(r: &KeyRecord) {
    assert!(!r.id.is_empty());
    assert!(!r.tenant.is_empty() && !r.tenant.contains(char::is_control));
    if let Some(l) = r.rate_limit {
        assert!(l.requests > 0 && !l.window.is_zero());
    }
}

fuzz_target!(|data: &[u8]| match data {
    [b'R', rest @ ..] if rest.len() >= 32 => {
        let hash = KeyHash(rest[..32].try_into().expect("32 bytes"));
        let Ok(r) = decode_record(&rest[32..], &hash) else {
            return;
        };
        assert_eq!(r.hash, hash);
        usable_fields(&r);
        assert_eq!(decode_record(&encode_record(&r), &hash), Ok(r));
    }
    _ => {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(file) = serde_yaml_ng::from_str::<KeyFile>(text) else {
            return;
        };
        let Ok(records) = parse_entries(&file.keys) else {
            return;
        };
        let mut ids = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for r in records {
            assert!(ids.insert(r.id.clone()), "duplicate id accepted");
            assert!(hashes.insert(r.hash), "duplicate hash accepted");
            usable_fields(&r);
            let back = decode_record(&encode_record(&r), &r.hash).expect("own encoding decodes");
            assert_eq!(back, normalised(r));
        }
    }
});
