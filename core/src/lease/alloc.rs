//! Choosing a free subnet: flanneld collects up to 100 free subnets from SubnetMin
//! upwards and picks one at random, so nodes starting together rarely collide.

use super::config::{Pool, to_u128};
use ipnet::IpNet;
use std::hash::{BuildHasher, Hasher};

/// How many free subnets to choose from (flanneld's bag size).
pub const CANDIDATES: usize = 100;

/// Up to `limit` subnets of `pool`, lowest first, that overlap none of `taken`.
/// Linear in `taken` plus the subnets walked, not their product.
pub fn free_subnets(
    pool: &Pool,
    taken: impl IntoIterator<Item = IpNet>,
    limit: usize,
) -> Vec<IpNet> {
    let family = pool.network.max_prefix_len();
    let mut used: Vec<(u128, u128)> = taken
        .into_iter()
        .filter(|n| n.max_prefix_len() == family)
        .map(|n| (to_u128(n.network()), to_u128(n.broadcast())))
        .collect();
    used.sort_unstable();
    let (step, max) = (pool.step(), to_u128(pool.max));
    let mut next_used = used.iter().peekable();
    let mut out = Vec::new();
    let mut start = to_u128(pool.min);
    while start <= max && out.len() < limit {
        let end = start + (step - 1);
        // Skip what lies wholly below this candidate; what remains may overlap it.
        while next_used.next_if(|(_, e)| *e < start).is_some() {}
        match next_used.peek() {
            Some((s, _)) if *s <= end => {}
            _ => out.push(pool.subnet_at(start)),
        }
        let Some(next) = start.checked_add(step) else {
            break;
        };
        start = next;
    }
    out
}

/// Picks uniformly among candidates. Seeded per process from the OS (std's
/// `RandomState`), so racing nodes do not pick in lock-step.
pub struct SubnetPicker(std::hash::RandomState);

impl Default for SubnetPicker {
    fn default() -> Self {
        SubnetPicker(std::hash::RandomState::new())
    }
}

impl SubnetPicker {
    /// A random element of `candidates`.
    pub fn pick<T: Copy>(&mut self, candidates: &[T]) -> Option<T> {
        if candidates.is_empty() {
            return None;
        }
        let mut h = self.0.build_hasher();
        h.write_usize(candidates.len());
        // A fresh RandomState per draw: std advances its keys for every new one.
        self.0 = std::hash::RandomState::new();
        Some(candidates[(h.finish() % candidates.len() as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::NetworkConfig;

    fn pool(cfg: &str) -> Pool {
        NetworkConfig::parse(cfg.as_bytes()).unwrap().v4.unwrap()
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn skips_taken_and_overlapping_subnets() {
        let p = pool(r#"{"Network":"10.0.0.0/16"}"#);
        let taken = nets(&[
            "10.0.2.0/24",
            "10.0.4.0/23",
            "10.0.7.128/25",
            "10.9.0.0/24",
            "fd00::/64",
        ]);
        let free = free_subnets(&p, taken, 5);
        let got: Vec<String> = free.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            got,
            [
                "10.0.1.0/24",
                "10.0.3.0/24",
                "10.0.6.0/24",
                "10.0.8.0/24",
                "10.0.9.0/24"
            ]
        );
        // A big reservation covering several candidates.
        let free = free_subnets(&p, nets(&["10.0.0.0/20"]), 1);
        assert_eq!(free[0].to_string(), "10.0.16.0/24");
    }

    #[test]
    fn a_full_pool_has_no_candidates_and_max_is_inclusive() {
        let p = pool(r#"{"Network":"10.0.0.0/26"}"#); // /28s: .16, .32, .48
        let all = free_subnets(&p, Vec::new(), CANDIDATES);
        assert_eq!(all.len(), 3);
        assert!(free_subnets(&p, all, CANDIDATES).is_empty());
        let v6 = NetworkConfig::parse(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/0","IPv6SubnetLen":2}"#,
        )
        .unwrap()
        .v6
        .unwrap();
        assert_eq!(free_subnets(&v6, Vec::new(), CANDIDATES).len(), 3);
    }

    #[test]
    fn picks_spread_over_the_candidates() {
        let mut picker = SubnetPicker::default();
        let seen: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| picker.pick(&[1, 2, 3, 4]).unwrap())
            .collect();
        assert_eq!(seen.len(), 4);
        assert_eq!(picker.pick::<u32>(&[]), None);
    }
}
