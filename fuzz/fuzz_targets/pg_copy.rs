#![no_main]

// The body is shared with the corpus regression test: see shardflow::fuzz_targets::pg_copy.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardflow::fuzz_targets::pg_copy(data));
