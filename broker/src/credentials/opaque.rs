//! Opaque credentials: `lsh_<credential id>.<secret>`.
//!
//! The secret is 256 bits from the system CSPRNG, base64url without padding (43
//! characters). The credential id in front is not secret: it lets a verifier find
//! the record in the task's hash slot, where only the SHA-256 of the whole value
//! is kept.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{CredentialError, Secret, random_bytes};
use crate::store::CredentialId;

/// Prefix of every opaque credential.
pub const PREFIX: &str = "lsh_";
const SECRET_LEN: usize = 43;

/// Makes a fresh opaque credential value for `id`.
///
/// # Errors
/// [`CredentialError::Random`] if the OS random source fails.
pub fn generate(id: &CredentialId) -> Result<Secret, CredentialError> {
    let secret = URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    Ok(Secret::new(format!("{PREFIX}{id}.{secret}")))
}

/// Reads the credential id out of an opaque value, if it has the right form.
/// Says nothing about validity: the caller compares the stored digest.
pub fn credential_id(value: &str) -> Option<CredentialId> {
    let rest = value.strip_prefix(PREFIX)?;
    let (id, secret) = rest.rsplit_once('.')?;
    let well_formed = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    well_formed.then(|| CredentialId::parse(id)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TaskId;

    #[test]
    fn generated_values_carry_their_id_and_256_bits() {
        let id = CredentialId::new(&TaskId::from_bytes([7; 16]), [9; 8]);
        let a = generate(&id).expect("random");
        let b = generate(&id).expect("random");
        assert_ne!(a, b);
        assert_eq!(credential_id(a.expose()), Some(id.clone()));
        let secret = a.expose().rsplit_once('.').map(|(_, s)| s).unwrap_or("");
        assert_eq!(
            URL_SAFE_NO_PAD.decode(secret).map(|v| v.len()).ok(),
            Some(32)
        );
    }

    #[test]
    fn malformed_values_have_no_id() {
        let id = CredentialId::new(&TaskId::from_bytes([7; 16]), [9; 8]);
        for bad in [
            String::new(),
            "lsh_".into(),
            format!("{id}.{}", "a".repeat(43)),
            format!("lsh_{id}.{}", "a".repeat(42)),
            format!("lsh_{id}.{}", "a".repeat(44)),
            format!("lsh_{id}.{}!", "a".repeat(42)),
            format!("lsh_tk_x.c00.{}", "a".repeat(43)),
        ] {
            assert!(credential_id(&bad).is_none(), "{bad}");
        }
    }
}
