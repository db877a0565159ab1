//! Guest-side probe for the VM tests and the benchmark: the UDP client and
//! servers, the connection flood and the latency loops that busybox lacks.
//! Prints one `VG-...` line per result for the harness to read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: vg-probe udp-echo ADDR COUNT SIZE | udp-echo-server PORT | tcp-echo-server PORT \
         | tcp-many ADDR N | tcp-rr ADDR N | tcp-crr ADDR N | tcp-send ADDR MIB \
         | tcp-send-file ADDR PATH | tcp-connect ADDR \
         | tcp-hold ADDR SECS | dns ADDR NAME udp|tcp \
         | tls-hello ADDR SNI | https-get ADDR SNI CAFILE PATH [HOST] \
         | dot ADDR SNI CAFILE NAME | https-crr ADDR SNI CAFILE N \
         | tcp-script ADDR HEX[,HEX...] | raw-syn IFACE GWMAC SRCIP DSTIP PORT \
         | syn-flood IFACE GWMAC SRCIP COUNT | udp-flood COUNT | icmp-flood COUNT \
         | dns-flood ADDR COUNT | dns-a ADDR NAME | tcp-read ADDR | tcp-write ADDR MIB \
         | tcp-send-prng ADDR MIB SEED | reach ADDR SECS"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("udp-echo") => udp_echo(arg(&args, 2), arg(&args, 3), arg(&args, 4)),
        Some("udp-echo-server") => udp_echo_server(arg(&args, 2)),
        Some("tcp-echo-server") => tcp_echo_server(arg(&args, 2)),
        Some("tcp-many") => tcp_many(arg(&args, 2), arg(&args, 3)),
        Some("tcp-rr") => tcp_rr(arg(&args, 2), arg(&args, 3)),
        Some("tcp-crr") => tcp_crr(arg(&args, 2), arg(&args, 3)),
        Some("tcp-send") => tcp_send(arg(&args, 2), arg(&args, 3)),
        Some("tcp-send-file") => tcp_send_file(arg(&args, 2), &arg::<String>(&args, 3)),
        Some("tcp-connect") => tcp_connect(arg(&args, 2)),
        Some("tcp-hold") => tcp_hold(arg(&args, 2), arg(&args, 3)),
        Some("tcp-echo-loop") => tcp_echo_loop(arg(&args, 2), arg(&args, 3)),
        Some("tls-hello") => tls_hello(arg(&args, 2), &arg::<String>(&args, 3)),
        Some("https-get") => {
            let sni: String = arg(&args, 3);
            let host = args.get(6).cloned().unwrap_or_else(|| sni.clone());
            https_get(
                arg(&args, 2),
                &sni,
                &arg::<String>(&args, 4),
                &arg::<String>(&args, 5),
                &host,
            )
        }
        Some("dot") => dot(
            arg(&args, 2),
            &arg::<String>(&args, 3),
            &arg::<String>(&args, 4),
            &arg::<String>(&args, 5),
        ),
        Some("https-crr") => https_crr(
            arg(&args, 2),
            &arg::<String>(&args, 3),
            &arg::<String>(&args, 4),
            arg(&args, 5),
        ),
        Some("dns") => dns(
            arg(&args, 2),
            &arg::<String>(&args, 3),
            &arg::<String>(&args, 4),
        ),
        Some("tcp-script") => tcp_script(arg(&args, 2), &arg::<String>(&args, 3)),
        Some("udp-flood") => udp_flood(arg(&args, 2)),
        Some("dns-flood") => dns_flood(arg(&args, 2), arg(&args, 3)),
        Some("tcp-read") => tcp_read(arg(&args, 2)),
        Some("reach") => reach(arg(&args, 2), arg(&args, 3)),
        Some("tcp-send-prng") => tcp_send_prng(arg(&args, 2), arg(&args, 3), arg(&args, 4)),
        Some("tcp-write") => tcp_write(arg(&args, 2), arg(&args, 3)),
        Some("dns-a") => dns_a(arg(&args, 2), &arg::<String>(&args, 3)),
        Some("icmp-flood") => icmp_flood(arg(&args, 2)),
        Some("syn-flood") => syn_flood(
            &arg::<String>(&args, 2),
            &arg::<String>(&args, 3),
            arg(&args, 4),
            arg(&args, 5),
        ),
        Some("raw-syn") => raw_syn(
            &arg::<String>(&args, 2),
            &arg::<String>(&args, 3),
            arg(&args, 4),
            arg(&args, 5),
            arg(&args, 6),
        ),
        _ => usage(),
    }
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or_else(|_| usage()))
        .collect()
}

/// Connects, sends each comma-separated hex part as its own write with a
/// pause between (so they travel as separate segments), then reads until
/// the peer closes: what the far end made of the bytes.
fn tcp_script(addr: SocketAddr, parts: &str) {
    let result = (|| -> std::io::Result<(&'static str, Vec<u8>)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(4)))?;
        for (i, part) in parts.split(',').enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            if s.write_all(&unhex(part)).is_err() {
                return Ok(("reset", Vec::new()));
            }
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(("closed", got)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(("reset", got));
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Ok(("open", got));
                }
                Err(e) => return Err(e),
            }
        }
    })();
    let (result, got) = result.unwrap_or(("error", Vec::new()));
    let first = String::from_utf8_lossy(&got);
    let first = first.lines().next().unwrap_or("");
    println!(
        "VG-SCRIPT {addr} result={result} bytes={} first={first:?}",
        got.len()
    );
}

/// An Ethernet frame carrying a TCP SYN from `src`:`sport` to
/// `dst`:`port`, from `own_mac` to `gw`, checksums filled.
fn syn_frame(
    own_mac: [u8; 6],
    gw: [u8; 6],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    sport: u16,
    port: u16,
) -> Vec<u8> {
    use std::net::IpAddr;
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let sum = |data: &[u8], mut acc: u32| {
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            acc += u32::from(word);
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc
    };
    let (ethertype, ip) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
            let c = !(sum(&tcp, sum(&pseudo, 0)) as u16);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = !(sum(&ip, 0) as u16);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(&tcp);
            (0x0800u16, ip)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
            let c = !(sum(&tcp, sum(&pseudo, 0)) as u16);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&tcp);
            (0x86ddu16, ip)
        }
        _ => usage(),
    };
    let mut frame = Vec::new();
    frame.extend_from_slice(&gw);
    frame.extend_from_slice(&own_mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame
}

/// Sends one TCP SYN to DSTIP:PORT as a raw Ethernet frame out of IFACE
/// (to the gateway's MAC), for destinations the guest's own stack would
/// never put on the wire (127.0.0.1, ::ffff:127.0.0.1, ...), and reports
/// the gateway's answer: synack, rst or none.
fn mac_of(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16).unwrap_or_else(|_| usage());
    }
    m
}

fn iface_mac(iface: &str) -> [u8; 6] {
    mac_of(
        std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
            .unwrap_or_default()
            .trim(),
    )
}

/// Sends COUNT TCP SYNs as fast as the link takes them, each to a distinct
/// destination in 198.51.100.10-249 (port 1000 up) from a distinct source
/// port, as raw frames out of IFACE to the gateway's MAC; prints how many
/// went out and how long it took.
fn syn_flood(iface: &str, gw_mac: &str, src: std::net::IpAddr, count: u32) {
    nice_down();
    let own_mac = iface_mac(iface);
    let gw = mac_of(gw_mac);
    let t = Instant::now();
    let mut sent = 0u32;
    // SAFETY: plain socket syscalls on a fresh AF_PACKET socket; every
    // buffer passed is live and sized as told.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        if fd < 0 {
            println!("VG-FLOOD sent=0 error=nosocket");
            return;
        }
        let name = std::ffi::CString::new(iface).unwrap_or_default();
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&gw);
        for i in 0..count {
            let dst = std::net::Ipv4Addr::new(198, 51, 100, 10 + (i % 240) as u8);
            let port = 1000 + (i / 240) as u16;
            let sport = 1024 + (i % 60000) as u16;
            let frame = syn_frame(own_mac, gw, src, dst.into(), sport, port);
            let delivered = retry_full_queue(|| {
                libc::sendto(
                    fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            });
            sent += u32::from(delivered);
        }
        libc::close(fd);
    }
    println!("VG-FLOOD sent={sent} ms={}", t.elapsed().as_millis());
}

/// Sends one UDP datagram to each of COUNT distinct destinations in
/// 198.51.100.10-249 (port 1000 up) from one socket: as many sessions as
/// datagrams for a gateway that tracks them.
fn udp_flood(count: u32) {
    nice_down();
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    let t = Instant::now();
    let mut sent = 0u32;
    for i in 0..count {
        let dst = std::net::Ipv4Addr::new(198, 51, 100, 10 + (i % 240) as u8);
        let port = 1000 + (i / 240) as u16;
        if sock.send_to(b"flood", (dst, port)).is_ok() {
            sent += 1;
        }
    }
    println!("VG-UDPFLOOD sent={sent} ms={}", t.elapsed().as_millis());
}

/// Sends one ICMP echo request to each of COUNT distinct (destination,
/// identifier) pairs in 198.51.100.10-249 through a raw socket: as many
/// echo sessions as requests for a gateway that tracks them.
fn icmp_flood(count: u32) {
    nice_down();
    let t = Instant::now();
    let mut sent = 0u32;
    // SAFETY: plain socket syscalls; every buffer passed is live and sized
    // as told.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if fd < 0 {
            println!("VG-ICMPFLOOD sent=0 error=nosocket");
            return;
        }
        for i in 0..count {
            let ident = (i / 240) as u16;
            let mut msg = [
                8u8, 0, 0, 0, 0, 0, 0, 1, b'f', b'l', b'o', b'o', b'd', 0, 0, 0,
            ];
            msg[4..6].copy_from_slice(&ident.to_be_bytes());
            let mut acc: u32 = 0;
            for pair in msg.chunks(2) {
                acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            msg[2..4].copy_from_slice(&(!(acc as u16)).to_be_bytes());
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_addr.s_addr = u32::from_ne_bytes([198, 51, 100, 10 + (i % 240) as u8]);
            let delivered = retry_full_queue(|| {
                libc::sendto(
                    fd,
                    msg.as_ptr() as *const libc::c_void,
                    msg.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            });
            sent += u32::from(delivered);
        }
        libc::close(fd);
    }
    println!("VG-ICMPFLOOD sent={sent} ms={}", t.elapsed().as_millis());
}

/// Runs `send` until it sends something, pausing while the socket or
/// device queue is full (ENOBUFS), for up to 5 s: on a loaded host the
/// virtio queue can stay full for a long while, and a flood that gave up
/// on a frame would not be the flood the test asked for.
fn retry_full_queue(mut send: impl FnMut() -> isize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if send() > 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn raw_syn(iface: &str, gw_mac: &str, src: std::net::IpAddr, dst: std::net::IpAddr, port: u16) {
    let own_mac = iface_mac(iface);
    let gw = mac_of(gw_mac);
    let sport: u16 = 40000 + (std::process::id() % 20000) as u16;
    let frame = syn_frame(own_mac, gw, src, dst, sport, port);
    // SAFETY: plain socket syscalls on a fresh AF_PACKET socket; every
    // buffer passed is live and sized as told.
    let result = unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        if fd < 0 {
            println!("VG-RAW {dst}:{port} result=nosocket");
            return;
        }
        let name = std::ffi::CString::new(iface).unwrap_or_default();
        let index = libc::if_nametoindex(name.as_ptr());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&gw);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = [0u8; 2048];
        let mut result = "none";
        while Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            if n <= 0 {
                continue;
            }
            let f = &buf[..n as usize];
            if f.len() < 14 || f[0..6] != own_mac {
                continue;
            }
            let (proto_at, tcp_at) = match u16::from_be_bytes([f[12], f[13]]) {
                0x0800 => (
                    14 + 9,
                    14 + usize::from(f.get(14).map_or(5, |b| b & 0x0f)) * 4,
                ),
                0x86dd => (14 + 6, 14 + 40),
                _ => continue,
            };
            if f.get(proto_at) != Some(&6) || f.len() < tcp_at + 14 {
                continue;
            }
            let t = &f[tcp_at..];
            if u16::from_be_bytes([t[0], t[1]]) != port || u16::from_be_bytes([t[2], t[3]]) != sport
            {
                continue;
            }
            result = match t[13] & 0x16 {
                0x12 => "synack",
                f if f & 0x04 != 0 => "rst",
                _ => continue,
            };
            break;
        }
        libc::close(fd);
        result
    };
    println!("VG-RAW {dst}:{port} result={result}");
}

/// COUNT datagrams of SIZE bytes, each waiting up to a second for its echo.
fn udp_echo(addr: SocketAddr, count: u32, size: usize) {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let sock = UdpSocket::bind(bind).expect("bind");
    sock.connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut ok = 0;
    let mut buf = vec![0u8; 65536];
    for seq in 0..count {
        let mut msg = vec![(seq % 251) as u8; size.max(4)];
        msg[..4].copy_from_slice(&seq.to_be_bytes());
        let _ = sock.send(&msg);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n] == msg[..] => {
                    ok += 1;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    println!("VG-UDP sent={count} ok={ok}");
}

fn udp_echo_server(port: u16) {
    let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
    println!("VG-UDP-SERVER {port}");
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    }
}

fn tcp_echo_server(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("VG-TCP-SERVER {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || echo(stream));
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// N connections opened at once and held open together, then each does one
/// echo exchange: counts successes and refusals.
fn tcp_many(addr: SocketAddr, n: usize) {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(20));
                barrier.wait();
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return 1,
                    Err(_) => return 2,
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let msg = format!("hello {i}\n");
                let mut back = vec![0u8; msg.len()];
                match stream
                    .write_all(msg.as_bytes())
                    .and_then(|()| stream.read_exact(&mut back))
                {
                    Ok(()) if back == msg.as_bytes() => 0,
                    _ => 2,
                }
            })
        })
        .collect();
    let (mut ok, mut refused, mut failed) = (0, 0, 0);
    for h in handles {
        match h.join().unwrap_or(2) {
            0 => ok += 1,
            1 => refused += 1,
            _ => failed += 1,
        }
    }
    println!("VG-MANY ok={ok} refused={refused} failed={failed}");
}

fn percentiles(mut samples: Vec<Duration>) -> (u128, u128) {
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .map_or(0, |d| d.as_micros())
    };
    (at(0.5), at(0.99))
}

/// N one-byte request/response round trips on one connection.
fn tcp_rr(addr: SocketAddr, n: usize) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut samples = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n {
        let t = Instant::now();
        stream.write_all(&[i as u8]).unwrap();
        stream.read_exact(&mut b).unwrap();
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    println!("VG-RR n={n} p50_us={p50} p99_us={p99}");
}

/// N sequential connect, one-byte exchange, close.
fn tcp_crr(addr: SocketAddr, n: usize) {
    let mut samples = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.write_all(b"x").unwrap();
        stream.read_exact(&mut b).unwrap();
        drop(stream);
        samples.push(t.elapsed());
    }
    let (p50, p99) = percentiles(samples);
    println!("VG-CRR n={n} p50_us={p50} p99_us={p99}");
}

/// Sends MIB mebibytes of zeros as fast as possible; prints the rate.
fn tcp_send(addr: SocketAddr, mib: usize) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let chunk = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk).unwrap();
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "VG-SEND mib={mib} secs={secs:.3} gbit={:.3}",
        (mib as f64 * 8.0 * 1.048_576) / 1000.0 / secs
    );
}

/// Sends a file, half-closes, waits for the peer to close.
fn tcp_send_file(addr: SocketAddr, path: &str) {
    let mut file = std::fs::File::open(path).expect("open");
    let mut stream = TcpStream::connect(addr).expect("connect");
    let sent = std::io::copy(&mut file, &mut stream).expect("send");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    println!("VG-SENT bytes={sent}");
}

/// One connection attempt: how it ended and how long it took.
fn tcp_connect(addr: SocketAddr) {
    let t = Instant::now();
    let result = match TcpStream::connect_timeout(&addr, Duration::from_secs(30)) {
        Ok(_) => "connected",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
        Err(_) => "error",
    };
    println!(
        "VG-CONNECT {addr} result={result} ms={}",
        t.elapsed().as_millis()
    );
}

/// Connects, reads nothing for SECS seconds (the sender must be held back by
/// the window), then reads to the end and reports the byte count.
/// Sends MIB MiB of the xorshift64* stream from SEED (little-endian
/// words; `tests/vm/flows.rs` makes the same bytes to check them), then
/// waits for the far end to close: uploads larger than guest memory.
fn tcp_send_prng(addr: SocketAddr, mib: usize, seed: u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut state = seed;
    let mut chunk = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        stream.write_all(&chunk).unwrap();
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    // Only waiting for the far end to close; how it closes is its business.
    let _ = stream.read_to_end(&mut rest);
    println!(
        "VG-SENT-PRNG bytes={} secs={:.1}",
        mib << 20,
        t.elapsed().as_secs_f64()
    );
}

/// Connects to ADDR every 100 ms (300 ms to answer) for SECS seconds and
/// reports the longest stretch without a connection: how long an outage
/// the guest saw.
fn reach(addr: SocketAddr, secs: u64) {
    println!("VG-REACH-START");
    let start = Instant::now();
    let (mut attempts, mut ok) = (0u32, 0u32);
    let mut last_ok = Instant::now();
    let mut longest = Duration::ZERO;
    let mut up = true;
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        attempts += 1;
        let connected = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok();
        if connected {
            ok += 1;
            longest = longest.max(t.duration_since(last_ok));
            last_ok = t;
        }
        if connected != up {
            up = connected;
            println!(
                "VG-REACH {} at={}",
                if up { "up" } else { "down" },
                start.elapsed().as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
    }
    println!(
        "VG-REACH attempts={attempts} ok={ok} longest-outage-ms={} last={}",
        longest.as_millis(),
        if up { "ok" } else { "fail" }
    );
}

/// How a stream ended, for the harness.
fn ending(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => "reset",
        std::io::ErrorKind::BrokenPipe => "broken-pipe",
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
        _ => "error",
    }
}

/// Connects, or prints `TAG ADDR bytes=0 end=...` and gives up. A peer
/// that resets at once may do so before the guest's handshake completes
/// (the gateway answers the SYN only once the peer accepted): that is the
/// reset the probe reports, not a probe failure.
fn connect_or_report(addr: SocketAddr, tag: &str, t: Instant) -> Option<TcpStream> {
    TcpStream::connect(addr)
        .map_err(|e| {
            println!(
                "{tag} {addr} bytes=0 end={} ms={}",
                ending(&e),
                t.elapsed().as_millis()
            );
        })
        .ok()
}

/// Reads a connection to its end (30 s at most without data) and says how
/// it ended: eof, reset, timeout.
fn tcp_read(addr: SocketAddr) {
    let t = Instant::now();
    let Some(mut stream) = connect_or_report(addr, "VG-READ", t) else {
        return;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => total += n as u64,
            Err(e) => break ending(&e),
        }
    };
    println!(
        "VG-READ {addr} bytes={total} end={end} ms={}",
        t.elapsed().as_millis()
    );
}

/// Writes MIB MiB (30 s at most per write) and says how it ended: done,
/// reset, broken-pipe, timeout.
fn tcp_write(addr: SocketAddr, mib: usize) {
    let t = Instant::now();
    let Some(mut stream) = connect_or_report(addr, "VG-WRITE", t) else {
        return;
    };
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let chunk = vec![0x77u8; 1 << 20];
    let mut total = 0u64;
    let mut end = "done";
    for _ in 0..mib {
        match stream.write(&chunk) {
            Ok(n) => total += n as u64,
            Err(e) => {
                end = ending(&e);
                break;
            }
        }
    }
    println!(
        "VG-WRITE {addr} bytes={total} end={end} ms={}",
        t.elapsed().as_millis()
    );
}

/// Connects to an echo server and round-trips a line every 200 ms for SECS
/// seconds or until the connection breaks; reports how it ended (reset,
/// closed, open), when, and how many round trips came back.
fn tcp_echo_loop(addr: SocketAddr, secs: u64) {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ok = 0u64;
    let result = loop {
        if start.elapsed() >= Duration::from_secs(secs) {
            break "open";
        }
        let mut back = [0u8; 5];
        let round = stream
            .write_all(b"ping\n")
            .and_then(|()| stream.read_exact(&mut back));
        match round {
            Ok(()) => ok += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break "closed",
            Err(_) => break "error",
        }
        if ok == 1 {
            println!("VG-ECHOING {addr}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "VG-ECHOLOOP {addr} result={result} ok={ok} ms={}",
        start.elapsed().as_millis()
    );
}

fn tcp_hold(addr: SocketAddr, secs: u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    println!("VG-HOLDING {addr}");
    std::thread::sleep(Duration::from_secs(secs));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    println!("VG-HELD bytes={total}");
}

/// Floods run at nice 19: the probes that time the gateway meanwhile would
/// otherwise time the guest scheduler's share for a busy loop.
/// Has a datagram that the guest's own transmit queue drops fail with
/// ENOBUFS; without IP_RECVERR Linux reports it as sent.
fn report_send_drops(sock: &UdpSocket) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an owned socket with an int option.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::SOL_IP,
            libc::IP_RECVERR,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "IP_RECVERR");
}

/// Sends at bulk priority: through pfifo_fast the socket's packets wait in
/// the lowest band, so a probe's packets never queue behind them inside
/// the guest.
fn bulk_priority(sock: &UdpSocket) {
    let prio: libc::c_int = 2; // TC_PRIO_BULK
    // SAFETY: setsockopt on an owned socket with an int option.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            &prio as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_PRIORITY");
}

fn nice_down() {
    // SAFETY: setpriority on this process with integer arguments.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}

/// A DNS query message (A, IN, recursion desired) for `name`.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

/// COUNT A queries for distinct names (fN.flood.test) as fast as the
/// guest can send them, from a new source port every 64 queries, answers
/// ignored: a query flood no per-port limit stops.
fn dns_flood(addr: SocketAddr, count: u32) {
    nice_down();
    let t = Instant::now();
    let mut sent = 0u32;
    let mut sock = None;
    for i in 0..count {
        if i % 64 == 0 {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_nonblocking(true).unwrap();
            report_send_drops(&s);
            bulk_priority(&s);
            sock = Some(s);
        }
        let query = a_query(i as u16, &format!("f{i}.flood.test"));
        let Some(s) = &sock else { continue };
        // As fast as the link takes them: a full transmit queue says
        // ENOBUFS, and sending on into it would only drop the guest's own
        // packets (the probes' among them) before they reach the gateway.
        loop {
            match s.send_to(&query, addr) {
                Ok(_) => {
                    sent += 1;
                    break;
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => break,
            }
        }
    }
    println!("VG-DNSFLOOD sent={sent} ms={}", t.elapsed().as_millis());
}

/// One A query, timed: its rcode and answer count, or a timeout after 3 s.
fn dns_a(addr: SocketAddr, name: &str) {
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    report_send_drops(&sock);
    let query = a_query(0x4242, name);
    let t = Instant::now();
    // A flood that just ended may still fill this guest's own transmit
    // queue: what it drops never reaches the gateway, so send again (the
    // time spent counts).
    let mut dropped = 0;
    loop {
        match sock.send_to(&query, addr) {
            Err(e)
                if e.raw_os_error() == Some(libc::ENOBUFS)
                    && t.elapsed() < Duration::from_secs(3) =>
            {
                dropped += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            sent => {
                sent.unwrap();
                break;
            }
        }
    }
    if dropped > 0 {
        println!("VG-DNSA {name} guest-queue-full={dropped}");
    }
    let mut buf = vec![0u8; 4096];
    while t.elapsed() < Duration::from_secs(3) {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n < 12 || buf[..2] != query[..2] {
            continue;
        }
        let count = u16::from_be_bytes([buf[6], buf[7]]);
        println!(
            "VG-DNSA {name} rcode={} answers={count} ms={}",
            buf[3] & 0x0f,
            t.elapsed().as_millis()
        );
        return;
    }
    println!(
        "VG-DNSA {name} result=timeout ms={}",
        t.elapsed().as_millis()
    );
}

/// One TXT query over UDP (no EDNS: 512-byte answers) or TCP; prints the
/// answer's rcode, TC bit and answer count.
fn dns(addr: SocketAddr, name: &str, transport: &str) {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 16, 0, 1]);
    let answer = if transport == "tcp" {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut msg = (query.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&query);
        s.write_all(&msg).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut a).unwrap();
        a
    } else {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(bind).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(&query, addr).unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    let rcode = answer.get(3).map_or(99, |b| b & 0x0f);
    let tc = answer.get(2).is_some_and(|b| b & 0x02 != 0);
    let count = answer
        .get(6..8)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    println!(
        "VG-DNS {transport} {name} rcode={rcode} tc={} answers={count} bytes={}",
        u8::from(tc),
        answer.len()
    );
}

/// Sends a minimal TLS ClientHello naming `sni` to an echo server: the
/// hello coming back means the flow was let through.
fn tls_hello(addr: SocketAddr, sni: &str) {
    let name = sni.as_bytes();
    let mut server_name = vec![0u8];
    server_name.extend_from_slice(&(name.len() as u16).to_be_bytes());
    server_name.extend_from_slice(name);
    let mut list = (server_name.len() as u16).to_be_bytes().to_vec();
    list.extend_from_slice(&server_name);
    let mut ext = vec![0u8, 0];
    ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
    ext.extend_from_slice(&list);
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7; 32]);
    hello.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut hs = vec![1u8, 0];
    hs.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    hs.extend_from_slice(&hello);
    let mut record = vec![22u8, 3, 1];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    let result = (|| -> std::io::Result<&'static str> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(8)))?;
        s.write_all(&record)?;
        let mut back = vec![0u8; record.len()];
        match s.read_exact(&mut back) {
            Ok(()) if back == record => Ok("echoed"),
            Ok(()) => Ok("garbled"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok("reset"),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok("closed"),
            Err(e) => Err(e),
        }
    })();
    println!("VG-TLS {sni} result={}", result.unwrap_or("error"));
}

/// A TLS client trusting only the CA certificates in `ca_file`.
fn tls_config(ca_file: &str, alpn: &[&[u8]]) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA usable");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(config)
}

/// One HTTPS request over a fresh connection; (status line's code, ALPN,
/// body) or the error's text.
fn https_once(
    addr: SocketAddr,
    sni: &str,
    config: &std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    host: &str,
) -> Result<(String, String, String), String> {
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect:{:?}", e.kind()))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // Servers that close without close_notify: what came is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let alpn = tls
        .conn
        .alpn_protocol()
        .map_or("-".to_owned(), |p| String::from_utf8_lossy(p).into_owned());
    let text = String::from_utf8_lossy(&response);
    let code = text.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned();
    Ok((code, alpn, body))
}

/// GET over TLS trusting only `ca_file`; prints the status, the ALPN and
/// the body's first line, or the TLS error.
fn https_get(addr: SocketAddr, sni: &str, ca_file: &str, path: &str, host: &str) {
    let config = tls_config(ca_file, &[b"h2", b"http/1.1"]);
    match https_once(addr, sni, &config, path, host) {
        Ok((code, alpn, body)) => println!(
            "VG-HTTPS {sni} host={host} result=ok status={code} alpn={alpn} body={}",
            body.lines().next().unwrap_or("")
        ),
        Err(e) => println!(
            "VG-HTTPS {sni} host={host} result=error error={}",
            e.replace(' ', "_")
        ),
    }
}

/// N sequential HTTPS requests, each on a new connection (full handshake);
/// prints connections per second.
fn https_crr(addr: SocketAddr, sni: &str, ca_file: &str, n: usize) {
    let config = tls_config(ca_file, &[b"http/1.1"]);
    let t = Instant::now();
    let mut ok = 0;
    for _ in 0..n {
        if matches!(https_once(addr, sni, &config, "/", sni), Ok((code, _, _)) if code == "200") {
            ok += 1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!("VG-HTTPS-CRR n={n} ok={ok} per_sec={:.1}", ok as f64 / secs);
}

/// One A query over DNS-over-TLS, trusting only `ca_file`.
fn dot(addr: SocketAddr, sni: &str, ca_file: &str, qname: &str) {
    let mut query = vec![0x43, 0x21, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in qname.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let result = (|| -> Result<Vec<u8>, String> {
        let config = tls_config(ca_file, &[b"dot"]);
        let name =
            rustls::pki_types::ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect:{:?}", e.kind()))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut msg = (query.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&query);
        tls.write_all(&msg).map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        tls.read_exact(&mut len).map_err(|e| e.to_string())?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        tls.read_exact(&mut answer).map_err(|e| e.to_string())?;
        Ok(answer)
    })();
    match result {
        Ok(a) => {
            let rcode = a.get(3).map_or(99, |b| b & 0x0f);
            let count = a.get(6..8).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            // The last answer's address, when it is an A record at the end.
            let addr = if count > 0 && a.len() >= 4 {
                let t = &a[a.len() - 4..];
                format!("{}.{}.{}.{}", t[0], t[1], t[2], t[3])
            } else {
                "-".into()
            };
            println!("VG-DOT {qname} rcode={rcode} answers={count} last={addr}");
        }
        Err(e) => println!("VG-DOT {qname} result=error error={}", e.replace(' ', "_")),
    }
}
