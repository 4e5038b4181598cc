#![no_main]

// The body is shared with the corpus regression test: see shardflow::fuzz_targets::csv_reader.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardflow::fuzz_targets::csv_reader(data));
