//! `RequestContext`: the only code that reads a CheckRequest. Everything after it sees plain data:
//! method, path without query, and the few headers that carry credentials, each already bounded
//! in size and checked for duplicates.

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

use crate::config::LimitsConfig;
use crate::route::{RouteError, RouteSettings};

pub const AUTHORIZATION: &str = "authorization";
pub const X_API_KEY: &str = "x-api-key";
pub const X_ON_BEHALF_OF: &str = "x-on-behalf-of";
pub const ORIGIN: &str = "origin";
pub const X_REQUEST_ID: &str = "x-request-id";

/// Longest `X-On-Behalf-Of` the contract allows; longer is `invalid_on_behalf_of`.
pub const MAX_ON_BEHALF_OF_CHARS: usize = 128;
/// Longer `Origin` or `x-request-id` values are ignored rather than copied.
const MAX_ORIGIN_BYTES: usize = 1_024;
const MAX_REQUEST_ID_BYTES: usize = 128;

/// One credential-bearing header as the request carried it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HeaderField {
    #[default]
    Absent,
    Present(String),
    /// Sent more than once (Envoy joins duplicates with `,`; raw header maps list them apart).
    Duplicated,
    /// Larger than the configured cap: rejected without being parsed or copied.
    TooLarge,
}

impl HeaderField {
    pub fn is_absent(&self) -> bool {
        matches!(self, HeaderField::Absent)
    }

    pub fn value(&self) -> Option<&str> {
        match self {
            HeaderField::Present(v) => Some(v),
            _ => None,
        }
    }
}

/// What the decision needs from a request.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub method: String,
    /// The path without query string or fragment, exactly as sent (not normalised).
    pub path: String,
    pub host: String,
    /// `x-request-id`, for logs only.
    pub request_id: Option<String>,
    pub authorization: HeaderField,
    pub api_key: HeaderField,
    pub on_behalf_of: HeaderField,
    pub origin: Option<String>,
    /// This route's settings from Envoy's `context_extensions`.
    pub route: RouteSettings,
    /// Set when those settings are wrong: the request is refused, never judged by defaults.
    pub route_error: Option<RouteError>,
    /// More headers than `limits.max_headers`: reading stopped there and the request is refused.
    pub too_many_headers: bool,
}

/// A CheckRequest without HTTP attributes: Envoy misconfigured, not a client's doing.
#[derive(Debug, thiserror::Error)]
#[error("CheckRequest has no attributes.request.http")]
pub struct NoHttpAttributes;

impl RequestContext {
    pub fn from_check(req: &CheckRequest, limits: &LimitsConfig) -> Result<Self, NoHttpAttributes> {
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or(NoHttpAttributes)?;

        let mut ctx = RequestContext {
            method: http.method.clone(),
            path: strip_query(&http.path).to_owned(),
            host: http.host.clone(),
            ..Default::default()
        };
        if let Some(attrs) = &req.attributes {
            match RouteSettings::parse(&attrs.context_extensions) {
                Ok(route) => ctx.route = route,
                Err(e) => ctx.route_error = Some(e),
            }
        }
        let mut reader = Reader::new(&mut ctx, limits);
        match &http.header_map {
            // `encode_raw_headers: true`: every header line arrives apart, bytes as sent.
            Some(map) if !map.headers.is_empty() => {
                for h in &map.headers {
                    if !reader.count() {
                        break;
                    }
                    let value = if h.raw_value.is_empty() {
                        std::borrow::Cow::Borrowed(h.value.as_str())
                    } else {
                        String::from_utf8_lossy(&h.raw_value)
                    };
                    reader.header(&h.key, &value);
                }
            }
            _ => {
                for (k, v) in &http.headers {
                    if !reader.count() {
                        break;
                    }
                    reader.header(k, v);
                }
            }
        }
        Ok(ctx)
    }
}

impl RequestContext {
    /// The same reading for a request that arrives as plain HTTP (the HTTP authorization mode):
    /// `headers` in arrival order, repeated names as separate entries.
    pub fn from_http<'h>(
        method: &str,
        path: &str,
        host: &str,
        headers: impl IntoIterator<Item = (&'h str, std::borrow::Cow<'h, str>)>,
        limits: &LimitsConfig,
    ) -> Self {
        let mut ctx = RequestContext {
            method: method.to_owned(),
            path: strip_query(path).to_owned(),
            host: host.to_owned(),
            ..Default::default()
        };
        let mut reader = Reader::new(&mut ctx, limits);
        for (name, value) in headers {
            if !reader.count() {
                break;
            }
            reader.header(name, &value);
        }
        ctx
    }
}

struct Reader<'a> {
    ctx: &'a mut RequestContext,
    limits: &'a LimitsConfig,
    /// Headers seen so far, against `limits.max_headers`.
    seen: usize,
}

impl<'a> Reader<'a> {
    fn new(ctx: &'a mut RequestContext, limits: &'a LimitsConfig) -> Self {
        Self {
            ctx,
            limits,
            seen: 0,
        }
    }

    /// Counts one more header; false (and the request marked) once it is one too many. Reading
    /// stops there: the rest is never looked at, whatever it carries.
    fn count(&mut self) -> bool {
        self.seen += 1;
        if self.seen > self.limits.max_headers {
            self.ctx.too_many_headers = true;
            return false;
        }
        true
    }

    fn header(&mut self, name: &str, value: &str) {
        let (slot, cap, comma_means_duplicate) = if name.eq_ignore_ascii_case(AUTHORIZATION) {
            (
                &mut self.ctx.authorization,
                self.limits.max_authorization_bytes,
                true,
            )
        } else if name.eq_ignore_ascii_case(X_API_KEY) {
            (&mut self.ctx.api_key, self.limits.max_api_key_bytes, true)
        } else if name.eq_ignore_ascii_case(X_ON_BEHALF_OF) {
            // A comma here is judged by the impersonation rules (`invalid_on_behalf_of`).
            (
                &mut self.ctx.on_behalf_of,
                MAX_ON_BEHALF_OF_CHARS * 4,
                false,
            )
        } else if name.eq_ignore_ascii_case(ORIGIN) {
            if value.len() <= MAX_ORIGIN_BYTES {
                self.ctx.origin = Some(value.to_owned());
            }
            return;
        } else if name.eq_ignore_ascii_case(X_REQUEST_ID) {
            if value.len() <= MAX_REQUEST_ID_BYTES && !value.contains(char::is_control) {
                self.ctx.request_id = Some(value.to_owned());
            }
            return;
        } else {
            return;
        };

        *slot = if !slot.is_absent() {
            // Seen before: in a raw header map, or a mixed-case twin in the joined map.
            HeaderField::Duplicated
        } else if value.len() > cap {
            HeaderField::TooLarge
        } else if comma_means_duplicate && value.contains(',') {
            // Envoy joins repeated header lines with `,` (and a client may squeeze two into one);
            // neither a token nor a key ever contains one.
            HeaderField::Duplicated
        } else {
            HeaderField::Present(value.to_owned())
        };
    }
}

/// Envoy's `path` is the request target, query included (its `query` field is left empty).
fn strip_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};

    fn check(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        path: path.into(),
                        host: "api.example".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// A CheckRequest whose headers come as a raw header map (`encode_raw_headers: true`), one
    /// entry per line as sent.
    fn check_raw(lines: &[(&str, &str)]) -> CheckRequest {
        let mut req = check("/", &[]);
        let http = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .expect("check() builds HTTP attributes");
        http.header_map = Some(HeaderMap {
            headers: lines
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        });
        req
    }

    fn read(req: &CheckRequest) -> RequestContext {
        RequestContext::from_check(req, &LimitsConfig::default()).unwrap()
    }

    #[test]
    fn reads_path_without_query_and_headers_case_insensitively() {
        let ctx = read(&check(
            "/api/v1/orgs/create?x=1",
            &[
                ("Authorization", "Bearer abc"),
                ("X-Api-Key", "sk_x"),
                ("ORIGIN", "https://a"),
            ],
        ));
        assert_eq!(ctx.path, "/api/v1/orgs/create");
        assert_eq!(ctx.method, "POST");
        assert_eq!(ctx.authorization, HeaderField::Present("Bearer abc".into()));
        assert_eq!(ctx.api_key, HeaderField::Present("sk_x".into()));
        assert_eq!(ctx.origin.as_deref(), Some("https://a"));
        assert!(ctx.on_behalf_of.is_absent());
    }

    #[test]
    fn joined_duplicates_are_detected() {
        let ctx = read(&check(
            "/",
            &[
                ("authorization", "Bearer a,Bearer b"),
                ("x-api-key", "sk_a, sk_b"),
            ],
        ));
        assert_eq!(ctx.authorization, HeaderField::Duplicated);
        assert_eq!(ctx.api_key, HeaderField::Duplicated);
        let ctx = read(&check("/", &[("x-on-behalf-of", "u1,u2")]));
        assert_eq!(ctx.on_behalf_of, HeaderField::Present("u1,u2".into()));
    }

    #[test]
    fn raw_header_map_duplicates_are_detected() {
        let req = check_raw(&[
            ("x-api-key", "sk_a"),
            ("X-API-KEY", "sk_b"),
            ("authorization", "Bearer t"),
        ]);
        let ctx = read(&req);
        assert_eq!(ctx.api_key, HeaderField::Duplicated);
        assert_eq!(ctx.authorization, HeaderField::Present("Bearer t".into()));
    }

    #[test]
    fn oversized_values_are_not_copied() {
        let big = "a".repeat(1 << 20);
        let token = format!("Bearer {big}");
        let ctx = read(&check(
            "/",
            &[
                ("authorization", token.as_str()),
                ("x-api-key", big.as_str()),
            ],
        ));
        assert_eq!(ctx.authorization, HeaderField::TooLarge);
        assert_eq!(ctx.api_key, HeaderField::TooLarge);
    }

    #[test]
    fn headers_past_the_cap_are_not_read() {
        let limits = LimitsConfig {
            max_headers: 16,
            ..Default::default()
        };
        let filler: Vec<(String, String)> =
            (0..16).map(|i| (format!("x-f{i}"), "v".into())).collect();
        let mut at_cap: Vec<(&str, &str)> = filler
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        at_cap.pop();
        at_cap.push(("x-api-key", "sk_x"));
        let ctx = RequestContext::from_check(&check("/", &at_cap), &limits).unwrap();
        assert!(!ctx.too_many_headers, "16 headers are within a cap of 16");
        assert_eq!(ctx.api_key, HeaderField::Present("sk_x".into()));

        at_cap.push(("x-one-more", "v"));
        let ctx = RequestContext::from_check(&check("/", &at_cap), &limits).unwrap();
        assert!(ctx.too_many_headers);

        // Raw header maps count every line, and the HTTP mode reads the same way.
        let req = check_raw(&[("x-same", "v"); 17]);
        assert!(
            RequestContext::from_check(&req, &limits)
                .unwrap()
                .too_many_headers
        );
        let lines = (0..17).map(|_| ("x-same", std::borrow::Cow::Borrowed("v")));
        let ctx = RequestContext::from_http("GET", "/", "h", lines, &limits);
        assert!(ctx.too_many_headers);
        let lines = (0..16).map(|_| ("x-same", std::borrow::Cow::Borrowed("v")));
        let ctx = RequestContext::from_http("GET", "/", "h", lines, &limits);
        assert!(!ctx.too_many_headers);
    }

    #[test]
    fn missing_http_attributes_is_an_error() {
        assert!(
            RequestContext::from_check(&CheckRequest::default(), &LimitsConfig::default()).is_err()
        );
    }
}
