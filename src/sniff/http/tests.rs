//! Request heads in every framing, and the tracker over whole connections.

use super::*;

fn host(data: &[u8]) -> Result<Option<String>, String> {
    match head(data) {
        Head::Request { host, .. } => Ok(host),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn the_name_in_every_framing_servers_accept() {
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"\n\nGET / HTTP/1.1\nHost: a.test\n\n",
        b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"gEt / http/1.1\r\nhOsT:a.test\r\n\r\n",
        b"PROPFIND /x HTTP/1.1\r\nX: y\r\nHost: A.Test.:8080\r\n\r\n",
        b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET http://a.test:81/x HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
        b"GET  /  HTTP/1.1\r\nHost:   a.test   \r\n\r\n",
    ];
    for case in cases {
        assert_eq!(
            host(case),
            Ok(Some("a.test".into())),
            "{:?}",
            String::from_utf8_lossy(case)
        );
    }
    assert_eq!(host(b"GET / HTTP/1.0\r\n\r\n"), Ok(None));
    assert_eq!(
        host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"),
        Ok(Some("2001:db8::1".into()))
    );
}

#[test]
fn what_a_server_could_read_otherwise_is_unreadable() {
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: y\r\n Host: b.test\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\rHost: b.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\0b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: ok.test@evil.test\r\n\r\n",
        b"GET http://evil.test/ HTTP/1.1\r\nHost: ok.test\r\n\r\n",
        b"GET http://ok.test@evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET /\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test:80x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xc3\xa4.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5 5\r\n\r\n",
    ];
    for case in cases {
        assert!(
            matches!(head(case), Head::Unreadable(_)),
            "{:?}: {:?}",
            String::from_utf8_lossy(case),
            head(case)
        );
    }
}

#[test]
fn not_http_and_prefixes() {
    for other in [
        &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
        b"\x16\x03\x01",
        b"get foo\r\n",
        b"EHLO client.test\r\n",
        b"SET key value\r\n",
        b"PING\r\n",
    ] {
        assert_eq!(
            head(other),
            Head::NotHttp,
            "{:?}",
            String::from_utf8_lossy(other)
        );
    }
    assert_eq!(head(b"SSH-2.0-OpenSSH_9.2\r\n"), Head::NotHttp);
    let full = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
    for cut in 0..full.len() {
        assert_eq!(head(&full[..cut]), Head::NeedMore, "{cut}");
    }
}

fn feed_split(data: &[u8], size: usize) -> Result<Vec<Option<String>>, &'static str> {
    let mut t = Tracker::new();
    let mut all = Vec::new();
    for chunk in data.chunks(size.max(1)) {
        match t.feed(chunk) {
            Found::Heads(h) => all.extend(h),
            Found::Unreadable(why) => return Err(why),
        }
    }
    Ok(all)
}

#[test]
fn every_request_on_a_connection_in_every_split() {
    let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n\
        POST /up HTTP/1.1\r\nHost: b.test\r\nContent-Length: 11\r\n\r\nHost: x.tes\
        POST /c HTTP/1.1\r\nHost: c.test\r\nTransfer-Encoding: chunked\r\n\r\n\
        4;ext=1\r\nGET \r\n0\r\nX-Trailer: 1\r\n\r\n\
        \r\nget / HTTP/1.1\r\nhost: D.test\r\n\r\n";
    let want: Vec<Option<String>> = ["a.test", "b.test", "c.test", "d.test"]
        .iter()
        .map(|s| Some((*s).to_owned()))
        .collect();
    for size in 1..=stream.len() {
        assert_eq!(feed_split(stream, size), Ok(want.clone()), "split {size}");
    }
}

#[test]
fn upgrades_end_in_opaque_bytes_unless_a_request_follows() {
    let ws = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85abcd12345";
    let mut t = Tracker::new();
    assert_eq!(t.feed(ws), Found::Heads(vec![Some("a.test".into())]));
    assert!(t.is_opaque());
    let declined = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n";
    assert_eq!(
        feed_split(declined, 7),
        Ok(vec![Some("a.test".into()), Some("b.test".into())])
    );
    let mut t = Tracker::new();
    assert_eq!(
        t.feed(b"CONNECT b.test:443 HTTP/1.1\r\n\r\n\x16\x03\x01"),
        Found::Heads(vec![Some("b.test".into())])
    );
    assert!(t.is_opaque());
    // Garbage where the next request should be is refused.
    let mut t = Tracker::new();
    assert!(matches!(
        t.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n\x00\x01binary"),
        Found::Unreadable(_)
    ));
}
