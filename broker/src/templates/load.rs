//! Reading a template directory: one snapshot of its files, then parsing it.
//!
//! The snapshot is taken once and both the change fingerprint and the parse use it,
//! so a file edited between "did it change?" and "parse it" cannot make the catalog
//! install a set that does not match what it fingerprinted.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use super::limits::{MAX_FILE_BYTES, MAX_TEMPLATES};
use super::model::TemplateSet;
use super::parse::parse_template;
use super::{TemplateErrors, TemplateIssue};

/// One template file as read.
#[derive(Debug)]
struct SourceFile {
    path: PathBuf,
    /// The file's bytes, or why they could not be used.
    contents: Result<Vec<u8>, String>,
}

/// Identifies one directory state: file names, sizes, mtimes and content hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint(Vec<(String, u64, Option<SystemTime>, [u8; 32])>);

/// All template files of a directory, read.
#[derive(Debug)]
pub(crate) struct Snapshot {
    files: Vec<SourceFile>,
    /// Problems with the directory itself.
    issues: Vec<TemplateIssue>,
    fingerprint: Fingerprint,
}

impl Snapshot {
    pub(crate) fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

fn is_template_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    // Dotfiles are skipped: editors' swap files, and the `..data` entries Kubernetes
    // puts in a mounted ConfigMap, are not templates.
    !name.starts_with('.')
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
}

/// Reads every `*.yaml` / `*.yml` file directly in `dir`, sorted by name.
pub(crate) fn snapshot(dir: &Path) -> Snapshot {
    let mut issues = Vec::new();
    let dir_issue = |message: String| TemplateIssue {
        file: dir.to_owned(),
        line: 0,
        message,
    };
    let mut paths = Vec::new();
    match fs::read_dir(dir) {
        Err(e) => issues.push(dir_issue(format!("cannot read template directory: {e}"))),
        Ok(entries) => {
            for entry in entries {
                match entry {
                    Ok(entry) => {
                        let path = entry.path();
                        // `fs::metadata` follows symlinks, which ConfigMap mounts use.
                        if is_template_file(&path) && fs::metadata(&path).is_ok_and(|m| m.is_file())
                        {
                            paths.push(path);
                        }
                    }
                    Err(e) => {
                        issues.push(dir_issue(format!("cannot list template directory: {e}")))
                    }
                }
            }
        }
    }
    paths.sort();
    if paths.len() > MAX_TEMPLATES {
        issues.push(dir_issue(format!(
            "{} template files; at most {MAX_TEMPLATES} allowed",
            paths.len()
        )));
        paths.truncate(MAX_TEMPLATES);
    }
    let mut files = Vec::with_capacity(paths.len());
    let mut fingerprint = Vec::with_capacity(paths.len());
    for path in paths {
        let (size, mtime, contents) = read_limited(&path);
        let hash = match &contents {
            Ok(bytes) => sha256(bytes),
            Err(_) => [0; 32],
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fingerprint.push((name, size, mtime, hash));
        files.push(SourceFile { path, contents });
    }
    Snapshot {
        files,
        issues,
        fingerprint: Fingerprint(fingerprint),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Reads at most [`MAX_FILE_BYTES`] + 1 bytes, so an oversized or growing file is
/// refused without being read whole.
fn read_limited(path: &Path) -> (u64, Option<SystemTime>, Result<Vec<u8>, String>) {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return (0, None, Err(format!("cannot read: {e}"))),
    };
    let meta = file.metadata().ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let mtime = meta.and_then(|m| m.modified().ok());
    let mut bytes = Vec::new();
    match file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes) {
        Err(e) => (size, mtime, Err(format!("cannot read: {e}"))),
        Ok(_) if bytes.len() as u64 > MAX_FILE_BYTES => (
            size,
            mtime,
            Err(format!(
                "file is larger than {MAX_FILE_BYTES} bytes (64 KiB); split it or trim it"
            )),
        ),
        Ok(_) => (size, mtime, Ok(bytes)),
    }
}

/// Parses every file of a snapshot and checks names are unique across files.
pub(crate) fn build(snapshot: &Snapshot) -> Result<TemplateSet, TemplateErrors> {
    let mut issues = snapshot.issues.clone();
    let mut templates = BTreeMap::new();
    let mut first_seen: BTreeMap<String, (PathBuf, usize)> = BTreeMap::new();
    for file in &snapshot.files {
        let text = match &file.contents {
            Err(message) => {
                issues.push(TemplateIssue {
                    file: file.path.clone(),
                    line: 0,
                    message: message.clone(),
                });
                continue;
            }
            Ok(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    // Count the line so the message points at the bad byte.
                    let line = 1 + bytes[..e.valid_up_to()]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count();
                    issues.push(TemplateIssue {
                        file: file.path.clone(),
                        line,
                        message: "file is not valid UTF-8".to_owned(),
                    });
                    continue;
                }
            },
        };
        let parsed = parse_template(&file.path, text);
        if let Some((name, line)) = &parsed.name {
            if let Some((first_file, first_line)) = first_seen.get(name) {
                issues.push(TemplateIssue {
                    file: file.path.clone(),
                    line: *line,
                    message: format!(
                        "duplicate template name {name:?}; already defined in {}:{first_line}",
                        first_file.display()
                    ),
                });
            } else {
                first_seen.insert(name.clone(), (file.path.clone(), *line));
            }
        }
        match parsed.result {
            Ok(template) => {
                templates
                    .entry(template.name.clone())
                    .or_insert_with(|| Arc::new(template));
            }
            Err(mut file_issues) => issues.append(&mut file_issues),
        }
    }
    if issues.is_empty() {
        Ok(TemplateSet(templates))
    } else {
        Err(TemplateErrors(issues))
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should panic on an unexpected value"
)]
mod tests {
    use super::*;

    fn print(dir: &Path) -> Fingerprint {
        snapshot(dir).fingerprint().clone()
    }

    #[test]
    fn template_file_names() {
        let cases = [
            ("a.yaml", true),
            ("a.yml", true),
            ("a.YAML", false),
            ("a.yaml.bak", false),
            ("a.json", false),
            (".a.yaml", false),
            ("..data", false),
            ("yaml", false),
        ];
        for (name, want) in cases {
            assert_eq!(is_template_file(Path::new(name)), want, "{name}");
        }
    }

    #[test]
    fn fingerprint_tracks_names_sizes_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, "x: 1\n").unwrap();
        let first = print(dir.path());
        assert_eq!(first, print(dir.path()), "stable when nothing changes");

        fs::write(&file, "x: 2\n").unwrap();
        let same_size = print(dir.path());
        assert_ne!(first, same_size, "same size, new content");

        fs::write(&file, "x: 22\n").unwrap();
        let bigger = print(dir.path());
        assert_ne!(same_size, bigger);

        fs::rename(&file, dir.path().join("b.yaml")).unwrap();
        assert_ne!(bigger, print(dir.path()), "renamed");

        let before_ignored = print(dir.path());
        fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        assert_eq!(
            before_ignored,
            print(dir.path()),
            "non-template files do not count"
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_files_are_followed_like_a_configmap_mount() {
        // Kubernetes mounts a ConfigMap as `name -> ..data/name`, `..data -> ..<ts>/`.
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("..2025_01_01");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("t.yaml"), "x: 1\n").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("..data/t.yaml"), dir.path().join("t.yaml"))
            .unwrap();
        let snap = snapshot(dir.path());
        assert_eq!(snap.files.len(), 1);
        assert!(snap.files[0].path.ends_with("t.yaml"));
        assert_eq!(snap.files[0].contents.as_deref().unwrap(), b"x: 1\n");
    }

    #[test]
    fn read_limited_refuses_large_files_without_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.yaml");
        fs::write(&file, vec![b'#'; 4 * MAX_FILE_BYTES as usize]).unwrap();
        let (size, _, contents) = read_limited(&file);
        assert_eq!(size, 4 * MAX_FILE_BYTES);
        assert!(contents.unwrap_err().contains("larger than"));
        let (_, _, missing) = read_limited(&dir.path().join("missing.yaml"));
        assert!(missing.unwrap_err().starts_with("cannot read"));
    }
}
