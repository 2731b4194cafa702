//! The key service's door: `POST <prefix>/<method>` with a protojson body → the caller from the
//! identity headers → the method's checks and the shared key change → a protojson answer, or an
//! error `{code, reason, message, field}`; one audit line per change. The method table is
//! `Method`: a new method is a variant, its name, and its arm in `dispatch`.
//!
//! Every request goes through one handler (`entry`), so that every refusal is that JSON error,
//! whoever makes it: an unknown path (404), another HTTP method (405 with `Allow`), another
//! content type (415), a body over `key_service.max_body_bytes` (413, counted as it arrives), a
//! caller over its rate limit (429 with `Retry-After`), a request over
//! `key_service.request_timeout_ms` (504), a panic (500). No router, extractor or layer of
//! axum's answers on its own.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, StreamExt};
use gybc_authz_engine::authn::apikey::KeyKind;
use gybc_authz_engine::browser::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use gybc_authz_engine::store::KeyRecord;
use gybc_authz_engine::store::admin::{self, AdminError, Idempotency, KeyUsage, Minted, Scope};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::Service;
use super::audit::{self, Outcome};
use super::caller::{self, Caller, Identity, Refusal};
use super::metrics::UNKNOWN_METHOD;
use super::proto::v1 as pb;
use super::validate::{self, Invalid};

/// The API's methods, by their path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    CreateKey,
    ListKeys,
    GetKey,
    UpdateKey,
    RotateKey,
    RevokeKey,
    GetKeyUsage,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::CreateKey,
        Method::ListKeys,
        Method::GetKey,
        Method::UpdateKey,
        Method::RotateKey,
        Method::RevokeKey,
        Method::GetKeyUsage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::CreateKey => "create-key",
            Method::ListKeys => "list-keys",
            Method::GetKey => "get-key",
            Method::UpdateKey => "update-key",
            Method::RotateKey => "rotate-key",
            Method::RevokeKey => "revoke-key",
            Method::GetKeyUsage => "get-key-usage",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The method a path names: `<prefix>/<method>`, nothing after it.
    fn of_path(prefix: &str, path: &str) -> Option<Self> {
        path.strip_prefix(prefix.trim_end_matches('/'))?
            .strip_prefix('/')
            .and_then(Self::parse)
    }

    /// A change gets an audit line; a read does not.
    fn audited(self) -> Option<&'static str> {
        match self {
            Method::CreateKey => Some("create"),
            Method::UpdateKey => Some("update"),
            Method::RotateKey => Some("rotate"),
            Method::RevokeKey => Some("revoke"),
            Method::ListKeys | Method::GetKey | Method::GetKeyUsage => None,
        }
    }
}

/// Why a request failed, as the caller sees it.
#[derive(Debug)]
pub enum ApiError {
    Refused(Refusal),
    Invalid(Invalid),
    NotFound,
    UnknownMethod,
    /// Not `POST`.
    MethodNotAllowed,
    /// A body that is not `application/json`.
    UnsupportedMediaType,
    /// A body over `key_service.max_body_bytes`.
    BodyTooLarge(usize),
    /// The body could not be read (the client went away mid-body).
    BodyUnreadable,
    /// A change the key's state does not allow (a revoked key cannot be rotated or updated).
    Precondition(String),
    /// The tenant holds the most active keys it may.
    KeyLimit(u32),
    /// The caller is over `key_service.caller_rate_limit`: retry after this many seconds.
    RateLimited(u64),
    Conflict(String),
    IdempotencyMismatch,
    /// A read this store cannot answer (usage needs Redis).
    Unimplemented(String),
    /// The key store failed: `unavailable` (not reached, or too slow) or `write` (refused it).
    Unavailable(&'static str),
    /// Not answered within `key_service.request_timeout_ms`.
    Timeout,
    Internal,
}

/// What an error answer says: its status, code, reason, message and the field it names.
struct Parts {
    status: StatusCode,
    code: &'static str,
    reason: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn outcome(&self) -> Outcome {
        match self {
            ApiError::Refused(_) | ApiError::Invalid(Invalid::Escalation { .. }) => {
                Outcome::Forbidden
            }
            ApiError::Invalid(_)
            | ApiError::Precondition(_)
            | ApiError::KeyLimit(_)
            | ApiError::MethodNotAllowed
            | ApiError::UnsupportedMediaType
            | ApiError::BodyTooLarge(_)
            | ApiError::BodyUnreadable => Outcome::Invalid,
            ApiError::RateLimited(_) => Outcome::Limited,
            ApiError::NotFound | ApiError::UnknownMethod => Outcome::NotFound,
            ApiError::Conflict(_) | ApiError::IdempotencyMismatch => Outcome::Conflict,
            ApiError::Unavailable(_)
            | ApiError::Timeout
            | ApiError::Internal
            | ApiError::Unimplemented(_) => Outcome::Error,
        }
    }

    /// The `code` of the answer, also the `outcome` label of the request's metrics.
    pub fn code(&self) -> &'static str {
        self.parts().code
    }

    fn parts(&self) -> Parts {
        let p = |status, code, reason, message: &str| Parts {
            status,
            code,
            reason,
            message: message.to_owned(),
            field: None,
        };
        match self {
            ApiError::Refused(r) => Parts {
                status: StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN),
                code: if r.status() == 401 {
                    "unauthenticated"
                } else {
                    "permission_denied"
                },
                reason: r.reason(),
                message: r.message().to_owned(),
                field: None,
            },
            ApiError::Invalid(Invalid::Field { field, message }) => Parts {
                field: Some(field.clone()),
                ..p(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "invalid_field",
                    message,
                )
            },
            ApiError::Invalid(Invalid::Escalation { scope }) => Parts {
                field: Some("scopes".to_owned()),
                ..p(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    "scope_escalation",
                    &format!("This key cannot grant the scope `{scope}`: it does not hold it."),
                )
            },
            ApiError::NotFound => p(
                StatusCode::NOT_FOUND,
                "not_found",
                "key_not_found",
                "No such key.",
            ),
            ApiError::UnknownMethod => p(
                StatusCode::NOT_FOUND,
                "not_found",
                "unknown_method",
                "No such method.",
            ),
            ApiError::MethodNotAllowed => p(
                StatusCode::METHOD_NOT_ALLOWED,
                "unimplemented",
                "method_not_allowed",
                "Every method of the key API is called with POST.",
            ),
            ApiError::UnsupportedMediaType => Parts {
                field: Some("Content-Type".to_owned()),
                ..p(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_argument",
                    "unsupported_media_type",
                    "Send the request as protojson, with Content-Type: application/json.",
                )
            },
            ApiError::BodyTooLarge(max) => Parts {
                field: Some("body".to_owned()),
                ..p(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_argument",
                    "body_too_large",
                    &format!("The request body is larger than {max} bytes."),
                )
            },
            ApiError::BodyUnreadable => Parts {
                field: Some("body".to_owned()),
                ..p(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "body_unreadable",
                    "The request body could not be read.",
                )
            },
            ApiError::Precondition(m) => p(
                StatusCode::BAD_REQUEST,
                "failed_precondition",
                "key_state",
                m,
            ),
            ApiError::KeyLimit(max) => p(
                StatusCode::BAD_REQUEST,
                "failed_precondition",
                "key_limit_reached",
                &format!(
                    "This tenant holds {max} active keys, the most it may: revoke one (or let one expire) first."
                ),
            ),
            ApiError::RateLimited(_) => p(
                StatusCode::TOO_MANY_REQUESTS,
                "resource_exhausted",
                "rate_limited",
                "Too many calls of the key API; retry after the time in Retry-After.",
            ),
            ApiError::Conflict(m) => p(StatusCode::CONFLICT, "aborted", "conflict", m),
            ApiError::IdempotencyMismatch => Parts {
                field: Some("Idempotency-Key".to_owned()),
                ..p(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_argument",
                    "idempotency_key_reused",
                    "This Idempotency-Key was used for a different request.",
                )
            },
            ApiError::Unimplemented(m) => p(
                StatusCode::NOT_IMPLEMENTED,
                "unimplemented",
                "usage_needs_redis",
                &format!("{m}."),
            ),
            ApiError::Unavailable(_) => p(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "store_unavailable",
                "The key store is unavailable; retry shortly.",
            ),
            ApiError::Timeout => p(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                "timeout",
                "The request took too long and was stopped; a change may or may not have been made (retry with the same Idempotency-Key).",
            ),
            ApiError::Internal => p(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal",
                "Internal error.",
            ),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::NotFound(_) => ApiError::NotFound,
            AdminError::Invalid(m) => ApiError::Precondition(m),
            AdminError::KeyLimit(max) => ApiError::KeyLimit(max),
            AdminError::Conflict(m) => ApiError::Conflict(m),
            AdminError::IdempotencyMismatch => ApiError::IdempotencyMismatch,
            AdminError::Unavailable(m) => {
                tracing::error!(error = %m, "Key store unavailable.");
                ApiError::Unavailable("unavailable")
            }
            AdminError::Write(m) => {
                tracing::error!(error = %m, "Key store refused a write.");
                ApiError::Unavailable("write")
            }
            AdminError::NoStore => ApiError::Internal,
            e @ AdminError::NoUsage => ApiError::Unimplemented(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Parts {
            status,
            code,
            reason,
            message,
            field,
        } = self.parts();
        let mut body = serde_json::json!({ "code": code, "reason": reason, "message": message });
        if let Some(f) = field {
            body["field"] = f.into();
        }
        let mut resp = (status, axum::Json(body)).into_response();
        match self {
            ApiError::MethodNotAllowed => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            ApiError::RateLimited(secs) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        resp
    }
}

/// Every request, whatever its path or method: one handler, so every answer is ours.
pub fn router(service: Arc<Service>) -> Router {
    Router::new().fallback(entry).with_state(service)
}

/// What a method answers: the message, and for the audit line the key it touched.
struct Answer {
    body: Vec<u8>,
    key_id: Option<String>,
    replayed: bool,
}

async fn entry(State(service): State<Arc<Service>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let method = Method::of_path(&service.config.path_prefix, parts.uri.path());
    let (label, result) = match method {
        None => (UNKNOWN_METHOD, Err(ApiError::UnknownMethod)),
        Some(m) if parts.method != axum::http::Method::POST => {
            (m.name(), Err(ApiError::MethodNotAllowed))
        }
        Some(m) => (m.name(), call(&service, m, &parts.headers, body).await),
    };
    let outcome = result.as_ref().map_or_else(ApiError::code, |_| "ok");
    service
        .metrics
        .request(label, outcome, started.elapsed().as_secs_f64());
    match result {
        Ok(a) => {
            let mut resp = (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                a.body,
            )
                .into_response();
            if a.replayed {
                resp.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// A POST to a method: its form, its caller and the caller's rate, then the method itself
/// within the request timeout; one audit line for a change, whatever the outcome.
async fn call(
    service: &Service,
    method: Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<Answer, ApiError> {
    let identity = Identity::read(headers, &service.headers);
    let caller = caller::authorize(&identity);
    // The body as far as it was read, for the audit line's key id (kept when the request times out).
    let read = OnceLock::new();
    let checked = json_body(headers).and_then(|()| match &caller {
        Ok(c) => service.rate_limit(c),
        Err(_) => Ok(()),
    });
    let result = match checked {
        Err(e) => Err(e),
        Ok(()) => {
            let work = async {
                let body = read_body(body, service.config.max_body_bytes).await?;
                let body = read.get_or_init(|| body);
                match &caller {
                    Err(r) => Err(ApiError::Refused(*r)),
                    Ok(c) => dispatch(service, method, c, headers, body).await,
                }
            };
            let timeout = Duration::from_millis(service.config.request_timeout_ms);
            match tokio::time::timeout(timeout, AssertUnwindSafe(work).catch_unwind()).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => {
                    tracing::error!(method = method.name(), "A key service request panicked.");
                    Err(ApiError::Internal)
                }
                Err(_) => {
                    tracing::warn!(method = method.name(), "A key service request timed out.");
                    Err(ApiError::Timeout)
                }
            }
        }
    };
    if let Err(ApiError::Unavailable(kind)) = &result {
        service.metrics.store_error(kind);
    }
    if let Some(action) = method.audited() {
        let (outcome, key_id) = match &result {
            Ok(a) => (Outcome::Ok, a.key_id.clone()),
            Err(e) => (
                e.outcome(),
                read.get().and_then(|b: &Bytes| requested_id(b)),
            ),
        };
        audit::change(&audit::Change {
            action,
            tenant: identity.tenant.unwrap_or(""),
            key_id: key_id.as_deref().unwrap_or(""),
            actor: &caller.as_ref().map(Caller::actor).unwrap_or_default(),
            request_id: &request_id(headers),
            outcome,
        });
    }
    result
}

/// A body, if any, must be protojson: `application/json` (parameters such as `charset` allowed).
/// A request without a body may leave the header out.
fn json_body(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        let empty = headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|l| l.as_bytes() == b"0");
        return if empty {
            Ok(())
        } else {
            Err(ApiError::UnsupportedMediaType)
        };
    };
    let essence = v
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The whole body, refused as soon as it passes `max` bytes (or says it will).
async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody;
    if body.size_hint().lower() > max as u64 {
        return Err(ApiError::BodyTooLarge(max));
    }
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::BodyUnreadable)?;
        if out.len() + chunk.len() > max {
            return Err(ApiError::BodyTooLarge(max));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// The method's arm: decode, check, change, answer.
async fn dispatch(
    service: &Service,
    method: Method,
    caller: &Caller,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Answer, ApiError> {
    let scope = Scope::Tenant(caller.tenant());
    let now = admin_now();
    match method {
        Method::CreateKey => {
            let req: pb::CreateKeyRequest = decode(body)?;
            let new =
                validate::create(&req, caller, &service.policy, now).map_err(ApiError::Invalid)?;
            let idem = idempotency(headers, &req)?;
            let minted = service
                .store
                .create_once(
                    new,
                    idem.as_ref(),
                    Some(service.config.max_active_keys_per_tenant),
                )
                .await?;
            let replayed = matches!(minted, Minted::Replayed(_));
            Ok(Answer {
                key_id: Some(minted.record().id.clone()),
                body: encode(&pb::CreateKeyResponse {
                    key: Some(api_key(minted.record(), now)),
                    secret: minted.secret().unwrap_or_default().to_owned(),
                }),
                replayed,
            })
        }
        Method::ListKeys => {
            let req: pb::ListKeysRequest = decode(body)?;
            let (filter, size, cursor) = validate::list(&req).map_err(ApiError::Invalid)?;
            let page = service
                .store
                .list_page(caller.tenant(), filter, size, cursor.as_ref())
                .await?;
            Ok(Answer {
                body: encode(&pb::ListKeysResponse {
                    keys: page.records.iter().map(|r| api_key(r, now)).collect(),
                    next_page_token: page.next.map(|c| c.encode()).unwrap_or_default(),
                }),
                key_id: None,
                replayed: false,
            })
        }
        Method::GetKey => {
            let req: pb::GetKeyRequest = decode(body)?;
            let r = service
                .store
                .find(scope, validate::id(&req.id).map_err(ApiError::Invalid)?)
                .await?;
            Ok(Answer {
                body: encode(&pb::GetKeyResponse {
                    key: Some(api_key(&r, now)),
                }),
                key_id: Some(r.id),
                replayed: false,
            })
        }
        Method::UpdateKey => {
            let req: pb::UpdateKeyRequest = decode(body)?;
            let id = validate::id(&req.id).map_err(ApiError::Invalid)?;
            // The kind decides which fields apply; it never changes, so reading it first is safe.
            let kind: KeyKind = service.store.find(scope, id).await?.kind;
            let changes = validate::update(&req, kind, caller, &service.policy, now)
                .map_err(ApiError::Invalid)?;
            let r = service
                .store
                .update(
                    scope,
                    id,
                    &changes,
                    Some(service.config.max_active_keys_per_tenant),
                )
                .await?;
            Ok(Answer {
                body: encode(&pb::UpdateKeyResponse {
                    key: Some(api_key(&r, now)),
                }),
                key_id: Some(r.id),
                replayed: false,
            })
        }
        Method::RotateKey => {
            let req: pb::RotateKeyRequest = decode(body)?;
            let grace = validate::grace(&req).map_err(ApiError::Invalid)?;
            let idem = idempotency(headers, &req)?;
            let (minted, old) = service
                .store
                .rotate_in(
                    scope,
                    &req.id,
                    grace,
                    idem.as_ref(),
                    Some(service.config.max_active_keys_per_tenant),
                )
                .await?;
            let replayed = matches!(minted, Minted::Replayed(_));
            Ok(Answer {
                key_id: Some(minted.record().id.clone()),
                body: encode(&pb::RotateKeyResponse {
                    key: Some(api_key(minted.record(), now)),
                    secret: minted.secret().unwrap_or_default().to_owned(),
                    replaced: Some(api_key(&old, now)),
                }),
                replayed,
            })
        }
        Method::GetKeyUsage => {
            let req: pb::GetKeyUsageRequest = decode(body)?;
            let (start, end) = validate::usage(&req, now, service.store.usage_retention_secs())
                .map_err(ApiError::Invalid)?;
            let u = service.store.usage(scope, &req.id, start, end).await?;
            Ok(Answer {
                body: encode(&usage_answer(&u)),
                key_id: Some(u.id),
                replayed: false,
            })
        }
        Method::RevokeKey => {
            let req: pb::RevokeKeyRequest = decode(body)?;
            let r = service
                .store
                .revoke_in(scope, validate::id(&req.id).map_err(ApiError::Invalid)?)
                .await?;
            Ok(Answer {
                body: encode(&pb::RevokeKeyResponse {
                    key: Some(api_key(&r, now)),
                }),
                key_id: Some(r.id),
                replayed: false,
            })
        }
    }
}

/// A usage answer: hours as RFC 3339 times, counts as protojson's int64 strings.
fn usage_answer(u: &KeyUsage) -> pb::GetKeyUsageResponse {
    let ts = |t: u64| pb::Timestamp {
        seconds: t as i64,
        nanos: 0,
    };
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::GetKeyUsageResponse {
        id: u.id.clone(),
        start_time: Some(ts(u.start)),
        end_time: Some(ts(u.end)),
        buckets: u
            .buckets
            .iter()
            .map(|b| pb::UsageBucket {
                start_time: Some(ts(b.hour_start)),
                allowed: n(b.counts.allowed),
                rate_limited: n(b.counts.rate_limited),
                denied: n(b.counts.denied),
            })
            .collect(),
        total: Some(pb::UsageCounts {
            allowed: n(u.total.allowed),
            rate_limited: n(u.total.rate_limited),
            denied: n(u.total.denied),
        }),
    }
}

fn admin_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A protojson body; an empty body is the empty message. A bad one names its field.
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // serde names an unknown field only in its message: "unknown field `nmae`, expected …".
        let unknown = inner
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next());
        // The path ends at the field that failed (an unknown one included).
        let field = match (unknown, path.as_str()) {
            (Some(f), "." | "" | "?") => f.to_owned(),
            (None, "." | "" | "?") => "body".to_owned(),
            (_, p) => p.to_owned(),
        };
        let message = if unknown.is_some() {
            format!("unknown field `{field}`")
        } else {
            // serde's message without its "at line 1 column 9" tail; the field says where.
            let text = inner.split(" at line ").next().unwrap_or(&inner);
            format!("{field}: {text}")
        };
        ApiError::Invalid(Invalid::Field { field, message })
    })
}

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(message).expect("generated messages serialize")
}

/// The `Idempotency-Key` of a create or rotate, with a digest of the request it came with.
fn idempotency<M: prost::Message>(
    headers: &HeaderMap,
    req: &M,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = validate::idempotency_key(v.as_bytes()).map_err(ApiError::Invalid)?;
    Ok(Some(Idempotency {
        key: key.to_owned(),
        fingerprint: Sha256::digest(req.encode_to_vec()).into(),
    }))
}

/// Envoy's `x-request-id`, bounded, for the audit line; `-` without one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .unwrap_or("-")
        .to_owned()
}

/// The `id` a refused or failed change named, for its audit line (only a key id, never a body).
fn requested_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct JustId {
        id: Option<String>,
    }
    serde_json::from_slice::<JustId>(body)
        .ok()
        .and_then(|j| j.id)
        .filter(|id| validate::id(id).is_ok())
}

/// A record as callers see it: never the secret, only 8 hex digits of its hash.
pub fn api_key(r: &KeyRecord, now: u64) -> pb::ApiKey {
    let ts = |t: u64| pb::Timestamp {
        seconds: t as i64,
        nanos: 0,
    };
    pb::ApiKey {
        id: r.id.clone(),
        kind: match r.kind {
            KeyKind::Secret => pb::KeyKind::Secret,
            KeyKind::Publishable => pb::KeyKind::Publishable,
        } as i32,
        tenant: r.tenant.clone(),
        name: r.name.clone().unwrap_or_default(),
        scopes: r.scopes.clone(),
        rate_limit: r.rate_limit.map(|l| l.to_string()).unwrap_or_default(),
        state: match admin::state(r, now) {
            admin::KeyState::Active => pb::KeyState::Active,
            admin::KeyState::Expired => pb::KeyState::Expired,
            admin::KeyState::Revoked => pb::KeyState::Revoked,
        } as i32,
        expire_time: r.expires_at.map(ts),
        create_time: r.created_at.map(ts),
        allowed_origins: r.allowed_origins.clone(),
        jwt_provider: r.jwt_provider.clone().unwrap_or_default(),
        hash_prefix: r.hash.to_hex()[..8].to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> (String, String) {
        match decode::<pb::CreateKeyRequest>(body.as_bytes()) {
            Err(ApiError::Invalid(Invalid::Field { field, message })) => (field, message),
            other => panic!("not a field error: {other:?}"),
        }
    }

    #[test]
    fn bodies_that_do_not_decode_name_the_field() {
        assert_eq!(
            field_of(r#"{"kind":"KEY_KIND_SECRET","nmae":"x"}"#).0,
            "nmae"
        );
        assert_eq!(field_of(r#"{"kind":"KEY_KIND_NOPE"}"#).0, "kind");
        assert_eq!(field_of(r#"{"expireTime":"yesterday"}"#).0, "expireTime");
        assert_eq!(field_of(r#"{"scopes":"one"}"#).0, "scopes");
        assert_eq!(field_of("not json").0, "body");
        let upd = decode::<pb::UpdateKeyRequest>(br#"{"id":"k","scopes":{"valuez":[]}}"#);
        assert!(
            matches!(&upd, Err(ApiError::Invalid(Invalid::Field { field, .. })) if field == "scopes.valuez"),
            "{upd:?}"
        );
        assert!(
            decode::<pb::ListKeysRequest>(b"").is_ok(),
            "an empty body is {{}}"
        );
    }

    #[test]
    fn methods_parse_by_their_path_segment() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()), Some(m));
        }
        assert_eq!(Method::parse("delete-everything"), None);
    }

    #[test]
    fn a_presented_key_has_no_secret_and_only_a_hash_prefix() {
        let mut r = KeyRecord {
            id: "key_1".into(),
            hash: gybc_authz_engine::authn::apikey::KeyHash::of("sk_secret"),
            kind: KeyKind::Secret,
            tenant: "acme".into(),
            scopes: vec!["keys:manage".into()],
            rate_limit: Some("10/60s".parse().unwrap()),
            status: gybc_authz_engine::store::KeyStatus::Active,
            expires_at: Some(100),
            name: None,
            created_at: Some(50),
            allowed_origins: vec![],
            jwt_provider: None,
            identity_platform_tenant: None,
        };
        let k = api_key(&r, 60);
        assert_eq!(k.state(), pb::KeyState::Active);
        assert_eq!(k.rate_limit, "10/60s");
        assert_eq!(k.hash_prefix.len(), 8);
        assert!(
            !serde_json::to_string(&k)
                .unwrap()
                .contains(&r.hash.to_hex())
        );
        assert_eq!(api_key(&r, 100).state(), pb::KeyState::Expired);
        r.status = gybc_authz_engine::store::KeyStatus::Revoked;
        assert_eq!(api_key(&r, 60).state(), pb::KeyState::Revoked);
    }
}
