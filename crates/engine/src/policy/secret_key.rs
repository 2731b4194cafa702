//! A secret (`sk_`) key sent by a browser. Browsers put `Origin` on every cross-origin request
//! (and on same-origin ones other than GET and HEAD), and a page cannot remove it; server-side
//! clients send none. A secret key that arrives with one was shipped in a web page, where
//! anyone who opens the page can read it: a leaked secret. `policy.secret_key_from_browser`
//! says whether it is refused (the default) or let through; either way it is counted.

use crate::config::SecretKeyFromBrowser;
use crate::decision::{Denial, Reason};

/// Whether a request with this `Origin` came from a browser: any non-blank value, the opaque
/// `null` of sandboxed frames and `file:` pages included. A blank one is treated as absent, as
/// Envoy's CORS filter does.
pub fn from_browser(origin: Option<&str>) -> bool {
    origin.is_some_and(|o| !o.trim().is_empty())
}

/// The rule for a known secret key: `None` when the request is not a browser's (the rule does
/// not apply and nothing is counted); otherwise the policy's verdict, `Err` when it refuses.
pub fn judge(origin: Option<&str>, policy: SecretKeyFromBrowser) -> Option<Result<(), Denial>> {
    if !from_browser(origin) {
        return None;
    }
    Some(match policy {
        SecretKeyFromBrowser::Deny => Err(Denial::new(Reason::SecretKeyInBrowser)),
        SecretKeyFromBrowser::Allow => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use SecretKeyFromBrowser::{Allow, Deny};

    #[test]
    fn table() {
        // (Origin, policy, verdict): None = not a browser, Some(true) = let through,
        // Some(false) = refused with secret_key_in_browser.
        let cases: &[(Option<&str>, SecretKeyFromBrowser, Option<bool>)] = &[
            (None, Deny, None),
            (None, Allow, None),
            (Some(""), Deny, None),
            (Some("  "), Deny, None),
            (Some("https://app.example.com"), Deny, Some(false)),
            (Some("https://app.example.com"), Allow, Some(true)),
            (Some("http://localhost:3000"), Deny, Some(false)),
            // Sandboxed iframes and file: pages send the opaque origin.
            (Some("null"), Deny, Some(false)),
            (Some("null"), Allow, Some(true)),
            // Whatever the value, a browser sent it: the shape is Envoy's CORS filter's concern.
            (Some("https://a.example/path"), Deny, Some(false)),
        ];
        for (origin, policy, want) in cases {
            let got = judge(*origin, *policy);
            assert_eq!(
                got.as_ref().map(Result::is_ok),
                *want,
                "{origin:?} {policy:?}"
            );
            if let Some(Err(d)) = got {
                assert_eq!(d.reason, Reason::SecretKeyInBrowser);
                assert_eq!(d.reason.http_status(), 403);
            }
        }
    }
}
