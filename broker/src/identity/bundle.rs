//! Trust bundles: for each trust domain, the CA certificates that may vouch for it.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use rustls::pki_types::{CertificateDer, TrustAnchor};

use super::{
    error::IdentityError,
    files::{Tracked, file_error, metadata_changed, parse_pem_certs, read_stamped, same_content},
    limits::{MAX_CERT_DER_LEN, MAX_PEM_CERTS},
    spiffe_id::validate_trust_domain,
};

/// The anchors of one trust domain, parsed once.
struct DomainBundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// An immutable snapshot: trust domain name → trust anchors.
///
/// Guarantees: every trust domain name is valid SPIFFE syntax, every domain has at
/// least one anchor, and every anchor is a CA certificate (basicConstraints `cA=true`),
/// so a leaf dropped into a bundle file by mistake cannot vouch for itself.
#[derive(Clone, Default)]
pub struct TrustBundles {
    domains: BTreeMap<String, Arc<DomainBundle>>,
}

impl TrustBundles {
    /// Builds a snapshot from PEM text per trust domain (useful in tests and for
    /// bundles that do not come from files).
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidSpiffeId`] for a bad trust domain name;
    /// [`IdentityError::File`] (with the trust domain as path) for PEM that holds no
    /// usable CA certificate, or breaks a size limit.
    pub fn from_pem<'a>(
        domains: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, IdentityError> {
        let mut out = BTreeMap::new();
        for (td, pem) in domains {
            validate_trust_domain(td)?;
            out.insert(td.to_owned(), Arc::new(parse_domain(Path::new(td), pem)?));
        }
        Ok(Self { domains: out })
    }

    /// Builds a snapshot from DER certificates per trust domain (for bundles
    /// delivered by the SPIFFE Workload API), with the same checks as
    /// [`from_pem`](Self::from_pem).
    ///
    /// # Errors
    ///
    /// As [`from_pem`](Self::from_pem).
    pub fn from_der(
        domains: impl IntoIterator<Item = (String, Vec<CertificateDer<'static>>)>,
    ) -> Result<Self, IdentityError> {
        let mut out = BTreeMap::new();
        for (td, certs) in domains {
            validate_trust_domain(&td)?;
            let bundle = domain_of(Path::new(&td), certs)?;
            out.insert(td, Arc::new(bundle));
        }
        Ok(Self { domains: out })
    }

    /// The trust anchors of `trust_domain`, or `None` when it is not configured.
    pub fn anchors(&self, trust_domain: &str) -> Option<&[TrustAnchor<'static>]> {
        self.domains.get(trust_domain).map(|d| d.anchors.as_slice())
    }

    /// The CA certificates (DER) of `trust_domain`, or `None` when it is not configured.
    pub fn certificates(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.domains.get(trust_domain).map(|d| d.certs.as_slice())
    }

    /// The configured trust domain names, sorted.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.domains
                    .iter()
                    .map(|(td, d)| (td, format!("{} anchors", d.anchors.len()))),
            )
            .finish()
    }
}

fn parse_domain(path: &Path, pem: &[u8]) -> Result<DomainBundle, IdentityError> {
    domain_of(path, parse_pem_certs(path, pem)?)
}

fn domain_of(
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<DomainBundle, IdentityError> {
    if certs.is_empty() {
        return Err(file_error(path, "no certificate"));
    }
    // The PEM path checks these while parsing; a Workload API bundle arrives as
    // DER and gets the same limits here.
    if certs.len() > MAX_PEM_CERTS {
        return Err(file_error(
            path,
            format!("more than the limit of {MAX_PEM_CERTS} certificates"),
        ));
    }
    if certs.iter().any(|c| c.as_ref().len() > MAX_CERT_DER_LEN) {
        return Err(file_error(
            path,
            format!("a certificate is larger than the limit of {MAX_CERT_DER_LEN} bytes"),
        ));
    }
    let mut anchors = Vec::with_capacity(certs.len());
    for (i, cert) in certs.iter().enumerate() {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| file_error(path, format!("certificate #{}: {e}", i + 1)))?;
        let is_ca = parsed
            .basic_constraints()
            .map_err(|e| file_error(path, format!("certificate #{}: {e}", i + 1)))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(file_error(
                path,
                format!(
                    "certificate #{} is not a CA (basicConstraints cA=true is required in a trust bundle)",
                    i + 1
                ),
            ));
        }
        let anchor = webpki::anchor_from_trusted_cert(cert)
            .map_err(|e| file_error(path, format!("certificate #{}: {e}", i + 1)))?;
        anchors.push(anchor.to_owned());
    }
    Ok(DomainBundle { certs, anchors })
}

/// Trust bundles loaded from one PEM file per trust domain, reloadable in place.
///
/// Guarantees: [`current`](Self::current) always returns a complete, valid snapshot
/// (the last one that loaded without error); a reload swaps the whole snapshot at once,
/// so a handshake never sees half of an update.
pub struct TrustBundleSource {
    current: RwLock<Arc<TrustBundles>>,
    // Held for the whole of a reload so two reloads cannot interleave.
    files: Mutex<BTreeMap<String, Tracked<Arc<DomainBundle>>>>,
}

impl TrustBundleSource {
    /// Loads one PEM bundle file per trust domain.
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidSpiffeId`] for a bad trust domain name;
    /// [`IdentityError::File`] when a file cannot be read, is over a size limit, or holds
    /// no certificate or a non-CA certificate.
    pub fn from_files(files: &BTreeMap<String, PathBuf>) -> Result<Self, IdentityError> {
        let mut tracked = BTreeMap::new();
        for (td, path) in files {
            validate_trust_domain(td)?;
            tracked.insert(td.clone(), load(path)?);
        }
        let snapshot = snapshot(&tracked);
        Ok(Self {
            current: RwLock::new(Arc::new(snapshot)),
            files: Mutex::new(tracked),
        })
    }

    /// A source that holds `bundles` until [`replace`](Self::replace)d, with no
    /// files behind it ([`reload`](Self::reload) does nothing): for bundles pushed by
    /// the SPIFFE Workload API.
    pub fn fixed(bundles: TrustBundles) -> Self {
        Self {
            current: RwLock::new(Arc::new(bundles)),
            files: Mutex::new(BTreeMap::new()),
        }
    }

    /// Swaps in a whole new snapshot at once; the next handshake uses it.
    pub fn replace(&self, bundles: TrustBundles) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(bundles);
    }

    /// The current snapshot; cheap (one `Arc` clone).
    pub fn current(&self) -> Arc<TrustBundles> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the files whose modification time or length changed, and swaps in a new
    /// snapshot if any content (by SHA-256) changed. Returns whether it did.
    ///
    /// # Errors
    ///
    /// [`IdentityError::File`] when a changed file cannot be read or parsed; the last
    /// good snapshot stays current and the next reload tries again.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = files.clone();
        let mut changed = false;
        for entry in next.values_mut() {
            if !metadata_changed(&entry.path, &entry.stamp)? {
                continue;
            }
            let (pem, stamp) = read_stamped(&entry.path)?;
            if same_content(&stamp, &entry.stamp) {
                entry.stamp = stamp;
                continue;
            }
            entry.value = Arc::new(parse_domain(&entry.path, &pem)?);
            entry.stamp = stamp;
            changed = true;
        }
        if changed {
            *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(snapshot(&next));
            tracing::info!(trust_domains = next.len(), "trust bundles reloaded");
        }
        *files = next;
        Ok(changed)
    }
}

impl fmt::Debug for TrustBundleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundleSource")
            .field("current", &self.current())
            .finish()
    }
}

fn load(path: &Path) -> Result<Tracked<Arc<DomainBundle>>, IdentityError> {
    let (pem, stamp) = read_stamped(path)?;
    Ok(Tracked {
        path: path.to_owned(),
        stamp,
        value: Arc::new(parse_domain(path, &pem)?),
    })
}

fn snapshot(files: &BTreeMap<String, Tracked<Arc<DomainBundle>>>) -> TrustBundles {
    TrustBundles {
        domains: files
            .iter()
            .map(|(td, t)| (td.clone(), Arc::clone(&t.value)))
            .collect(),
    }
}
