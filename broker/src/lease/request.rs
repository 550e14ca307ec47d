//! Request shapes and their size limits, checked before any lookup.

use std::{collections::BTreeMap, time::Duration};

use crate::policy::FieldProblem;

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
        } else if self
            .intent
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            problems.push(FieldProblem::new("intent", "contains control characters"));
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
        for name in self.parameters.keys() {
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
