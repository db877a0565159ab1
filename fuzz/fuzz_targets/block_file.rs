//! `vhost_gateway::fuzzing::block_file` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_gateway::fuzzing::block_file(data));
