//! The live template set, reloaded from its directory without a restart.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use super::load::{Fingerprint, build, snapshot};
use super::model::TemplateSet;
use super::{SetCheck, TemplateErrors};

/// The broker's current templates. Readers always see one complete, valid set: a
/// reload either installs a whole new set or leaves the last good one in place.
pub struct TemplateCatalog {
    dir: PathBuf,
    current: crate::reload::Current<TemplateSet>,
    /// Fingerprint of the last directory state that was parsed, good or bad. Holding
    /// this lock for the whole reload also serializes concurrent reloads, so an older
    /// read can never overwrite a newer one.
    seen: Mutex<Fingerprint>,
    /// Checked on every set before it is installed (start and reload).
    check: Option<SetCheck>,
}

impl std::fmt::Debug for TemplateCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateCatalog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Parses `snap` and applies `check`.
fn build_checked(
    snap: &super::load::Snapshot,
    check: Option<&SetCheck>,
) -> Result<TemplateSet, TemplateErrors> {
    let set = build(snap)?;
    match check.map(|c| c(&set)) {
        Some(issues) if !issues.is_empty() => Err(TemplateErrors(issues)),
        _ => Ok(set),
    }
}

impl TemplateCatalog {
    /// Loads `dir`.
    ///
    /// # Errors
    ///
    /// Every problem in the directory; the broker must not start without a valid set.
    pub fn new(dir: PathBuf) -> Result<Self, TemplateErrors> {
        Self::with_check(dir, None)
    }

    /// Loads `dir`; this set and every reloaded one must also pass `check`
    /// (a reload that fails it keeps the last good set, like a parse error).
    ///
    /// # Errors
    ///
    /// Every problem in the directory, then every issue `check` reports.
    pub fn with_check(dir: PathBuf, check: Option<SetCheck>) -> Result<Self, TemplateErrors> {
        let snap = snapshot(&dir);
        let set = build_checked(&snap, check.as_ref())?;
        tracing::info!(dir = %dir.display(), templates = set.len(), "templates loaded");
        Ok(Self {
            seen: Mutex::new(snap.fingerprint().clone()),
            current: crate::reload::Current::new(set),
            dir,
            check,
        })
    }

    /// The directory the catalog reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current set; cheap, and stays valid for the caller even if a reload
    /// installs a newer one meanwhile.
    pub fn current(&self) -> Arc<TemplateSet> {
        // A panic elsewhere while holding the lock cannot leave a half-written set:
        // the only write is a single Arc assignment, so the poisoned value is sound.
        self.current.get()
    }

    /// Re-reads the directory if any template file's name, size, mtime or content
    /// changed since the last reload. Returns `Ok(true)` when a new set was installed
    /// and `Ok(false)` when nothing changed, including when the directory is still in
    /// the same bad state a previous reload already reported.
    ///
    /// # Errors
    ///
    /// Every problem in the changed directory. The last good set stays current and
    /// each problem is logged at warn level.
    pub fn reload(&self) -> Result<bool, TemplateErrors> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let snap = snapshot(&self.dir);
        if snap.fingerprint() == &*seen {
            return Ok(false);
        }
        // Remember this state even if it is bad, so an unchanged broken directory is
        // reported once rather than on every poll.
        *seen = snap.fingerprint().clone();
        match build_checked(&snap, self.check.as_ref()) {
            Ok(set) => {
                let count = set.len();
                self.current.set(set);
                tracing::info!(dir = %self.dir.display(), templates = count, "templates reloaded");
                Ok(true)
            }
            Err(errors) => {
                for issue in &errors.0 {
                    tracing::warn!(
                        file = %issue.file.display(),
                        line = issue.line,
                        problem = %issue.message,
                        "template reload rejected; keeping the last good set"
                    );
                }
                Err(errors)
            }
        }
    }
}
