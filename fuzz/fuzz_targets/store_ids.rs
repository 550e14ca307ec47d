//! Fuzz target `store_ids`: see `leash_broker::fuzzing::store_ids` for what it feeds and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = leash_broker::fuzzing::store_ids(data);
});
