//! Replays every committed fuzz input through the function its fuzz target calls, so
//! CI checks the corpus without libFuzzer.
//!
//! Inputs are `fuzz/corpus/<target>/*` (seeds and minimised corpus) and
//! `fuzz/artifacts/<target>/regression-*` (inputs that once crashed a target). Every
//! input must run without a panic; a seed named `ok-*` must be accepted and one named
//! `no-*` refused, so a fixture or rule that drifts shows up here.
#![expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use leash_broker::fuzzing::{self, Outcome};

type Target = fn(&[u8]) -> Outcome;

/// Every fuzz target, by its name in `fuzz/Cargo.toml`.
const TARGETS: &[(&str, Target)] = &[
    ("spiffe_id", fuzzing::spiffe_id),
    ("x509_svid", fuzzing::x509_svid),
    ("jwt_svid", fuzzing::jwt_svid),
    ("template", fuzzing::template),
    ("config", fuzzing::config),
    ("credential", fuzzing::credential),
    ("store_ids", fuzzing::store_ids),
    ("policy", fuzzing::policy),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.starts_with('.'))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| !n.starts_with("leash-fuzz"))
        .collect();
    let mut known: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    known.sort_unstable();
    let mut declared_sorted = declared.clone();
    declared_sorted.sort_unstable();
    assert_eq!(declared_sorted, known, "fuzz/Cargo.toml and TARGETS differ");
}

#[test]
fn corpus_and_regressions_replay_without_panics() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name), "");
        let regressions = files(&fuzz_dir().join("artifacts").join(name), "regression-");
        assert!(
            corpus
                .iter()
                .any(|p| p.file_name().unwrap().to_string_lossy().starts_with("ok-")),
            "{name}: no ok- seed in fuzz/corpus/{name}"
        );
        for path in corpus.iter().chain(&regressions) {
            let data = fs::read(path).unwrap();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            replayed += 1;
            match catch_unwind(AssertUnwindSafe(|| target(&data))) {
                Err(_) => failures.push(format!("{name}/{file}: panicked (see above)")),
                Ok(outcome) => {
                    if file.starts_with("ok-") && outcome != Outcome::Accepted {
                        failures.push(format!("{name}/{file}: refused, expected accepted"));
                    }
                    if file.starts_with("no-") && outcome != Outcome::Rejected {
                        failures.push(format!("{name}/{file}: accepted, expected refused"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("replayed {replayed} fuzz inputs");
}
