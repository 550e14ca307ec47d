//! Binding BeginTask parameters to a template, and rendering scopes from them.

use std::collections::{BTreeMap, BTreeSet};

use super::limits::{MAX_PARAMETERS, MAX_VALUE_BYTES};
use super::model::{
    GrantSpec, Parameter, ParameterConstraint, ParameterKind, ScopeClass, Template,
};

/// One reason a BeginTask's parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterProblem {
    /// Field path, `parameters.<name>`, or `parameters` for the map as a whole.
    pub field: String,
    /// Why, in words a client developer can act on.
    pub reason: String,
}

impl std::fmt::Display for ParameterProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A piece of a scope: literal text or a `{placeholder}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScopePiece<'a> {
    Literal(&'a str),
    Placeholder(&'a str),
}

/// Splits a scope into literals and placeholders.
///
/// # Errors
///
/// An unclosed `{`, a stray `}` or an empty `{}`; literal braces are not supported
/// because a brace in a scope is almost always a typo in a placeholder.
pub(crate) fn split_scope(scope: &str) -> Result<Vec<ScopePiece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = scope;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                pieces.push(ScopePiece::Literal(rest));
                break;
            }
            Some(at) => {
                if at > 0 {
                    pieces.push(ScopePiece::Literal(&rest[..at]));
                }
                if rest[at..].starts_with('}') {
                    return Err("has a `}` without a matching `{`".to_owned());
                }
                let after = &rest[at + 1..];
                let Some(close) = after
                    .find(['{', '}'])
                    .filter(|&i| after[i..].starts_with('}'))
                else {
                    return Err("has a `{` without a matching `}`".to_owned());
                };
                let name = &after[..close];
                if name.is_empty() {
                    return Err("has an empty placeholder `{}`".to_owned());
                }
                pieces.push(ScopePiece::Placeholder(name));
                rest = &after[close + 1..];
            }
        }
    }
    Ok(pieces)
}

impl Template {
    /// Names of the parameters that appear as `{placeholder}` in any grant's scopes.
    pub fn scope_parameters(&self) -> BTreeSet<&str> {
        self.grants
            .iter()
            .flat_map(|g| g.scopes.iter())
            .filter_map(|s| split_scope(s).ok())
            .flatten()
            .filter_map(|piece| match piece {
                ScopePiece::Placeholder(name) => Some(name),
                ScopePiece::Literal(_) => None,
            })
            .collect()
    }

    /// Checks BeginTask parameters against the declared ones and returns them
    /// normalized (integers in canonical decimal form). Absent optional parameters are
    /// absent from the result.
    ///
    /// Guarantees on `Ok`: every key is declared, every required parameter is present,
    /// every value is at most [`MAX_VALUE_BYTES`] bytes, has no control character,
    /// satisfies its kind and constraint, and has no whitespace if it is substituted
    /// into a scope.
    ///
    /// # Errors
    ///
    /// Every problem found, not just the first, each naming `parameters.<name>`.
    pub fn bind_parameters(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Vec<ParameterProblem>> {
        // A request with thousands of keys would otherwise produce thousands of
        // problems; one message is enough to act on.
        if given.len() > MAX_PARAMETERS.max(self.parameters.len()) {
            return Err(vec![ParameterProblem {
                field: "parameters".to_owned(),
                reason: format!(
                    "{} parameters given; a template declares at most {MAX_PARAMETERS}",
                    given.len()
                ),
            }]);
        }
        let in_scopes = self.scope_parameters();
        let mut problems = Vec::new();
        let mut bound = BTreeMap::new();
        for name in given.keys() {
            if self.parameter(name).is_none() {
                problems.push(ParameterProblem {
                    field: field_for(name),
                    reason: format!(
                        "unknown parameter; template `{}` declares {}",
                        self.name,
                        declared_list(&self.parameters)
                    ),
                });
            }
        }
        for parameter in &self.parameters {
            let field = field_for(&parameter.name);
            match given.get(&parameter.name) {
                None if parameter.required => problems.push(ParameterProblem {
                    field,
                    reason: format!("required {} parameter is missing", parameter.kind.as_str()),
                }),
                None => {}
                Some(value) => {
                    match check_value(
                        parameter,
                        value,
                        in_scopes.contains(parameter.name.as_str()),
                    ) {
                        Ok(normalized) => {
                            bound.insert(parameter.name.clone(), normalized);
                        }
                        Err(reason) => problems.push(ParameterProblem { field, reason }),
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(bound)
        } else {
            Err(problems)
        }
    }

    /// The grant's scopes with every `{param}` replaced by its bound value.
    ///
    /// `bound` must come from [`Template::bind_parameters`]; for a loaded template
    /// every placeholder is then resolvable. Substitution is a single pass, so a value
    /// containing `{x}` is never expanded again. A scope whose placeholder has no
    /// value (only possible with a hand-built template or an unbound map) is dropped,
    /// never emitted half-rendered, because a credential with fewer scopes is safe and
    /// one with a literal `{repo}` might be read as a wildcard.
    pub fn scopes_for(&self, grant: &GrantSpec, bound: &BTreeMap<String, String>) -> Vec<String> {
        self.classified_scopes_for(grant, bound)
            .into_iter()
            .map(|(scope, _)| scope)
            .collect()
    }

    /// [`Template::scopes_for`], each rendered scope with its declared class. A scope
    /// without a declared class (only possible with a hand-built grant) is dropped
    /// like one that cannot render: a credential never carries an unclassified scope.
    pub fn classified_scopes_for(
        &self,
        grant: &GrantSpec,
        bound: &BTreeMap<String, String>,
    ) -> Vec<(String, ScopeClass)> {
        grant
            .scopes
            .iter()
            .zip(grant.scope_classes.iter().copied())
            .filter_map(|(scope, class)| match render_scope(scope, bound) {
                Ok(rendered) => Some((rendered, class)),
                Err(reason) => {
                    tracing::warn!(
                        template = %self.name,
                        grant = %grant.name,
                        scope = %scope,
                        %reason,
                        "scope dropped: cannot render"
                    );
                    None
                }
            })
            .collect()
    }
}

fn render_scope(scope: &str, bound: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(scope.len());
    for piece in split_scope(scope)? {
        match piece {
            ScopePiece::Literal(text) => out.push_str(text),
            ScopePiece::Placeholder(name) => match bound.get(name) {
                Some(value) => out.push_str(value),
                None => return Err(format!("no value bound for `{{{name}}}`")),
            },
        }
    }
    Ok(out)
}

/// `parameters.<name>`, with a name from a client escaped and shortened so a hostile
/// key cannot forge log lines or blow up a response.
fn field_for(name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("parameters.{name}")
    } else {
        let short: String = name.chars().take(64).collect();
        format!("parameters.{short:?}")
    }
}

fn declared_list(parameters: &[Parameter]) -> String {
    if parameters.is_empty() {
        return "no parameters".to_owned();
    }
    let names: Vec<String> = parameters.iter().map(|p| format!("`{}`", p.name)).collect();
    names.join(", ")
}

fn check_value(parameter: &Parameter, value: &str, in_scope: bool) -> Result<String, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes; at most {MAX_VALUE_BYTES} allowed",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err("value contains a control character".to_owned());
    }
    if in_scope && value.chars().any(char::is_whitespace) {
        return Err(
            "value contains whitespace, which is not allowed in a value substituted into a scope"
                .to_owned(),
        );
    }
    match parameter.kind {
        ParameterKind::Boolean => match value {
            "true" | "false" => Ok(value.to_owned()),
            _ => Err(format!("expected `true` or `false`, got {value:?}")),
        },
        ParameterKind::Integer => {
            let number: i64 = value
                .parse()
                .map_err(|_| format!("expected a decimal integer, got {value:?}"))?;
            if let ParameterConstraint::Range { min, max } = &parameter.constraint {
                if let Some(min) = min.filter(|&min| number < min) {
                    return Err(format!("{number} is below the minimum {min}"));
                }
                if let Some(max) = max.filter(|&max| number > max) {
                    return Err(format!("{number} is above the maximum {max}"));
                }
            }
            Ok(number.to_string())
        }
        ParameterKind::String => match &parameter.constraint {
            ParameterConstraint::Pattern { source, regex } => {
                if regex.is_match(value) {
                    Ok(value.to_owned())
                } else {
                    Err(format!("{value:?} does not match the pattern `{source}`"))
                }
            }
            ParameterConstraint::Enum(values) => {
                if values.iter().any(|v| v == value) {
                    Ok(value.to_owned())
                } else {
                    Err(format!("{value:?} is not one of {}", quoted_list(values)))
                }
            }
            // Loading refuses unconstrained strings; a hand-built template gets the
            // same fail-closed answer rather than accepting anything.
            ParameterConstraint::None | ParameterConstraint::Range { .. } => {
                Err("parameter has no pattern or enum, so no value can be accepted".to_owned())
            }
        },
    }
}

fn quoted_list(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_supplied_names_are_escaped_in_fields() {
        let long = "k".repeat(100);
        let cases: &[(&str, &str)] = &[
            ("repo", "parameters.repo"),
            ("my-key_2", "parameters.my-key_2"),
            ("", "parameters.\"\""),
            ("a b", "parameters.\"a b\""),
            ("x\ny", "parameters.\"x\\ny\""),
            ("a\u{1b}[31m", "parameters.\"a\\u{1b}[31m\""),
        ];
        for (name, want) in cases {
            assert_eq!(field_for(name), *want, "{name:?}");
        }
        let field = field_for(&long);
        assert!(field.len() < 80, "{field}");
        assert!(!field_for("a\nb").contains('\n'));
    }

    #[test]
    fn render_scope_table() {
        let bound: BTreeMap<String, String> = [("a", "1"), ("b", "x/y")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("plain", Ok("plain")),
            ("{a}", Ok("1")),
            ("p:{a}:{b}", Ok("p:1:x/y")),
            ("{a}{a}", Ok("11")),
            ("{c}", Err("no value bound for `{c}`")),
            ("{a", Err("without a matching")),
        ];
        for (scope, want) in cases {
            let got = render_scope(scope, &bound);
            match want {
                Ok(text) => assert_eq!(got.as_deref(), Ok(*text), "{scope}"),
                Err(fragment) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(fragment)),
                    "{scope}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn problems_display_field_and_reason() {
        let problem = ParameterProblem {
            field: "parameters.repo".to_owned(),
            reason: "required string parameter is missing".to_owned(),
        };
        assert_eq!(
            problem.to_string(),
            "parameters.repo: required string parameter is missing"
        );
    }
}
