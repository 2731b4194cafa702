//! Which credential a request presents, and the rules that refuse a request before any lookup:
//! duplicated headers, a secret key together with a token, a malformed `X-On-Behalf-Of`,
//! `Authorization` that is not `Bearer`, an API key of the wrong shape.

use crate::authn::apikey::{ApiKey, KeyKind};
use crate::decision::{Denial, Reason};
use crate::policy::impersonation;
use crate::request::{HeaderField, RequestContext};

/// What the request authenticates with. Borrowed from the request: nothing is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials<'a> {
    None,
    /// `Authorization: Bearer <token>` alone.
    Bearer {
        token: &'a str,
        on_behalf_of: Option<&'a str>,
    },
    /// `X-API-Key: sk_…`.
    SecretKey {
        key: ApiKey<'a>,
        on_behalf_of: Option<&'a str>,
    },
    /// `X-API-Key: pk_…`, with the user's token if any (`Err` when `Authorization` is not Bearer).
    PublishableKey {
        key: ApiKey<'a>,
        user_token: Option<Result<&'a str, Denial>>,
        on_behalf_of: Option<&'a str>,
    },
}

/// Reads the credentials, applying every rule that needs no lookup.
pub fn extract(req: &RequestContext) -> Result<Credentials<'_>, Denial> {
    // Headers past `limits.max_headers` were never read: a credential among them would be judged
    // on part of the request, so none is judged at all.
    if req.too_many_headers {
        return Err(Denial::because(
            Reason::MalformedCredentials,
            "too_many_headers",
        ));
    }
    if matches!(req.authorization, HeaderField::Duplicated)
        || matches!(req.api_key, HeaderField::Duplicated)
    {
        return Err(Denial::new(Reason::MalformedCredentials));
    }
    if matches!(req.on_behalf_of, HeaderField::Duplicated) {
        return Err(Denial::because(Reason::InvalidOnBehalfOf, "duplicated"));
    }
    // A secret key is a complete credential; a token beside it leaves the caller's identity in doubt.
    let is_secret = req.api_key.value().is_some_and(|k| k.starts_with("sk_"));
    if is_secret && !req.authorization.is_absent() {
        return Err(Denial::new(Reason::AmbiguousCredentials));
    }
    let on_behalf_of = match &req.on_behalf_of {
        HeaderField::Absent => None,
        HeaderField::Present(v) => Some(impersonation::check_header(v)?),
        HeaderField::TooLarge | HeaderField::Duplicated => {
            return Err(Denial::because(Reason::InvalidOnBehalfOf, "too_long"));
        }
    };

    match &req.api_key {
        HeaderField::Absent => {}
        HeaderField::TooLarge => return Err(Denial::because(Reason::InvalidApiKey, "too_large")),
        HeaderField::Duplicated => unreachable!("handled above"),
        HeaderField::Present(text) => {
            let key = ApiKey::parse(text)
                .map_err(|_| Denial::because(Reason::InvalidApiKey, "format"))?;
            return Ok(match key.kind() {
                KeyKind::Secret => Credentials::SecretKey { key, on_behalf_of },
                KeyKind::Publishable => Credentials::PublishableKey {
                    key,
                    user_token: match &req.authorization {
                        HeaderField::Absent => None,
                        other => Some(bearer(other)),
                    },
                    on_behalf_of,
                },
            });
        }
    }

    match &req.authorization {
        HeaderField::Absent => Ok(Credentials::None),
        other => Ok(Credentials::Bearer {
            token: bearer(other)?,
            on_behalf_of,
        }),
    }
}

/// `Bearer <token>`: scheme case-insensitive (RFC 7235), one token of JWT characters after it.
/// Whether `b` is a byte a compact JWS may contain: base64url, the `.` separators, and `=`
/// padding that some encoders add. Comparisons, not a table: over a whole token the compiler
/// tests 16 bytes at a time with them (a table is one load per byte).
#[inline(always)]
fn is_jwt_char(b: u8) -> bool {
    // `| 0x20` folds A–Z onto a–z and sends no other byte there.
    let letter = (b | 0x20).wrapping_sub(b'a') < 26;
    let digit = b.wrapping_sub(b'0') < 10;
    letter | digit | (b == b'-') | (b == b'_') | (b == b'.') | (b == b'=')
}

fn bearer(field: &HeaderField) -> Result<&str, Denial> {
    let value = match field {
        HeaderField::Present(v) => v.as_str(),
        HeaderField::TooLarge => return Err(Denial::because(Reason::InvalidToken, "too_large")),
        _ => return Err(Denial::because(Reason::InvalidToken, "malformed")),
    };
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(Denial::because(Reason::InvalidToken, "not_bearer"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denial::because(Reason::InvalidToken, "not_bearer"));
    }
    let token = token.trim_matches(' ');
    // This runs over every byte of a ~1 kB token per Check: without an early exit, so the loop
    // has no branch per byte and is vectorised (a bad token costs the same).
    if token.is_empty() || !token.bytes().fold(true, |ok, b| ok & is_jwt_char(b)) {
        return Err(Denial::because(Reason::InvalidToken, "malformed"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>, key: Option<&str>, obo: Option<&str>) -> RequestContext {
        let f = |v: Option<&str>| v.map_or(HeaderField::Absent, |v| HeaderField::Present(v.into()));
        RequestContext {
            authorization: f(auth),
            api_key: f(key),
            on_behalf_of: f(obo),
            ..Default::default()
        }
    }

    fn reason(r: Result<Credentials<'_>, Denial>) -> Reason {
        r.unwrap_err().reason
    }

    #[test]
    fn jwt_characters_are_base64url_dot_and_padding() {
        for b in 0..=u8::MAX {
            let c = b as char;
            let expected = c.is_ascii_alphanumeric() || "-_.=".contains(c);
            assert_eq!(is_jwt_char(b), expected, "{b:#04x}");
        }
    }

    #[test]
    fn table() {
        let sk = ApiKey::generate(KeyKind::Secret);
        let pk = ApiKey::generate(KeyKind::Publishable);
        let sk = sk.as_str();
        let pk = pk.as_str();
        let denied: &[(&str, RequestContext, Reason)] = &[
            (
                "sk and bearer",
                req(Some("Bearer a.b.c"), Some(sk), None),
                Reason::AmbiguousCredentials,
            ),
            (
                "sk and basic",
                req(Some("Basic dTpw"), Some(sk), None),
                Reason::AmbiguousCredentials,
            ),
            (
                "basic auth",
                req(Some("Basic dTpw"), None, None),
                Reason::InvalidToken,
            ),
            (
                "bearer without token",
                req(Some("Bearer "), None, None),
                Reason::InvalidToken,
            ),
            (
                "bare token",
                req(Some("a.b.c"), None, None),
                Reason::InvalidToken,
            ),
            (
                "bearer junk",
                req(Some("Bearer a b"), None, None),
                Reason::InvalidToken,
            ),
            (
                "other prefix",
                req(None, Some("ak_123456789012345678901234567890"), None),
                Reason::InvalidApiKey,
            ),
            (
                "short key",
                req(None, Some("sk_abc"), None),
                Reason::InvalidApiKey,
            ),
            (
                "empty key",
                req(None, Some(""), None),
                Reason::InvalidApiKey,
            ),
            (
                "obo with comma",
                req(None, Some(sk), Some("a,b")),
                Reason::InvalidOnBehalfOf,
            ),
            (
                "obo empty",
                req(Some("Bearer a.b.c"), None, Some("")),
                Reason::InvalidOnBehalfOf,
            ),
        ];
        for (name, r, want) in denied {
            assert_eq!(reason(extract(r)), *want, "{name}");
        }

        assert_eq!(extract(&req(None, None, None)).unwrap(), Credentials::None);
        assert!(matches!(
            extract(&req(Some("bearer a.b.c"), None, Some("u1"))).unwrap(),
            Credentials::Bearer {
                token: "a.b.c",
                on_behalf_of: Some("u1")
            }
        ));
        assert!(matches!(
            extract(&req(None, Some(sk), Some("u1"))).unwrap(),
            Credentials::SecretKey { .. }
        ));
        match extract(&req(Some("Bearer a.b.c"), Some(pk), None)).unwrap() {
            Credentials::PublishableKey {
                user_token: Some(Ok("a.b.c")),
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        match extract(&req(Some("Basic x"), Some(pk), None)).unwrap() {
            Credentials::PublishableKey {
                user_token: Some(Err(d)),
                ..
            } => assert_eq!(d.reason, Reason::InvalidToken),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            extract(&req(None, Some(pk), None)).unwrap(),
            Credentials::PublishableKey {
                user_token: None,
                ..
            }
        ));
    }

    #[test]
    fn duplicates_and_oversized_headers() {
        let mut r = req(None, None, None);
        r.api_key = HeaderField::Duplicated;
        assert_eq!(reason(extract(&r)), Reason::MalformedCredentials);
        let mut r = req(None, None, None);
        r.authorization = HeaderField::Duplicated;
        assert_eq!(reason(extract(&r)), Reason::MalformedCredentials);
        let mut r = req(None, None, None);
        r.authorization = HeaderField::TooLarge;
        assert_eq!(reason(extract(&r)), Reason::InvalidToken);
        let mut r = req(None, None, None);
        r.api_key = HeaderField::TooLarge;
        assert_eq!(reason(extract(&r)), Reason::InvalidApiKey);
        // Too many headers: refused whatever credential was read before the cap.
        let sk = ApiKey::generate(KeyKind::Secret);
        let mut r = req(None, Some(&sk), None);
        r.too_many_headers = true;
        let d = extract(&r).unwrap_err();
        assert_eq!(
            (d.reason, d.detail),
            (Reason::MalformedCredentials, Some("too_many_headers"))
        );
    }
}
