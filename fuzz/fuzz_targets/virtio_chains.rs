//! `vhost_gateway::fuzzing::virtio_chains` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_gateway::fuzzing::virtio_chains(data));
