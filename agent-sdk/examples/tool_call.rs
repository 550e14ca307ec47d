//! An agent "tool", wired the way agent frameworks call tools: an object with an
//! async `call(input) -> Result<Output, ToolError>`. Each call is one Leash task,
//! so the credential it uses exists only while the tool runs and can do only
//! what the call declared.
//!
//! ```sh
//! cargo run -p leash-sdk --example tool_call -- acme/widgets
//! ```

use std::time::Duration;

use leash_sdk::{Client, Error, Outcome, TaskRequest};

/// What the model asked the tool to do.
#[derive(Debug)]
pub struct ReviewInput {
    /// `owner/name` of the repository.
    pub repo: String,
    /// The pull request.
    pub pull_request: u32,
}

/// What the tool gives back to the model.
#[derive(Debug)]
pub struct ReviewOutput {
    /// A short account of what was done.
    pub summary: String,
}

/// The tool's errors, as the framework shows them to the model.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The platform does not allow this agent to do that; do not retry.
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The input was wrong; the message says which field.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Try again later.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<Error> for ToolError {
    fn from(e: Error) -> Self {
        match e {
            Error::Denied(m) | Error::NotFound(m) => Self::NotAllowed(m),
            Error::Invalid(m) => Self::BadInput(m),
            Error::Unavailable(m) => Self::Unavailable(m),
            other => Self::Other(other.to_string()),
        }
    }
}

/// The tool: one shared Leash client, one task per call.
pub struct ReviewPullRequest {
    leash: Client,
}

impl ReviewPullRequest {
    /// Runs one tool call inside its own task.
    ///
    /// # Errors
    /// [`ToolError`] when the task cannot begin, the lease is lost, or the task
    /// cannot be completed.
    pub async fn call(&self, input: ReviewInput) -> Result<ReviewOutput, ToolError> {
        let task = self
            .leash
            .begin_task(
                TaskRequest::new("demo")
                    .param("repo", &input.repo)
                    .intent(format!(
                        "review PR {} of {}",
                        input.pull_request, input.repo
                    ))
                    .ttl(Duration::from_secs(60)),
            )
            .await?;

        let result = tokio::select! {
            lost = task.lease_lost() => Err(ToolError::from(lost)),
            r = self.review(&task, &input) => r,
        };
        let outcome = if result.is_ok() {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        };
        let summary = match &result {
            Ok(o) => o.summary.clone(),
            Err(e) => e.to_string(),
        };
        task.complete(outcome, summary).await?;
        result
    }

    async fn review(
        &self,
        task: &leash_sdk::Task,
        input: &ReviewInput,
    ) -> Result<ReviewOutput, ToolError> {
        let github = task
            .credential("github")
            .ok_or_else(|| ToolError::Other("the template has no github grant".into()))?;
        // A real tool would call the API here with `github.secret()`.
        println!(
            "calling {} as task {} with scopes {:?} (credential {})",
            github.audience(),
            task.id(),
            github.scopes(),
            github.id()
        );
        Ok(ReviewOutput {
            summary: format!("reviewed PR {} of {}", input.pull_request, input.repo),
        })
    }
}

fn setting(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let leash = Client::builder()
        .broker(setting("LEASH_BROKER", "https://localhost:8443"))
        .svid_files(
            setting("LEASH_CERT", ".leash-dev/agent.pem"),
            setting("LEASH_KEY", ".leash-dev/agent-key.pem"),
        )
        .bundle_file(setting("LEASH_CA", ".leash-dev/bundle.pem"))
        .connect()
        .await?;
    let tool = ReviewPullRequest { leash };
    let repo = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "acme/widgets".into());
    let output = tool
        .call(ReviewInput {
            repo,
            pull_request: 42,
        })
        .await?;
    println!("{}", output.summary);
    Ok(())
}
