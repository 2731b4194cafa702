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
/// The bytes a compact JWS may contain: base64url, the `.` separators, and `=` padding that some
/// encoders add.
static JWT_CHARS: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.' || c == b'=';
        b += 1;
    }
    t
};

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
    // A table, not a chain of comparisons: this runs over every byte of a ~1 kB token per Check.
    // Without an early exit, so the loop has no branch per byte (a bad token costs the same).
    if token.is_empty() || !token.bytes().fold(true, |ok, b| ok & JWT_CHARS[b as usize]) {
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
