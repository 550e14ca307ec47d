//! Fuzz target `jwt_svid`: see `leash_broker::fuzzing::jwt_svid` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = leash_broker::fuzzing::jwt_svid(data);
});
