//! `vhost_gateway::fuzzing::dhcp_ndp` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_gateway::fuzzing::dhcp_ndp(data));
