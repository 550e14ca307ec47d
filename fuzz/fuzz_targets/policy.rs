//! Fuzz target `policy`: see `leash_broker::fuzzing::policy` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = leash_broker::fuzzing::policy(data);
});
