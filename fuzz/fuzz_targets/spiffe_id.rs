//! Fuzz target `spiffe_id`: see `leash_broker::fuzzing::spiffe_id` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = leash_broker::fuzzing::spiffe_id(data);
});
