//! The broker's own serving certificate, reloadable in place.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use rustls::{
    pki_types::PrivateKeyDer,
    pki_types::pem::PemObject,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{
    error::IdentityError,
    files::{Stamp, file_error, metadata_changed, parse_pem_certs, read_stamped, same_content},
};

/// The broker's TLS certificate chain and private key, loaded from two PEM files.
///
/// Guarantees: the chain is non-empty, the key parses with the ring provider and its
/// public key matches the leaf; [`ResolvesServerCert`] always hands out the last pair
/// that loaded without error, so a half-written rotation never breaks new handshakes.
/// `Debug` never prints key material.
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
    // None when the pair is pushed (SPIFFE Workload API) rather than read from files.
    files: Option<ServingFiles>,
}

struct ServingFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    // (cert, key) stamps; held for the whole of a reload.
    stamps: Mutex<(Stamp, Stamp)>,
}

impl ServingCert {
    /// Loads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, SEC1 or
    /// PKCS#1).
    ///
    /// # Errors
    ///
    /// [`IdentityError::File`] when a file cannot be read, is over a size limit, holds
    /// no certificate or no key, or the key does not match the leaf.
    pub fn from_files(cert_pem: PathBuf, key_pem: PathBuf) -> Result<Self, IdentityError> {
        let (key, stamps) = load(&cert_pem, &key_pem)?;
        Ok(Self {
            current: RwLock::new(Arc::new(key)),
            files: Some(ServingFiles {
                cert_path: cert_pem,
                key_path: key_pem,
                stamps: Mutex::new(stamps),
            }),
        })
    }

    /// A serving certificate held until [`replace`](Self::replace)d, with no files
    /// behind it ([`reload`](Self::reload) does nothing): for an SVID pushed by the
    /// SPIFFE Workload API.
    pub fn fixed(key: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
            files: None,
        }
    }

    /// Swaps in a new certificate and key; the next handshake uses them.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
    }

    /// The current certificate and key.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads both files when either one's modification time or length changed, and
    /// swaps in the new pair if the content (by SHA-256) changed. Returns whether it did.
    ///
    /// # Errors
    ///
    /// [`IdentityError::File`] when the new files cannot be used (for example the key was
    /// rotated but the certificate not yet); the last good pair stays current.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let mut stamps = files.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if !metadata_changed(&files.cert_path, &stamps.0)?
            && !metadata_changed(&files.key_path, &stamps.1)?
        {
            return Ok(false);
        }
        let (key, new_stamps) = load(&files.cert_path, &files.key_path)?;
        let changed =
            !same_content(&stamps.0, &new_stamps.0) || !same_content(&stamps.1, &new_stamps.1);
        if changed {
            *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
            tracing::info!(cert = %files.cert_path.display(), "serving certificate reloaded");
        }
        *stamps = new_stamps;
        Ok(changed)
    }
}

fn load(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(CertifiedKey, (Stamp, Stamp)), IdentityError> {
    let (cert_pem, cert_stamp) = read_stamped(cert_path)?;
    let (key_pem, key_stamp) = read_stamped(key_path)?;
    let chain = parse_pem_certs(cert_path, &cert_pem)?;
    // The parser's error could quote key bytes in some versions; say only what failed.
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| file_error(key_path, "no usable PRIVATE KEY block found"))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| file_error(key_path, format!("key unusable with the certificate: {e}")))?;
    Ok((certified, (cert_stamp, key_stamp)))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert_path", &self.files.as_ref().map(|f| &f.cert_path))
            .field("key_path", &self.files.as_ref().map(|f| &f.key_path))
            .field("key", &"...")
            .finish()
    }
}
