use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    time::{Duration, SystemTime},
};

use super::{LeafSpec, ca, leaf};
use crate::identity::{
    IdentityError, ServingCert, SvidRule, TrustBundleSource, pki::DevCa, verify_svid,
};

/// Writes `contents` and sets a distinct mtime, so change detection never depends on
/// the file system's timestamp granularity.
fn write(path: &Path, contents: &[u8], generation: u64) {
    fs::write(path, contents).unwrap();
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + generation);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

#[test]
fn bundle_reload_picks_up_new_pem_and_keeps_last_good_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.pem");
    let ca1 = ca("a.test");
    let ca2 = ca("a.test");
    write(&path, ca1.pem.as_bytes(), 1);
    let source =
        TrustBundleSource::from_files(&BTreeMap::from([("a.test".to_owned(), path.clone())]))
            .unwrap();

    let (leaf1, _) = leaf(&LeafSpec::default(), Some(&ca1));
    let (leaf2, _) = leaf(&LeafSpec::default(), Some(&ca2));
    let now = SystemTime::now();
    assert!(verify_svid(std::slice::from_ref(&leaf1), &source.current(), now).is_ok());
    assert!(verify_svid(std::slice::from_ref(&leaf2), &source.current(), now).is_err());

    // Nothing changed: no re-read, no swap.
    assert!(!source.reload().unwrap());

    // Rotate to CA 2.
    let before = source.current();
    write(&path, ca2.pem.as_bytes(), 2);
    assert!(source.reload().unwrap());
    assert!(verify_svid(std::slice::from_ref(&leaf2), &source.current(), now).is_ok());
    match verify_svid(std::slice::from_ref(&leaf1), &source.current(), now) {
        Err(IdentityError::InvalidSvid {
            rule: SvidRule::UntrustedIssuer,
            ..
        }) => {}
        other => panic!("old CA still trusted: {other:?}"),
    }
    // A snapshot taken before the reload is unaffected (handshakes in flight keep theirs).
    assert!(verify_svid(std::slice::from_ref(&leaf1), &before, now).is_ok());

    // Touched but identical content: not a change.
    write(&path, ca2.pem.as_bytes(), 3);
    assert!(!source.reload().unwrap());

    // A broken file: error, last good kept, and the error repeats until fixed.
    write(&path, b"-----BEGIN CERTIFICATE-----\nnot base64!\n", 4);
    let err = source.reload().unwrap_err();
    assert!(matches!(err, IdentityError::File { .. }), "{err:?}");
    assert!(err.to_string().contains("a.pem"), "{err}");
    assert!(source.reload().is_err());
    assert!(verify_svid(std::slice::from_ref(&leaf2), &source.current(), now).is_ok());

    // A file that vanished: error, last good kept.
    fs::remove_file(&path).unwrap();
    assert!(source.reload().is_err());
    assert!(verify_svid(std::slice::from_ref(&leaf2), &source.current(), now).is_ok());

    // Fixed: back to CA 1.
    write(&path, ca1.pem.as_bytes(), 5);
    assert!(source.reload().unwrap());
    assert!(verify_svid(std::slice::from_ref(&leaf1), &source.current(), now).is_ok());
}

#[test]
fn bundle_reload_with_several_domains_changes_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
    let (a, b1, b2) = (ca("a.test"), ca("b.test"), ca("b.test"));
    write(&pa, a.pem.as_bytes(), 1);
    write(&pb, b1.pem.as_bytes(), 1);
    let source = TrustBundleSource::from_files(&BTreeMap::from([
        ("a.test".to_owned(), pa.clone()),
        ("b.test".to_owned(), pb.clone()),
    ]))
    .unwrap();
    let before = source.current();
    write(&pb, b2.pem.as_bytes(), 2);
    assert!(source.reload().unwrap());
    let after = source.current();
    assert_eq!(after.certificates("a.test"), before.certificates("a.test"));
    assert_eq!(after.certificates("b.test").unwrap()[0], b2.der);
    assert!(format!("{source:?}").contains("b.test"));
}

#[test]
fn bundle_source_rejects_bad_configuration_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.pem");
    write(&path, ca("a.test").pem.as_bytes(), 1);
    let bad_name = BTreeMap::from([("A.test".to_owned(), path.clone())]);
    assert!(matches!(
        TrustBundleSource::from_files(&bad_name),
        Err(IdentityError::InvalidSpiffeId { .. })
    ));
    let missing = BTreeMap::from([("a.test".to_owned(), dir.path().join("nope.pem"))]);
    assert!(matches!(
        TrustBundleSource::from_files(&missing),
        Err(IdentityError::File { .. })
    ));
    let big = dir.path().join("big.pem");
    write(
        &big,
        &vec![b'x'; crate::identity::limits::MAX_PEM_FILE_LEN + 1],
        1,
    );
    let err =
        TrustBundleSource::from_files(&BTreeMap::from([("a.test".to_owned(), big)])).unwrap_err();
    assert!(err.to_string().contains("larger than the limit"), "{err}");
}

#[test]
fn serving_cert_reload_swaps_and_keeps_last_good() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let dev = DevCa::generate("a.test", Duration::from_secs(3600)).unwrap();
    let first = dev.issue_server_cert(Duration::from_secs(3600)).unwrap();
    let second = dev.issue_server_cert(Duration::from_secs(3600)).unwrap();
    write(&cert_path, first.cert_pem.as_bytes(), 1);
    write(&key_path, first.key_pem.as_bytes(), 1);
    let serving = ServingCert::from_files(cert_path.clone(), key_path.clone()).unwrap();
    let first_der = serving.current().cert[0].clone();
    assert!(!serving.reload().unwrap());

    // Half a rotation (new cert, old key): refused, the first pair keeps serving.
    write(&cert_path, second.cert_pem.as_bytes(), 2);
    let err = serving.reload().unwrap_err();
    assert!(err.to_string().contains("key unusable"), "{err}");
    assert_eq!(serving.current().cert[0], first_der);

    // Rotation completed.
    write(&key_path, second.key_pem.as_bytes(), 2);
    assert!(serving.reload().unwrap());
    assert_ne!(serving.current().cert[0], first_der);

    // Debug never shows the key.
    let dbg = format!("{serving:?}");
    assert!(!dbg.contains("PRIVATE KEY") && dbg.contains("..."), "{dbg}");

    // Missing key file at start is an error naming the file.
    let err = ServingCert::from_files(cert_path, dir.path().join("none.key")).unwrap_err();
    assert!(err.to_string().contains("none.key"), "{err}");
}
