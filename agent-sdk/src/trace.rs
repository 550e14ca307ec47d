//! W3C Trace Context: the `traceparent` the SDK sends with its calls, so the
//! broker's spans join the agent's trace.
//!
//! Only the `traceparent` header of W3C Trace Context §3.2 is handled, version
//! `00`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase,
//! neither id all zeros. The SDK creates no spans of its own: it passes the
//! agent's context on unchanged, on the BeginTask and on every later call of
//! the task (renewals, completion, approval watches).

use std::fmt;

use crate::Error;

/// The environment variable tools of the OpenTelemetry ecosystem use to hand a
/// process its parent trace context; read when no trace parent is given, and
/// set by `leash-agent exec` for its child.
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";

/// The gRPC metadata key the trace parent travels in.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A valid W3C `traceparent` (version `00`). Its text form ([`fmt::Display`])
/// is exactly what [`TraceParent::parse`] accepted.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value.
    ///
    /// # Errors
    /// [`Error::Config`] naming what is wrong: not four `-`-separated fields,
    /// a version other than `00`, a field of the wrong length, a character
    /// that is not lowercase hex, or an all-zero trace or parent id.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("traceparent: {why}"));
        // Checked before splitting so an error never quotes a huge value.
        if value.len() != 55 {
            return Err(bad(&format!(
                "must be 55 characters (00-<32 hex>-<16 hex>-<2 hex>), not {}",
                value.len()
            )));
        }
        let fields: Vec<&str> = value.split('-').collect();
        let [version, trace_id, parent_id, flags] = fields[..] else {
            return Err(bad("must be four fields separated by '-'"));
        };
        if version != "00" {
            return Err(bad("only version 00 is supported"));
        }
        let trace_id: [u8; 16] =
            hex_field(trace_id).ok_or_else(|| bad("trace id must be 32 lowercase hex digits"))?;
        let parent_id: [u8; 8] =
            hex_field(parent_id).ok_or_else(|| bad("parent id must be 16 lowercase hex digits"))?;
        let [flags]: [u8; 1] =
            hex_field(flags).ok_or_else(|| bad("flags must be 2 lowercase hex digits"))?;
        if trace_id == [0; 16] {
            return Err(bad("trace id must not be all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(bad("parent id must not be all zeros"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The `TRACEPARENT` environment variable, if it is set and valid; an
    /// invalid one is ignored (logged at debug), as W3C Trace Context asks.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var(TRACEPARENT_ENV).ok()?;
        match Self::parse(value.trim()) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring TRACEPARENT");
                None
            }
        }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent (span) id, 16 lowercase hex digits.
    pub fn parent_id(&self) -> String {
        hex(&self.parent_id)
    }

    /// True when the caller sampled this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl std::str::FromStr for TraceParent {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn hex_field<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `message` as a request carrying `trace` (if any) as `traceparent` metadata.
pub(crate) fn request<T>(message: T, trace: Option<&TraceParent>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(trace) = trace
        && let Ok(value) = trace.to_string().parse()
    {
        request.metadata_mut().insert(TRACEPARENT_HEADER, value);
    }
    request
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.to_string(), GOOD);
        let unsampled = TraceParent::parse(&GOOD.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
        assert_eq!(unsampled.to_string(), GOOD.replace("-01", "-00"));
        assert_eq!(GOOD.parse::<TraceParent>().unwrap(), t);
        assert_eq!(format!("{t:?}"), format!("TraceParent({GOOD})"));
    }

    #[test]
    fn malformed_traceparents_are_rejected_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "55 characters"),
            (&GOOD[..54], "55 characters"),
            (&format!("{GOOD}0"), "55 characters"),
            (&GOOD.replace("00-4b", "01-4b"), "version 00"),
            (&GOOD.replace("00-4b", "ff-4b"), "version 00"),
            // Uppercase hex is not allowed (W3C Trace Context §3.2.2).
            (&GOOD.replace("4bf9", "4BF9"), "trace id"),
            (&GOOD.replace("00f0", "00F0"), "parent id"),
            (&GOOD.replace("-01", "-0A"), "flags"),
            (&GOOD.replace("4bf9", "4bfg"), "trace id"),
            (&GOOD.replace("00f0", "00f "), "parent id"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "trace id must not be all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "parent id must not be all zeros",
            ),
            // Right total length, wrong field lengths.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e47360-0f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b701-",
                "parent id",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
                "four fields",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                "55 characters",
            ),
            // Multi-byte characters never panic the parser.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
                "trace id",
            ),
        ];
        for (value, want) in cases {
            let e = TraceParent::parse(value).unwrap_err().to_string();
            assert!(e.contains(want), "{value:?}: {e}");
            assert!(e.starts_with("configuration: traceparent:"), "{e}");
        }
    }

    #[test]
    fn requests_carry_the_traceparent_header() {
        let t = TraceParent::parse(GOOD).unwrap();
        let r = request((), Some(&t));
        assert_eq!(
            r.metadata()
                .get(TRACEPARENT_HEADER)
                .unwrap()
                .to_str()
                .unwrap(),
            GOOD
        );
        assert!(
            request((), None)
                .metadata()
                .get(TRACEPARENT_HEADER)
                .is_none()
        );
    }
}
