//! Log output, text or JSON, in which no field value can forge a line.
//!
//! Requests are refused at the edge when their text fields hold control
//! characters (see [`is_unsafe_in_log`]), but values reach logs on other paths too
//! (error messages quoting input, names from files). So both formats escape them:
//!
//! - **text**: [`EscapedFields`] writes `name=value` pairs like
//!   tracing-subscriber's default, but escapes every unsafe character in every
//!   value and in the message as `\u{..}`. The default formatter writes a
//!   `%`-formatted value (`intent = %task.intent`) and the message raw, so a
//!   newline in one would start a second, forged line.
//! - **JSON**: serde_json already escapes C0 controls; [`EscapedJsonWriter`] also
//!   escapes DEL, C1 controls and U+2028/U+2029, which JSON allows raw but which
//!   terminals and some log viewers treat as controls or line breaks.
//!
//! Lines leave through [`non_blocking`]: a bounded queue drained by a thread of
//! its own, so a slow or stuck log pipe never stalls a request. When the queue
//! is full a line is dropped, and counted, rather than waited for.

use std::{
    fmt::{self, Write as _},
    io,
};

use tracing::{
    Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter,
    field::RecordFields,
    fmt::{FormatFields, MakeWriter, format::Writer},
};

use crate::cli::LogFormat;

/// True for characters that could end a log line or drive a terminal: every C0
/// control (tab and newline included), DEL, every C1 control, and the Unicode line
/// and paragraph separators.
pub fn is_unsafe_in_log(c: char) -> bool {
    c < ' ' || ('\u{7f}'..='\u{9f}').contains(&c) || c == '\u{2028}' || c == '\u{2029}'
}

/// A `fmt::Write` that passes text through with every [`is_unsafe_in_log`]
/// character replaced by its `\u{..}` escape.
struct Escaping<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(is_unsafe_in_log) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or(' ');
            write!(self.0, "\\u{{{:x}}}", u32::from(c))?;
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The text format's field formatter: `message name=value ...`, every value
/// escaped (see the module documentation). Strings are quoted as
/// tracing-subscriber's default does.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let mut out = Escaping(&mut *self.writer);
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = match field.name() {
            "message" => write!(out, "{sep}{value:?}"),
            // `r#type` and friends: print the field as written.
            name => write!(
                out,
                "{sep}{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

/// A [`MakeWriter`] for the JSON format that escapes DEL, C1 controls and
/// U+2028/U+2029 (which JSON would carry raw) as `\uXXXX`. Every other byte passes
/// unchanged; these characters can only occur inside JSON strings, where the
/// escape means the same character.
#[derive(Debug, Clone)]
pub struct EscapedJsonWriter<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for EscapedJsonWriter<M> {
    type Writer = JsonEscaper<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        JsonEscaper {
            inner: self.0.make_writer(),
            carry: Vec::new(),
        }
    }
}

/// The writer of [`EscapedJsonWriter`]: one per event.
#[derive(Debug)]
pub struct JsonEscaper<W: io::Write> {
    inner: W,
    // The start of a multi-byte character split across two writes.
    carry: Vec<u8>,
}

impl<W: io::Write> JsonEscaper<W> {
    fn escape(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            let next = |n: usize| bytes.get(i + n).copied();
            match b {
                0x7f => {
                    out.extend_from_slice(b"\\u007f");
                    i += 1;
                }
                // U+0080..=U+009F: C2 80..=C2 9F.
                0xc2 => match next(1) {
                    Some(c @ 0x80..=0x9f) => {
                        out.extend_from_slice(format!("\\u00{c:02x}").as_bytes());
                        i += 2;
                    }
                    None => break,
                    Some(_) => {
                        out.push(b);
                        i += 1;
                    }
                },
                // U+2028, U+2029: E2 80 A8, E2 80 A9.
                0xe2 => match (next(1), next(2)) {
                    (Some(0x80), Some(c @ (0xa8 | 0xa9))) => {
                        out.extend_from_slice(if c == 0xa8 { b"\\u2028" } else { b"\\u2029" });
                        i += 3;
                    }
                    (None, _) | (Some(0x80), None) => break,
                    _ => {
                        out.push(b);
                        i += 1;
                    }
                },
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        self.carry = bytes[i..].to_vec();
        self.inner.write_all(&out)
    }
}

impl<W: io::Write> io::Write for JsonEscaper<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(buf);
        self.escape(&bytes)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let carry = std::mem::take(&mut self.carry);
        self.inner.write_all(&carry)?;
        self.inner.flush()
    }
}

impl<W: io::Write> Drop for JsonEscaper<W> {
    fn drop(&mut self) {
        // A character cut at the very end of an event cannot be one to escape.
        let _ = io::Write::flush(self);
    }
}

/// Most log lines queued for the writer thread; past it lines are dropped
/// (counted by [`tracing_appender::non_blocking::NonBlocking::error_counter`]).
pub const LOG_QUEUE_LINES: usize = 64 * 1024;

/// `sink` behind a bounded queue and a writer thread of its own (crate
/// `tracing-appender`): writing a log line never blocks the caller; when the
/// queue is full the line is dropped and counted. Keep the guard alive for the
/// life of the process: dropping it flushes what is queued.
pub fn non_blocking<W: io::Write + Send + 'static>(
    sink: W,
) -> (
    tracing_appender::non_blocking::NonBlocking,
    tracing_appender::non_blocking::WorkerGuard,
) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("leash-log-writer")
        .finish(sink);
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

static DROPPED: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Log lines dropped so far by the process's first [`non_blocking`] writer
/// (0 if there is none).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// The broker's log subscriber: `filter`, `format`, written to `writer`, with the
/// escaping of this module (and no ANSI colours in the text format), and the
/// OpenTelemetry layer ([`crate::telemetry::layer`], inert until telemetry
/// starts). `filter` applies to the log lines only, so `LEASH_LOG=warn` does not
/// switch traces off. Install it with
/// [`SubscriberInitExt::init`](tracing_subscriber::util::SubscriberInitExt::init).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _};
    let registry = tracing_subscriber::registry().with(crate::telemetry::layer());
    match format {
        // No ANSI colours: logs go to files and collectors, and escape sequences
        // are exactly what this module keeps out of them.
        LogFormat::Text => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .fmt_fields(EscapedFields)
                    .with_writer(writer)
                    .with_filter(filter),
            ),
        ),
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(EscapedJsonWriter(writer))
                    .with_filter(filter),
            ),
        ),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod non_blocking_tests {
    use std::{
        io,
        sync::{Arc, Mutex, mpsc},
        time::Duration,
    };

    use tracing_subscriber::EnvFilter;

    use super::{LogFormat, non_blocking, subscriber};

    /// A log pipe nobody reads: every write waits until the test opens it.
    struct StuckPipe {
        open: Arc<Mutex<mpsc::Receiver<()>>>,
        written: Arc<Mutex<usize>>,
    }

    impl io::Write for StuckPipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self
                .open
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60));
            *self.written.lock().unwrap() += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_log_pipe_never_blocks_the_caller_and_drops_are_counted() {
        let (open_tx, open_rx) = mpsc::channel();
        let written = Arc::new(Mutex::new(0));
        let pipe = StuckPipe {
            open: Arc::new(Mutex::new(open_rx)),
            written: Arc::clone(&written),
        };
        let (writer, guard) = non_blocking(pipe);
        let counter = writer.error_counter();
        let sub = subscriber(LogFormat::Json, EnvFilter::new("info"), writer);
        let lines = super::LOG_QUEUE_LINES + 1000;
        // Emitted on another thread: if logging blocked on the stuck pipe this
        // thread would never finish, and the test fails at the timeout below.
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            tracing::subscriber::with_default(sub, || {
                for i in 0..lines {
                    tracing::info!(i, "a request's log line");
                }
            });
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("logging blocked on a stuck pipe");
        assert!(
            counter.dropped_lines() > 0,
            "a full queue drops, and counts"
        );
        // Opened, the pipe receives what was queued.
        for _ in 0..lines {
            let _ = open_tx.send(());
        }
        drop(guard);
        assert!(*written.lock().unwrap() > 0);
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::{
        audit,
        store::{TaskId, TaskRecord, TaskState},
    };

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    const FORGED: &str = "review\n2026-01-01T00:00:00Z  INFO leash::audit: event=\"task.completed\" \u{2028}\u{85}\u{7f}\u{1b}[31m";

    fn task(intent: &str) -> TaskRecord {
        TaskRecord {
            id: TaskId::from_bytes([1; 16]),
            owner: "spiffe://acme.test/agent/a".into(),
            template: "review".into(),
            template_version: "1".into(),
            parameters: BTreeMap::new(),
            intent: intent.into(),
            fingerprint: "f".into(),
            created_at_ms: 0,
            lease_ttl_ms: 1,
            lease_deadline_ms: 1,
            max_deadline_ms: 1,
            state: TaskState::Active,
            ended_at_ms: None,
            outcome: None,
            binding: Default::default(),
            class: String::new(),
            tenant: String::new(),
            parent: None,
            root: None,
            depth: 0,
            actors: Vec::new(),
            delegated: None,
            approval: None,
            policies: Vec::new(),
        }
    }

    /// The audit events that carry client text, with `FORGED` in each.
    fn emit() {
        audit::task_begun(&task(FORGED), false);
        audit::denied("spiffe://acme.test/agent/a", "begin", FORGED);
        tracing::info!(target: audit::TARGET, event = "task.summary", summary = FORGED);
        tracing::warn!("message text: {FORGED}");
    }

    #[test]
    fn a_newline_in_a_value_cannot_start_a_second_text_line() {
        let buf = Buffer::default();
        let sub = subscriber(LogFormat::Text, EnvFilter::new("trace"), buf.clone());
        tracing::subscriber::with_default(sub, emit);
        let out = buf.text();
        assert_eq!(out.lines().count(), 4, "{out}");
        assert!(
            out.lines().all(|l| !l.chars().any(is_unsafe_in_log)),
            "{out:?}"
        );
        assert!(out.contains("intent=review\\u{a}2026"), "{out}");
        assert!(!out.contains('\u{2028}') && !out.contains('\u{85}'));

        // The control: tracing-subscriber's default text format, which the broker
        // used before, lets the same events forge lines, so this test can fail.
        let plain = Buffer::default();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(plain.clone())
            .finish();
        tracing::subscriber::with_default(sub, emit);
        assert!(plain.text().lines().count() > 4, "{}", plain.text());
    }

    #[test]
    fn json_lines_stay_one_line_and_carry_the_exact_text() {
        let buf = Buffer::default();
        let sub = subscriber(LogFormat::Json, EnvFilter::new("trace"), buf.clone());
        tracing::subscriber::with_default(sub, emit);
        let out = buf.text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(
            !out.chars().any(|c| is_unsafe_in_log(c) && c != '\n'),
            "{out:?}"
        );
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["fields"]["intent"], FORGED);
        for line in &lines {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }

    #[test]
    fn the_json_escaper_handles_characters_split_across_writes() {
        let buf = Buffer::default();
        let text = "a\u{2028}b\u{85}c\u{e9}\u{20ac}";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut w = EscapedJsonWriter(buf.clone()).make_writer();
            io::Write::write_all(&mut w, &bytes[..cut]).unwrap();
            io::Write::write_all(&mut w, &bytes[cut..]).unwrap();
            drop(w);
            let out = std::mem::take(&mut *buf.0.lock().unwrap());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "a\\u2028b\\u0085c\u{e9}\u{20ac}",
                "cut at {cut}"
            );
        }
    }
}
