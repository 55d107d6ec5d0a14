//! Address pools: picking a client address from an instance's CIDR blocks.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// No address of the pool is free.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "address pool full: all {usable} usable addresses of {blocks} are static or in use; \
     add a CIDR block or disconnect a client"
)]
pub struct PoolFull {
    /// Usable host addresses in the blocks.
    pub usable: u64,
    /// The blocks, comma separated.
    pub blocks: String,
}

/// Returns the number of usable host addresses of a block: all but the network and broadcast
/// addresses.
pub fn usable_hosts(block: &Ipv4Net) -> u64 {
    (1u64 << (32 - u32::from(block.prefix_len()))).saturating_sub(2)
}

/// Returns whether `address` is a usable host address of `block`.
pub fn is_usable_host(block: &Ipv4Net, address: Ipv4Addr) -> bool {
    block.contains(&address) && address != block.network() && address != block.broadcast()
}

/// Picks a free address for a dynamic client, walking the blocks in order from the address
/// after `previous` (the client's last address), so that a reconnecting client gets another
/// one while any other is free. `reserved` returns whether an address is taken: static addresses
/// of accounts and addresses of connected clients.
///
/// # Errors
/// Returns [`PoolFull`] when no usable address is free. The previous address counts as free
/// only when it is the last one left.
pub fn allocate(
    blocks: &[Ipv4Net],
    previous: Option<Ipv4Addr>,
    reserved: impl Fn(Ipv4Addr) -> bool,
) -> Result<Ipv4Addr, PoolFull> {
    let hosts: Vec<(u32, u64)> = blocks
        .iter()
        .filter(|block| usable_hosts(block) > 0)
        .map(|block| (u32::from(block.network()) + 1, usable_hosts(block)))
        .collect();
    let usable: u64 = hosts.iter().map(|(_, count)| count).sum();
    let full = || PoolFull {
        usable,
        blocks: blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
    };
    if usable == 0 {
        return Err(full());
    }
    // Position of an address in the concatenated host ranges.
    let position_of = |address: Ipv4Addr| -> Option<u64> {
        let mut offset = 0;
        for (first, count) in &hosts {
            let value = u32::from(address);
            if value >= *first && u64::from(value - first) < *count {
                return Some(offset + u64::from(value - first));
            }
            offset += count;
        }
        None
    };
    let address_at = |mut position: u64| -> Ipv4Addr {
        for (first, count) in &hosts {
            if position < *count {
                return Ipv4Addr::from(first + position as u32);
            }
            position -= count;
        }
        unreachable!("position {position} is beyond the pool")
    };
    let start = previous.and_then(position_of).map_or(0, |position| (position + 1) % usable);
    let mut previous_free = false;
    for step in 0..usable {
        let address = address_at((start + step) % usable);
        if reserved(address) {
            continue;
        }
        if Some(address) == previous {
            previous_free = true;
            continue;
        }
        return Ok(address);
    }
    match previous {
        Some(address) if previous_free => Ok(address),
        _ => Err(full()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn nets(blocks: &[&str]) -> Vec<Ipv4Net> {
        blocks.iter().map(|block| block.parse().unwrap()).collect()
    }

    #[test]
    fn usable_host_counts() {
        assert_eq!(usable_hosts(&"10.0.0.0/24".parse().unwrap()), 254);
        assert_eq!(usable_hosts(&"10.0.0.0/30".parse().unwrap()), 2);
        assert_eq!(usable_hosts(&"10.0.0.0/31".parse().unwrap()), 0);
        assert_eq!(usable_hosts(&"10.0.0.0/8".parse().unwrap()), 16_777_214);
    }

    #[test]
    fn first_address_skips_network() {
        let blocks = nets(&["10.9.0.0/24"]);
        assert_eq!(allocate(&blocks, None, |_| false).unwrap(), Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn reconnect_gets_another_address() {
        let blocks = nets(&["10.9.0.0/24"]);
        let first = allocate(&blocks, None, |_| false).unwrap();
        let second = allocate(&blocks, Some(first), |_| false).unwrap();
        assert_ne!(first, second);
        assert_eq!(second, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn never_network_broadcast_or_reserved() {
        let blocks = nets(&["10.9.0.0/30", "10.9.1.0/30"]);
        let reserved = |address: Ipv4Addr| address == Ipv4Addr::new(10, 9, 0, 2);
        let mut seen = HashSet::new();
        let mut previous = None;
        for _ in 0..6 {
            let address = allocate(&blocks, previous, reserved).unwrap();
            assert!(blocks.iter().any(|block| is_usable_host(block, address)), "{address}");
            assert_ne!(address, Ipv4Addr::new(10, 9, 0, 2));
            seen.insert(address);
            previous = Some(address);
        }
        let expected: HashSet<Ipv4Addr> =
            [Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 1, 1), Ipv4Addr::new(10, 9, 1, 2)]
                .into_iter()
                .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn wraps_from_last_block_to_first() {
        let blocks = nets(&["10.9.0.0/30", "10.9.1.0/30"]);
        let next = allocate(&blocks, Some(Ipv4Addr::new(10, 9, 1, 2)), |_| false).unwrap();
        assert_eq!(next, Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn full_pool_is_an_error() {
        let blocks = nets(&["10.9.0.0/30"]);
        let error = allocate(&blocks, None, |_| true).unwrap_err();
        assert_eq!(error.usable, 2);
        assert_eq!(
            error.to_string(),
            "address pool full: all 2 usable addresses of 10.9.0.0/30 are static or in use; \
             add a CIDR block or disconnect a client"
        );
    }

    #[test]
    fn previous_address_is_the_last_resort() {
        let blocks = nets(&["10.9.0.0/30"]);
        let previous = Ipv4Addr::new(10, 9, 0, 1);
        let only_previous_free = |address: Ipv4Addr| address != previous;
        assert_eq!(allocate(&blocks, Some(previous), only_previous_free).unwrap(), previous);
    }

    #[test]
    fn previous_outside_blocks_starts_at_first() {
        let blocks = nets(&["10.9.0.0/29"]);
        let next = allocate(&blocks, Some(Ipv4Addr::new(192, 168, 1, 1)), |_| false).unwrap();
        assert_eq!(next, Ipv4Addr::new(10, 9, 0, 1));
    }
}
