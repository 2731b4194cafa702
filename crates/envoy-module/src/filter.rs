//! The Envoy door: Envoy's request headers → `RequestContext` → engine → `Answer` → Envoy's header
//! and local-reply calls. No decision logic lives here.
//!
//! A decision that needs nothing but memory (a cached key, a cached token, the local limiter) is
//! made inline on Envoy's worker thread: the engine's future is polled once and is ready. One
//! that must wait (Redis, a key fetch) holds the request while the process-wide runtime finishes
//! it, and the worker resumes the request through the filter scheduler.
//!
//! When Envoy traces the request, the decision is a child of Envoy's active span, made through
//! Envoy's tracer (on the worker: started with the request, ended when the answer is written)
//! with the attributes the engine lists; the engine's own `tracing_export` then records nothing
//! for it, so each decision is one span. Requests Envoy does not trace keep `tracing_export`.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use gybc_authz_engine::answer::{Answer, Header};
use gybc_authz_engine::config::{Config, ProcessEnv};
use gybc_authz_engine::decision::{Decision, Reason};
use gybc_authz_engine::request::{self, RequestContext};
use gybc_authz_engine::route::{PREFIX, RouteError, RouteSettings};
use gybc_authz_engine::{Engine, otel, telemetry};
use smallvec::SmallVec;

use crate::engines::{self, Running};
use crate::ffi::{
    ChildSpan, EnvoyConfig, EnvoyFilter, HeadersStatus, HttpFilter, HttpFilterConfig,
    HttpRouteConfig,
};
use crate::runtime;
use crate::stats::Stats;

// Exports Envoy's hooks for these types; their bodies are in ffi.rs.
crate::ffi::declare_filter!(FilterConfig, RouteConfig);

/// The only event a filter schedules: its decision is ready.
const DECIDED: u64 = 1;

/// One filter config: the engine for the daemon's config file format, and the stats Envoy defined
/// for it. Shared by every worker; a config reload makes a new one and drops the old, and the
/// engine (`engines`) is the old one's when the config is equal.
pub struct FilterConfig {
    shared: Arc<Shared>,
}

struct Shared {
    /// `running.engine`, at hand.
    engine: Arc<Engine>,
    running: Arc<Running>,
    stats: Stats,
}

impl Shared {
    /// One decision's latency, and the engine's metrics copied into Envoy's stats if it is time.
    fn decided(&self, envoy: &EnvoyFilter, latency: Duration) {
        let (gathered, copies) = (&self.running.gathered, &self.running.copies);
        (self.stats).decided(envoy, gathered, copies, engines::lifecycle, latency);
    }

    /// The engine's metrics copied into Envoy's stats if it is time.
    fn sync_stats(&self, envoy: &EnvoyFilter) {
        let (gathered, copies) = (&self.running.gathered, &self.running.copies);
        (self.stats).sync(envoy, gathered, copies, engines::lifecycle);
    }
}

impl HttpFilterConfig for FilterConfig {
    type Filter = Filter;

    /// `config` is the daemon's YAML config, or the absolute path of a file holding it. Errors
    /// carry the same field paths `gybc-authz check-config` prints, and fail Envoy's config load;
    /// so does a changed config whose engine does not load in time (`engines`).
    fn new(envoy: &mut EnvoyConfig, _name: &str, config: &[u8]) -> Result<FilterConfig, String> {
        let cfg = load_config(config)?;
        telemetry::init(&cfg.log);
        let running = engines::engine_for(&cfg, runtime::get()?)?;
        let stats = Stats::declare(envoy, &running.engine.metrics)?;
        Ok(FilterConfig {
            shared: Arc::new(Shared {
                engine: running.engine.clone(),
                running,
                stats,
            }),
        })
    }

    fn new_filter(&self) -> Filter {
        Filter {
            shared: self.shared.clone(),
            started: None,
            decided: None,
            to_client: ToClient::default(),
            sent: 0,
            span: None,
        }
    }
}

fn load_config(raw: &[u8]) -> Result<Config, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "filter_config is not UTF-8".to_owned())?;
    let trimmed = text.trim();
    if trimmed.starts_with('/') && !trimmed.contains('\n') {
        Config::load(Path::new(trimmed), &ProcessEnv).map_err(|e| format!("{trimmed}: {e}"))
    } else if !trimmed.is_empty() && !trimmed.contains([':', '\n', '{']) {
        // One word and no YAML structure: meant as a file, which Envoy's working directory
        // would make ambiguous.
        Err(format!(
            "filter_config: `{trimmed}` is neither the config's YAML nor an absolute path to it"
        ))
    } else {
        Config::from_yaml(text, &ProcessEnv).map_err(|e| format!("filter_config: {e}"))
    }
}

/// A route's `gybc.*` settings: a map of the same keys and string values the sidecar reads from
/// `context_extensions`, as YAML or JSON. A bad value is kept and refuses the route's requests
/// (403 `route_misconfigured`), as in the sidecar; a config that is not such a map fails the load.
pub struct RouteConfig {
    settings: Result<RouteSettings, RouteError>,
}

impl HttpRouteConfig for RouteConfig {
    fn new(_name: &str, config: &[u8]) -> Result<RouteConfig, String> {
        let text = std::str::from_utf8(config)
            .map_err(|_| "per-route filter_config is not UTF-8".to_owned())?;
        let map: HashMap<String, String> = if text.trim().is_empty() {
            HashMap::new()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| {
                format!("per-route filter_config must map gybc.* settings to strings: {e}")
            })?
        };
        if let Some(key) = map.keys().find(|k| !k.starts_with(PREFIX)) {
            return Err(format!(
                "per-route filter_config: `{key}` is not a {PREFIX}* setting"
            ));
        }
        let settings = RouteSettings::parse(&map);
        if let Err(e) = &settings {
            tracing::error!(key = %e.key, why = e.why, "Invalid per-route setting; requests on this route are refused.");
        }
        Ok(RouteConfig { settings })
    }
}

/// One request's passage through the filter.
pub struct Filter {
    shared: Arc<Shared>,
    /// When a held request's decision started.
    started: Option<Instant>,
    /// Filled by the runtime when a held request's decision is ready; `Err` if it panicked.
    /// Made only for a held request: an inline one needs no slot.
    decided: Option<Arc<Mutex<Option<Decided>>>>,
    /// The rate-limit headers an allow sends back to the client.
    to_client: ToClient,
    /// Bit `i`: the request carries `Engine::upstream_names()[i]` (all bits when its header
    /// lines could not be read).
    sent: u8,
    /// The decision's span in Envoy's trace, from the decision's start until it is applied.
    span: Option<ChildSpan>,
}

type Decided = std::thread::Result<(Box<RequestContext>, Decision)>;

thread_local! {
    /// The request context this worker reads its requests into, kept between them so that its
    /// strings' buffers are reused (a box: it moves into the decision and back as a pointer).
    static KEPT_CONTEXT: Cell<Option<Box<RequestContext>>> = const { Cell::new(None) };
}

impl HttpFilter for Filter {
    fn on_request_headers(
        &mut self,
        envoy: &mut EnvoyFilter,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        let started = Instant::now();
        #[cfg(feature = "test-hooks")]
        self.advance_test_clock(envoy);
        // The worker's kept context, read into in place (`reread_bytes`): a request decided
        // inline hands it back; one that must wait takes it along and the next gets a new one.
        let mut ctx = KEPT_CONTEXT.take().unwrap_or_default();
        self.read(envoy, &mut ctx);
        // When Envoy traces the request, the decision is a span in Envoy's trace, through
        // Envoy's tracer, instead of one the engine exports itself (`tracing_export`).
        self.span = envoy.start_child_span(otel::DECISION_SPAN);
        let in_envoys_trace = self.span.is_some();
        let engine = self.shared.engine.clone();
        let decide = async move {
            let decision = if in_envoys_trace {
                engine.decide_untraced(&ctx).await
            } else {
                engine.decide(&ctx).await
            };
            (ctx, decision)
        };
        let runtime = match runtime::get() {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        // Entered, so whatever the engine registers (timers, sockets) belongs to its runtime.
        let polled = {
            let _entered = runtime.enter();
            runtime::poll_once(decide)
        };
        match polled {
            Ok((ctx, decision)) => {
                let status = self.apply(envoy, &ctx, &decision, started);
                KEPT_CONTEXT.set(Some(ctx));
                status
            }
            Err(decide) => {
                let Some(scheduler) = envoy.scheduler() else {
                    return HeadersStatus::StopIteration;
                };
                self.started = Some(started);
                let decided = self.decided.insert(Arc::default()).clone();
                runtime.spawn(async move {
                    let out = AssertUnwindSafe(decide).catch_unwind().await;
                    *decided.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
                    // Envoy drops the event if the client has gone; the scheduler is ours to free.
                    scheduler.commit(DECIDED);
                });
                HeadersStatus::StopIteration
            }
        }
    }

    fn on_scheduled(&mut self, envoy: &mut EnvoyFilter, _event_id: u64) {
        let Some(decided) = self
            .decided
            .as_ref()
            .and_then(|d| d.lock().unwrap_or_else(|p| p.into_inner()).take())
        else {
            return;
        };
        let started = self.started.take().unwrap_or_else(Instant::now);
        match decided {
            Ok((ctx, decision)) => {
                if self.apply(envoy, &ctx, &decision, started) == HeadersStatus::Continue {
                    envoy.continue_decoding();
                }
            }
            // The runtime caught it; the FFI layer answers it like a panic in this hook.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn on_response_headers(
        &mut self,
        envoy: &mut EnvoyFilter,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        if self.to_client.is_empty() {
            return HeadersStatus::Continue;
        }
        // Each replaces a copy the upstream sent; one it did not send is added, which spares
        // Envoy a search per header (one read of the response's lines costs less). Unread lines
        // (a response always has `:status`) count as sent.
        let lines = envoy.response_headers();
        let unread = lines.iter().next().is_none();
        let sent = |name: &str| {
            unread
                || lines
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
        };
        let to_client: SmallVec<[(&str, &str, bool); 8]> = (self.to_client.iter())
            .map(|(name, value)| (name, value, sent(name)))
            .collect();
        drop(lines);
        for (name, value, sent) in to_client {
            if sent {
                envoy.set_response_header(name, value);
            } else {
                envoy.add_response_header(name, value);
            }
        }
        HeadersStatus::Continue
    }

    /// The FFI layer caught a panic: answer 503 as the engine words it (the layer's own 503 is
    /// the fallback should this fail too), and count it.
    fn on_panic(&mut self, envoy: &mut EnvoyFilter) {
        if let Some(mut span) = self.span.take() {
            span.set_tag("error", "true");
            span.finish();
        }
        let engine = &self.shared.engine;
        let failed = engine.failed();
        if let Answer::Deny {
            reason,
            status,
            headers,
            body,
        } = engine.answer(&failed)
        {
            send_denial(envoy, reason, status, &headers, body);
        }
        self.shared.sync_stats(envoy);
    }
}

impl Filter {
    fn read(&mut self, envoy: &EnvoyFilter, ctx: &mut RequestContext) {
        let lines = envoy.request_headers();
        // Which of the headers an allow may remove the client sent: removing one that is not
        // there is a header-map scan in Envoy for nothing.
        let names = self.shared.engine.upstream_names();
        // An allow adds, rather than sets, an identity header the client did not send; so when
        // the lines could not be read (a request always has pseudo-headers), every one counts as
        // sent, and is replaced.
        self.sent = match lines.iter().next() {
            None => u8::MAX,
            // No name an allow writes is a pseudo-header.
            Some(_) => {
                (lines.iter().filter(|(k, _)| k.first() != Some(&b':'))).fold(0, |sent, (k, _)| {
                    names
                        .iter()
                        .position(|n| n.as_bytes().eq_ignore_ascii_case(k))
                        .map_or(sent, |i| sent | 1 << i)
                })
            }
        };
        let pseudo = |name: &[u8]| {
            lines
                .iter()
                .find(|(k, _)| *k == name)
                .map_or(Cow::Borrowed(""), |(_, v)| request::text(v))
        };
        let (method, target, host) = (pseudo(b":method"), pseudo(b":path"), pseudo(b":authority"));
        // Values are bytes (Envoy does not promise UTF-8), read as the sidecar's raw header map
        // reads them; only the values the engine looks at are turned into text.
        ctx.reread_bytes(
            &method,
            &target,
            &host,
            lines.iter(),
            self.shared.engine.limits(),
        );
        // A route without settings keeps the defaults `reread_bytes` left.
        if let Some(r) = envoy.route_config::<RouteConfig>() {
            ctx.set_route(r.settings.clone());
        }
    }

    /// Writes the answer into the stream, logs and counts the decision.
    fn apply(
        &mut self,
        envoy: &mut EnvoyFilter,
        ctx: &RequestContext,
        decision: &Decision,
        started: Instant,
    ) -> HeadersStatus {
        let engine = &self.shared.engine;
        // Ended before the answer goes out: a local reply may end the stream, and its span.
        if let Some(mut span) = self.span.take() {
            for (key, value) in otel::decision_attributes(ctx, decision) {
                span.set_tag(key, &value.to_string());
            }
            if otel::decision_error(decision).is_some() {
                // Envoy's tracers' convention for a failed operation.
                span.set_tag("error", "true");
            }
            span.finish();
        }
        let status = match engine.answer(decision) {
            Answer::Allow {
                upstream,
                remove_upstream,
                downstream,
            } => {
                let names = engine.upstream_names();
                let sent = |name: &str| {
                    names
                        .iter()
                        .position(|n| *n == name)
                        .is_none_or(|i| self.sent & 1 << i != 0)
                };
                // Removals first (the answer sets none of these), while the map holds only the
                // client's lines: the first search makes Envoy index a map's custom headers, and
                // the fewer there are, the cheaper. Setting replaces every client copy; a header
                // the client did not send is added, which spares Envoy a search for copies.
                for name in remove_upstream.into_iter().filter(|n| sent(n)) {
                    envoy.remove_request_header(name);
                }
                for h in &upstream {
                    if sent(h.name) {
                        envoy.set_request_header(h.name, &h.value);
                    } else {
                        envoy.add_request_header(h.name, &h.value);
                    }
                }
                for h in &downstream {
                    self.to_client.push(h.name, &h.value);
                }
                HeadersStatus::Continue
            }
            Answer::Deny {
                reason,
                status,
                headers,
                body,
            } => {
                send_denial(envoy, reason, status, &headers, body);
                HeadersStatus::StopIteration
            }
        };
        let latency = started.elapsed();
        engine.observe(ctx, decision, latency);
        self.shared.decided(envoy, latency);
        status
    }

    #[cfg(feature = "test-hooks")]
    fn advance_test_clock(&self, envoy: &mut EnvoyFilter) {
        const ADVANCE: &str = "x-gybc-test-advance-ms";
        let by = envoy
            .request_header(ADVANCE)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
        if let (Some(ms), Some(clock)) = (by, engines::test_clock()) {
            clock.advance(std::time::Duration::from_millis(ms));
        }
        envoy.remove_request_header(ADVANCE);
    }
}

/// The headers an allow sends back to the client, kept from the request-headers hook to the
/// response's: a few short lines, written one after the other into one buffer held inline (the
/// three `x-ratelimit-*` lines fit; the IETF ones may spill to the heap).
#[derive(Default)]
struct ToClient {
    text: SmallVec<[u8; 128]>,
    /// Each line's name and value, as the offsets where they end in `text`.
    ends: SmallVec<[(usize, usize); 4]>,
}

impl ToClient {
    fn push(&mut self, name: &str, value: &str) {
        self.text.extend_from_slice(name.as_bytes());
        let name_end = self.text.len();
        self.text.extend_from_slice(value.as_bytes());
        self.ends.push((name_end, self.text.len()));
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        // Only whole strings were pushed: the buffer is UTF-8, and each cut is at a boundary.
        let text = std::str::from_utf8(&self.text).expect("pushed as strings");
        let mut start = 0;
        self.ends.iter().map(move |&(name_end, end)| {
            let line = (&text[start..name_end], &text[name_end..end]);
            start = end;
            line
        })
    }
}

/// A denial as Envoy's local reply: the client gets it, the upstream never sees the request.
fn send_denial(
    envoy: &mut EnvoyFilter,
    reason: Reason,
    status: u16,
    headers: &[Header<'_>],
    body: &str,
) {
    let headers: SmallVec<[(&str, &str); 8]> =
        headers.iter().map(|h| (h.name, h.value.as_ref())).collect();
    // Envoy's response code details, as its access log shows them (no spaces allowed).
    let mut details = SmallVec::<[u8; 64]>::new();
    details.extend_from_slice(b"gybc_authz_");
    details.extend_from_slice(reason.as_str().as_bytes());
    let details = std::str::from_utf8(&details).expect("ASCII");
    envoy.send_response(u32::from(status), &headers, body.as_bytes(), details);
}

// Only the decision future's shape is checked here: anything that calls into Envoy needs the
// real binary (tests/module_*.rs).
#[cfg(test)]
mod tests {
    use std::pin::pin;

    use super::*;

    #[test]
    fn route_config_takes_a_map_of_gybc_settings() {
        let ok = RouteConfig::new("r", br#"{"gybc.public": "true"}"#).unwrap();
        assert!(ok.settings.unwrap().public);
        let yaml = RouteConfig::new("r", b"gybc.required_scopes: \"a, b\"\n").unwrap();
        assert_eq!(yaml.settings.unwrap().required_scopes, ["a", "b"]);
        assert!(RouteConfig::new("r", b"").unwrap().settings.is_ok());
        // A bad value refuses the route's requests, as in the sidecar.
        let bad = RouteConfig::new("r", br#"{"gybc.public": "yes please"}"#).unwrap();
        assert!(bad.settings.is_err());
        // Not a map of strings, or a key outside gybc.*: Envoy's config load fails.
        assert!(RouteConfig::new("r", b"[1, 2]").is_err());
        assert!(RouteConfig::new("r", br#"{"public": "true"}"#).is_err());
    }

    #[test]
    fn filter_config_is_the_daemons_format_inline_or_by_path() {
        assert!(load_config(b"jwt: { leeway_secs: 5 }\n").is_ok());
        let err = load_config(b"jwt: { leeway_secs: 999999 }\n").unwrap_err();
        assert!(err.contains("jwt.leeway_secs"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "bogus_section: 1\n").unwrap();
        let err = load_config(path.to_str().unwrap().as_bytes()).unwrap_err();
        assert!(err.contains("bogus_section"), "{err}");
        let err = load_config(b"config/gybc-authz.yaml").unwrap_err();
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn kept_response_headers_come_back_as_pushed_inline_or_spilled() {
        let lines = [
            ("x-ratelimit-limit", "100"),
            ("x-ratelimit-remaining", "99"),
            ("x-ratelimit-reset", "1767225600"),
            ("ratelimit", "limit=100, remaining=99, reset=60"),
            ("ratelimit-policy", "100;w=60"),
        ];
        let mut to_client = ToClient::default();
        for (i, (name, value)) in lines.iter().enumerate() {
            to_client.push(name, value);
            assert!(to_client.iter().eq(lines[..=i].iter().copied()));
        }
        assert!(to_client.text.spilled(), "the IETF lines spill to the heap");
        assert!(ToClient::default().iter().next().is_none());
    }

    #[test]
    fn a_decision_future_is_send() {
        fn send<T: Send>(_: &T) {}
        let f = async {
            let engine: Option<Arc<Engine>> = None;
            let ctx = RequestContext::default();
            if let Some(e) = engine {
                let _ = e.decide(&ctx).await;
            }
        };
        send(&pin!(f));
    }
}
