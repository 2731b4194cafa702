//! `RequestContext`: the neutral request every door reads its wire format into. Everything after
//! it sees plain data: method, path without query, the few headers that carry credentials, each
//! already bounded in size and checked for duplicates, and the caller's trace context.

use std::borrow::Cow;

use crate::config::LimitsConfig;
use crate::route::{RouteError, RouteSettings};
use crate::trace_context::{self, TraceHeaders, TraceParent};

pub const AUTHORIZATION: &str = "authorization";
pub const X_API_KEY: &str = "x-api-key";
pub const X_ON_BEHALF_OF: &str = "x-on-behalf-of";
pub const ORIGIN: &str = "origin";
pub const X_REQUEST_ID: &str = "x-request-id";

/// Every header whose value a request's reading looks at (names lower case); any other line is
/// only counted against `limits.max_headers`.
pub const READ_HEADERS: [&str; 12] = [
    AUTHORIZATION,
    X_API_KEY,
    X_ON_BEHALF_OF,
    ORIGIN,
    X_REQUEST_ID,
    trace_context::TRACEPARENT,
    trace_context::TRACESTATE,
    trace_context::B3,
    trace_context::X_B3_TRACE_ID,
    trace_context::X_B3_SPAN_ID,
    trace_context::X_B3_SAMPLED,
    trace_context::X_B3_FLAGS,
];

/// Whether a header name starting with this byte (either case) can be one of [`READ_HEADERS`]:
/// made from the list itself, so it cannot fall out of step with it.
const READ_FIRST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < READ_HEADERS.len() {
        let first = READ_HEADERS[i].as_bytes()[0];
        table[first.to_ascii_lowercase() as usize] = true;
        table[first.to_ascii_uppercase() as usize] = true;
        i += 1;
    }
    table
};

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
    /// The caller's trace context (`traceparent`/`tracestate`, or B3), the parent of the
    /// decision's span. A door whose transport has a span of its own (Envoy's) may set it instead.
    pub trace: Option<TraceParent>,
}

impl RequestContext {
    /// Reads a request as any door sees it: method, request target (the query is dropped here),
    /// host, and every header line in arrival order, repeated names as separate entries (a door
    /// whose transport joins repeats with `,` passes the joined line; it reads as duplicated).
    /// Reading stops at `limits.max_headers`.
    pub fn read<'h, V: AsRef<str>>(
        method: &str,
        target: &str,
        host: &str,
        headers: impl IntoIterator<Item = (&'h str, V)>,
        limits: &LimitsConfig,
    ) -> Self {
        Self::read_lines(
            method,
            target,
            host,
            headers,
            limits,
            |reader, (name, value)| {
                if let Some(name) = read_header(name.as_bytes()) {
                    reader.header(name, value.as_ref());
                }
            },
        )
    }

    /// [`RequestContext::read`] for a door whose transport hands out header lines as bytes
    /// (Envoy's): the same rules, but only the values of [`READ_HEADERS`] are turned into text
    /// (invalid UTF-8 replaced, as a raw header map's reader would), the rest only counted. A
    /// name that is not UTF-8 is no header the engine reads.
    pub fn read_bytes<'h>(
        method: &str,
        target: &str,
        host: &str,
        headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
        limits: &LimitsConfig,
    ) -> Self {
        let mut ctx = RequestContext::default();
        ctx.reread_bytes(method, target, host, headers, limits);
        ctx
    }

    /// [`RequestContext::read_bytes`] into a context a door keeps from one request to the next:
    /// every field ends as `read_bytes` would make it, but each string is written into the
    /// buffer the same field had for the previous request. A door that reads every request into
    /// one context (the Envoy module, per worker) allocates nothing for requests of one shape.
    pub fn reread_bytes<'h>(
        &mut self,
        method: &str,
        target: &str,
        host: &str,
        headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
        limits: &LimitsConfig,
    ) {
        self.read_lines_into(
            method,
            target,
            host,
            headers,
            limits,
            |reader, (name, value)| {
                if let Some(name) = read_header(name) {
                    reader.header(name, &text(value));
                }
            },
        );
    }

    /// What both readers share: the request line, then each header line, counted against
    /// `limits.max_headers` before `read_line` sees it.
    fn read_lines<L>(
        method: &str,
        target: &str,
        host: &str,
        lines: impl IntoIterator<Item = L>,
        limits: &LimitsConfig,
        read_line: impl FnMut(&mut Reader<'_>, L),
    ) -> Self {
        let mut ctx = RequestContext::default();
        ctx.read_lines_into(method, target, host, lines, limits, read_line);
        ctx
    }

    fn read_lines_into<L>(
        &mut self,
        method: &str,
        target: &str,
        host: &str,
        lines: impl IntoIterator<Item = L>,
        limits: &LimitsConfig,
        mut read_line: impl FnMut(&mut Reader<'_>, L),
    ) {
        let mut spare = Spare::take(self);
        self.method = reuse(&mut spare.method, method);
        self.path = reuse(&mut spare.path, strip_query(target));
        self.host = reuse(&mut spare.host, host);
        let mut reader = Reader::new(self, limits, spare);
        for line in lines {
            if !reader.count() {
                break;
            }
            read_line(&mut reader, line);
        }
        let trace = reader.trace.finish();
        self.trace = trace;
    }

    /// The span this request's decision belongs under, as the door's transport knows it.
    pub fn with_trace_parent(mut self, parent: TraceParent) -> Self {
        self.trace = Some(parent);
        self
    }

    /// The route's settings as its door found them; an error refuses the request.
    pub fn with_route(mut self, route: Result<RouteSettings, RouteError>) -> Self {
        self.set_route(route);
        self
    }

    /// [`RequestContext::with_route`] for a context read in place.
    pub fn set_route(&mut self, route: Result<RouteSettings, RouteError>) {
        match route {
            Ok(r) => self.route = r,
            Err(e) => self.route_error = Some(e),
        }
    }
}

/// The previous request's string buffers, taken out of the context before it is read again. The
/// whole context is taken, so every field starts as a fresh context's (no field of the request
/// before, present or added later, can outlive it); a buffer goes back only to the field it came
/// from, if the new request carries that field.
#[derive(Default)]
struct Spare {
    method: String,
    path: String,
    host: String,
    authorization: String,
    api_key: String,
    on_behalf_of: String,
    origin: String,
    request_id: String,
}

impl Spare {
    fn take(ctx: &mut RequestContext) -> Self {
        let old = std::mem::take(ctx);
        let field = |f: HeaderField| match f {
            HeaderField::Present(s) => s,
            _ => String::new(),
        };
        Spare {
            method: old.method,
            path: old.path,
            host: old.host,
            authorization: field(old.authorization),
            api_key: field(old.api_key),
            on_behalf_of: field(old.on_behalf_of),
            origin: old.origin.unwrap_or_default(),
            request_id: old.request_id.unwrap_or_default(),
        }
    }
}

/// `value` in `spare`'s buffer, in the capacity it has.
fn reuse(spare: &mut String, value: &str) -> String {
    let mut buf = std::mem::take(spare);
    buf.clear();
    buf.push_str(value);
    buf
}

struct Reader<'a> {
    ctx: &'a mut RequestContext,
    limits: &'a LimitsConfig,
    /// Headers seen so far, against `limits.max_headers`.
    seen: usize,
    trace: TraceHeaders,
    spare: Spare,
}

impl<'a> Reader<'a> {
    fn new(ctx: &'a mut RequestContext, limits: &'a LimitsConfig, spare: Spare) -> Self {
        Self {
            ctx,
            limits,
            seen: 0,
            trace: TraceHeaders::default(),
            spare,
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

    /// One line of a header the engine reads, by its name as [`READ_HEADERS`] spells it.
    fn header(&mut self, name: &'static str, value: &str) {
        let (slot, spare, cap, comma_means_duplicate) = match name {
            AUTHORIZATION => (
                &mut self.ctx.authorization,
                &mut self.spare.authorization,
                self.limits.max_authorization_bytes,
                true,
            ),
            X_API_KEY => (
                &mut self.ctx.api_key,
                &mut self.spare.api_key,
                self.limits.max_api_key_bytes,
                true,
            ),
            // A comma here is judged by the impersonation rules (`invalid_on_behalf_of`).
            X_ON_BEHALF_OF => (
                &mut self.ctx.on_behalf_of,
                &mut self.spare.on_behalf_of,
                MAX_ON_BEHALF_OF_CHARS * 4,
                false,
            ),
            ORIGIN => {
                if value.len() <= MAX_ORIGIN_BYTES {
                    self.ctx.origin = Some(reuse(&mut self.spare.origin, value));
                }
                return;
            }
            X_REQUEST_ID => {
                if value.len() <= MAX_REQUEST_ID_BYTES && !has_control(value) {
                    self.ctx.request_id = Some(reuse(&mut self.spare.request_id, value));
                }
                return;
            }
            // Trace headers are parsed as they come, each bounded.
            _ => {
                self.trace.header(name, value);
                return;
            }
        };

        *slot = if !slot.is_absent() {
            // Seen before: in a raw header map, or a mixed-case twin in the joined map.
            HeaderField::Duplicated
        } else if value.len() > cap {
            HeaderField::TooLarge
        } else if comma_means_duplicate && memchr::memchr(b',', value.as_bytes()).is_some() {
            // Envoy joins repeated header lines with `,` (and a client may squeeze two into one);
            // neither a token nor a key ever contains one. (memchr: a ~1 kB token per Check.)
            HeaderField::Duplicated
        } else {
            HeaderField::Present(reuse(spare, value))
        };
    }
}

/// Envoy's `path` is the request target, query included (its `query` field is left empty).
fn strip_query(path: &str) -> &str {
    // Bytes, not a `char` pattern: both are ASCII, and this runs on every request.
    let end = memchr::memchr2(b'?', b'#', path.as_bytes()).unwrap_or(path.len());
    &path[..end]
}

/// The header `name` is, as [`READ_HEADERS`] spells it, if the engine reads it (any case).
fn read_header(name: &[u8]) -> Option<&'static str> {
    // Most lines are none of these (pseudo-headers, user-agent, …): their first byte says so
    // without comparing names.
    if !READ_FIRST_BYTE[usize::from(*name.first()?)] {
        return None;
    }
    READ_HEADERS
        .iter()
        .find(|n| n.as_bytes().eq_ignore_ascii_case(name))
        .copied()
}

/// Whether `value` holds a control character (`char::is_control`), looked at a byte at a time
/// when it is ASCII, as request ids are: one runs on every request.
fn has_control(value: &str) -> bool {
    if value.is_ascii() {
        value.bytes().any(|b| b.is_ascii_control())
    } else {
        value.contains(char::is_control)
    }
}

/// A header value as text: borrowed when it is UTF-8 (checked a word at a time; the lossy
/// conversion walks it a byte at a time), otherwise with U+FFFD for each invalid sequence.
pub fn text(value: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(value) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_with(path: &str, headers: &[(&str, &str)], limits: &LimitsConfig) -> RequestContext {
        RequestContext::read("POST", path, "api.example", headers.iter().copied(), limits)
    }

    fn read(path: &str, headers: &[(&str, &str)]) -> RequestContext {
        read_with(path, headers, &LimitsConfig::default())
    }

    #[test]
    fn every_header_read_is_found_in_any_case_and_no_other() {
        for name in READ_HEADERS {
            assert_eq!(read_header(name.as_bytes()), Some(name));
            let upper = name.to_ascii_uppercase();
            assert_eq!(read_header(upper.as_bytes()), Some(name), "{upper}");
        }
        for other in [
            ":authority",
            ":path",
            "user-agent",
            "x-forwarded-proto",
            "",
            "a",
        ] {
            assert_eq!(read_header(other.as_bytes()), None, "{other}");
        }
        assert!(has_control("id\u{7f}") && has_control("id\u{85}") && has_control("a\nb"));
        assert!(!has_control("2f1c-é") && !has_control("0b6e3c1e-uuid"));
    }

    #[test]
    fn reads_path_without_query_and_headers_case_insensitively() {
        let ctx = read(
            "/api/v1/orgs/create?x=1",
            &[
                ("Authorization", "Bearer abc"),
                ("X-Api-Key", "sk_x"),
                ("ORIGIN", "https://a"),
            ],
        );
        assert_eq!(ctx.path, "/api/v1/orgs/create");
        assert_eq!(ctx.method, "POST");
        assert_eq!(ctx.authorization, HeaderField::Present("Bearer abc".into()));
        assert_eq!(ctx.api_key, HeaderField::Present("sk_x".into()));
        assert_eq!(ctx.origin.as_deref(), Some("https://a"));
        assert!(ctx.on_behalf_of.is_absent());
        assert_eq!(read("/a#frag", &[]).path, "/a");
    }

    #[test]
    fn joined_duplicates_are_detected() {
        let ctx = read(
            "/",
            &[
                ("authorization", "Bearer a,Bearer b"),
                ("x-api-key", "sk_a, sk_b"),
            ],
        );
        assert_eq!(ctx.authorization, HeaderField::Duplicated);
        assert_eq!(ctx.api_key, HeaderField::Duplicated);
        let ctx = read("/", &[("x-on-behalf-of", "u1,u2")]);
        assert_eq!(ctx.on_behalf_of, HeaderField::Present("u1,u2".into()));
    }

    #[test]
    fn repeated_lines_are_detected() {
        let ctx = read(
            "/",
            &[
                ("x-api-key", "sk_a"),
                ("X-API-KEY", "sk_b"),
                ("authorization", "Bearer t"),
            ],
        );
        assert_eq!(ctx.api_key, HeaderField::Duplicated);
        assert_eq!(ctx.authorization, HeaderField::Present("Bearer t".into()));
    }

    #[test]
    fn oversized_values_are_not_copied() {
        let big = "a".repeat(1 << 20);
        let token = format!("Bearer {big}");
        let ctx = read(
            "/",
            &[
                ("authorization", token.as_str()),
                ("x-api-key", big.as_str()),
            ],
        );
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
        let ctx = read_with("/", &at_cap, &limits);
        assert!(!ctx.too_many_headers, "16 headers are within a cap of 16");
        assert_eq!(ctx.api_key, HeaderField::Present("sk_x".into()));

        at_cap.push(("x-one-more", "v"));
        assert!(read_with("/", &at_cap, &limits).too_many_headers);
        // Every line counts, repeated names too.
        assert!(read_with("/", &[("x-same", "v"); 17], &limits).too_many_headers);
        assert!(!read_with("/", &[("x-same", "v"); 16], &limits).too_many_headers);
    }

    #[test]
    fn the_trace_context_is_read_with_the_credentials() {
        let ctx = read(
            "/",
            &[
                ("x-api-key", "sk_x"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("tracestate", "vendor=1"),
            ],
        );
        let trace = ctx.trace.expect("a parent");
        assert_eq!(
            trace.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(trace.sampled, Some(true));
        assert_eq!(trace.trace_state.as_deref(), Some("vendor=1"));
        assert_eq!(ctx.api_key, HeaderField::Present("sk_x".into()));
        assert!(read("/", &[("traceparent", "garbage")]).trace.is_none());
    }

    #[test]
    fn bytes_read_as_text() {
        let lines: &[(&[u8], &[u8])] = &[
            (b"X-Api-Key", b"sk_x"),
            (b"origin", b"https://\xffa"),
            (b"x-other", b"\xff\xfe"),
            (b"\xffname", b"v"),
            (
                b"traceparent",
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ];
        let limits = LimitsConfig::default();
        let ctx = RequestContext::read_bytes("GET", "/a?b", "h", lines.iter().copied(), &limits);
        let text: Vec<(String, String)> = lines
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let same = read_with(
            "/a?b",
            &text
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            &limits,
        );
        assert_eq!(ctx.path, "/a");
        assert_eq!(ctx.api_key, same.api_key);
        assert_eq!(ctx.origin.as_deref(), Some("https://\u{fffd}a"));
        assert_eq!(ctx.origin, same.origin);
        assert_eq!(ctx.trace, same.trace);
        assert!(ctx.trace.is_some());

        // The cap counts every line, read or not.
        let capped = LimitsConfig {
            max_headers: 4,
            ..Default::default()
        };
        let ctx = RequestContext::read_bytes("GET", "/", "h", lines.iter().copied(), &capped);
        assert!(ctx.too_many_headers);
        assert!(ctx.trace.is_none(), "the fifth line is past the cap");
    }

    #[test]
    fn rereading_a_context_is_reading_it_afresh() {
        type Lines<'a> = &'a [(&'a [u8], &'a [u8])];
        let key: Lines = &[
            (b":path", b"/a"),
            (
                b"x-api-key",
                b"sk_live_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            ),
            (b"x-request-id", b"0b6e3c1e-6d8e-4b5e-9b0e-3d3f3c1e6d8e"),
            (b"origin", b"https://a.example"),
        ];
        let token: Lines = &[
            (b"authorization", b"Bearer aaa.bbb.ccc"),
            (b"x-on-behalf-of", b"user-1"),
            (
                b"traceparent",
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            (b"tracestate", b"vendor=1"),
        ];
        let joined: Lines = &[(b"x-api-key", b"sk_a,sk_b"), (b"X-Api-Key", b"sk_c")];
        let many: Lines = &[
            (b"a", b"1"),
            (b"b", b"2"),
            (b"c", b"3"),
            (b"d", b"4"),
            (b"x-api-key", b"sk_late"),
        ];
        let limits = LimitsConfig {
            max_headers: 4,
            ..Default::default()
        };
        let mut ctx = RequestContext::default();
        // Every request after every other, the context carrying the one before's fields.
        for (i, lines) in [key, token, key, joined, many, key, &[], token, many]
            .into_iter()
            .enumerate()
        {
            let target = if i % 2 == 0 { "/x/y?q=1" } else { "/z" };
            ctx = ctx.with_route(Err(RouteError {
                key: "gybc.x".into(),
                why: "stale",
            }));
            ctx.reread_bytes("GET", target, "h", lines.iter().copied(), &limits);
            let fresh =
                RequestContext::read_bytes("GET", target, "h", lines.iter().copied(), &limits);
            assert_eq!(format!("{ctx:?}"), format!("{fresh:?}"), "request {i}");
        }
    }

    #[test]
    fn a_bad_route_setting_is_kept_for_the_decision() {
        let bad = RouteError {
            key: "gybc.publik".into(),
            why: "unknown setting",
        };
        let ctx = read("/", &[]).with_route(Err(bad.clone()));
        assert_eq!(ctx.route_error, Some(bad));
        let ctx = read("/", &[]).with_route(Ok(RouteSettings {
            public: true,
            ..Default::default()
        }));
        assert!(ctx.route.public && ctx.route_error.is_none());
    }
}
