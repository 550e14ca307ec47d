//! Reloads certificate, trust-bundle, template and policy files when they change.
//!
//! Polling (not inotify) so that Kubernetes ConfigMap and Secret updates, which
//! swap symlinks, are seen like any edit. A bad file keeps the last good
//! version and is reported; the next good edit is picked up.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    identity::{ServingCert, TrustBundleSource, jwt_svid::JwtBundleSource},
    policy::cedar::PolicyCatalog,
    templates::TemplateCatalog,
};

/// Watches the broker's files; one per replica.
#[derive(Debug)]
pub struct Reloader {
    /// Trust bundles per trust domain.
    pub bundles: Arc<TrustBundleSource>,
    /// The broker's serving certificate.
    pub cert: Arc<ServingCert>,
    /// The JWT bundles of the JWT-SVID listener, when it is on.
    pub jwt_bundles: Option<Arc<JwtBundleSource>>,
    /// The templates.
    pub templates: Arc<TemplateCatalog>,
    /// The Cedar policies, when configured.
    pub policies: Option<Arc<PolicyCatalog>>,
    /// How often to look.
    pub interval: Duration,
}

impl Reloader {
    /// Checks every file once: reloads what changed, reports what is broken.
    pub fn check(&self) {
        match self.bundles.reload() {
            Ok(true) => tracing::info!("trust bundles reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "trust bundles not reloaded; keeping the last good set")
            }
        }
        match self.cert.reload() {
            Ok(true) => tracing::info!("serving certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate not reloaded; keeping the last good one")
            }
        }
        if let Some(jwt) = &self.jwt_bundles {
            match jwt.reload() {
                Ok(true) => tracing::info!("JWT bundles reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "JWT bundles not reloaded; keeping the last good set")
                }
            }
        }
        match self.templates.reload() {
            Ok(true) => tracing::info!(
                templates = self.templates.current().len(),
                "templates reloaded"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                problems = e.0.len(),
                "templates not reloaded; keeping the last good set:\n{e}"
            ),
        }
        if let Some(policies) = &self.policies {
            match policies.reload() {
                Ok(true) => {
                    tracing::info!(policies = policies.current().len(), "policies reloaded")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    problems = e.0.len(),
                    "policies not reloaded; keeping the last good set:\n{e}"
                ),
            }
        }
    }

    /// Checks every `interval` until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
            self.check();
        }
    }
}

/// A value that reloads replace whole (a template set, a policy set): readers
/// get an `Arc` of one complete version, which stays valid for them even after
/// a reload installs a newer one.
#[derive(Debug)]
pub struct Current<T>(std::sync::RwLock<Arc<T>>);

impl<T> Current<T> {
    /// Holds `value` as the current version.
    pub fn new(value: T) -> Self {
        Self(std::sync::RwLock::new(Arc::new(value)))
    }

    /// The current version.
    pub fn get(&self) -> Arc<T> {
        // The only write is one Arc assignment, so a poisoned value is still whole.
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Installs `value` as the current version.
    pub fn set(&self, value: T) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(value);
    }
}
