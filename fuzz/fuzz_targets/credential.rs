//! Fuzz target `credential`: see `leash_broker::fuzzing::credential` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = leash_broker::fuzzing::credential(data);
});
