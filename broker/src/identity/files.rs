//! Change detection and capped reads for PEM files that are reloaded in place.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    time::SystemTime,
};

use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::{
    error::IdentityError,
    limits::{MAX_CERT_DER_LEN, MAX_PEM_CERTS, MAX_PEM_FILE_LEN},
};

/// What a file looked like when last read: cheap metadata plus a content hash, so a
/// touch without a content change is not reported as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    sha256: [u8; 32],
}

pub(crate) fn file_error(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::File {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// True when the file's metadata differs from `old` (so it must be read again).
pub(crate) fn metadata_changed(path: &Path, old: &Stamp) -> Result<bool, IdentityError> {
    let meta = fs::metadata(path).map_err(|e| file_error(path, e.to_string()))?;
    Ok(meta.modified().ok() != old.mtime || meta.len() != old.len)
}

/// Reads a whole file, refusing anything over [`MAX_PEM_FILE_LEN`], with its stamp.
pub(crate) fn read_stamped(path: &Path) -> Result<(Vec<u8>, Stamp), IdentityError> {
    let file = fs::File::open(path).map_err(|e| file_error(path, e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| file_error(path, e.to_string()))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so an oversize file is detected even if it grew
    // after the metadata call.
    file.take(MAX_PEM_FILE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(path, e.to_string()))?;
    if bytes.len() > MAX_PEM_FILE_LEN {
        return Err(file_error(
            path,
            format!("file is larger than the limit of {MAX_PEM_FILE_LEN} bytes"),
        ));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    let stamp = Stamp {
        mtime: meta.modified().ok(),
        len: bytes.len() as u64,
        sha256,
    };
    Ok((bytes, stamp))
}

/// True when two stamps describe the same content.
pub(crate) fn same_content(a: &Stamp, b: &Stamp) -> bool {
    a.sha256 == b.sha256
}

/// Parses every `CERTIFICATE` block of a PEM file, enforcing the size limits.
pub(crate) fn parse_pem_certs(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| file_error(path, format!("bad PEM: {e}")))?;
        if cert.as_ref().len() > MAX_CERT_DER_LEN {
            return Err(file_error(
                path,
                format!("a certificate is larger than the limit of {MAX_CERT_DER_LEN} bytes"),
            ));
        }
        certs.push(cert);
        if certs.len() > MAX_PEM_CERTS {
            return Err(file_error(
                path,
                format!("more than the limit of {MAX_PEM_CERTS} certificates"),
            ));
        }
    }
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// A loaded file together with its stamp.
#[derive(Debug, Clone)]
pub(crate) struct Tracked<T> {
    pub(crate) path: PathBuf,
    pub(crate) stamp: Stamp,
    pub(crate) value: T,
}
