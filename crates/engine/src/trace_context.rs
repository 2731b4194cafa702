//! The caller's trace context, read from W3C `traceparent`/`tracestate` or B3 headers into plain
//! data, so a decision's span can join the caller's trace. Pure parsing, bounded: anything
//! malformed, oversized or ambiguous reads as no parent at all, never as an error.

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const X_B3_TRACE_ID: &str = "x-b3-traceid";
pub const X_B3_SPAN_ID: &str = "x-b3-spanid";
pub const X_B3_SAMPLED: &str = "x-b3-sampled";
pub const X_B3_FLAGS: &str = "x-b3-flags";

/// W3C asks that at least 512 characters of `tracestate` be passed on; a longer one is dropped
/// whole rather than cut inside an entry.
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// `traceparent` of a future version may be longer than version 00's 55 characters; past this it
/// is not looked at.
const MAX_TRACEPARENT_BYTES: usize = 256;
/// The longest B3 single header: 32 + 16 hex ids, a flag and a 16-hex parent id, with dashes.
const MAX_B3_BYTES: usize = 68;

/// The span a request arrived under: the parent of the decision's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's sampling decision; `None` when it deferred it (B3 without a flag), so the
    /// decision is made here as for a root.
    pub sampled: Option<bool>,
    /// W3C `tracestate`, passed on as received.
    pub trace_state: Option<String>,
}

/// Collects the trace headers of one request as a door reads them, in any order and case.
#[derive(Debug, Default)]
pub struct TraceHeaders {
    traceparent: Slot<TraceParent>,
    tracestate: Option<String>,
    tracestate_too_long: bool,
    b3: Slot<TraceParent>,
    b3_trace_id: Slot<[u8; 16]>,
    b3_span_id: Slot<[u8; 8]>,
    b3_sampled: Option<bool>,
    b3_debug: bool,
}

/// One header's parsed value; a repeated header is ambiguous and reads as absent.
#[derive(Debug, Default)]
enum Slot<T> {
    #[default]
    Absent,
    Valid(T),
    Invalid,
}

impl<T> Slot<T> {
    fn set(&mut self, parsed: Option<T>) {
        *self = match (&self, parsed) {
            (Slot::Absent, Some(v)) => Slot::Valid(v),
            _ => Slot::Invalid,
        };
    }

    fn take(self) -> Option<T> {
        match self {
            Slot::Valid(v) => Some(v),
            _ => None,
        }
    }
}

impl TraceHeaders {
    /// Reads `name` if it is a trace header; false for any other header.
    pub fn header(&mut self, name: &str, value: &str) -> bool {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        let value = value.trim();
        if is(TRACEPARENT) {
            self.traceparent.set(parse_traceparent(value));
        } else if is(TRACESTATE) {
            // Repeated `tracestate` lines are one list (W3C trace-context §3.3.1.1).
            let joined = match self.tracestate.take() {
                Some(before) => format!("{before},{value}"),
                None => value.to_owned(),
            };
            if joined.len() > MAX_TRACESTATE_BYTES {
                self.tracestate_too_long = true;
            } else {
                self.tracestate = Some(joined);
            }
        } else if is(B3) {
            self.b3.set(parse_b3_single(value));
        } else if is(X_B3_TRACE_ID) {
            self.b3_trace_id.set(parse_b3_trace_id(value));
        } else if is(X_B3_SPAN_ID) {
            self.b3_span_id.set(hex_id::<8>(value));
        } else if is(X_B3_SAMPLED) {
            self.b3_sampled = parse_b3_sampled(value);
        } else if is(X_B3_FLAGS) {
            self.b3_debug = value == "1";
        } else {
            return false;
        }
        true
    }

    /// The parent: W3C first, as Envoy and the OpenTelemetry propagators prefer it, then B3's
    /// single header, then its multi-header form.
    pub fn finish(self) -> Option<TraceParent> {
        if let Some(mut p) = self.traceparent.take() {
            if !self.tracestate_too_long {
                p.trace_state = self.tracestate.filter(|s| !s.is_empty());
            }
            return Some(p);
        }
        if let Some(p) = self.b3.take() {
            return Some(p);
        }
        let (trace_id, span_id) = (self.b3_trace_id.take()?, self.b3_span_id.take()?);
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: if self.b3_debug {
                Some(true)
            } else {
                self.b3_sampled
            },
            trace_state: None,
        })
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; a later version may append fields.
fn parse_traceparent(v: &str) -> Option<TraceParent> {
    if v.len() < 55 || v.len() > MAX_TRACEPARENT_BYTES || !v.is_ascii() {
        return None;
    }
    let version = hex_id::<1>(&v[0..2])?[0];
    // Version ff is forbidden; version 00 has exactly four fields.
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && &v[55..56] != "-") {
        return None;
    }
    if &v[2..3] != "-" || &v[35..36] != "-" || &v[52..53] != "-" {
        return None;
    }
    let trace_id = hex_id::<16>(&v[3..35])?;
    let span_id = hex_id::<8>(&v[36..52])?;
    let flags = hex_id::<1>(&v[53..55])?[0];
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: Some(flags & 0x01 == 1),
        trace_state: None,
    })
}

/// `b3: <trace id>-<span id>[-<sampled>[-<parent span id>]]`. A bare sampling flag (`b3: 0`)
/// carries no ids to join, so it reads as no parent.
fn parse_b3_single(v: &str) -> Option<TraceParent> {
    if v.len() > MAX_B3_BYTES {
        return None;
    }
    let mut parts = v.split('-');
    let trace_id = parse_b3_trace_id(parts.next()?)?;
    let span_id = hex_id::<8>(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        hex_id::<8>(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        sampled,
        trace_state: None,
    })
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is the low half of a 128-bit id.
fn parse_b3_trace_id(v: &str) -> Option<[u8; 16]> {
    match v.len() {
        32 => hex_id::<16>(v),
        16 => {
            let low = hex_id::<8>(v)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id).filter(|id| id.iter().any(|b| *b != 0))
        }
        _ => None,
    }
}

fn parse_b3_sampled(v: &str) -> Option<bool> {
    match v {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Exactly `2 * N` lower-case hex digits, not all zero (an all-zero id is invalid in both
/// formats, and a zero flags byte is still a valid `[0]`, so only ids go through the check).
fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    if N > 1 && out.iter().all(|b| *b == 0) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn read(headers: &[(&str, &str)]) -> Option<TraceParent> {
        let mut t = TraceHeaders::default();
        for (k, v) in headers {
            t.header(k, v);
        }
        t.finish()
    }

    fn ids(p: &TraceParent) -> (String, String) {
        let h = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        (h(&p.trace_id), h(&p.span_id))
    }

    #[test]
    fn w3c_traceparent_is_read_with_its_flag_and_state() {
        let p = read(&[
            ("Traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "rojo=00f067aa0ba902b7"),
            ("tracestate", "congo=t61rcWkgMzE"),
        ])
        .unwrap();
        assert_eq!(ids(&p), (TRACE.into(), SPAN.into()));
        assert_eq!(p.sampled, Some(true));
        assert_eq!(
            p.trace_state.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        let p = read(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]).unwrap();
        assert_eq!(p.sampled, Some(false));
        // Only bit 0 is the sampled flag.
        let p = read(&[("traceparent", &format!("00-{TRACE}-{SPAN}-02"))]).unwrap();
        assert_eq!(p.sampled, Some(false));
        // A later version may carry more fields after a dash.
        let p = read(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-extra"))]).unwrap();
        assert_eq!(p.sampled, Some(true));
    }

    #[test]
    fn malformed_or_repeated_traceparents_read_as_no_parent() {
        let zero_trace = "0".repeat(32);
        let zero_span = "0".repeat(16);
        let upper = TRACE.to_uppercase();
        for bad in [
            String::new(),
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{zero_trace}-{SPAN}-01"),
            format!("00-{TRACE}-{zero_span}-01"),
            format!("00-{upper}-{SPAN}-01"),
            format!("00_{TRACE}-{SPAN}-01"),
            format!("0g-{TRACE}-{SPAN}-01"),
            format!("01-{TRACE}-{SPAN}-01x"),
            format!("00-{TRACE}-{SPAN}-01{}", "-x".repeat(200)),
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01".into(),
        ] {
            assert_eq!(read(&[("traceparent", &bad)]), None, "{bad:?}");
        }
        let good = format!("00-{TRACE}-{SPAN}-01");
        assert_eq!(
            read(&[("traceparent", &good), ("traceparent", &good)]),
            None
        );
    }

    #[test]
    fn oversized_tracestate_is_dropped_whole() {
        let big = format!("a={}", "x".repeat(MAX_TRACESTATE_BYTES));
        let p = read(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "a=1"),
            ("tracestate", &big),
        ])
        .unwrap();
        assert_eq!(p.trace_state, None);
    }

    #[test]
    fn b3_single_and_multi_headers_are_read() {
        let p = read(&[("b3", &format!("{TRACE}-{SPAN}-1-{SPAN}"))]).unwrap();
        assert_eq!(
            (ids(&p), p.sampled),
            ((TRACE.into(), SPAN.into()), Some(true))
        );
        let p = read(&[("b3", &format!("{}-{SPAN}-0", &TRACE[16..]))]).unwrap();
        assert_eq!(ids(&p).0, format!("{}{}", "0".repeat(16), &TRACE[16..]));
        assert_eq!(p.sampled, Some(false));
        assert_eq!(
            read(&[("b3", &format!("{TRACE}-{SPAN}-d"))])
                .unwrap()
                .sampled,
            Some(true)
        );
        assert_eq!(
            read(&[("b3", &format!("{TRACE}-{SPAN}"))]).unwrap().sampled,
            None
        );
        for bad in ["0", "1", &format!("{TRACE}-{SPAN}-2"), TRACE] {
            assert_eq!(read(&[("b3", bad)]), None, "{bad:?}");
        }

        let multi = |sampled: Option<&str>, flags: Option<&str>| {
            let mut h = vec![("X-B3-TraceId", TRACE), ("X-B3-SpanId", SPAN)];
            h.extend(sampled.map(|s| ("X-B3-Sampled", s)));
            h.extend(flags.map(|f| ("X-B3-Flags", f)));
            read(&h).unwrap()
        };
        assert_eq!(ids(&multi(None, None)), (TRACE.into(), SPAN.into()));
        assert_eq!(multi(Some("1"), None).sampled, Some(true));
        assert_eq!(multi(Some("true"), None).sampled, Some(true));
        assert_eq!(multi(Some("0"), None).sampled, Some(false));
        assert_eq!(multi(None, None).sampled, None);
        assert_eq!(multi(Some("0"), Some("1")).sampled, Some(true), "debug");
        assert_eq!(read(&[("x-b3-traceid", TRACE)]), None, "no span id");
    }

    #[test]
    fn w3c_wins_over_b3_and_single_over_multi() {
        let other = "a".repeat(32);
        let p = read(&[
            ("x-b3-traceid", &other),
            ("x-b3-spanid", SPAN),
            ("b3", &format!("{other}-{SPAN}-1")),
            ("traceparent", &format!("00-{TRACE}-{SPAN}-00")),
        ])
        .unwrap();
        assert_eq!((ids(&p).0, p.sampled), (TRACE.into(), Some(false)));
        let p = read(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("b3", &format!("{other}-{SPAN}-1")),
        ])
        .unwrap();
        assert_eq!(ids(&p).0, other);
    }

    #[test]
    fn other_headers_are_not_taken() {
        let mut t = TraceHeaders::default();
        assert!(!t.header("x-request-id", "abc"));
        assert!(!t.header("traceparent-x", "abc"));
        assert!(t.header("TRACESTATE", "a=1"));
    }
}
