//! Address ranges and range sets: validation and round-robin iteration.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One allocatable range inside a subnet. All bounds are inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

/// A pool of disjoint ranges of one family; one address is taken from each set per ADD.
pub type RangeSet = Vec<Range>;

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn from_u128(v: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

impl Range {
    /// Build and validate a range. Defaults as the reference: start = network+1,
    /// end = broadcast-1 (v4) or the last address (v6), gateway = network+1.
    pub fn new(
        subnet: IpNet,
        start: Option<IpAddr>,
        end: Option<IpAddr>,
        gateway: Option<IpAddr>,
    ) -> Result<Range, String> {
        let net = subnet.network();
        if subnet.addr() != net {
            return Err(format!(
                "network has host bits set: for a subnet mask of length {} the network address is {net}",
                subnet.prefix_len()
            ));
        }
        if subnet.prefix_len() > subnet.max_prefix_len() - 2 {
            return Err(format!("network {subnet} too small to allocate from"));
        }
        let first = from_u128(to_u128(net) + 1, net);
        let last = match subnet {
            IpNet::V4(_) => from_u128(to_u128(subnet.broadcast()) - 1, net),
            IpNet::V6(_) => subnet.broadcast(),
        };
        let inside = |what: &str, ip: IpAddr| {
            if subnet.contains(&ip) {
                Ok(ip)
            } else {
                Err(format!("{what} {ip} not in network {subnet}"))
            }
        };
        // The reference accepts bounds on the network and IPv4 broadcast addresses
        // and then hands those out; we accept the same configs but never do.
        let start = match start.map(|ip| inside("rangeStart", ip)).transpose()? {
            Some(ip) if ip != net => ip,
            _ => first,
        };
        let end = match end.map(|ip| inside("rangeEnd", ip)).transpose()? {
            Some(ip) if ip != subnet.broadcast() || subnet.addr().is_ipv6() => ip,
            _ => last,
        };
        let gateway = gateway
            .map(|ip| inside("gateway", ip))
            .transpose()?
            .unwrap_or(first);
        if to_u128(start) > to_u128(end) {
            return Err(format!("rangeStart {start} is after rangeEnd {end}"));
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.start.is_ipv4() == other.start.is_ipv4()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }

    /// How many addresses ADD can hand out from this range.
    pub fn capacity(&self) -> u128 {
        let all = to_u128(self.end) - to_u128(self.start) + 1;
        all - u128::from(self.contains(self.gateway))
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// Check a set: non-empty, one family, no overlapping ranges.
pub fn validate_set(set: &RangeSet) -> Result<(), String> {
    let Some(first) = set.first() else {
        return Err("empty range set".into());
    };
    if set
        .iter()
        .any(|r| r.start.is_ipv4() != first.start.is_ipv4())
    {
        return Err("mixed address families".into());
    }
    for (i, a) in set.iter().enumerate() {
        if let Some(b) = set[i + 1..].iter().find(|b| a.overlaps(b)) {
            return Err(format!("subnets {} and {} overlap", a.subnet, b.subnet));
        }
    }
    Ok(())
}

pub fn sets_overlap(a: &RangeSet, b: &RangeSet) -> bool {
    a.iter().any(|ra| b.iter().any(|rb| ra.overlaps(rb)))
}

/// The range of `set` holding `ip`.
pub fn range_for(set: &RangeSet, ip: IpAddr) -> Option<&Range> {
    set.iter().find(|r| r.contains(ip))
}

/// `start-end[,start-end…]`, as the reference prints a set in its errors.
pub fn describe(set: &RangeSet) -> String {
    set.iter()
        .map(Range::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The reference's round-robin order: start after `last` when it lies in the set,
/// otherwise at the first range's start; walk each range to its end, move to the
/// next range (wrapping), skip gateways, and stop after one full loop.
pub fn candidates(set: &RangeSet, last: Option<IpAddr>) -> impl Iterator<Item = (IpAddr, &Range)> {
    let resume = last.and_then(|ip| set.iter().position(|r| r.contains(ip)).map(|i| (i, ip)));
    let (mut idx, mut cur) = match resume {
        Some((i, ip)) => (i, Some(to_u128(ip))),
        None => (0, None),
    };
    let mut origin: Option<(usize, u128)> = None;
    std::iter::from_fn(move || {
        loop {
            let next = match cur {
                None => to_u128(set[idx].start),
                Some(c) if c == to_u128(set[idx].end) => {
                    idx = (idx + 1) % set.len();
                    to_u128(set[idx].start)
                }
                Some(c) => c + 1,
            };
            cur = Some(next);
            match origin {
                None => origin = Some((idx, next)),
                Some(o) if o == (idx, next) => return None,
                Some(_) => {}
            }
            let r = &set[idx];
            let ip = from_u128(next, r.start);
            if ip != r.gateway {
                return Some((ip, r));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(subnet: &str) -> Range {
        Range::new(subnet.parse().unwrap(), None, None, None).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_match_reference() {
        let a = r("10.98.0.0/29");
        assert_eq!(
            (a.start, a.end, a.gateway),
            (ip("10.98.0.1"), ip("10.98.0.6"), ip("10.98.0.1"))
        );
        assert_eq!(a.capacity(), 5);
        let b = r("fd00::/126");
        assert_eq!((b.start, b.end), (ip("fd00::1"), ip("fd00::3")));
        assert_eq!(b.capacity(), 2);
        assert_eq!(r("10.96.0.0/30").capacity(), 1);
    }

    #[test]
    fn validation_messages() {
        let bad = |s: &str, st: Option<&str>, en: Option<&str>, gw: Option<&str>| {
            Range::new(s.parse().unwrap(), st.map(ip), en.map(ip), gw.map(ip)).unwrap_err()
        };
        assert_eq!(
            bad("10.96.0.0/31", None, None, None),
            "network 10.96.0.0/31 too small to allocate from"
        );
        assert_eq!(
            bad("fd::/127", None, None, None),
            "network fd::/127 too small to allocate from"
        );
        assert!(bad("10.96.0.1/24", None, None, None).contains("the network address is 10.96.0.0"));
        assert_eq!(
            bad("10.96.1.0/24", Some("10.96.2.5"), None, None),
            "rangeStart 10.96.2.5 not in network 10.96.1.0/24"
        );
        let edges = Range::new(
            "10.96.1.0/24".parse().unwrap(),
            Some(ip("10.96.1.0")),
            Some(ip("10.96.1.255")),
            None,
        );
        let edges = edges.unwrap();
        assert_eq!(
            (edges.start, edges.end),
            (ip("10.96.1.1"), ip("10.96.1.254")),
            "never the network or broadcast"
        );
        assert_eq!(
            bad("10.96.1.0/24", Some("10.96.1.50"), Some("10.96.1.10"), None),
            "rangeStart 10.96.1.50 is after rangeEnd 10.96.1.10"
        );
        assert_eq!(
            bad("10.96.1.0/24", None, None, Some("10.9.9.9")),
            "gateway 10.9.9.9 not in network 10.96.1.0/24"
        );
    }

    #[test]
    fn round_robin_skips_gateway_and_wraps_once() {
        let set = vec![r("10.98.0.0/29")];
        let all: Vec<String> = candidates(&set, None)
            .map(|(ip, _)| ip.to_string())
            .collect();
        assert_eq!(
            all,
            [
                "10.98.0.2",
                "10.98.0.3",
                "10.98.0.4",
                "10.98.0.5",
                "10.98.0.6"
            ]
        );
        let from4: Vec<String> = candidates(&set, Some(ip("10.98.0.4")))
            .map(|(ip, _)| ip.to_string())
            .collect();
        assert_eq!(
            from4,
            [
                "10.98.0.5",
                "10.98.0.6",
                "10.98.0.2",
                "10.98.0.3",
                "10.98.0.4"
            ]
        );
        // A stale pointer outside the set restarts at the beginning.
        assert_eq!(
            candidates(&set, Some(ip("10.1.1.1"))).next().unwrap().0,
            ip("10.98.0.2")
        );
    }

    #[test]
    fn multi_range_sets_walk_every_range() {
        let set = vec![r("10.1.0.0/30"), r("10.2.0.0/30")];
        let all: Vec<String> = candidates(&set, Some(ip("10.1.0.2")))
            .map(|(ip, _)| ip.to_string())
            .collect();
        assert_eq!(all, ["10.2.0.2", "10.1.0.2"]);
        assert_eq!(describe(&set), "10.1.0.1-10.1.0.2,10.2.0.1-10.2.0.2");
    }

    #[test]
    fn set_checks() {
        assert_eq!(validate_set(&vec![]).unwrap_err(), "empty range set");
        assert_eq!(
            validate_set(&vec![r("10.0.0.0/24"), r("fd::/64")]).unwrap_err(),
            "mixed address families"
        );
        assert_eq!(
            validate_set(&vec![r("10.0.0.0/16"), r("10.0.1.0/24")]).unwrap_err(),
            "subnets 10.0.0.0/16 and 10.0.1.0/24 overlap"
        );
        assert!(sets_overlap(
            &vec![r("10.0.0.0/16")],
            &vec![r("10.0.5.0/24")]
        ));
        assert!(!sets_overlap(&vec![r("10.0.0.0/24")], &vec![r("fd::/64")]));
    }
}
