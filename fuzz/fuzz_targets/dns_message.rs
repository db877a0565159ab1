//! `vhost_gateway::fuzzing::dns_message` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_gateway::fuzzing::dns_message(data));
