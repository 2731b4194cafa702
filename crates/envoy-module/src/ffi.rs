//! Envoy's dynamic-module C ABI (v0.2.0, Envoy 1.40): the only `unsafe` code in the crate.
//!
//! Four parts: the C declarations (types, enum values, the callbacks this module calls); the
//! safe wrappers [`EnvoyFilter`], [`EnvoyConfig`], [`Scheduler`] and [`ChildSpan`]; the traits a
//! door implements ([`HttpFilterConfig`], [`HttpFilter`], [`HttpRouteConfig`]); and the
//! `envoy_dynamic_module_on_*` hooks Envoy calls. This file names no door: the hooks that need
//! the door's types are generic bodies here, exported by the one [`declare_filter!`] call the
//! door makes (as Envoy's own Rust SDK registers user code through `declare_init_functions!`).
//! Dispatch is static: each exported hook is monomorphized for the door's types, with no
//! registry to consult and no allocation beyond the stream's own.
//!
//! What the wrappers guarantee, and why:
//! - No panic reaches Envoy: unwinding across `extern "C"` aborts the whole proxy, so every hook
//!   runs under `catch_unwind`. A filter that panicked gets no further calls on that stream.
//! - Envoy re-enters the module while a hook runs. Continuing a request can run a local reply
//!   further down the chain (a `direct_response` route) and call our response-headers hook
//!   (seen in 1.40); a local reply that finishes the stream may call `on_http_filter_destroy`
//!   before `send_response` returns (Envoy's code allows it; not seen in 1.40 smoke tests). So per-stream state lives in `Cell`s, the filter sits in an
//!   `UnsafeCell` that is never borrowed twice, a destroy that arrives mid-hook is carried out
//!   by the outermost hook, and `continue_decoding` runs after the filter call has returned.
//! - After a local reply Envoy may already have torn the stream down, so header access, the
//!   scheduler and route config stop working (stats keep working: they only need the config).
//! - Header slices Envoy lends stay valid until the hook returns or a header changes: getters
//!   borrow `&self` and every mutator takes `&mut self`, so the borrow checker enforces it.

use std::any::{Any, TypeId};
use std::cell::{Cell, UnsafeCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::io::{self, Write as _};
use std::marker::PhantomData;
use std::mem::{self, ManuallyDrop};
use std::panic::{self, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::{PoisonError, RwLock};

// `catch_unwind` in every hook is what keeps a filter panic from aborting Envoy; with
// panic = "abort" there is nothing to catch. The workspace profile decides, this enforces it.
#[cfg(panic = "abort")]
compile_error!("gybc-authz-envoy must be built with panic = \"unwind\" (see src/ffi.rs)");

// ---------------------------------------------------------------------------------------------
// C declarations
// ---------------------------------------------------------------------------------------------

/// `envoy_dynamic_module_type_envoy_buffer`: bytes Envoy owns and lends for a call or a hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

impl EnvoyBuffer {
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    const EMPTY: Self = Self {
        ptr: ptr::null(),
        length: 0,
    };

    /// # Safety
    /// `ptr` must be null or point to `length` readable bytes that stay unchanged for `'a`.
    unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            // Envoy hands out `{NULL, 0}` for empty values; `from_raw_parts` forbids a null pointer.
            return &[];
        }
        // SAFETY: non-null, and the caller promises `length` bytes that live for `'a`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) }
    }
}

/// `envoy_dynamic_module_type_module_buffer`: bytes the module owns, read by Envoy during a call.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    /// `set_header` treats a null value as "remove the header".
    const NULL: Self = Self {
        ptr: ptr::null(),
        length: 0,
    };

    fn new(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

/// `envoy_dynamic_module_type_envoy_http_header`: one header line Envoy owns.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

impl EnvoyHttpHeader {
    const EMPTY: Self = Self {
        key_ptr: ptr::null(),
        key_length: 0,
        value_ptr: ptr::null(),
        value_length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`: one header line the module owns.
#[repr(C)]
struct ModuleHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

// C enums travel as 32-bit integers (clang gives an enum without negative values `unsigned
// int`). Plain integers rather than Rust enums: a value Envoy adds later must not be UB here.

/// `envoy_dynamic_module_type_http_header_type`.
const HEADER_TYPE_REQUEST: u32 = 0;
const HEADER_TYPE_RESPONSE: u32 = 2;

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_headers_status`.
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
const HEADERS_STOP_ALL_ITERATION_AND_WATERMARK: u32 = 4;

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_body_status`.
const BODY_CONTINUE: u32 = 0;
const BODY_STOP_ITERATION_AND_WATERMARK: u32 = 2;
const BODY_STOP_ITERATION_NO_BUFFER: u32 = 3;

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_trailers_status`.
const TRAILERS_CONTINUE: u32 = 0;
const TRAILERS_STOP_ITERATION: u32 = 1;

/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;

// Every callback below is exported by the Envoy 1.40.0 binary (`nm -D`); the module leaves
// them undefined and `dlopen` resolves them against Envoy.
unsafe extern "C" {
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy: *mut c_void,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy: *mut c_void,
        header_type: u32,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter_envoy: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy: *mut c_void,
        status_code: u32,
        headers: *const ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter_envoy: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter_envoy: *mut c_void,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_get_most_specific_route_config(
        filter_envoy: *mut c_void,
    ) -> *const c_void;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config_envoy: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config_envoy: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config_envoy: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter_envoy: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter_envoy: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter_envoy: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    // Tracing. The active span is Envoy's `Tracing::Span` of the stream (null when the HCM has
    // no tracer); a child span is a `Tracing::Span` whose ownership Envoy hands to the module,
    // and `child_span_finish` both ends and deletes it. `set_tag` takes either kind.
    fn envoy_dynamic_module_callback_http_get_active_span(filter_envoy: *mut c_void)
    -> *mut c_void;
    fn envoy_dynamic_module_callback_http_span_spawn_child(
        filter_envoy: *mut c_void,
        span: *mut c_void,
        operation_name: ModuleBuffer,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_span_set_tag(
        span: *mut c_void,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_child_span_finish(child_span: *mut c_void);
}

/// The shape shared by the three `*_config_define_*` callbacks.
type DefineFn =
    unsafe extern "C" fn(*mut c_void, ModuleBuffer, *const ModuleBuffer, usize, *mut usize) -> u32;
/// The shape shared by the per-request metric callbacks.
type RecordFn = unsafe extern "C" fn(*mut c_void, usize, *const ModuleBuffer, usize, u64) -> u32;

// ---------------------------------------------------------------------------------------------
// Safe wrappers
// ---------------------------------------------------------------------------------------------

/// What a headers hook tells Envoy to do with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadersStatus {
    /// Pass the message on to the next filter.
    Continue,
    /// Request side: hold the request (headers, body and trailers) until `on_scheduled` calls
    /// [`EnvoyFilter::continue_decoding`] or answers it. Nothing else resumes it, so a filter
    /// that returns this must have handed a [`Scheduler`] to something that will commit.
    /// Response side: treated as `Continue`, since this layer has no way to resume a response.
    StopIteration,
}

/// Which hook an [`EnvoyFilter`] was made for: some calls are only meaningful in some hooks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    RequestHeaders,
    Scheduled,
    ResponseHeaders,
}

/// Envoy's side of one stream, valid only during a hook call (not Send).
pub struct EnvoyFilter {
    raw: *mut c_void,
    hook: Hook,
    /// A local reply went out (in this hook or an earlier one).
    responded: bool,
    /// The filter asked to continue; the hook does it once the filter call has returned.
    continue_requested: bool,
}

/// How many request header lines [`EnvoyFilter::request_headers`] holds without a heap allocation.
const INLINE_HEADERS: usize = 32;

/// A request's header lines, borrowed from Envoy for as long as the filter handle they came from.
pub struct HeaderLines<'a> {
    inline: [EnvoyHttpHeader; INLINE_HEADERS],
    /// Used instead of `inline` when the request has more lines.
    heap: Vec<EnvoyHttpHeader>,
    len: usize,
    _filter: PhantomData<&'a EnvoyFilter>,
}

impl<'a> HeaderLines<'a> {
    /// The lines as (name, value) bytes. Values are bytes: Envoy does not promise UTF-8.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        let lines = if self.heap.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.heap[..self.len]
        };
        lines.iter().map(|line| {
            let key = EnvoyBuffer {
                ptr: line.key_ptr,
                length: line.key_length,
            };
            let value = EnvoyBuffer {
                ptr: line.value_ptr,
                length: line.value_length,
            };
            // SAFETY: as in `request_header`: valid until the hook ends or a header changes,
            // and `'a` borrows the `EnvoyFilter`, which lives only for the hook and must be
            // `&mut` to change a header.
            unsafe { (key.as_bytes(), value.as_bytes()) }
        })
    }
}

impl EnvoyFilter {
    fn new(raw: *mut c_void, hook: Hook, responded: bool) -> Self {
        Self {
            raw,
            hook,
            responded,
            continue_requested: false,
        }
    }

    // Only the test build reads a single header (its clock seam); the filter reads them all.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    /// The first value of request header `name` (lower case). Values are bytes: Envoy does not
    /// promise UTF-8.
    pub fn request_header(&self, name: &str) -> Option<&[u8]> {
        if self.responded {
            return None;
        }
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: `raw` is the live filter of the running hook; Envoy reads `name` during the
        // call only; `value` is a valid out-pointer and a null `optional_size` is allowed.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.raw,
                HEADER_TYPE_REQUEST,
                ModuleBuffer::new(name.as_bytes()),
                &mut value,
                0,
                ptr::null_mut(),
            )
        };
        // SAFETY: Envoy keeps the value until the hook returns or a header changes; the slice
        // borrows `self`, which lives only for the hook and must be `&mut` to change a header.
        found.then(|| unsafe { value.as_bytes() })
    }

    /// Every request header line as Envoy holds it, pseudo-headers (`:authority`, `:path`,
    /// `:method`, `:scheme`) first, then the rest in arrival order; names are lower case. One
    /// Envoy call; no heap allocation for up to `INLINE_HEADERS` lines.
    pub fn request_headers(&self) -> HeaderLines<'_> {
        self.header_lines(HEADER_TYPE_REQUEST)
    }

    /// Every response header line as Envoy holds it; only in the response-headers hook (there
    /// is no response map before).
    pub fn response_headers(&self) -> HeaderLines<'_> {
        self.header_lines(HEADER_TYPE_RESPONSE)
    }

    fn header_lines(&self, header_type: u32) -> HeaderLines<'_> {
        let mut lines = HeaderLines {
            inline: [EnvoyHttpHeader::EMPTY; INLINE_HEADERS],
            heap: Vec::new(),
            len: 0,
            _filter: PhantomData,
        };
        if self.responded {
            return lines;
        }
        // SAFETY: `raw` is the live filter of the running hook.
        let count =
            unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.raw, header_type) };
        if count == 0 {
            return lines;
        }
        let out = if count <= INLINE_HEADERS {
            lines.inline.as_mut_ptr()
        } else {
            lines.heap = vec![EnvoyHttpHeader::EMPTY; count];
            lines.heap.as_mut_ptr()
        };
        // SAFETY: `out` has room for `count` entries, the size of the same map Envoy now walks
        // (nothing runs on this worker between the two calls to change it).
        let ok =
            unsafe { envoy_dynamic_module_callback_http_get_headers(self.raw, header_type, out) };
        if ok {
            lines.len = count;
        }
        lines
    }

    /// Sets request header `name` to `value`, replacing every copy the client sent. Envoy
    /// treats an empty value as removal: this ABI cannot set a header to "".
    pub fn set_request_header(&mut self, name: &str, value: &str) -> bool {
        self.set_header(
            HEADER_TYPE_REQUEST,
            name,
            ModuleBuffer::new(value.as_bytes()),
        )
    }

    /// Adds request header `name` beside any copy already there: for a header the request is
    /// known not to carry, the same as setting it without Envoy's search for copies to replace.
    /// Envoy adds nothing for an empty value.
    pub fn add_request_header(&mut self, name: &str, value: &str) -> bool {
        self.add_header(HEADER_TYPE_REQUEST, name, value)
    }

    /// Adds response header `name` beside any copy already there (see `add_request_header`).
    pub fn add_response_header(&mut self, name: &str, value: &str) -> bool {
        self.add_header(HEADER_TYPE_RESPONSE, name, value)
    }

    fn add_header(&mut self, header_type: u32, name: &str, value: &str) -> bool {
        let value = ModuleBuffer::new(value.as_bytes());
        self.header_call(
            envoy_dynamic_module_callback_http_add_header,
            header_type,
            name,
            value,
        )
    }

    /// Removes every copy of request header `name`.
    pub fn remove_request_header(&mut self, name: &str) -> bool {
        self.set_header(HEADER_TYPE_REQUEST, name, ModuleBuffer::NULL)
    }

    /// Sets response header `name`, replacing every copy; only works in the response-headers
    /// hook (there is no response map before), and like requests, "" removes the header.
    pub fn set_response_header(&mut self, name: &str, value: &str) -> bool {
        self.set_header(
            HEADER_TYPE_RESPONSE,
            name,
            ModuleBuffer::new(value.as_bytes()),
        )
    }

    fn set_header(&mut self, header_type: u32, name: &str, value: ModuleBuffer) -> bool {
        self.header_call(
            envoy_dynamic_module_callback_http_set_header,
            header_type,
            name,
            value,
        )
    }

    /// One of Envoy's calls that write a header (`set_header`, `add_header`: same arguments).
    fn header_call(
        &mut self,
        call: unsafe extern "C" fn(*mut c_void, u32, ModuleBuffer, ModuleBuffer) -> bool,
        header_type: u32,
        name: &str,
        value: ModuleBuffer,
    ) -> bool {
        if self.responded {
            return false;
        }
        // SAFETY: `call` is one of Envoy's header-writing callbacks; `raw` is the live filter of
        // the running hook; Envoy copies key and value during the call. `&mut self` ends every
        // borrow of header values Envoy lent before.
        unsafe {
            call(
                self.raw,
                header_type,
                ModuleBuffer::new(name.as_bytes()),
                value,
            )
        }
    }

    /// Answers the request locally. Only the first answer of a stream goes out; afterwards the
    /// request is never continued and headers, scheduler and route config are unavailable
    /// (Envoy may finish and destroy the stream during this very call). `details` is Envoy's
    /// response code details (`%RESPONSE_CODE_DETAILS%`): no whitespace; "" becomes
    /// `dynamic_module`. Envoy adds `content-length` and keeps a `content-type` given here (no
    /// second one). The response-headers hook does not see this response.
    pub fn send_response(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        details: &str,
    ) {
        if self.responded {
            return;
        }
        self.responded = true;
        let lines: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(name, value)| ModuleHttpHeader {
                key_ptr: name.as_ptr().cast(),
                key_length: name.len(),
                value_ptr: value.as_ptr().cast(),
                value_length: value.len(),
            })
            .collect();
        // SAFETY: `raw` is the live filter of the running hook; Envoy copies headers, body and
        // details during the call. It may re-enter `on_http_filter_destroy`, which the stream
        // state defers (see the module docs).
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.raw,
                status,
                lines.as_ptr(),
                lines.len(),
                ModuleBuffer::new(body),
                ModuleBuffer::new(details.as_bytes()),
            );
        }
    }

    /// Lets a held request go on. Takes effect when the hook returns: in `on_request_headers` it
    /// is the same as returning `Continue`, in `on_scheduled` the request resumes right after
    /// the call. Ignored in other hooks and after a local reply.
    pub fn continue_decoding(&mut self) {
        if matches!(self.hook, Hook::RequestHeaders | Hook::Scheduled) {
            self.continue_requested = true;
        }
    }

    /// A handle another thread can use to wake `on_scheduled` on this stream's worker. `None`
    /// once the stream was answered.
    pub fn scheduler(&mut self) -> Option<Scheduler> {
        if self.responded {
            return None;
        }
        // SAFETY: `raw` is the live filter of the running hook and not yet answered, so its
        // decoder callbacks (whose dispatcher the scheduler keeps) are set.
        let raw = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.raw) };
        NonNull::new(raw).map(|raw| Scheduler { raw })
    }

    /// The most specific per-route config for this request (route beats virtual host), as made
    /// by [`HttpRouteConfig::new`]. `None` also when it is not an `R`.
    pub fn route_config<R: HttpRouteConfig>(&self) -> Option<&R> {
        if self.responded {
            return None;
        }
        // SAFETY: `raw` is the live filter of the running hook and not yet answered.
        let config =
            unsafe { envoy_dynamic_module_callback_get_most_specific_route_config(self.raw) };
        if config.is_null() || !live_route_config::<R>(config) {
            return None;
        }
        // SAFETY: the registry holds only pointers this module made as `Box<R>` for the `R` it
        // records, and has not destroyed; Envoy destroys a route config only after the routes
        // (and the streams holding them) let go, so it outlives this hook and the `&self` borrow.
        Some(unsafe { &*config.cast::<R>() })
    }

    /// Adds `by` to a counter. `labels` are the values, in the order the names were defined;
    /// false when the count does not match the definition or Envoy refuses.
    pub fn increment_counter(&self, id: CounterId, labels: &[&str], by: u64) -> bool {
        self.record(
            envoy_dynamic_module_callback_http_filter_increment_counter,
            id.0,
            labels,
            by,
        )
    }

    /// Records one value in a histogram (Envoy shows it after the next stats flush).
    pub fn record_histogram(&self, id: HistogramId, labels: &[&str], value: u64) -> bool {
        self.record(
            envoy_dynamic_module_callback_http_filter_record_histogram_value,
            id.0,
            labels,
            value,
        )
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, id: GaugeId, labels: &[&str], value: u64) -> bool {
        self.record(
            envoy_dynamic_module_callback_http_filter_set_gauge,
            id.0,
            labels,
            value,
        )
    }

    fn record(&self, callback: RecordFn, id: MetricId, labels: &[&str], value: u64) -> bool {
        // Envoy keeps label-less metrics and labelled ones under separate id numbers and picks
        // the table by the label count it is given: a mismatched count would hit another metric.
        if labels.len() != id.labels {
            return false;
        }
        with_buffers(labels, |values, count| {
            // SAFETY: `raw` is the filter of the running hook (metrics only use its config,
            // which outlives the stream, so they work after a local reply too); Envoy reads
            // `count` label values during the call.
            unsafe { callback(self.raw, id.index, values, count, value) }
        }) == Some(METRICS_SUCCESS)
    }

    /// Starts `operation` as a child of the span Envoy traces this request with, timed from now.
    /// `None` when Envoy does not trace the request (its HCM has no `tracing` provider) or the
    /// stream was answered. Whether the span is exported is Envoy's tracer's sampling decision.
    pub fn start_child_span(&mut self, operation: &str) -> Option<ChildSpan> {
        if self.responded {
            return None;
        }
        // SAFETY: `raw` is the live filter of the running hook and not yet answered. Envoy
        // returns its stream's own span (or null), which lives as long as the stream.
        let active = unsafe { envoy_dynamic_module_callback_http_get_active_span(self.raw) };
        if active.is_null() {
            return None;
        }
        // SAFETY: `raw` is the live filter and `active` its stream's span, alive for this hook;
        // Envoy copies the name during the call. The child it returns is ours (see `ChildSpan`).
        let child = unsafe {
            envoy_dynamic_module_callback_http_span_spawn_child(
                self.raw,
                active,
                ModuleBuffer::new(operation.as_bytes()),
            )
        };
        NonNull::new(child).map(|raw| ChildSpan { raw })
    }

    /// Answers 503 unless the stream was answered already: what a request gets when the filter
    /// cannot decide (it panicked, or could not be created).
    fn answer_unavailable(&mut self, details: &str) {
        self.send_response(
            503,
            &[("content-type", "application/json"), ("retry-after", "1")],
            UNAVAILABLE_BODY,
            details,
        );
    }
}

const UNAVAILABLE_BODY: &[u8] =
    br#"{"code":"unavailable","message":"Authorization is temporarily unavailable; retry shortly.","reason":"unavailable"}"#;

/// Wakes `on_scheduled` on the stream's worker from any thread. Whoever holds it must commit or
/// drop it (both delete Envoy's scheduler at once): Envoy's scheduler only weakly references the
/// stream, so when the client went away first the event is dropped and the hook never runs; a
/// scheduler owned by the hook would then leak.
pub struct Scheduler {
    raw: NonNull<c_void>,
}

// SAFETY: Envoy's scheduler is a weak reference to the stream plus the worker's dispatcher.
// `commit` posts to that dispatcher, which is thread-safe, and `delete` only drops the weak
// reference, so both may run on any thread. (A commit while Envoy shuts down was not tested.)
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// Runs `on_scheduled(event_id)` on the stream's worker, unless the stream is gone by then.
    pub fn commit(self, event_id: u64) {
        let this = ManuallyDrop::new(self);
        // SAFETY: `raw` came from `scheduler_new` and is deleted exactly once, here (Drop is
        // skipped); deleting right after committing does not cancel the posted event.
        unsafe {
            envoy_dynamic_module_callback_http_filter_scheduler_commit(this.raw.as_ptr(), event_id);
            envoy_dynamic_module_callback_http_filter_scheduler_delete(this.raw.as_ptr());
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `scheduler_new`; `commit` skips this, so it is deleted once.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.raw.as_ptr()) };
    }
}

/// A span the module started under Envoy's active span ([`EnvoyFilter::start_child_span`]).
/// Envoy handed over its ownership: it is ended and freed exactly once, by `finish` or on drop.
/// It may outlive the hook that made it (a held request's span ends in `on_scheduled`) but not
/// the stream: the filter holding it is dropped by `on_http_filter_destroy`, before Envoy ends
/// the stream's own span. Like the stream it belongs to Envoy's worker thread (not `Send`).
pub struct ChildSpan {
    raw: NonNull<c_void>,
}

impl ChildSpan {
    /// Sets tag `key` to `value` (Envoy's tracer turns tags into span attributes).
    pub fn set_tag(&mut self, key: &str, value: &str) {
        // SAFETY: `raw` is a live child span (not finished: that consumes `self`); Envoy copies
        // key and value during the call, on this worker thread (the type is not `Send`).
        unsafe {
            envoy_dynamic_module_callback_http_span_set_tag(
                self.raw.as_ptr(),
                ModuleBuffer::new(key.as_bytes()),
                ModuleBuffer::new(value.as_bytes()),
            );
        }
    }

    /// Ends the span now; Envoy's tracer exports it if the trace is sampled.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for ChildSpan {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `span_spawn_child`, whose ownership passed to us; this is the
        // only release (finish consumes `self` into this), and Envoy deletes the span here.
        unsafe { envoy_dynamic_module_callback_http_child_span_finish(self.raw.as_ptr()) };
    }
}

/// Envoy's side of the filter config, only during config_new: defines stats.
pub struct EnvoyConfig {
    raw: *mut c_void,
}

impl EnvoyConfig {
    /// Defines a counter with these label names (at most 8). `None` if Envoy refuses. Prometheus
    /// shows it as `envoy_<metrics_namespace>_<name>{<label>="<value>"}` (no `_total` added).
    pub fn define_counter(&mut self, name: &str, labels: &[&str]) -> Option<CounterId> {
        self.define(
            envoy_dynamic_module_callback_http_filter_config_define_counter,
            name,
            labels,
        )
        .map(CounterId)
    }

    /// Defines a histogram with these label names (at most 8).
    pub fn define_histogram(&mut self, name: &str, labels: &[&str]) -> Option<HistogramId> {
        self.define(
            envoy_dynamic_module_callback_http_filter_config_define_histogram,
            name,
            labels,
        )
        .map(HistogramId)
    }

    /// Defines a gauge with these label names (at most 8); values add up across workers.
    pub fn define_gauge(&mut self, name: &str, labels: &[&str]) -> Option<GaugeId> {
        self.define(
            envoy_dynamic_module_callback_http_filter_config_define_gauge,
            name,
            labels,
        )
        .map(GaugeId)
    }

    fn define(&mut self, callback: DefineFn, name: &str, labels: &[&str]) -> Option<MetricId> {
        let mut index = 0usize;
        let result = with_buffers(labels, |names, count| {
            // SAFETY: `raw` is the config Envoy is building in the running config_new; Envoy
            // copies the name and `count` label names during the call and writes `index`.
            unsafe {
                callback(
                    self.raw,
                    ModuleBuffer::new(name.as_bytes()),
                    names,
                    count,
                    &mut index,
                )
            }
        })?;
        (result == METRICS_SUCCESS).then_some(MetricId {
            index,
            labels: labels.len(),
        })
    }
}

/// Envoy's id for a metric of one filter config, plus its label count (see `record`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MetricId {
    index: usize,
    labels: usize,
}

/// A counter defined by [`EnvoyConfig::define_counter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterId(MetricId);

/// A histogram defined by [`EnvoyConfig::define_histogram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistogramId(MetricId);

/// A gauge defined by [`EnvoyConfig::define_gauge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GaugeId(MetricId);

/// Label lists go to Envoy from the stack: the per-request path allocates nothing for them.
const MAX_LABELS: usize = 8;

fn with_buffers<R>(
    strings: &[&str],
    call: impl FnOnce(*const ModuleBuffer, usize) -> R,
) -> Option<R> {
    if strings.len() > MAX_LABELS {
        return None;
    }
    let mut buffers = [ModuleBuffer::NULL; MAX_LABELS];
    for (buffer, string) in buffers.iter_mut().zip(strings) {
        *buffer = ModuleBuffer::new(string.as_bytes());
    }
    Some(call(buffers.as_ptr(), strings.len()))
}

// The slow path hands schedulers to other threads (configs are `Send + Sync` by their traits).
const _: () = {
    const fn send<T: Send>() {}
    send::<Scheduler>();
};

// ---------------------------------------------------------------------------------------------
// The door's side
// ---------------------------------------------------------------------------------------------

/// What the door makes of each filter config Envoy loads. Envoy shares it across workers (hence
/// `Send + Sync`) and destroys it after the last stream made from it, on a config update or at
/// shutdown.
pub trait HttpFilterConfig: Send + Sync + Sized + 'static {
    /// One stream's state.
    type Filter: HttpFilter;

    /// `name` is the listener's `filter_name`, `config` its `filter_config` value. An error
    /// rejects the config: Envoy refuses to start (or the update), and stderr says why.
    /// `envoy` defines stats, which Envoy accepts only now.
    fn new(envoy: &mut EnvoyConfig, name: &str, config: &[u8]) -> Result<Self, String>;

    /// The filter for a new stream, on that stream's worker. A panic here answers the stream
    /// 503 when its request headers arrive.
    fn new_filter(&self) -> Self::Filter;
}

/// One stream's filter, called on the stream's worker thread only. A panic in any of these
/// answers 503 (unless the stream was answered already), calls [`HttpFilter::on_panic`], and
/// ends the filter's calls for the stream.
pub trait HttpFilter: 'static {
    /// The request's headers. [`HeadersStatus::StopIteration`] holds the whole request until
    /// `on_scheduled` continues or answers it.
    fn on_request_headers(&mut self, envoy: &mut EnvoyFilter, end_of_stream: bool)
    -> HeadersStatus;

    /// A [`Scheduler`] this stream handed out was committed with `event_id`.
    fn on_scheduled(&mut self, envoy: &mut EnvoyFilter, event_id: u64);

    /// The response's headers (not those of this filter's own local replies).
    fn on_response_headers(
        &mut self,
        envoy: &mut EnvoyFilter,
        end_of_stream: bool,
    ) -> HeadersStatus;

    /// The filter panicked in one of the calls above: its last call, to answer and count it.
    fn on_panic(&mut self, envoy: &mut EnvoyFilter);
}

/// A route's per-filter config (`typed_per_filter_config`), read by requests on every worker.
pub trait HttpRouteConfig: Send + Sync + Sized + 'static {
    /// `name` is the route's `filter_name`, `config` its `filter_config` value; an error rejects
    /// the route config.
    fn new(name: &str, config: &[u8]) -> Result<Self, String>;
}

// ---------------------------------------------------------------------------------------------
// Per-stream state
// ---------------------------------------------------------------------------------------------

/// The module's side of one stream: what `on_http_filter_new` gives Envoy. Only ever reached
/// through `&Stream`, because Envoy's re-entrant calls make a second reference while one hook
/// still holds the first.
struct Stream<F> {
    /// `None` when making the filter panicked: the stream is then answered 503.
    filter: UnsafeCell<Option<F>>,
    /// Our hooks for this stream currently on the stack.
    depth: Cell<u32>,
    /// A `&mut F` exists; a re-entrant hook must not make another.
    filter_busy: Cell<bool>,
    /// Envoy destroyed the stream while a hook ran; the outermost hook frees it.
    destroy_pending: Cell<bool>,
    /// The filter panicked (or was never made): it gets no more calls.
    poisoned: Cell<bool>,
    /// The request is held until `on_scheduled` continues or answers it.
    waiting: Cell<bool>,
    /// A local reply went out.
    responded: Cell<bool>,
}

enum Outcome<R> {
    Done(R),
    /// The filter was not called: it panicked before, or it is busy further up the stack.
    Skipped,
    /// The filter panicked now; `on_panic` has run.
    Panicked,
}

impl<F: HttpFilter> Stream<F> {
    fn new(filter: Option<F>) -> Self {
        Self {
            poisoned: Cell::new(filter.is_none()),
            filter: UnsafeCell::new(filter),
            depth: Cell::new(0),
            filter_busy: Cell::new(false),
            destroy_pending: Cell::new(false),
            waiting: Cell::new(false),
            responded: Cell::new(false),
        }
    }

    /// Calls into the filter under `catch_unwind`, and keeps `responded` in step with `envoy`.
    fn run<R>(
        &self,
        envoy: &mut EnvoyFilter,
        call: impl FnOnce(&mut F, &mut EnvoyFilter) -> R,
    ) -> Outcome<R> {
        if self.poisoned.get() || self.filter_busy.get() {
            return Outcome::Skipped;
        }
        // SAFETY: `filter_busy` is false, so no other `&mut` into the cell exists, and it stays
        // true (no hook makes another) until this one is gone. Envoy only touches `Cell` fields.
        let Some(filter) = (unsafe { &mut *self.filter.get() }).as_mut() else {
            return Outcome::Skipped;
        };
        self.filter_busy.set(true);
        let outcome = match panic::catch_unwind(AssertUnwindSafe(|| call(filter, envoy))) {
            Ok(value) => Outcome::Done(value),
            Err(payload) => {
                discard(payload);
                self.poisoned.set(true);
                // The filter gets one last call so it can count the panic; a second panic there
                // is dropped too (the panic hook has printed both to stderr).
                if let Err(payload) =
                    panic::catch_unwind(AssertUnwindSafe(|| filter.on_panic(envoy)))
                {
                    discard(payload);
                }
                Outcome::Panicked
            }
        };
        self.filter_busy.set(false);
        self.responded.set(self.responded.get() || envoy.responded);
        outcome
    }
}

/// Runs `body` with the stream behind Envoy's `filter_module` pointer (`None` when it is null),
/// counting nesting so that a destroy arriving meanwhile is
/// carried out by the outermost hook. `body` must not panic (filter calls go through
/// `Stream::run`); if it did, the stream would leak rather than be freed while in use.
fn with_stream<F: HttpFilter, R>(
    filter_module: *const c_void,
    body: impl FnOnce(&Stream<F>) -> R,
) -> Option<R> {
    let raw = filter_module.cast::<Stream<F>>();
    if raw.is_null() {
        return None;
    }
    // SAFETY: a non-null `filter_module` is the `Box<Stream>` from `on_http_filter_new`, and it
    // is freed only by a destroy with no hook on the stack (or by the last hook, below).
    let stream = unsafe { &*raw };
    stream.depth.set(stream.depth.get() + 1);
    let value = body(stream);
    let depth = stream.depth.get() - 1;
    stream.depth.set(depth);
    if depth == 0 && stream.destroy_pending.get() {
        // SAFETY: Envoy destroyed the stream and no hook is left using it; `stream` is not
        // used after this.
        unsafe { free_stream(raw) };
    }
    Some(value)
}

/// # Safety
/// `raw` must be a `Box<Stream<F>>` from `on_http_filter_new` that nothing uses any more.
unsafe fn free_stream<F>(raw: *const Stream<F>) {
    // SAFETY: per the contract, this is the unique owner.
    let stream = unsafe { Box::from_raw(raw.cast_mut()) };
    // The filter's Drop is the filter's code: it may panic.
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(move || drop(stream))) {
        discard(payload);
    }
}

// ---------------------------------------------------------------------------------------------
// Route config registry
// ---------------------------------------------------------------------------------------------

/// Route configs this module made and has not destroyed, with the type each was made as. Envoy
/// hands a filter whatever its route's `typed_per_filter_config` produced, and nothing stops that
/// config naming another module; checking here keeps a foreign object from being read as an
/// [`HttpRouteConfig`], and one type from being read as another.
static ROUTE_CONFIGS: RwLock<BTreeMap<usize, TypeId>> = RwLock::new(BTreeMap::new());

fn live_route_config<R: HttpRouteConfig>(config: *const c_void) -> bool {
    let configs = ROUTE_CONFIGS.read().unwrap_or_else(PoisonError::into_inner);
    configs.get(&config.addr()) == Some(&TypeId::of::<R>())
}

// ---------------------------------------------------------------------------------------------
// Panic plumbing
// ---------------------------------------------------------------------------------------------

/// Runs a hook body; a panic becomes `fallback`. Filter code is caught closer to the call (with
/// its own answer), so this is the last line for the layer's own code.
fn guard<R>(fallback: R, body: impl FnOnce() -> R) -> R {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            discard(payload);
            fallback
        }
    }
}

/// Drops a panic payload. Its Drop is arbitrary code that could panic again and unwind into
/// Envoy, so that second payload is leaked instead.
fn discard(payload: Box<dyn Any + Send>) {
    if let Err(again) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        mem::forget(again);
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "(no message)"
    }
}

/// Config errors go to Envoy's stderr, next to Envoy's own "Failed to create filter config".
/// A failed write is ignored: `eprintln!` would panic.
fn report(message: &str) {
    let _ = writeln!(io::stderr(), "gybc-authz: {message}");
}

/// Builds a config from Envoy's name and config bytes; null (rejecting the config) on error or
/// panic, after saying why on stderr.
fn new_config<T>(
    kind: &str,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
    make: impl FnOnce(&str, &[u8]) -> Result<T, String>,
) -> Option<Box<T>> {
    let built = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: Envoy lends both buffers for the duration of this call.
        let (name, config) = unsafe { (name.as_bytes(), config.as_bytes()) };
        let name = std::str::from_utf8(name).map_err(|_| format!("{kind} name is not UTF-8"))?;
        make(name, config).map(Box::new)
    }));
    match built {
        Ok(Ok(config)) => Some(config),
        Ok(Err(message)) => {
            report(&message);
            None
        }
        Err(payload) => {
            report(&format!("{kind} panicked: {}", panic_text(&*payload)));
            discard(payload);
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------------

/// Envoy checks the version and logs a match; "v0.1.0" would still load, with a deprecation
/// warning.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guard(ptr::null(), || c"v0.2.0".as_ptr())
}

/// Registers the door: exports the hooks whose work depends on the door's types, each a call
/// into the generic body of the same name below, monomorphized for `$config` (an
/// [`HttpFilterConfig`]) and `$route` (an [`HttpRouteConfig`]). The door calls it once, at its
/// module's top level; a second call would export every symbol twice and fail to link. The
/// hooks that need no door type are exported by this file directly.
macro_rules! declare_filter {
    ($config:ty, $route:ty) => {
        $crate::ffi::declare_filter! { @export $config;
            envoy_dynamic_module_on_http_filter_config_new(
                config_envoy: *mut ::std::ffi::c_void,
                name: $crate::ffi::EnvoyBuffer,
                config: $crate::ffi::EnvoyBuffer,
            ) -> *const ::std::ffi::c_void;
            envoy_dynamic_module_on_http_filter_config_destroy(
                filter_config: *const ::std::ffi::c_void,
            );
            envoy_dynamic_module_on_http_filter_new(
                filter_config: *const ::std::ffi::c_void,
                filter_envoy: *mut ::std::ffi::c_void,
            ) -> *const ::std::ffi::c_void;
            envoy_dynamic_module_on_http_filter_request_headers(
                filter_envoy: *mut ::std::ffi::c_void,
                filter_module: *const ::std::ffi::c_void,
                end_of_stream: bool,
            ) -> u32;
            envoy_dynamic_module_on_http_filter_scheduled(
                filter_envoy: *mut ::std::ffi::c_void,
                filter_module: *const ::std::ffi::c_void,
                event_id: u64,
            );
            envoy_dynamic_module_on_http_filter_response_headers(
                filter_envoy: *mut ::std::ffi::c_void,
                filter_module: *const ::std::ffi::c_void,
                end_of_stream: bool,
            ) -> u32;
            envoy_dynamic_module_on_http_filter_request_body(
                filter_envoy: *mut ::std::ffi::c_void,
                filter_module: *const ::std::ffi::c_void,
                end_of_stream: bool,
            ) -> u32;
            envoy_dynamic_module_on_http_filter_request_trailers(
                filter_envoy: *mut ::std::ffi::c_void,
                filter_module: *const ::std::ffi::c_void,
            ) -> u32;
            envoy_dynamic_module_on_http_filter_destroy(filter_module: *const ::std::ffi::c_void);
        }
        $crate::ffi::declare_filter! { @export $route;
            envoy_dynamic_module_on_http_filter_per_route_config_new(
                name: $crate::ffi::EnvoyBuffer,
                config: $crate::ffi::EnvoyBuffer,
            ) -> *const ::std::ffi::c_void;
            envoy_dynamic_module_on_http_filter_per_route_config_destroy(
                config: *const ::std::ffi::c_void,
            );
        }
    };
    (@export $ty:ty; $($hook:ident($($arg:ident: $arg_ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        $(
            // `no_mangle` is how Envoy finds a hook. It is an unsafe attribute (two exports of
            // one name would clash), allowed here for the export alone: the body is ffi.rs's.
            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            pub extern "C" fn $hook($($arg: $arg_ty),*) $(-> $ret)? {
                $crate::ffi::$hook::<$ty>($($arg),*)
            }
        )*
    };
}
pub(crate) use declare_filter;

// The bodies `declare_filter!` exports, each named as its hook and called only by that export.
// Like any `extern "C"` hook they take Envoy's raw pointers behind a safe signature: Envoy is
// the one caller, and the SAFETY notes say what it promises.

/// Null rejects the config: Envoy refuses to start (or the update), and stderr says why.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_config_new<C: HttpFilterConfig>(
    config_envoy: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(ptr::null(), || {
        let mut envoy = EnvoyConfig { raw: config_envoy };
        new_config("filter config", name, config, |name, config| {
            C::new(&mut envoy, name, config)
        })
        .map_or(ptr::null(), |config| {
            Box::into_raw(config).cast_const().cast()
        })
    })
}

#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_config_destroy<C: HttpFilterConfig>(
    filter_config: *const c_void,
) {
    guard((), || {
        if filter_config.is_null() {
            return;
        }
        // SAFETY: Envoy passes back the `Box<C>` from config_new, once, after every filter made
        // from it is gone (each holds Envoy's config, which calls this on release).
        let config = unsafe { Box::from_raw(filter_config.cast::<C>().cast_mut()) };
        drop(config);
    });
}

/// Null rejects the route config.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_per_route_config_new<R: HttpRouteConfig>(
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(ptr::null(), || {
        let Some(config) = new_config("route config", name, config, R::new) else {
            return ptr::null();
        };
        let raw = Box::into_raw(config).cast_const().cast::<c_void>();
        ROUTE_CONFIGS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(raw.addr(), TypeId::of::<R>());
        raw
    })
}

#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_per_route_config_destroy<R: HttpRouteConfig>(
    config: *const c_void,
) {
    guard((), || {
        let known = ROUTE_CONFIGS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&config.addr());
        if known == Some(TypeId::of::<R>()) {
            // SAFETY: per_route_config_new registered it as a `Box<R>` (the type recorded), and
            // removing it from the registry makes this the only release.
            drop(unsafe { Box::from_raw(config.cast::<R>().cast_mut()) });
        }
    });
}

/// If making the filter panics the stream still gets state, marked poisoned, so that
/// request_headers answers our 503: given null, Envoy 1.40 would answer a bare 500 itself.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_new<C: HttpFilterConfig>(
    filter_config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    guard(ptr::null(), || {
        if filter_config.is_null() {
            return ptr::null();
        }
        // SAFETY: Envoy passes the `Box<C>` from config_new, alive until config_destroy, which
        // cannot run while Envoy is making a filter from it.
        let config = unsafe { &*filter_config.cast::<C>() };
        let filter = panic::catch_unwind(AssertUnwindSafe(|| config.new_filter()))
            .map_err(discard)
            .ok();
        let stream = Box::new(Stream::<C::Filter>::new(filter));
        Box::into_raw(stream).cast_const().cast()
    })
}

/// A panic (here or when the filter was made) answers 503 and stops: an authorization filter
/// that cannot decide must not let the request through. After any local reply Envoy must get
/// StopIteration, whatever the filter returned.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_request_headers<C: HttpFilterConfig>(
    filter_envoy: *mut c_void,
    filter_module: *const c_void,
    end_of_stream: bool,
) -> u32 {
    // Fallback if this layer itself panicked: hold the request (Envoy times it out) rather
    // than let it through unchecked.
    guard(HEADERS_STOP_ITERATION, || {
        let decided = with_stream::<C::Filter, _>(filter_module, |stream| {
            let mut envoy =
                EnvoyFilter::new(filter_envoy, Hook::RequestHeaders, stream.responded.get());
            let outcome = stream.run(&mut envoy, |filter, envoy| {
                filter.on_request_headers(envoy, end_of_stream)
            });
            match outcome {
                Outcome::Done(_) if envoy.responded => HEADERS_STOP_ITERATION,
                Outcome::Done(HeadersStatus::Continue) => HEADERS_CONTINUE,
                Outcome::Done(HeadersStatus::StopIteration) if envoy.continue_requested => {
                    HEADERS_CONTINUE
                }
                Outcome::Done(HeadersStatus::StopIteration) => {
                    // StopAll (not plain StopIteration): Envoy then holds and watermarks the body
                    // and trailers itself instead of passing them (and the headers) on.
                    stream.waiting.set(true);
                    HEADERS_STOP_ALL_ITERATION_AND_WATERMARK
                }
                Outcome::Panicked | Outcome::Skipped => {
                    envoy.answer_unavailable("gybc_authz_filter_panic");
                    stream.responded.set(true);
                    HEADERS_STOP_ITERATION
                }
            }
        });
        decided.unwrap_or_else(|| {
            EnvoyFilter::new(filter_envoy, Hook::RequestHeaders, false)
                .answer_unavailable("gybc_authz_no_filter");
            HEADERS_STOP_ITERATION
        })
    })
}

/// A panic answers 503 (unless the filter answered first); a continue the filter asked for runs
/// after it returned, so Envoy may re-enter our hooks for the rest of the chain.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_scheduled<C: HttpFilterConfig>(
    filter_envoy: *mut c_void,
    filter_module: *const c_void,
    event_id: u64,
) {
    guard((), || {
        with_stream::<C::Filter, _>(filter_module, |stream| {
            let mut envoy = EnvoyFilter::new(filter_envoy, Hook::Scheduled, stream.responded.get());
            match stream.run(&mut envoy, |filter, envoy| {
                filter.on_scheduled(envoy, event_id)
            }) {
                Outcome::Panicked => {
                    envoy.answer_unavailable("gybc_authz_filter_panic");
                    stream.responded.set(true);
                }
                Outcome::Done(()) if envoy.continue_requested && !envoy.responded => {
                    stream.waiting.set(false);
                    if !stream.destroy_pending.get() {
                        // SAFETY: the stream is live (no destroy yet) and this hook's filter
                        // pointer is valid; no `&mut` filter is held, so the hooks Envoy calls
                        // from here (body, a later filter's local reply, destroy) find it free.
                        unsafe {
                            envoy_dynamic_module_callback_http_filter_continue_decoding(
                                filter_envoy,
                            )
                        };
                    }
                }
                Outcome::Done(()) | Outcome::Skipped => {}
            }
        });
    });
}

/// Continue unless the filter answered here: a panic must not turn a served response into an
/// error, and nothing in this layer could resume a stopped response.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_response_headers<C: HttpFilterConfig>(
    filter_envoy: *mut c_void,
    filter_module: *const c_void,
    end_of_stream: bool,
) -> u32 {
    guard(HEADERS_CONTINUE, || {
        with_stream::<C::Filter, _>(filter_module, |stream| {
            let mut envoy =
                EnvoyFilter::new(filter_envoy, Hook::ResponseHeaders, stream.responded.get());
            let answered_before = envoy.responded;
            stream.run(&mut envoy, |filter, envoy| {
                filter.on_response_headers(envoy, end_of_stream)
            });
            if envoy.responded && !answered_before {
                HEADERS_STOP_ITERATION
            } else {
                HEADERS_CONTINUE
            }
        })
        .unwrap_or(HEADERS_CONTINUE)
    })
}

/// Body data is only called while the request is held if Envoy ignored StopAll; hold it then.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_request_body<C: HttpFilterConfig>(
    _filter_envoy: *mut c_void,
    filter_module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(BODY_STOP_ITERATION_NO_BUFFER, || {
        with_stream::<C::Filter, _>(filter_module, |stream| {
            if stream.responded.get() {
                BODY_STOP_ITERATION_NO_BUFFER
            } else if stream.waiting.get() {
                BODY_STOP_ITERATION_AND_WATERMARK
            } else {
                BODY_CONTINUE
            }
        })
        .unwrap_or(BODY_STOP_ITERATION_NO_BUFFER)
    })
}

#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_request_trailers<C: HttpFilterConfig>(
    _filter_envoy: *mut c_void,
    filter_module: *const c_void,
) -> u32 {
    guard(TRAILERS_STOP_ITERATION, || {
        with_stream::<C::Filter, _>(filter_module, |stream| {
            if stream.responded.get() || stream.waiting.get() {
                TRAILERS_STOP_ITERATION
            } else {
                TRAILERS_CONTINUE
            }
        })
        .unwrap_or(TRAILERS_STOP_ITERATION)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(BODY_CONTINUE, || BODY_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
) -> u32 {
    guard(TRAILERS_CONTINUE, || TRAILERS_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
) {
    guard((), || {});
}

/// Envoy calls this when the stream ends, possibly from inside one of our hooks (a local reply
/// finishing the stream); then the outermost hook frees the stream on its way out.
#[doc(hidden)]
pub fn envoy_dynamic_module_on_http_filter_destroy<C: HttpFilterConfig>(
    filter_module: *const c_void,
) {
    guard((), || {
        let raw = filter_module.cast::<Stream<C::Filter>>();
        if raw.is_null() {
            return;
        }
        // SAFETY: a non-null pointer is our live `Box<Stream>` (Envoy destroys once); only its
        // `Cell` fields are read here.
        let stream = unsafe { &*raw };
        if stream.depth.get() > 0 {
            stream.destroy_pending.set(true);
        } else {
            // SAFETY: no hook is on the stack and Envoy will not use the pointer again.
            unsafe { free_stream(raw) };
        }
    });
}

// Hooks Envoy 1.40 requires but this module never triggers: it starts no HTTP callouts or
// streams, and is not a terminal filter (watermarks). Guarded anyway, so code added to them
// later is covered.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _callout_id: u64,
    _result: u32,
    _headers: *const EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *const EnvoyBuffer,
    _body_chunks_size: usize,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _stream_id: u64,
    _headers: *const EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _stream_id: u64,
    _trailers: *const EnvoyHttpHeader,
    _trailers_size: usize,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _stream_id: u64,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
    _stream_id: u64,
    _reason: u32,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
) {
    guard((), || {});
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy: *mut c_void,
    _filter_module: *const c_void,
) {
    guard((), || {});
}
