//! `vhost_gateway::fuzzing::config_policy` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_gateway::fuzzing::config_policy(data));
