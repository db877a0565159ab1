//! The control API under a real guest: what an operator reads and changes
//! while the guest works.

use std::process::Command;
use std::time::{Duration, Instant};

use kit::guest::{Daemon, Guest, GuestOpts};

use crate::flows::World;

/// The TCP flow to `remote` in a `ctl flows --json` answer.
fn flow_to<'a>(flows: &'a serde_json::Value, remote: &str) -> Option<&'a serde_json::Value> {
    flows["flows"]
        .as_array()?
        .iter()
        .find(|f| f["proto"] == "tcp" && f["remote"] == remote)
}

/// A guest downloads 100 MiB from a name it resolved through the gateway,
/// and its reader pauses for a few seconds on the way (the transfer stands
/// still with the flow open). Meanwhile the operator reads the flow with
/// its name and its bytes growing, the counters growing, the guest's lease
/// and the Prometheus gauges, from another process, while the transfer
/// runs.
#[test]
fn counters_and_flows_are_read_while_a_transfer_runs() {
    let world = World::new("ctl");
    let big = world.www.0.join("big");
    let made = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100", "status=none"])
        .arg(format!("of={}", big.display()))
        .status()
        .unwrap();
    assert!(made.success());
    let daemon = Daemon::start(&world.ns, None);
    let script = r#"
dhcp
echo VG-START
wget -q -O - http://example.test/big | (sleep 4; cat > /dev/null)
echo VG-DONE
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-START");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    let remote = "192.0.2.10:80";
    // The flow appears, paused by the slow reader, then moves on.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first: Option<(u64, u64)> = None;
    let mut grown = None;
    while grown.is_none() && Instant::now() < deadline {
        let flows = daemon.ctl_json(&["flows"]);
        let counters = daemon.ctl_json(&["counters"]);
        let to_guest = counters["counters"]["bytes_to_guest"].as_u64().unwrap();
        if let Some(flow) = flow_to(&flows, remote) {
            let bytes = flow["bytes_to_guest"].as_u64().unwrap();
            assert_eq!(flow["name"], "example.test", "{flows}");
            assert_eq!(flow["state"], "established", "{flows}");
            match first {
                None if bytes > 0 => {
                    first = Some((bytes, to_guest));
                    let status = daemon.ctl_json(&["status"]);
                    assert_eq!(status["vmm_attached"], true, "{status}");
                    assert_eq!(status["gauges"]["tcp_established"], 1, "{status}");
                    let lease = status["guest"]["lease_seconds_left"].as_u64().unwrap_or(0);
                    assert!(lease > 3000, "{status}");
                    assert!(status["guest"]["mac"].is_string(), "{status}");
                    let (ok, metrics) = daemon.ctl(&["metrics"]);
                    assert!(ok, "{metrics}");
                    let line = "vhost_gateway_flows{proto=\"tcp\",state=\"established\"} 1";
                    assert!(metrics.contains(line), "{metrics}");
                    let (ok, table) = daemon.ctl(&["flows"]);
                    assert!(ok && table.contains("example.test"), "{table}");
                    eprintln!("{table}");
                }
                Some((at_first, counted_first)) if bytes > at_first => {
                    assert!(to_guest > counted_first, "{counters}");
                    grown = Some((at_first, bytes));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = guest.finish();
    let (at_first, later) = grown.unwrap_or_else(|| panic!("{first:?}\n{console}"));
    eprintln!("flow bytes to the guest: {at_first} then {later}");
    assert!(console.contains("VG-DONE"), "{console}");
}
