//! JWT header and claims handling: arbitrary tokens (whole, or as header JSON + payload +
//! signature) through `JwtVerifier::verify` against a static in-memory key set, and arbitrary
//! claims signed with that set's own key. No forged token ever verifies; a signed token verifies
//! only when its claims satisfy the contract (issuer, audience, times, subject, tenant claim).
//!
//! Input, one mode per first line: `token` + the token; `parts` + header JSON, payload and
//! signature lines (base64url-encoded here); `claims` + a kid line (`-` for none) + a JSON object
//! merged over valid claims and signed with the real key.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gybc_authz_engine::authn::{JwtVerifier, Provider, TokenError};
use gybc_authz_engine::clock::ManualClock;
use gybc_authz::dev::{SigningKey, firebase_claims};
use gybc_authz_engine::authn::jwks::{Fetched, Jwks, JwksError, JwksTiming, KeySource};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const PROJECT: &str = "gybc-fuzz";
const KID: &str = "fuzz-1";
/// The verifier's clock: fixed, so a run is reproducible.
const NOW: u64 = 1_800_000_000;
const LEEWAY: u64 = 30;

/// The key document, served from memory.
struct Static(String);

impl KeySource for Static {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Fetched, JwksError>> + Send + '_>> {
        let body = self.0.clone().into_bytes();
        Box::pin(async move {
            Ok(Fetched {
                body,
                max_age: None,
            })
        })
    }

    fn name(&self) -> String {
        "fuzz keys".into()
    }
}

struct State {
    rt: tokio::runtime::Runtime,
    key: SigningKey,
    /// Only ever sees tokens the fuzzer made up: none may verify.
    forged: JwtVerifier,
    /// Sees tokens signed with `key`.
    signed: JwtVerifier,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let key = SigningKey::generate(KID).unwrap();
        let timing = JwksTiming {
            // After the first load an unknown kid never waits for a fetch.
            unknown_kid_interval: Duration::from_secs(86_400),
            unknown_kid_wait: Duration::ZERO,
            default_refresh: Duration::from_secs(86_400),
            min_refresh: Duration::from_secs(86_400),
        };
        let jwks = Jwks::new("fuzz", Arc::new(Static(SigningKey::jwks(&[&key]))), timing);
        rt.block_on(jwks.refresh()).expect("the key set loads");
        let verifier = || {
            JwtVerifier::new(
                vec![Provider::new("fuzz", PROJECT, "tenant_id", jwks.clone())],
                Some("fuzz"),
                Arc::new(ManualClock::at_secs(NOW)),
                LEEWAY,
                10_000,
            )
        };
        State {
            forged: verifier(),
            signed: verifier(),
            rt,
            key,
        }
    })
}

enum Input {
    Token(String),
    Parts {
        header: String,
        payload: String,
        signature: String,
    },
    Claims {
        fields: String,
        kid: Option<String>,
    },
}

impl Input {
    fn read(text: &str) -> Option<Self> {
        let (mode, rest) = text.split_once('\n')?;
        match mode {
            "token" => Some(Input::Token(rest.to_owned())),
            "parts" => {
                let mut p = rest.splitn(3, '\n');
                Some(Input::Parts {
                    header: p.next()?.to_owned(),
                    payload: p.next().unwrap_or_default().to_owned(),
                    signature: p.next().unwrap_or_default().to_owned(),
                })
            }
            "claims" => {
                let (kid, fields) = rest.split_once('\n')?;
                Some(Input::Claims {
                    fields: fields.to_owned(),
                    kid: (kid != "-").then(|| kid.to_owned()),
                })
            }
            _ => None,
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn forged(token: &str) {
    let s = state();
    let got = s.rt.block_on(s.forged.verify(0, token));
    assert!(got.is_err(), "a token nobody signed verified: {token:?}");
}

fuzz_target!(|text: &str| {
    let Some(input) = Input::read(text) else {
        return;
    };
    match input {
        Input::Token(token) => forged(&token),
        Input::Parts {
            header,
            payload,
            signature,
        } => forged(&format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(payload.as_bytes()),
            b64(signature.as_bytes())
        )),
        Input::Claims { fields, kid } => {
            let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&fields) else {
                return;
            };
            let mut claims = firebase_claims(PROJECT, "user-1", Some("t1"), NOW, 3600);
            for (k, v) in fields {
                claims[k] = v;
            }
            let s = state();
            let token = s.key.sign_as(kid.as_deref(), &claims);
            match s.rt.block_on(s.signed.verify(0, &token)) {
                Ok(v) => {
                    assert_eq!(kid.as_deref(), Some(KID));
                    assert_eq!(
                        claims["iss"].as_str(),
                        Some(format!("https://securetoken.google.com/{PROJECT}").as_str())
                    );
                    let aud_ok = match &claims["aud"] {
                        Value::String(a) => a == PROJECT,
                        Value::Array(list) => list.iter().any(|a| a == PROJECT),
                        _ => false,
                    };
                    assert!(aud_ok, "aud {:?}", claims["aud"]);
                    let exp = claims["exp"].as_u64().expect("numeric exp");
                    assert_eq!(v.exp, exp);
                    assert!(exp.saturating_add(LEEWAY) > NOW, "expired token verified");
                    for t in ["iat", "nbf", "auth_time"] {
                        if let Some(t) = claims[t].as_u64() {
                            assert!(t <= NOW + LEEWAY, "{t} in the future");
                        }
                    }
                    assert_eq!(claims["sub"].as_str(), Some(v.sub.as_str()));
                    let n = v.sub.chars().count();
                    assert!((1..=128).contains(&n) && !v.sub.contains(char::is_control));
                    match &v.tenant {
                        Some(t) => {
                            assert_eq!(claims["tenant_id"].as_str(), Some(t.as_str()));
                            assert!(!t.is_empty() && !t.contains(char::is_control));
                        }
                        None => assert!(matches!(
                            &claims["tenant_id"],
                            Value::Null | Value::String(_)
                        )),
                    }
                }
                Err(e) => {
                    // The only reasons a correctly signed token can fail.
                    assert_ne!(e, TokenError::Signature, "our own signature failed");
                    assert_ne!(e, TokenError::Algorithm);
                }
            }
        }
    }
});
