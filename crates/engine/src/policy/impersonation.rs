//! `X-On-Behalf-Of`: only a secret key holding `users:impersonate` may name another user, and the
//! name must be a plain user id.

use crate::decision::{AuthMethod, Denial, Reason};
use crate::request::MAX_ON_BEHALF_OF_CHARS;

/// The scope that lets a secret key act for a user.
pub const IMPERSONATE_SCOPE: &str = "users:impersonate";

/// The header value's own rules: 1..=128 characters; no control characters, spaces or commas.
pub fn check_header(value: &str) -> Result<&str, Denial> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err(Denial::because(Reason::InvalidOnBehalfOf, "empty"));
    }
    if chars > MAX_ON_BEHALF_OF_CHARS {
        return Err(Denial::because(Reason::InvalidOnBehalfOf, "too_long"));
    }
    if value
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ',')
    {
        return Err(Denial::because(Reason::InvalidOnBehalfOf, "characters"));
    }
    Ok(value)
}

/// Whether this caller may act for `on_behalf_of`; `Ok(Some(user))` when it does.
pub fn authorize<'a>(
    method: AuthMethod,
    scopes: &[String],
    on_behalf_of: Option<&'a str>,
) -> Result<Option<&'a str>, Denial> {
    let Some(user) = on_behalf_of else {
        return Ok(None);
    };
    match method {
        AuthMethod::ApiKey if scopes.iter().any(|s| s == IMPERSONATE_SCOPE) => Ok(Some(user)),
        AuthMethod::ApiKey => Err(Denial::because(Reason::ImpersonationNotAllowed, "scope")),
        AuthMethod::Jwt | AuthMethod::PublishableKey => {
            Err(Denial::because(Reason::ImpersonationNotAllowed, "method"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values() {
        let long = "u".repeat(129);
        let max = "u".repeat(128);
        let cases: &[(&str, bool)] = &[
            ("user_123", true),
            ("ユーザー", true),
            (&max, true),
            ("", false),
            (&long, false),
            ("a b", false),
            ("a,b", false),
            ("a\tb", false),
            ("a\u{0}b", false),
            ("a\u{7f}", false),
            ("a\u{a0}b", false),
        ];
        for (v, ok) in cases {
            let got = check_header(v);
            assert_eq!(got.is_ok(), *ok, "{v:?}");
            if let Err(d) = got {
                assert_eq!(d.reason, Reason::InvalidOnBehalfOf);
            }
        }
    }

    #[test]
    fn who_may_impersonate() {
        let with = vec![IMPERSONATE_SCOPE.to_owned()];
        let without = vec!["threads:read".to_owned()];
        type Case<'a> = (
            AuthMethod,
            &'a [String],
            Option<&'a str>,
            Result<Option<&'a str>, Reason>,
        );
        let cases: &[Case] = &[
            (AuthMethod::ApiKey, &with, Some("u1"), Ok(Some("u1"))),
            (AuthMethod::ApiKey, &with, None, Ok(None)),
            (
                AuthMethod::ApiKey,
                &without,
                Some("u1"),
                Err(Reason::ImpersonationNotAllowed),
            ),
            (AuthMethod::ApiKey, &without, None, Ok(None)),
            (
                AuthMethod::Jwt,
                &with,
                Some("u1"),
                Err(Reason::ImpersonationNotAllowed),
            ),
            (
                AuthMethod::PublishableKey,
                &with,
                Some("u1"),
                Err(Reason::ImpersonationNotAllowed),
            ),
            (AuthMethod::Jwt, &[], None, Ok(None)),
        ];
        for (method, scopes, obo, want) in cases {
            let got = authorize(*method, scopes, *obo).map_err(|d| d.reason);
            assert_eq!(&got, want, "{method:?} {scopes:?} {obo:?}");
        }
    }
}
