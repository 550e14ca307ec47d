//! A minimal agent: connect with SVID files, begin a task, use its credential
//! while watching the lease, complete the task.
//!
//! Against `leash dev` (run from the directory holding `.leash-dev/`):
//!
//! ```sh
//! cargo run -p leash-sdk --example agent
//! ```
//!
//! `LEASH_BROKER`, `LEASH_CA`, `LEASH_CERT` and `LEASH_KEY` override the defaults.

use std::time::Duration;

use leash_sdk::{Client, Error, Outcome, TaskRequest};

fn setting(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let client = Client::builder()
        .broker(setting("LEASH_BROKER", "https://localhost:8443"))
        .svid_files(
            setting("LEASH_CERT", ".leash-dev/agent.pem"),
            setting("LEASH_KEY", ".leash-dev/agent-key.pem"),
        )
        .bundle_file(setting("LEASH_CA", ".leash-dev/bundle.pem"))
        .connect()
        .await?;

    let task = client
        .begin_task(
            TaskRequest::new("demo")
                .param("repo", "acme/widgets")
                .intent("review PR 42")
                .ttl(Duration::from_secs(30)),
        )
        .await?;
    println!("task {} begun", task.id());

    // Debug output of a credential never shows its value.
    for credential in task.credentials().iter() {
        println!("{credential:?}");
    }

    // The work: here, three rounds of "calling the API" with whatever credential
    // is current (the SDK renews the lease and rotates credentials meanwhile).
    // Stop at once if the lease is lost.
    let work = async {
        for round in 1..=3 {
            if let Some(github) = task.credential("github") {
                let _bearer = format!("Bearer {}", github.secret());
                println!(
                    "round {round}: calling {} with scopes {:?}",
                    github.audience(),
                    github.scopes()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        lost = task.lease_lost() => return Err(lost),
        () = work => {}
    }

    let done = task.complete(Outcome::Succeeded, "reviewed PR 42").await?;
    println!(
        "completed; {} credentials revoked",
        done.revoked_credentials
    );
    Ok(())
}
