//! Value types of the configuration that TOML has no native form for: MAC
//! addresses, IPv6 prefixes, resolver addresses.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A 48-bit MAC address written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Group bit set (multicast or broadcast).
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    /// All zeros.
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts
                .next()
                .ok_or_else(|| format!("{s:?}: expected six hex bytes"))?;
            if part.len() != 2 {
                return Err(format!("{s:?}: expected two hex digits per byte"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{s:?}: not hex"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?}: expected six hex bytes"));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An IPv6 prefix written `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Prefix {
    /// The network address (host bits zero).
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub len: u8,
}

impl Ipv6Prefix {
    fn mask(self) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0)
    }

    /// Whether `addr` lies inside the prefix.
    pub fn contains(self, addr: Ipv6Addr) -> bool {
        u128::from(addr) & self.mask() == u128::from(self.addr)
    }
}

impl FromStr for Ipv6Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS/LENGTH"))?;
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IPv6 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("{s:?}: length must be 0..=128"))?;
        let prefix = Self { addr, len };
        if u128::from(addr) & !prefix.mask() != 0 {
            return Err(format!("{s:?}: host bits are set"));
        }
        Ok(prefix)
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for Ipv6Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A DNS resolver address: `IP` (port 53) or `IP:port` (`[v6]:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolver(pub std::net::SocketAddr);

impl FromStr for Resolver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Self(std::net::SocketAddr::new(ip, 53)));
        }
        s.parse()
            .map(Self)
            .map_err(|_| format!("{s:?}: expected IP or IP:port"))
    }
}

impl<'de> Deserialize<'de> for Resolver {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_errors() {
        let m: MacAddr = "52:54:00:ab:CD:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_parse_and_contains() {
        let p: Ipv6Prefix = "fd00:1::/64".parse().unwrap();
        assert!(p.contains("fd00:1::5".parse().unwrap()));
        assert!(!p.contains("fd00:2::5".parse().unwrap()));
        assert!("fd00:1::1/64".parse::<Ipv6Prefix>().is_err());
        assert!("fd00::/129".parse::<Ipv6Prefix>().is_err());
        assert!("fd00::".parse::<Ipv6Prefix>().is_err());
    }
}
