#![no_main]
// The harness and its invariants live in rust/fuzzing.rs (also run by cargo test).
libfuzzer_sys::fuzz_target!(|data: &[u8]| _core::fuzzing::image_rule(data));
