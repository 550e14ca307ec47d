//! Credentials: minting what a task's grants yield, and reading them back.
//!
//! - [`jwt`]: JWS compact serialization on `ring` with an algorithm allow-list
//!   (EdDSA/Ed25519, ES256). Nothing else is ever accepted, `none` least of all.
//! - [`opaque`]: 256 random bits; only the SHA-256 of the value is stored.
//! - [`keys`]: signing keys from PKCS#8 files, and the JWK Set that publishes them.
//! - [`mint`]: template grant → signed credential → checked → returned.
//!
//! A credential value exists only in the response to the agent: it is wrapped in
//! [`Secret`], whose `Debug` prints `"..."`, and it is never stored or logged.

pub mod jwt;
pub mod keys;
pub mod mint;
pub mod opaque;

use std::fmt;

pub use keys::{Algorithm, KeySet, SigningKey};
pub use mint::{MintRequest, Minted, Minter, act_claim};

/// Why a credential could not be minted or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A signing key file could not be read or is not a usable PKCS#8 key.
    #[error("signing key {kid}: {reason}")]
    Key {
        /// The key's id.
        kid: String,
        /// Why it is unusable.
        reason: String,
    },
    /// No signing key was configured.
    #[error("no signing key configured")]
    NoKeys,
    /// The system random source failed.
    #[error("random source failed")]
    Random,
    /// Signing failed, or a freshly minted credential failed its own check.
    #[error("minting failed: {0}")]
    Mint(String),
    /// The lease ends before any credential could expire inside it: a JWT's
    /// expiry is whole seconds rounded down, so the last fraction of a second
    /// of a lease holds none. The task's state, not a fault.
    #[error(
        "the lease ends in {remaining_ms} ms, too soon to issue a credential that expires inside it"
    )]
    LeaseEndsTooSoon {
        /// Time left on the lease.
        remaining_ms: u64,
    },
    /// A presented token is not a credential this broker issued (malformed,
    /// unknown key, bad signature, disallowed algorithm).
    #[error("token rejected: {0}")]
    Rejected(&'static str),
}

/// A credential value. Its `Debug` never shows it; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value itself: to be sent to its owner and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"...\"")
    }
}

/// Lower-case hex SHA-256 of a credential value: what the store keeps.
pub fn value_digest(value: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    hex::encode(d.as_ref())
}

/// Compares two digests in constant time.
pub fn digests_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Fills `N` bytes from the system CSPRNG.
///
/// # Errors
/// [`CredentialError::Random`] if the OS random source fails.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CredentialError> {
    use ring::rand::SecureRandom as _;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CredentialError::Random)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_debug_print() {
        let s = Secret::new("lsh_supersecret".into());
        assert_eq!(format!("{s:?}"), "\"...\"");
        assert!(!format!("{:?}", Some(&s)).contains("supersecret"));
    }

    #[test]
    fn digests() {
        assert_eq!(
            value_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(digests_match(&value_digest("x"), &value_digest("x")));
        assert!(!digests_match(&value_digest("x"), &value_digest("y")));
        assert!(!digests_match("ab", "abc"));
    }
}
