//! Named input limits. Every limit a template file or a BeginTask request can hit is
//! here, so operators can find them and messages can quote them.

use std::time::Duration;

/// Largest template file accepted, in bytes (64 KiB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Most template files in one directory.
pub const MAX_TEMPLATES: usize = 256;
/// Most parameters one template declares.
pub const MAX_PARAMETERS: usize = 32;
/// Most grants one template declares.
pub const MAX_GRANTS: usize = 16;
/// Most scopes one grant declares.
pub const MAX_SCOPES_PER_GRANT: usize = 32;
/// Most identity patterns one template lists.
pub const MAX_IDENTITIES: usize = 64;
/// Most values in one parameter's `enum`.
pub const MAX_ENUM_VALUES: usize = 64;
/// Longest parameter value, in bytes, both in an `enum` and in a BeginTask request.
pub const MAX_VALUE_BYTES: usize = 256;
/// Longest `pattern` source, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Compiled size limit for a `pattern`, in bytes; bounds memory per template.
pub const MAX_PATTERN_COMPILED_BYTES: usize = 256 * 1024;
/// Longest audience, scope (before substitution), owner or version, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Deepest YAML nesting accepted; the format itself needs four levels.
pub const MAX_YAML_DEPTH: usize = 16;
/// Shortest duration any TTL or lifetime may have.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
/// Longest `approval.validity`: how long a request waits for a decision, and
/// then an approval waits to be used (24 h).
pub const MAX_APPROVAL_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
