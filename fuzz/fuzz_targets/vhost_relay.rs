//! `vhost_gateway::fuzzing::vhost_relay` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_gateway::fuzzing::vhost_relay(data));
