//! API key format parsing: `ApiKey::parse` on arbitrary text, and `KeyHash::parse`. A key that
//! parses has the documented shape, and every single-character change to it is caught by the
//! checksum before any lookup.
#![no_main]

use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Some(h) = KeyHash::parse(text) {
        assert_eq!(KeyHash::parse(&h.to_hex()), Some(h));
    }
    let Ok(key) = ApiKey::parse(text) else {
        return;
    };
    let prefix = match key.kind() {
        KeyKind::Secret => "sk_",
        KeyKind::Publishable => "pk_",
    };
    assert!(text.starts_with(prefix));
    let rest = &text[3..];
    assert!(
        (28..=106).contains(&rest.len()),
        "22-100 body + 6 checksum characters"
    );
    assert!(rest.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(key.expose(), text);
    assert_eq!(key.hash(), KeyHash::of(text));
    // Debug never shows the secret.
    assert!(!format!("{key:?}").contains(rest));

    // A one-character typo anywhere after the prefix never parses (CRC32 catches every error of
    // up to 32 bits).
    let bytes = text.as_bytes();
    for i in 3..bytes.len() {
        let mut typo = bytes.to_vec();
        typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
        let typo = std::str::from_utf8(&typo).expect("ASCII");
        assert!(ApiKey::parse(typo).is_err(), "typo at {i} accepted");
    }
});
