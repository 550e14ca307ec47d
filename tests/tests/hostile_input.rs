//! Text that reaches the audit trail cannot forge it: control characters (C0
//! including tab and newline, DEL, C1, and the Unicode line and paragraph
//! separators) in `intent`, `summary`, `template` or a parameter name or value are
//! refused at the edge with INVALID_ARGUMENT naming the field, and change nothing.

use leash_e2e::{
    BrokerOptions, REVIEW_TEMPLATE, TestBroker, pb, renew_when_allowed, review_request,
};
use tonic::Code;

/// A template with a free-text parameter, so only the control-character rule can
/// refuse a value.
const NOTE_TEMPLATE: &str = r#"
name: note
version: "1"
owner: platform@acme.test
identities: [spiffe://acme.test/agent/*]
parameters:
  note: { type: string, pattern: ".*", required: false }
lease: { ttl: 5s, max_ttl: 5s, max_lifetime: 1m }
grants:
  - { name: api, kind: opaque, audience: https://api.acme.test, scopes: [{scope: "read", class: read}], ttl: 5s }
"#;

/// Each character class the rule covers, once.
const FORBIDDEN: [(&str, char); 9] = [
    ("newline", '\n'),
    ("carriage return", '\r'),
    ("tab", '\t'),
    ("NUL", '\0'),
    ("escape", '\u{1b}'),
    ("DEL", '\u{7f}'),
    ("NEL (C1)", '\u{85}'),
    ("line separator", '\u{2028}'),
    ("paragraph separator", '\u{2029}'),
];

fn note_request(note: &str) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "note".into(),
        parameters: [("note".to_owned(), note.to_owned())].into_iter().collect(),
        ..review_request()
    }
}

fn refused(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) -> Option<String> {
    match result {
        Err(s) if s.code() == Code::InvalidArgument && s.message().contains(field) => None,
        other => Some(format!("{field}: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_refused_in_every_text_field() {
    let mut options = BrokerOptions::memory();
    options.templates = vec![REVIEW_TEMPLATE.to_owned(), NOTE_TEMPLATE.to_owned()];
    let broker = TestBroker::start(options).await;
    let mut agent = broker.broker("agent/hostile").await;
    // The control: clean text in every field is accepted.
    let task = agent
        .begin_task(note_request("plain words, accents: é ü — and emoji 🦀"))
        .await
        .unwrap()
        .into_inner();

    let mut wrong = Vec::new();
    for (name, c) in FORBIDDEN {
        let forged = format!("review{c}event=\"task.completed\"");
        let mut intent = note_request("x");
        intent.intent = forged.clone();
        wrong.extend(refused(agent.begin_task(intent).await, "intent"));
        wrong.extend(refused(
            agent.begin_task(note_request(&forged)).await,
            "parameters",
        ));
        let mut key = note_request("x");
        key.parameters = [(format!("no{c}te"), "x".to_owned())].into_iter().collect();
        wrong.extend(refused(agent.begin_task(key).await, "parameters"));
        let mut template = note_request("x");
        template.template = format!("note{c}");
        wrong.extend(refused(agent.begin_task(template).await, "template"));
        let complete = agent
            .complete_task(pb::CompleteTaskRequest {
                task_id: task.task_id.clone(),
                summary: forged,
                ..Default::default()
            })
            .await;
        wrong.extend(refused(complete, "summary"));
        if !wrong.is_empty() {
            wrong.push(format!("(character: {name})"));
            break;
        }
    }
    assert!(wrong.is_empty(), "accepted:\n{}", wrong.join("\n"));

    // Nothing changed: the task is still active and completes with a clean summary.
    renew_when_allowed(&mut agent, &task.task_id).await.unwrap();
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.task_id,
            summary: "done: reviewed".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    broker.stop().await;
}
