//! `leash templates check DIR [--config FILE]`.

use std::path::Path;

use crate::{
    config::Config,
    policy::actors,
    templates::{self, TemplateErrors, TemplateSet},
};

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The config file given with `--config` does not load.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The directory has problems (parse errors, or classes the config lacks).
    #[error("{0}")]
    Templates(TemplateErrors),
}

/// Validates every template in `dir`; with `config`, also that each template's
/// `classes` are actor classes of that config of the template's `tenant`
/// (what the broker checks when it loads the directory).
///
/// # Errors
/// [`CheckError::Config`] if the config does not load; otherwise
/// [`CheckError::Templates`] with every problem, each with file and line.
pub fn check(dir: &Path, config: Option<&Path>) -> Result<TemplateSet, CheckError> {
    let classes = config
        .map(Config::load)
        .transpose()?
        .map(|c| c.actor_classes());
    let set = templates::check_dir(dir).map_err(CheckError::Templates)?;
    if let Some(classes) = classes {
        let issues = actors::template_check(classes)(&set);
        if !issues.is_empty() {
            return Err(CheckError::Templates(TemplateErrors(issues)));
        }
    }
    Ok(set)
}
