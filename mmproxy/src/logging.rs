//! Log output: `tracing` to stderr, as text or as JSON lines.
//!
//! # What `-v` shows
//! go-mmproxy's `-v` says how much is logged about *individual connections*;
//! the daemon's own lifecycle (listening, routes installed, reloads, shutdown,
//! stats) is always logged. Here that split is made by target:
//!
//! | events | target | `-v 0` | `-v 1` | `-v 2` |
//! |---|---|---|---|---|
//! | daemon lifecycle, start-up warnings | anything else (module paths) | info+ | info+ | info+ |
//! | per-connection / per-flow | [`CONN_TARGET`] (`mmproxy::conn`) | off | warn+ (errors of connections) | debug+ (every state change) |
//! | kernel-side events (aya-log) | [`KERNEL_TARGET`] (`mmproxy_ebpf…`) | off | off | debug+ |
//!
//! So code that logs about one connection must use `target: CONN_TARGET`: its
//! failures (rejected, header invalid, upstream refused, relay error) at
//! `warn!`, its state changes (accepted, header parsed, upstream connected,
//! closed) at `debug!`. Target filters match by prefix, so `mmproxy::conn`
//! must stay a label and never become a module name's prefix.
//!
//! `RUST_LOG`, when set and not empty, replaces this table entirely (standard
//! `tracing_subscriber::EnvFilter` syntax, e.g. `RUST_LOG=debug` or
//! `RUST_LOG=info,mmproxy::conn=debug,netlink_proto=trace`).
//!
//! # The `log` crate
//! Records made through `log` (aya-log forwards the BPF programs' events that
//! way, with the program crate's module path as target; dependencies such as
//! netlink-proto use it too) are turned into `tracing` events and filtered by
//! the same table.
//!
//! # JSON
//! `--log-format json` writes one object per line shaped like go-mmproxy's
//! (zap's production encoder), so pipelines written for it keep working:
//! `{"level":"info","ts":1700000000.123456,"logger":"mmproxy::daemon",
//! "caller":"mmproxy/src/daemon/mod.rs:42","msg":"listening","addr":"0.0.0.0:8443"}`.
//! `level` is lower case, `ts` is seconds since the epoch, `msg` is the
//! message; the event's fields and those of its enclosing spans (outermost
//! first) follow as top-level keys. Numbers and booleans stay JSON numbers and
//! booleans; everything else is a string.
use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use crate::cli::LogFormat;

/// Target of every per-connection (and per-UDP-flow) event; see the module docs.
pub const CONN_TARGET: &str = "mmproxy::conn";

/// Target prefix of the kernel-side events aya-log forwards (the BPF crate's
/// `module_path!()`).
pub const KERNEL_TARGET: &str = "mmproxy_ebpf";

/// Installs the process-wide subscriber and the `log` → `tracing` bridge.
/// Call once, first thing in `main`; fails if called twice or if `RUST_LOG`
/// does not parse.
pub fn init(format: LogFormat, verbose: u8) -> anyhow::Result<()> {
    let filter = filter_from(std::env::var("RUST_LOG").ok().as_deref(), verbose)?;
    let ansi = std::io::stderr().is_terminal();
    // try_init also installs tracing-log's LogTracer with the filter's most
    // verbose level as `log`'s max level, so `log` records below it are
    // dropped at the call site.
    subscriber(format, filter, std::io::stderr, ansi)
        .try_init()
        .context("cannot install the log subscriber")
}

/// The filter directives for `-v` (ignoring `RUST_LOG`); see the module docs.
pub fn default_directives(verbose: u8) -> String {
    let (conn, kernel) = match verbose {
        0 => ("off", "off"),
        1 => ("warn", "off"),
        _ => ("debug", "debug"),
    };
    format!("info,{CONN_TARGET}={conn},{KERNEL_TARGET}={kernel}")
}

/// `RUST_LOG` (when set and not blank) or else the `-v` table.
pub fn filter_from(rust_log: Option<&str>, verbose: u8) -> anyhow::Result<EnvFilter> {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(spec) => EnvFilter::try_new(spec)
            .with_context(|| format!("RUST_LOG={spec:?} is not a valid log filter")),
        None => EnvFilter::try_new(default_directives(verbose)).context("built-in log filter"),
    }
}

/// The subscriber `init` installs, writing to `writer`; separate so tests can
/// run it as a scoped default with a captured writer.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let output: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(ansi)
                .with_target(true),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .fmt_fields(JsonFields)
                .event_format(ZapJson),
        ),
    };
    tracing_subscriber::registry().with(output).with(filter)
}

/// Event formatter for the go-mmproxy-shaped JSON lines.
struct ZapJson;

impl<S, N> FormatEvent<S, N> for ZapJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records bridged from `log` carry their real target/file/line in
        // `log.*` fields; the normalized metadata puts them back in place.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut line = String::with_capacity(256);
        line.push_str("{\"level\":");
        json_str(&mut line, level_name(meta.level()));
        let _ = write!(line, ",\"ts\":{ts:.6},\"logger\":");
        json_str(&mut line, meta.target());
        if let (Some(file), Some(n)) = (meta.file(), meta.line()) {
            line.push_str(",\"caller\":");
            json_str(&mut line, &format!("{file}:{n}"));
        }
        let mut v = JsonVisitor {
            out: &mut line,
            skip_log_fields: normalized.is_some(),
            first: false,
        };
        event.record(&mut v);
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>() {
                    if !f.fields.is_empty() {
                        line.push(',');
                        line.push_str(&f.fields);
                    }
                }
            }
        }
        line.push('}');
        writeln!(w, "{line}")
    }
}

/// Span fields pre-rendered as a JSON object's inside (`"a":1,"b":"x"`), so
/// that each event only splices them in.
struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut s = String::new();
        let mut v = JsonVisitor {
            out: &mut s,
            skip_log_fields: false,
            first: true,
        };
        fields.record(&mut v);
        writer.write_str(&s)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // The default separator is a space, which would break the JSON.
        let mut v = JsonVisitor {
            first: current.fields.is_empty(),
            out: &mut current.fields,
            skip_log_fields: false,
        };
        fields.record(&mut v);
        Ok(())
    }
}

/// Writes `"key":value` pairs; `first` says whether a comma is needed before
/// the next one.
struct JsonVisitor<'a> {
    out: &'a mut String,
    skip_log_fields: bool,
    first: bool,
}

impl JsonVisitor<'_> {
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.skip_log_fields && name.starts_with("log.") {
            return false;
        }
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        // zap's key for the message.
        json_str(self.out, if name == "message" { "msg" } else { name });
        self.out.push(':');
        true
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            json_str(self.out, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.out.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            let _ = write!(self.out, "{value}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            let _ = write!(self.out, "{value}");
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field) {
            if value.is_finite() {
                let _ = write!(self.out, "{value}");
            } else {
                // JSON has no NaN/inf.
                json_str(self.out, &value.to_string());
            }
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.key(field) {
            // The one place a logged error's chain is written out for JSON (the
            // text format shows it as `error.sources`): the error, then its causes,
            // as anyhow's `{:#}` prints them.
            let chain: Vec<String> = std::iter::successors(Some(value), |e| e.source())
                .map(|e| e.to_string())
                .collect();
            json_str(self.out, &chain.join(": "));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            // The message arrives here as fmt::Arguments, whose Debug is its text.
            json_str(self.out, &format!("{value:?}"));
        }
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// Appends `s` as a JSON string literal.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// A MakeWriter into a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Runs `f` under the subscriber for (format, -v, RUST_LOG) and returns the output.
    fn run(format: LogFormat, verbose: u8, rust_log: Option<&str>, f: impl FnOnce()) -> String {
        let cap = Capture::default();
        let filter = filter_from(rust_log, verbose).unwrap();
        let sub = subscriber(format, filter, cap.clone(), false);
        tracing::subscriber::with_default(sub, f);
        cap.text()
    }

    fn emit_all() {
        tracing::info!(target: "mmproxy::daemon", "lifecycle-line");
        tracing::debug!(target: "mmproxy::daemon", "daemon-debug-line");
        tracing::warn!(target: CONN_TARGET, peer = "192.0.2.1:1000", "conn-error-line");
        tracing::debug!(target: CONN_TARGET, "conn-state-line");
        tracing::trace!(target: CONN_TARGET, "conn-trace-line");
        // What aya-log does: a `log` record with the BPF crate's target.
        let record = log::Record::builder()
            .args(format_args!("kernel-line"))
            .level(log::Level::Debug)
            .target("mmproxy_ebpf")
            .build();
        tracing_log::format_trace(&record).unwrap();
    }

    #[test]
    fn verbosity_table() {
        let v0 = run(LogFormat::Text, 0, None, emit_all);
        assert!(v0.contains("lifecycle-line"), "{v0}");
        for hidden in [
            "daemon-debug-line",
            "conn-error-line",
            "conn-state-line",
            "kernel-line",
        ] {
            assert!(!v0.contains(hidden), "-v0 showed {hidden}: {v0}");
        }

        let v1 = run(LogFormat::Text, 1, None, emit_all);
        assert!(
            v1.contains("lifecycle-line") && v1.contains("conn-error-line"),
            "{v1}"
        );
        for hidden in ["daemon-debug-line", "conn-state-line", "kernel-line"] {
            assert!(!v1.contains(hidden), "-v1 showed {hidden}: {v1}");
        }

        let v2 = run(LogFormat::Text, 2, None, emit_all);
        for shown in [
            "lifecycle-line",
            "conn-error-line",
            "conn-state-line",
            "kernel-line",
        ] {
            assert!(v2.contains(shown), "-v2 hid {shown}: {v2}");
        }
        assert!(
            !v2.contains("daemon-debug-line") && !v2.contains("conn-trace-line"),
            "{v2}"
        );
        // The bridged record keeps its target.
        assert!(
            v2.lines()
                .any(|l| l.contains("kernel-line") && l.contains("mmproxy_ebpf")),
            "{v2}"
        );
    }

    #[test]
    fn rust_log_overrides_verbosity() {
        let out = run(LogFormat::Text, 0, Some("debug"), emit_all);
        for shown in [
            "daemon-debug-line",
            "conn-error-line",
            "conn-state-line",
            "kernel-line",
        ] {
            assert!(out.contains(shown), "RUST_LOG=debug hid {shown}: {out}");
        }
        let out = run(LogFormat::Text, 2, Some("error"), emit_all);
        assert!(out.is_empty(), "{out}");
        // Blank RUST_LOG counts as unset.
        let out = run(LogFormat::Text, 0, Some("  "), emit_all);
        assert!(
            out.contains("lifecycle-line") && !out.contains("conn-error-line"),
            "{out}"
        );
        let err = filter_from(Some("info,[[["), 0).unwrap_err();
        assert!(format!("{err:#}").contains("RUST_LOG"), "{err:#}");
    }

    #[test]
    fn default_directives_parse_for_every_level() {
        for v in 0..=3 {
            assert!(EnvFilter::try_new(default_directives(v)).is_ok(), "-v{v}");
        }
        assert_eq!(
            default_directives(1),
            "info,mmproxy::conn=warn,mmproxy_ebpf=off"
        );
    }

    /// Minimal JSON check without a JSON crate: every line is one object
    /// with the zap keys, and string escapes hold.
    #[test]
    fn json_lines_look_like_go_mmproxy() {
        let out = run(LogFormat::Json, 2, None, || {
            let span = tracing::info_span!("conn", proxy = "192.0.2.1:1000", id = 7u64);
            let _g = span.enter();
            span.record("id", 8u64);
            tracing::warn!(
                target: CONN_TARGET,
                client = "198.51.100.9:5555",
                ok = false,
                n = -3i64,
                "upstream \"refused\"\n"
            );
            emit_all();
        });
        let lines: Vec<&str> = out.lines().collect();
        assert!(!lines.is_empty());
        for l in &lines {
            assert!(l.starts_with("{\"level\":\"") && l.ends_with('}'), "{l}");
            assert!(l.contains(",\"ts\":") && l.contains(",\"msg\":"), "{l}");
        }
        let first = lines[0];
        assert!(first.starts_with("{\"level\":\"warn\","), "{first}");
        assert!(first.contains("\"logger\":\"mmproxy::conn\""), "{first}");
        assert!(
            first.contains("\"msg\":\"upstream \\\"refused\\\"\\n\""),
            "{first}"
        );
        assert!(
            first.contains("\"client\":\"198.51.100.9:5555\""),
            "{first}"
        );
        assert!(
            first.contains("\"ok\":false") && first.contains("\"n\":-3"),
            "{first}"
        );
        assert!(first.contains("\"proxy\":\"192.0.2.1:1000\""), "{first}");
        // A field recorded after the span was created is appended with a comma.
        assert!(first.contains("\"id\":7,\"id\":8"), "{first}");
        assert!(first.contains("\"caller\":\""), "{first}");
        let kernel = lines.iter().find(|l| l.contains("kernel-line")).unwrap();
        assert!(kernel.contains("\"logger\":\"mmproxy_ebpf\""), "{kernel}");
        assert!(kernel.contains("\"level\":\"debug\""), "{kernel}");
        assert!(!kernel.contains("log.target"), "{kernel}");
    }

    #[test]
    fn json_string_escaping() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\u{1}\té");
        assert_eq!(s, "\"a\\\"b\\\\c\\u0001\\té\"");
    }
}
