//! Request shapes and their size limits, checked before any lookup.

use std::{collections::BTreeMap, time::Duration};

use super::LeaseError;
use crate::{logging, policy::FieldProblem};

/// The problem with `field` if `text` holds a character that could break a log
/// line or drive a terminal ([`logging::is_unsafe_in_log`]: C0 controls with tab
/// and newline, DEL, C1 controls, U+2028, U+2029).
fn control_problem(field: &str, text: &str) -> Option<FieldProblem> {
    text.chars().find(|&c| logging::is_unsafe_in_log(c)).map(|c| {
        FieldProblem::new(
            field,
            format!(
                "contains the control character U+{:04X}; text fields are one line of printable characters",
                u32::from(c)
            ),
        )
    })
}

/// Checks a completion summary: at most [`Limits::SUMMARY`] bytes, no character
/// that [`logging::is_unsafe_in_log`].
///
/// # Errors
/// `InvalidArgument` naming `summary`.
pub fn check_summary(summary: &str) -> Result<(), LeaseError> {
    if summary.len() > Limits::SUMMARY {
        return Err(LeaseError::invalid(
            "summary",
            format!(
                "{} bytes; at most {} allowed",
                summary.len(),
                Limits::SUMMARY
            ),
        ));
    }
    match control_problem("summary", summary) {
        Some(problem) => Err(LeaseError::InvalidArgument(vec![problem])),
        None => Ok(()),
    }
}

/// Checks a required one-line text field (an intent or a reason): present, at
/// most `max` bytes, no character that [`logging::is_unsafe_in_log`].
///
/// # Errors
/// `InvalidArgument` naming `field`.
pub fn check_required_text(field: &str, text: &str, max: usize) -> Result<(), LeaseError> {
    if text.trim().is_empty() {
        return Err(LeaseError::invalid(field, "required"));
    }
    if text.len() > max {
        return Err(LeaseError::invalid(
            field,
            format!("{} bytes; at most {max} allowed", text.len()),
        ));
    }
    match control_problem(field, text) {
        Some(problem) => Err(LeaseError::InvalidArgument(vec![problem])),
        None => Ok(()),
    }
}

/// Named input limits. Every request field is bounded by one of these.
#[derive(Debug, Clone, Copy)]
pub struct Limits;

impl Limits {
    /// Longest intent, in bytes.
    pub const INTENT: usize = 1024;
    /// Longest completion summary, in bytes.
    pub const SUMMARY: usize = 1024;
    /// Longest idempotency key, in bytes.
    pub const IDEMPOTENCY_KEY: usize = 128;
    /// Longest template name, in bytes.
    pub const TEMPLATE_NAME: usize = 64;
    /// Most parameters in one request.
    pub const PARAMETERS: usize = 32;
    /// Longest parameter name, in bytes.
    pub const PARAMETER_NAME: usize = 64;
    /// Longest token accepted by introspection, in bytes.
    pub const TOKEN: usize = 8 * 1024;
    /// Longest admin or approver reason, in bytes.
    pub const REASON: usize = 1024;
    /// Longest SPIFFE ID or prefix, in bytes (the SPIFFE-ID spec's 2048).
    pub const SPIFFE_ID: usize = 2048;
    /// Most grants one DelegateTask may name.
    pub const DELEGATED_GRANTS: usize = 16;
    /// Most scopes one DelegateTask may name per grant.
    pub const DELEGATED_SCOPES: usize = 64;
    /// Longest delegation handle accepted, in bytes.
    pub const HANDLE: usize = 128;
}

/// A request to begin a task, as the domain sees it.
#[derive(Debug, Clone, Default)]
pub struct BeginTask {
    /// Template name.
    pub template: String,
    /// Parameter values by name.
    pub parameters: BTreeMap<String, String>,
    /// Declared intent; required.
    pub intent: String,
    /// Wanted lease TTL; the template default when `None`.
    pub requested_ttl: Option<Duration>,
    /// Retry key; `None` when not given.
    pub idempotency_key: Option<String>,
}

impl BeginTask {
    /// Checks field shapes and sizes, reporting every problem at once.
    ///
    /// # Errors
    /// Every field problem found.
    pub fn check_shape(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems = Vec::new();
        if self.template.is_empty() {
            problems.push(FieldProblem::new("template", "required"));
        } else if self.template.len() > Limits::TEMPLATE_NAME {
            problems.push(FieldProblem::new(
                "template",
                format!("longer than {} bytes", Limits::TEMPLATE_NAME),
            ));
        } else {
            problems.extend(control_problem("template", &self.template));
        }
        if self.intent.trim().is_empty() {
            problems.push(FieldProblem::new(
                "intent",
                "required: say in plain words what the task will do",
            ));
        } else if self.intent.len() > Limits::INTENT {
            problems.push(FieldProblem::new(
                "intent",
                format!(
                    "{} bytes; at most {} allowed",
                    self.intent.len(),
                    Limits::INTENT
                ),
            ));
        } else {
            // Newlines and tabs too: the intent is written into audit lines.
            problems.extend(control_problem("intent", &self.intent));
        }
        if let Some(key) = &self.idempotency_key {
            if key.len() > Limits::IDEMPOTENCY_KEY {
                problems.push(FieldProblem::new(
                    "idempotency_key",
                    format!("longer than {} bytes", Limits::IDEMPOTENCY_KEY),
                ));
            } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(FieldProblem::new(
                    "idempotency_key",
                    "must be printable ASCII without spaces",
                ));
            }
        }
        if self.parameters.len() > Limits::PARAMETERS {
            problems.push(FieldProblem::new(
                "parameters",
                format!("more than {} parameters", Limits::PARAMETERS),
            ));
        }
        for (name, value) in &self.parameters {
            if name.len() > Limits::PARAMETER_NAME {
                problems.push(FieldProblem::new(
                    "parameters",
                    format!(
                        "a parameter name is longer than {} bytes",
                        Limits::PARAMETER_NAME
                    ),
                ));
                break;
            }
            if let Some(mut problem) = control_problem("parameters", name) {
                // The name itself cannot go into the field: it is the bad text.
                problem.reason = format!("a parameter name {}", problem.reason);
                problems.push(problem);
                break;
            }
            problems.extend(control_problem(&format!("parameters.{name}"), value));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> BeginTask {
        BeginTask {
            template: "t".into(),
            intent: "review PR 7".into(),
            ..BeginTask::default()
        }
    }

    #[test]
    fn control_characters_are_refused_in_every_text_field() {
        let forbidden = [
            '\0', '\t', '\n', '\r', '\u{1b}', '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}',
            '\u{2028}', '\u{2029}',
        ];
        for c in forbidden {
            let text = format!("a{c}b");
            let cases: Vec<(BeginTask, &str)> = vec![
                (
                    BeginTask {
                        intent: text.clone(),
                        ..ok()
                    },
                    "intent",
                ),
                (
                    BeginTask {
                        template: text.clone(),
                        ..ok()
                    },
                    "template",
                ),
                (
                    BeginTask {
                        parameters: [(text.clone(), "v".into())].into_iter().collect(),
                        ..ok()
                    },
                    "parameters",
                ),
                (
                    BeginTask {
                        parameters: [("p".into(), text.clone())].into_iter().collect(),
                        ..ok()
                    },
                    "parameters.p",
                ),
            ];
            for (req, field) in cases {
                let problems = req.check_shape().expect_err(field);
                assert_eq!(problems[0].field, field, "{c:?}");
                assert!(problems[0].reason.contains("U+"), "{c:?}");
            }
            let err = check_summary(&text).expect_err("summary");
            assert!(err.to_string().starts_with("summary: "), "{err}");
        }
        // Printable text of any script, and the characters around the ranges, pass.
        for fine in ["plain", "é ü — 🦀", "\u{a0}nbsp", "~", "\u{2027}\u{202a}"] {
            let req = BeginTask {
                intent: fine.into(),
                parameters: [("p".into(), fine.into())].into_iter().collect(),
                ..ok()
            };
            assert!(req.check_shape().is_ok(), "{fine:?}");
            assert!(check_summary(fine).is_ok(), "{fine:?}");
        }
        assert!(check_summary(&"s".repeat(Limits::SUMMARY + 1)).is_err());
    }

    #[test]
    fn shapes() {
        assert!(ok().check_shape().is_ok());
        let cases: Vec<(BeginTask, &str)> = vec![
            (
                BeginTask {
                    template: String::new(),
                    ..ok()
                },
                "template",
            ),
            (
                BeginTask {
                    template: "x".repeat(65),
                    ..ok()
                },
                "template",
            ),
            (
                BeginTask {
                    intent: " ".into(),
                    ..ok()
                },
                "intent",
            ),
            (
                BeginTask {
                    intent: "x".repeat(1025),
                    ..ok()
                },
                "intent",
            ),
            (
                BeginTask {
                    intent: "a\u{7}b".into(),
                    ..ok()
                },
                "intent",
            ),
            (
                BeginTask {
                    idempotency_key: Some("a b".into()),
                    ..ok()
                },
                "idempotency_key",
            ),
            (
                BeginTask {
                    idempotency_key: Some("k".repeat(129)),
                    ..ok()
                },
                "idempotency_key",
            ),
            (
                BeginTask {
                    parameters: (0..33).map(|i| (format!("p{i}"), "v".into())).collect(),
                    ..ok()
                },
                "parameters",
            ),
        ];
        for (req, field) in cases {
            let problems = req.check_shape().expect_err(field);
            assert_eq!(problems[0].field, field);
        }
        // Exactly at the limits is fine.
        let edge = BeginTask {
            intent: "x".repeat(1024),
            idempotency_key: Some("k".repeat(128)),
            ..ok()
        };
        assert!(edge.check_shape().is_ok());
    }
}
