//! Requests: Check requests shaped like Envoy's, one kind per credential, and the outcome each must get.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Secret,
    Jwt,
    Publishable,
    UniqueJwt,
    Unknown,
    KeySet,
    BadToken,
    OverLimit,
    /// A JWT signed for this request alone (the soak's endless supply of unique tokens).
    FreshJwt,
}

impl Kind {
    pub(crate) fn parse(s: &str) -> Res<Self> {
        Ok(match s {
            "sk" => Kind::Secret,
            "jwt" => Kind::Jwt,
            "pk" => Kind::Publishable,
            "jwt-unique" => Kind::UniqueJwt,
            "unknown" => Kind::Unknown,
            "keyset" => Kind::KeySet,
            "bad-token" => Kind::BadToken,
            "over-limit" => Kind::OverLimit,
            "jwt-fresh" => Kind::FreshJwt,
            other => return Err(format!("unknown request kind `{other}`").into()),
        })
    }

    /// HTTP status the answer should carry (200: allowed).
    pub(crate) fn expected(self) -> u32 {
        match self {
            Kind::Unknown | Kind::BadToken => 401,
            Kind::OverLimit => 429,
            _ => 200,
        }
    }
}

pub(crate) fn parse_mix(spec: &str) -> Res<Vec<(Kind, u32)>> {
    spec.split(',')
        .filter(|s| !s.is_empty())
        .map(|part| {
            let (k, w) = part.split_once(':').unwrap_or((part, "1"));
            Ok((Kind::parse(k.trim())?, w.trim().parse()?))
        })
        .collect()
}

/// A CheckRequest shaped like Envoy's: peers, the usual headers, then the credential headers.
pub(crate) fn envoy_like_request(extra: &[(&str, &str)]) -> CheckRequest {
    let peer = |port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let mut headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", API_PATH),
        (":scheme", "http"),
        ("user-agent", "loadgen/1"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5d1f3c1e-9b0a-4a52-8e4e-2f8f3d4c9a10"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in extra {
        headers.insert((*k).to_owned(), (*v).to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(40_000)),
            destination: Some(peer(10_000)),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "13863245011370523000".into(),
                    method: "POST".into(),
                    headers,
                    path: API_PATH.into(),
                    host: "api.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub(crate) fn set_header(req: &mut CheckRequest, name: &str, value: String) {
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.headers.insert(name.to_owned(), value);
    }
}

/// Builds each request of a run; shared by all workers.
pub(crate) struct RequestFactory {
    pub(crate) fx: Fixtures,
    pub(crate) secret: CheckRequest,
    pub(crate) limited: CheckRequest,
    pub(crate) bad_token: CheckRequest,
    pub(crate) jwt: Vec<CheckRequest>,
    pub(crate) publishable: Vec<CheckRequest>,
    pub(crate) base: CheckRequest,
    pub(crate) unique_next: AtomicUsize,
    pub(crate) sequential_next: AtomicU64,
    pub(crate) keyset: u64,
    pub(crate) sequential: bool,
    /// Signs `jwt-fresh` tokens.
    pub(crate) signing: Option<Arc<SigningKey>>,
    pub(crate) fresh_next: AtomicU64,
}

impl RequestFactory {
    pub(crate) fn new(fx: Fixtures, keyset: u64, sequential: bool) -> Self {
        let bearer = |t: &str| format!("Bearer {t}");
        Self {
            secret: envoy_like_request(&[("x-api-key", &fx.secret_key)]),
            limited: envoy_like_request(&[("x-api-key", &fx.limited_key)]),
            bad_token: envoy_like_request(&[("authorization", &bearer(&fx.bad_token))]),
            jwt: fx
                .tokens
                .iter()
                .map(|t| envoy_like_request(&[("authorization", &bearer(t))]))
                .collect(),
            publishable: fx
                .tokens
                .iter()
                .map(|t| {
                    envoy_like_request(&[
                        ("authorization", &bearer(t)),
                        ("x-api-key", &fx.publishable_key),
                    ])
                })
                .collect(),
            base: envoy_like_request(&[]),
            unique_next: AtomicUsize::new(0),
            sequential_next: AtomicU64::new(0),
            keyset: keyset.max(1),
            sequential,
            signing: None,
            fresh_next: AtomicU64::new(0),
            fx,
        }
    }

    pub(crate) fn with_signing(mut self, key: Arc<SigningKey>) -> Self {
        self.signing = Some(key);
        self
    }

    /// The next request of `kind`; `None` once the unique tokens are used up.
    pub(crate) fn make(&self, kind: Kind, rng: &mut u64) -> Option<CheckRequest> {
        Some(match kind {
            Kind::Secret => self.secret.clone(),
            Kind::OverLimit => self.limited.clone(),
            Kind::BadToken => self.bad_token.clone(),
            Kind::Jwt => self.jwt[(splitmix(rng) % self.jwt.len() as u64) as usize].clone(),
            Kind::Publishable => {
                self.publishable[(splitmix(rng) % self.publishable.len() as u64) as usize].clone()
            }
            Kind::UniqueJwt => {
                let i = self.unique_next.fetch_add(1, Ordering::Relaxed);
                let token = self.fx.unique_tokens.get(i)?;
                let mut r = self.base.clone();
                set_header(&mut r, "authorization", format!("Bearer {token}"));
                r
            }
            Kind::Unknown => {
                let mut r = self.base.clone();
                set_header(&mut r, "x-api-key", keyset_key(splitmix(rng), 0));
                r
            }
            Kind::FreshJwt => {
                let i = self.fresh_next.fetch_add(1, Ordering::Relaxed);
                let token = self.signing.as_ref()?.sign(&firebase_claims(
                    PROJECT,
                    &format!("fresh-{i}-{}", splitmix(rng)),
                    Some(TENANT),
                    now_secs(),
                    3600,
                ));
                let mut r = self.base.clone();
                set_header(&mut r, "authorization", format!("Bearer {token}"));
                r
            }
            Kind::KeySet => {
                let i = if self.sequential {
                    self.sequential_next.fetch_add(1, Ordering::Relaxed) % self.keyset
                } else {
                    splitmix(rng) % self.keyset
                };
                let mut r = self.base.clone();
                set_header(&mut r, "x-api-key", keyset_key(self.fx.key_seed, i));
                r
            }
        })
    }
}

/// HTTP status of an answer as Envoy would send it (200 for an allow).
pub(crate) fn answer_status(resp: &CheckResponse) -> u32 {
    if resp.status.as_ref().is_none_or(|s| s.code == 0) {
        return 200;
    }
    match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(403, |s| s.code as u32),
        _ => 403,
    }
}
