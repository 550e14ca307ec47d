//! A tiny YAML node tree that remembers the 1-based line of every node and key.
//!
//! `yaml_rust2`'s own `Yaml` type drops positions, and every validation message must
//! name a line, so the tree is built here from the parser's marked events. The parser
//! is driven one event at a time instead of through `Parser::load`, because `load`
//! recurses once per nesting level and a 64 KiB file of `- - - - …` could exhaust the
//! stack; the explicit stack below stops at [`MAX_YAML_DEPTH`] instead.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::limits::MAX_YAML_DEPTH;

/// One YAML node and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// 1-based line of the node's first character, or of its key for mapping values.
    pub line: usize,
    /// What the node holds.
    pub value: Value,
}

/// The three YAML node shapes, without tags or anchors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// A scalar: its text, and whether it was written plain (unquoted, so YAML would
    /// resolve `true`, `12` or `~` to a non-string).
    Scalar { text: String, plain: bool },
    /// A sequence, in order.
    Seq(Vec<Node>),
    /// A mapping, in source order; duplicate keys are kept so the validator can name them.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    /// The key text.
    pub text: String,
    /// 1-based line of the key.
    pub line: usize,
}

/// A YAML document that could not be turned into a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    /// 1-based line of the problem.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// What YAML calls a plain scalar resolves to under the core schema. Only the
/// distinctions the validator reports are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScalarType {
    Null,
    Bool,
    Integer,
    Float,
    String,
}

impl ScalarType {
    /// How the type is named in messages.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool => "a boolean",
            Self::Integer => "an integer",
            Self::Float => "a float",
            Self::String => "a string",
        }
    }
}

impl Value {
    /// Names the node's shape for "expected X, found Y" messages.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Self::Scalar { text, plain } => scalar_type(text, *plain).describe(),
            Self::Seq(_) => "a list",
            Self::Map(_) => "a mapping",
        }
    }
}

/// Resolves a scalar the way the YAML 1.2 core schema would; quoted scalars are strings.
pub(crate) fn scalar_type(text: &str, plain: bool) -> ScalarType {
    if !plain {
        return ScalarType::String;
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => ScalarType::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => ScalarType::Bool,
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => ScalarType::Float,
        _ if is_core_int(text) => ScalarType::Integer,
        _ if is_core_float(text) => ScalarType::Float,
        _ => ScalarType::String,
    }
}

fn is_core_int(text: &str) -> bool {
    let digits = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    if let Some(hex) = text.strip_prefix("0x") {
        return digits(hex, 16);
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return digits(oct, 8);
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    digits(unsigned, 10)
}

fn is_core_float(text: &str) -> bool {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = all_digits(int_part)
        && frac_part.is_none_or(all_digits)
        && (!int_part.is_empty() || frac_part.is_some_and(|f| !f.is_empty()));
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exponent_ok
}

/// Parses one YAML document into a tree. `Ok(None)` means the file held no document.
///
/// # Errors
///
/// A syntax error, a second document, an alias, a non-scalar mapping key or nesting
/// deeper than [`MAX_YAML_DEPTH`]; parsing stops there because nothing after a syntax
/// error can be trusted.
pub(crate) fn parse(src: &str) -> Result<Option<Node>, YamlError> {
    let mut parser = Parser::new_from_str(src);
    let mut builder = TreeBuilder::default();
    loop {
        let (event, mark) = parser.next_token().map_err(|e| YamlError {
            line: e.marker().line(),
            message: format!("YAML syntax error: {}", e.info()),
        })?;
        let end = event == Event::StreamEnd;
        builder.on_event(event, mark);
        if let Some(error) = builder.error.take() {
            return Err(error);
        }
        if end {
            return Ok(builder.root);
        }
    }
}

enum Frame {
    Seq {
        line: usize,
        items: Vec<Node>,
    },
    Map {
        line: usize,
        entries: Vec<(Key, Node)>,
        pending_key: Option<Key>,
    },
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
    error: Option<YamlError>,
}

impl TreeBuilder {
    fn fail(&mut self, line: usize, message: impl Into<String>) {
        // Keep the first error: later events are consequences of it.
        if self.error.is_none() {
            self.error = Some(YamlError {
                line,
                message: message.into(),
            });
        }
    }

    fn open(&mut self, frame: Frame, line: usize) {
        if self.stack.len() >= MAX_YAML_DEPTH {
            self.fail(
                line,
                format!("YAML nesting deeper than {MAX_YAML_DEPTH} levels"),
            );
            return;
        }
        self.stack.push(frame);
    }

    fn finish(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                Some(key) => {
                    // A value starts on its key's line for reporting: the parser marks
                    // an empty value (`owner:`) at the next token and a block list at
                    // its first item, but "`identities`: too many" belongs to the key.
                    let node = Node {
                        line: key.line,
                        value: node.value,
                    };
                    entries.push((key, node));
                }
                None => match node.value {
                    Value::Scalar { text, .. } => {
                        *pending_key = Some(Key {
                            text,
                            line: node.line,
                        });
                    }
                    _ => self.fail(node.line, "mapping keys must be strings"),
                },
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let line = mark.line();
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(
                        line,
                        "a template file holds exactly one YAML document; found a second",
                    );
                }
            }
            Event::Alias(_) => self.fail(line, "YAML aliases are not supported in templates"),
            Event::Scalar(text, style, _, _) => self.finish(Node {
                line,
                value: Value::Scalar {
                    text,
                    plain: style == TScalarStyle::Plain,
                },
            }),
            Event::SequenceStart(..) => self.open(
                Frame::Seq {
                    line,
                    items: Vec::new(),
                },
                line,
            ),
            Event::MappingStart(..) => self.open(
                Frame::Map {
                    line,
                    entries: Vec::new(),
                    pending_key: None,
                },
                line,
            ),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq { line, items }) => self.finish(Node {
                    line,
                    value: Value::Seq(items),
                }),
                Some(Frame::Map { line, entries, .. }) => self.finish(Node {
                    line,
                    value: Value::Map(entries),
                }),
                // The parser never closes what it did not open; treat it as corrupt input.
                None => self.fail(line, "unbalanced YAML structure"),
            },
        }
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should panic on an unexpected value"
)]
mod tests {
    use super::*;

    fn scalar(line: usize, text: &str) -> Node {
        Node {
            line,
            value: Value::Scalar {
                text: text.to_owned(),
                plain: true,
            },
        }
    }

    fn key(line: usize, text: &str) -> Key {
        Key {
            text: text.to_owned(),
            line,
        }
    }

    #[test]
    fn builds_tree_with_lines() {
        let src = "a: 1\nb:\n  - x\n  - y\nc: {d: e}\n";
        let root = parse(src).unwrap().unwrap();
        assert_eq!(root.line, 1);
        let Value::Map(entries) = root.value else {
            panic!("expected a mapping")
        };
        assert_eq!(entries[0], (key(1, "a"), scalar(1, "1")));
        assert_eq!(entries[1].0, key(2, "b"));
        assert_eq!(
            entries[1].1.value,
            Value::Seq(vec![scalar(3, "x"), scalar(4, "y")])
        );
        assert_eq!(entries[1].1.line, 2, "a block value takes its key's line");
        assert_eq!(entries[2].0, key(5, "c"));
        assert_eq!(
            entries[2].1.value,
            Value::Map(vec![(key(5, "d"), scalar(5, "e"))])
        );
    }

    #[test]
    fn quoted_scalars_are_not_plain() {
        let root = parse("a: '1'\n").unwrap().unwrap();
        let Value::Map(entries) = root.value else {
            panic!("expected a mapping")
        };
        assert_eq!(
            entries[0].1.value,
            Value::Scalar {
                text: "1".into(),
                plain: false
            }
        );
    }

    #[test]
    fn empty_input_has_no_document() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }

    #[test]
    fn rejections_carry_lines() {
        let cases: &[(&str, usize, &str)] = &[
            ("a: 1\nb: [1, 2\n", 3, "YAML syntax error"),
            ("a: 1\n  b: 2\n", 2, "YAML syntax error"),
            ("a: &x 1\nb: *x\n", 2, "aliases are not supported"),
            ("a: 1\n---\nb: 2\n", 2, "exactly one YAML document"),
            ("? [a]\n: 1\n", 1, "mapping keys must be strings"),
        ];
        for (src, line, fragment) in cases {
            let err = parse(src).unwrap_err();
            assert_eq!(err.line, *line, "{src:?}: {err:?}");
            assert!(err.message.contains(fragment), "{src:?}: {err:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed() {
        let deep = "- ".repeat(20_000) + "x\n";
        let err = parse(&deep).unwrap_err();
        assert!(err.message.contains("nesting deeper"), "{err:?}");
        let flow = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&flow).unwrap_err().message.contains("nesting deeper"));
    }

    #[test]
    fn scalar_types_follow_core_schema() {
        let cases: &[(&str, bool, ScalarType)] = &[
            ("", true, ScalarType::Null),
            ("~", true, ScalarType::Null),
            ("true", true, ScalarType::Bool),
            ("False", true, ScalarType::Bool),
            ("yes", true, ScalarType::String),
            ("12", true, ScalarType::Integer),
            ("-3", true, ScalarType::Integer),
            ("0x1F", true, ScalarType::Integer),
            ("0o17", true, ScalarType::Integer),
            ("1.5", true, ScalarType::Float),
            ("1e3", true, ScalarType::Float),
            (".5", true, ScalarType::Float),
            (".inf", true, ScalarType::Float),
            ("1.2.3", true, ScalarType::String),
            ("60s", true, ScalarType::String),
            ("12", false, ScalarType::String),
            ("true", false, ScalarType::String),
            ("", false, ScalarType::String),
        ];
        for (text, plain, want) in cases {
            assert_eq!(scalar_type(text, *plain), *want, "{text:?} plain={plain}");
        }
    }
}
