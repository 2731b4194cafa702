//! Property tests: arbitrary header maps sent to the real daemon over gRPC. Whatever a client
//! sends, the daemon answers (never panics); an allow carries exactly the identity derived from the
//! credential it verified, never a client's value; a denial carries no upstream headers; and no
//! answer contains a credential. `PROPTEST_CASES=N` runs more cases than the default 256.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use gybc_authz::cli::check::check_request;
use gybc_authz::dev::firebase_claims;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::*;

/// Tokens live for 30 days: the clock moves 61 s per case (so every key has its quota back),
/// and 256 cases must stay well inside that.
const TOKEN_SECS: u64 = 30 * 86_400;
/// Credentials shorter than this are not checked for echoes (a short string can occur by chance).
const MIN_ECHO_CHECK: usize = 16;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        // The daemon's state (caches, quotas) makes a case depend on the ones before it; a
        // persisted seed would not replay it, so none is written.
        failure_persistence: None,
        ..Config::default()
    })
}

/// What a verified token says, for the oracle.
#[derive(Clone)]
struct TokenFacts {
    provider: &'static str,
    sub: String,
    tenant: Option<String>,
    firebase_tenant: Option<String>,
}

/// The credentials the generators draw from, and what each one must yield upstream.
struct Fixtures {
    keys: TestKeys,
    tokens: BTreeMap<String, TokenFacts>,
    /// Tokens that never verify (expired, foreign signer, tampered).
    bad_tokens: Vec<String>,
}

impl Fixtures {
    fn new(env: &TestEnv) -> Self {
        let now = env.now();
        let dash = signing_key("dashboard-1");
        let app = signing_key("app-1");
        let mut tokens = BTreeMap::new();
        let mut add =
            |token: String, provider, sub: &str, tenant: Option<&str>, ip: Option<&str>| {
                tokens.insert(
                    token,
                    TokenFacts {
                        provider,
                        sub: sub.to_owned(),
                        tenant: tenant.map(str::to_owned),
                        firebase_tenant: ip.map(str::to_owned),
                    },
                );
            };
        let claims = |project, sub, tenant| firebase_claims(project, sub, tenant, now, TOKEN_SECS);
        add(
            dash.sign(&claims(PROJECT, "dash_user", Some(TENANT))),
            "dashboard",
            "dash_user",
            Some(TENANT),
            None,
        );
        add(
            dash.sign(&claims(PROJECT, "new_user", None)),
            "dashboard",
            "new_user",
            None,
            None,
        );
        add(
            app.sign(&claims(APP_PROJECT, "end_user", None)),
            "endusers",
            "end_user",
            None,
            None,
        );
        add(
            app.sign(&claims(APP_PROJECT, "end_user_t1", Some(TENANT))),
            "endusers",
            "end_user_t1",
            Some(TENANT),
            None,
        );
        add(
            app.sign(&claims(APP_PROJECT, "end_user_t2", Some(OTHER_TENANT))),
            "endusers",
            "end_user_t2",
            Some(OTHER_TENANT),
            None,
        );
        let mut ip = claims(APP_PROJECT, "ip_user", None);
        ip["firebase"]["tenant"] = IP_TENANT.into();
        add(app.sign(&ip), "endusers", "ip_user", None, Some(IP_TENANT));

        let mut expired = claims(PROJECT, "late_user", Some(TENANT));
        expired["exp"] = (now - 3600).into();
        let good = dash.sign(&claims(PROJECT, "dash_user", Some(OTHER_TENANT)));
        let (head, rest) = good.split_once('.').unwrap();
        let tampered = format!(
            "{head}.{}.{}",
            base64_claims(&claims(PROJECT, "admin", Some(OTHER_TENANT))),
            rest.split_once('.').unwrap().1
        );
        let bad_tokens = vec![
            dash.sign(&expired),
            signing_key("rogue-1").sign_as(Some("dashboard-1"), &claims(PROJECT, "x", None)),
            tampered,
        ];
        Self {
            keys: env.keys.clone(),
            tokens,
            bad_tokens,
        }
    }

    fn all_keys(&self) -> Vec<String> {
        let k = &self.keys;
        vec![
            k.secret.clone(),
            k.impersonator.clone(),
            k.limited.clone(),
            k.revoked.clone(),
            k.expired.clone(),
            k.unknown.clone(),
            k.publishable.clone(),
            k.publishable_ip.clone(),
        ]
    }

    fn all_tokens(&self) -> Vec<String> {
        self.tokens
            .keys()
            .cloned()
            .chain(self.bad_tokens.iter().cloned())
            .collect()
    }

    /// The identity headers an allow must carry for this request, or `None` when no allow is
    /// possible for it at all. Mirrors the decision table, not the code.
    fn expected(&self, req: &Sent) -> Option<BTreeMap<String, String>> {
        let single = |name: &str| match req.values(name).as_slice() {
            [] => Ok(None),
            [v] => Ok(Some(v.clone())),
            _ => Err(()),
        };
        let key = single("x-api-key").ok()?;
        let auth = single("authorization").ok()?;
        let obo = single("x-on-behalf-of").ok()?;
        let token = auth.as_deref().map(bearer_token);
        let facts = |t: &Option<Option<String>>| {
            t.as_ref()
                .and_then(|t| t.as_ref())
                .and_then(|t| self.tokens.get(t))
                .cloned()
        };
        let mut out = BTreeMap::new();
        let mut set = |k: &str, v: &str| {
            out.insert(k.to_owned(), v.to_owned());
        };
        let k = &self.keys;
        // A secret key from a browser (`Origin`, not blank) is refused by default. Only when
        // every `Origin` line is non-blank is that certain: of several lines the engine keeps
        // the last it reads, and a map's order is not the order they were sent in.
        let origins = req.values("origin");
        let from_browser = !origins.is_empty() && origins.iter().all(|o| !o.trim().is_empty());
        if from_browser && key.as_deref().is_some_and(|key| key.starts_with("sk_")) {
            return None;
        }
        match key {
            Some(key) if key == k.secret || key == k.limited => {
                if auth.is_some() || obo.is_some() {
                    return None;
                }
                let (id, scopes) = if key == k.secret {
                    ("key_secret", Some("threads:read"))
                } else {
                    ("key_limited", None)
                };
                set("x-tenant-id", TENANT);
                set("x-auth-method", "api_key");
                set("x-api-key-id", id);
                if let Some(s) = scopes {
                    set("x-scopes", s);
                }
            }
            Some(key) if key == k.impersonator => {
                if auth.is_some() {
                    return None;
                }
                set("x-tenant-id", TENANT);
                set("x-auth-method", "api_key");
                set("x-api-key-id", "key_impersonator");
                set("x-scopes", "threads:read users:impersonate");
                if let Some(user) = &obo {
                    // The contract's rules for the one client-chosen identity value.
                    let n = user.chars().count();
                    if n == 0
                        || n > 128
                        || user
                            .chars()
                            .any(|c| c.is_control() || c.is_whitespace() || c == ',')
                    {
                        return None;
                    }
                    set("x-user-id", user);
                    set("x-impersonated-by", "key_impersonator");
                }
            }
            Some(key) if key == k.publishable || key == k.publishable_ip => {
                let f = facts(&token)?;
                if obo.is_some() || f.provider != "endusers" {
                    return None;
                }
                if f.tenant.as_deref().is_some_and(|t| t != TENANT) {
                    return None;
                }
                let id = if key == k.publishable {
                    "key_app"
                } else {
                    if f.firebase_tenant.as_deref() != Some(IP_TENANT) {
                        return None;
                    }
                    "key_app_ip"
                };
                set("x-tenant-id", TENANT);
                set("x-user-id", &f.sub);
                set("x-auth-method", "publishable_key");
                set("x-api-key-id", id);
            }
            Some(_) => return None,
            None => {
                let f = facts(&token)?;
                if obo.is_some() || f.provider != "dashboard" {
                    return None;
                }
                match &f.tenant {
                    Some(t) => set("x-tenant-id", t),
                    None if req.path_without_query() == ORG_CREATE => {}
                    None => return None,
                }
                set("x-user-id", &f.sub);
                set("x-auth-method", "jwt");
            }
        }
        Some(out)
    }
}

fn base64_claims(v: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// `Bearer <token>` → the token as the daemon reads it (scheme case-insensitive, spaces trimmed).
fn bearer_token(value: &str) -> Option<String> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' ').to_owned())
}

// === requests ===

/// One generated request, as the client sent it.
#[derive(Debug, Clone)]
struct Sent {
    path: String,
    headers: Vec<(String, String)>,
    /// `encode_raw_headers: true` (each line apart) or Envoy's joined map.
    raw: bool,
}

impl Sent {
    /// Every value sent under `name` (any case), as the daemon sees them: a joined map turns
    /// repeated lines of one spelling into one comma-joined value.
    fn values(&self, name: &str) -> Vec<String> {
        let lines = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name));
        if self.raw {
            return lines.map(|(_, v)| v.clone()).collect();
        }
        let mut joined: BTreeMap<&str, String> = BTreeMap::new();
        for (k, v) in lines {
            joined
                .entry(k.as_str())
                .and_modify(|e| {
                    e.push(',');
                    e.push_str(v)
                })
                .or_insert_with(|| v.clone());
        }
        joined.into_values().collect()
    }

    fn path_without_query(&self) -> &str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }

    /// Credential values long enough to be recognised if they were echoed.
    fn secrets(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("authorization") {
                if let Some(t) = bearer_token(v) {
                    out.insert(t);
                }
                out.insert(v.clone());
            } else if k.eq_ignore_ascii_case("x-api-key") {
                out.insert(v.clone());
            }
        }
        out.retain(|s| s.len() >= MIN_ECHO_CHECK);
        out
    }

    fn to_check(&self) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
        let mut req = check_request("POST", &self.path, "api.example.com", &[]);
        let http = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .expect("http attributes");
        if self.raw {
            http.header_map = Some(HeaderMap {
                headers: self
                    .headers
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.clone(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            });
        } else {
            let mut map: HashMap<String, String> = HashMap::new();
            for (k, v) in &self.headers {
                map.entry(k.clone())
                    .and_modify(|e| {
                        e.push(',');
                        e.push_str(v)
                    })
                    .or_insert_with(|| v.clone());
            }
            http.headers = map;
        }
        req
    }
}

/// `name` in one of the spellings a client might use.
fn any_case(name: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(name.to_owned()),
        Just(name.to_ascii_uppercase()),
        Just(
            name.split('-')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join("-")
        ),
    ]
}

/// Header values no credential looks like: printable text, control characters, commas, Unicode.
fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "\\PC{0,24}",
        "[a-zA-Z0-9_\\-\\.=]{16,80}",
        "[\\x00-\\x1f,; ]{0,6}",
    ]
}

/// Requests built from the fixtures' credentials, spoofed identity headers and junk.
fn requests(fx: &Fixtures) -> impl Strategy<Value = Sent> + use<> {
    let tokens = fx.all_tokens();
    let keys = fx.all_keys();
    let authorization = prop_oneof![
        4 => prop::sample::select(tokens.clone()).prop_map(|t| format!("Bearer {t}")),
        1 => prop::sample::select(tokens.clone()).prop_map(|t| format!("bEaReR  {t} ")),
        1 => prop::sample::select(tokens).prop_map(|t| t.to_string()),
        1 => Just("Basic dXNlcjpwYXNzd29yZA==".to_owned()),
        1 => junk().prop_map(|j| format!("Bearer {j}")),
    ];
    let mangled_key = prop::sample::select(keys.clone()).prop_map(|k| {
        let mut b = k.into_bytes();
        let i = b.len() - 1;
        b[i] = if b[i] == b'a' { b'b' } else { b'a' };
        String::from_utf8(b).unwrap()
    });
    let api_key = prop_oneof![
        6 => prop::sample::select(keys),
        1 => mangled_key,
        1 => junk(),
    ];
    let on_behalf_of = prop_oneof![
        4 => Just("user_7".to_owned()),
        1 => Just("ユーザー".to_owned()),
        1 => Just(String::new()),
        1 => Just("a b".to_owned()),
        1 => Just("u".repeat(129)),
        1 => junk(),
    ];
    let origin = prop_oneof![
        Just(APP_ORIGIN.to_owned()),
        Just("https://evil.example".to_owned()),
        junk(),
    ];
    let spoof = prop_oneof![
        Just(TENANT.to_owned()),
        Just(OTHER_TENANT.to_owned()),
        Just("admin".to_owned()),
        Just("key_impersonator".to_owned()),
        Just("api_key".to_owned()),
        junk(),
    ];
    let identity_name = prop::sample::select(IDENTITY_HEADERS.to_vec())
        .prop_flat_map(any_case)
        .boxed();
    let header = prop_oneof![
        4 => (any_case("authorization"), authorization),
        4 => (any_case("x-api-key"), api_key),
        2 => (any_case("x-on-behalf-of"), on_behalf_of),
        1 => (any_case("origin"), origin),
        3 => (identity_name, spoof),
        1 => ("[a-z][a-z0-9\\-]{0,12}", junk()),
        1 => (Just(":path".to_owned()), junk()),
    ];
    let path = prop_oneof![
        4 => Just(API_PATH.to_owned()),
        4 => Just(ORG_CREATE.to_owned()),
        1 => Just(format!("{ORG_CREATE}?next=/x")),
        1 => Just(format!("{ORG_CREATE}/")),
        1 => Just("/api/v1//orgs/create".to_owned()),
        1 => Just("/api/v1/x/../orgs/create".to_owned()),
        1 => Just("/api/v1/orgs%2Fcreate".to_owned()),
        1 => "/[a-z0-9/%\\.]{0,24}",
    ];
    // A coherent credential set (what a real client sends), then extra headers that may break it
    // (a second credential, an impersonation, spoofed identity headers), in any order.
    let k = &fx.keys;
    let token = |sub: &str| {
        fx.tokens
            .iter()
            .find(|(_, f)| f.sub == sub)
            .map(|(t, _)| format!("Bearer {t}"))
            .expect("fixture token")
    };
    let h = |name: &str, value: &str| (name.to_owned(), value.to_owned());
    let coherent = prop::sample::select(vec![
        vec![h("authorization", &token("dash_user"))],
        vec![h("authorization", &token("new_user"))],
        vec![h("x-api-key", &k.secret)],
        vec![h("x-api-key", &k.limited)],
        vec![h("x-api-key", &k.impersonator)],
        vec![
            h("x-api-key", &k.impersonator),
            h("x-on-behalf-of", "user_7"),
        ],
        vec![
            h("x-api-key", &k.publishable),
            h("authorization", &token("end_user")),
            h("origin", APP_ORIGIN),
        ],
        vec![
            h("x-api-key", &k.publishable),
            h("authorization", &token("end_user_t1")),
        ],
        vec![
            h("x-api-key", &k.publishable_ip),
            h("authorization", &token("ip_user")),
        ],
        // Near misses: each differs from an allowed set by one rule.
        vec![
            h("x-api-key", &k.publishable),
            h("authorization", &token("end_user_t2")),
        ],
        vec![
            h("x-api-key", &k.publishable_ip),
            h("authorization", &token("end_user")),
        ],
        vec![
            h("x-api-key", &k.publishable),
            h("authorization", &token("dash_user")),
        ],
        vec![h("authorization", &token("end_user_t1"))],
        vec![h("x-api-key", &k.secret), h("x-on-behalf-of", "user_7")],
        vec![
            h("authorization", &token("dash_user")),
            h("x-on-behalf-of", "user_7"),
        ],
        vec![h("x-api-key", &k.revoked)],
        vec![h("x-api-key", &k.expired)],
        vec![h("x-api-key", &k.unknown)],
        vec![],
    ]);
    let headers = (coherent, prop::collection::vec(header, 0..4))
        .prop_map(|(mut base, extra)| {
            base.extend(extra);
            base
        })
        .prop_shuffle();
    (path, headers, any::<bool>()).prop_map(|(path, headers, raw)| Sent { path, headers, raw })
}

// === checking answers ===

fn to_map(h: &[HeaderValueOption]) -> BTreeMap<String, String> {
    h.iter()
        .filter_map(|o| o.header.as_ref())
        .map(|hv| (hv.key.clone(), hv.value.clone()))
        .collect()
}

/// Headers a denial may carry: none of them goes upstream.
const DENIAL_HEADERS: [&str; 8] = [
    "content-type",
    "www-authenticate",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
];

/// The properties every answer must have, whatever was sent. Returns whether it was an allow.
fn check_answer(
    fx: Option<&Fixtures>,
    sent: &Sent,
    resp: &CheckResponse,
) -> Result<bool, TestCaseError> {
    let code = resp.status.as_ref().map_or(-1, |s| s.code);
    let mut outputs: Vec<String> = resp
        .status
        .iter()
        .flat_map(|s| [s.message.clone()])
        .collect();
    let allowed = match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            prop_assert_eq!(code, 0, "an allow carries status 0");
            let upstream = to_map(&ok.headers);
            for h in ok.headers.iter().chain(&ok.response_headers_to_add) {
                prop_assert_eq!(h.append_action, 2, "overwrite, never append: {:?}", h);
            }
            // Every identity header is set by the daemon or removed; both never.
            for name in IDENTITY_HEADERS {
                let set = upstream.contains_key(name);
                let removed = ok.headers_to_remove.iter().any(|r| r == name);
                prop_assert!(set ^ removed, "{} set={} removed={}", name, set, removed);
            }
            for name in ["x-api-key", "x-on-behalf-of"] {
                prop_assert!(ok.headers_to_remove.iter().any(|r| r == name), "{}", name);
            }
            let names: BTreeSet<&str> = upstream.keys().map(String::as_str).collect();
            prop_assert!(
                names.iter().all(|n| IDENTITY_HEADERS.contains(n)),
                "only identity headers go upstream: {:?}",
                names
            );
            for k in to_map(&ok.response_headers_to_add).keys() {
                prop_assert!(k.contains("ratelimit"), "client header {}", k);
            }
            match fx {
                Some(fx) => {
                    let want = fx.expected(sent);
                    prop_assert!(
                        want.is_some(),
                        "allowed a request no rule allows: {:?} → {:?}",
                        sent,
                        upstream
                    );
                    prop_assert_eq!(
                        &upstream,
                        &want.unwrap(),
                        "upstream identity is exactly the derived one"
                    );
                }
                None => prop_assert!(false, "junk was allowed: {:?} → {:?}", sent, upstream),
            }
            outputs.extend(upstream.into_values());
            outputs.extend(to_map(&ok.response_headers_to_add).into_values());
            true
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            prop_assert_ne!(code, 0, "a denial never carries status 0");
            let headers = to_map(&d.headers);
            for k in headers.keys() {
                prop_assert!(
                    DENIAL_HEADERS.contains(&k.as_str()),
                    "denial header {} (identity headers never ride on a denial)",
                    k
                );
            }
            let body: serde_json::Value = serde_json::from_str(&d.body)
                .map_err(|e| TestCaseError::fail(format!("body is not JSON: {e}")))?;
            let keys: BTreeSet<&str> = body
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            prop_assert_eq!(keys, BTreeSet::from(["code", "message", "reason"]));
            outputs.extend(headers.into_values());
            outputs.push(d.body.clone());
            false
        }
        other => return Err(TestCaseError::fail(format!("no HTTP answer: {other:?}"))),
    };
    for secret in sent.secrets() {
        prop_assert!(
            outputs.iter().all(|o| !o.contains(&secret)),
            "credential echoed in the answer"
        );
    }
    Ok(allowed)
}

// === the properties ===

#[test]
fn decisions_never_panic_never_leak_and_allow_only_the_derived_identity() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(TestEnv::start());
    let fx = Fixtures::new(&env);
    let allows = std::cell::Cell::new(0u32);
    let runs = std::cell::Cell::new(0u32);
    runner()
        .run(&requests(&fx), |sent| {
            // Every key has its quota back: counted requests cannot crowd out allows.
            env.clock.advance(std::time::Duration::from_secs(61));
            let resp = rt
                .block_on(env.client.clone().check(sent.to_check()))
                .map_err(|s| TestCaseError::fail(format!("Check failed as an RPC: {s}")))?
                .into_inner();
            runs.set(runs.get() + 1);
            let allowed = check_answer(Some(&fx), &sent, &resp)?;
            allows.set(allows.get() + allowed as u32);
            Ok(())
        })
        .unwrap();
    // The generator must reach the allow paths, or the identity property proves nothing.
    let (allows, runs) = (allows.get(), runs.get());
    println!("{allows} allows in {runs} cases");
    assert!(allows * 20 >= runs, "only {allows} allows in {runs} cases");
    rt.block_on(env.stop());
}

#[test]
fn arbitrary_header_maps_are_always_a_clean_denial() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(TestEnv::start());
    let name = prop_oneof![
        2 => prop::sample::select(vec![
            "authorization", "Authorization", "x-api-key", "X-API-KEY", "x-on-behalf-of",
            "origin", "x-request-id", "x-tenant-id", "X-User-Id", ":path", "",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,16}",
    ];
    let value = prop_oneof![
        junk(),
        "sk_[0-9A-Za-z]{20,60}",
        "pk_[0-9A-Za-z]{20,60}",
        "Bearer [A-Za-z0-9_\\-]{1,40}\\.[A-Za-z0-9_\\-]{1,80}\\.[A-Za-z0-9_\\-]{0,40}",
    ];
    let strategy = (
        "\\PC{0,32}",
        prop::collection::vec((name, value), 0..12),
        any::<bool>(),
    )
        .prop_map(|(path, headers, raw)| Sent { path, headers, raw });
    runner()
        .run(&strategy, |sent| {
            let resp = rt
                .block_on(env.client.clone().check(sent.to_check()))
                .map_err(|s| TestCaseError::fail(format!("Check failed as an RPC: {s}")))?
                .into_inner();
            check_answer(None, &sent, &resp)?;
            Ok(())
        })
        .unwrap();
    rt.block_on(env.stop());
}
