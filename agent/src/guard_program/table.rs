//! The control-plane table: the guard's fast answer to "did the control plane send this?".
//!
//! The LPM tries hold the policy; a trie walk costs a control-plane SYN drop about as much as
//! the rest of its path. The table answers most addresses with array reads: a first level per
//! /16 (in the config, for IPv4 and IPv6), and for IPv4 a block per /16 that holds only part
//! of the control plane, with an entry per /24, and a 256-bit bitmap per /24 that holds only
//! part of it. Whatever does not fit in the blocks there are, and every IPv6 prefix longer than
//! /16, the table leaves to the trie.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tether_agent_common::{TABLE_ALL, TABLE_BLOCK, TABLE_BLOCKS, TABLE_NONE, TABLE_TRIE, top_slot};

use super::Cidr;
use super::cidr::masked;
use super::shared_config::Tables;

/// One level's entries by an octet (or by the first two, at the top).
pub(super) type Level<const N: usize> = [u8; N];

pub(super) struct Table {
    pub v4_top: Box<Level<65536>>,
    pub v6_top: Box<Level<65536>>,
    /// Second IPv4 level, block by block.
    pub mid: Vec<Level<256>>,
    /// Last IPv4 level: bitmaps by the fourth octet.
    pub low: Vec<[u64; 4]>,
}

/// The 2^(bits - len) consecutive indexes, of `bits`-bit numbers, that the prefix
/// `value/len` of those numbers covers.
fn covered(value: usize, len: u8, bits: u8) -> std::ops::Range<usize> {
    let count = 1usize << (bits - len.min(bits));
    let first = value & !(count - 1);
    first..first + count
}

fn empty<const N: usize>() -> Box<Level<N>> {
    vec![TABLE_NONE; N]
        .into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| unreachable!("a vector of N entries"))
}

fn block_entry(index: usize) -> u8 {
    u8::try_from(index).map_or(TABLE_TRIE, |i| i.saturating_add(TABLE_BLOCK))
}

impl Table {
    pub fn compile(prefixes: &[Cidr]) -> Table {
        let mut table = Table {
            v4_top: empty(),
            v6_top: empty(),
            mid: Vec::new(),
            low: Vec::new(),
        };
        let mut partial: BTreeMap<usize, Vec<([u8; 4], u8)>> = BTreeMap::new();
        for cidr in prefixes {
            match cidr.addr {
                IpAddr::V4(address) => {
                    let address = masked(address.octets(), cidr.len);
                    let top = top_slot(address[0], address[1]);
                    if cidr.len <= 16 {
                        table.v4_top[covered(top, cidr.len, 16)].fill(TABLE_ALL);
                    } else {
                        partial.entry(top).or_default().push((address, cidr.len));
                    }
                }
                IpAddr::V6(address) => {
                    let address = masked(address.octets(), cidr.len);
                    let top = top_slot(address[0], address[1]);
                    if cidr.len <= 16 {
                        table.v6_top[covered(top, cidr.len, 16)].fill(TABLE_ALL);
                    } else if table.v6_top[top] == TABLE_NONE {
                        table.v6_top[top] = TABLE_TRIE;
                    }
                }
            }
        }
        for (top, prefixes) in partial {
            let entry = &mut table.v4_top[top];
            if *entry == TABLE_ALL {
                continue;
            }
            if table.mid.len() == TABLE_BLOCKS as usize {
                *entry = TABLE_TRIE;
                continue;
            }
            *entry = block_entry(table.mid.len());
            let mut mid = [TABLE_NONE; 256];
            let mut lows: BTreeMap<u8, [u64; 4]> = BTreeMap::new();
            for (address, len) in prefixes {
                if len <= 24 {
                    mid[covered(usize::from(address[2]), len - 16, 8)].fill(TABLE_ALL);
                } else {
                    let bits = lows.entry(address[2]).or_default();
                    for octet in covered(usize::from(address[3]), len - 24, 8) {
                        bits[octet >> 6] |= 1 << (octet & 63);
                    }
                }
            }
            for (third, bits) in lows {
                let entry = &mut mid[usize::from(third)];
                if *entry == TABLE_ALL {
                    continue;
                }
                *entry = if table.low.len() == TABLE_BLOCKS as usize {
                    TABLE_TRIE
                } else {
                    table.low.push(bits);
                    block_entry(table.low.len() - 1)
                };
            }
            table.mid.push(mid);
        }
        table
    }

    /// While the tries change from what `current` describes to what this table does: every
    /// first-level entry whose answer may change asks the trie, and none names a block, so the
    /// blocks can be rewritten. Where old and new agree on "none" or "all", the answer holds
    /// whatever state the tries are in.
    pub fn defer_changes(&self, current: &mut Tables<'_>) {
        for (current, new) in [
            (&mut *current.v4_top, &self.v4_top),
            (&mut *current.v6_top, &self.v6_top),
        ] {
            for (current, new) in current.iter_mut().zip(new.iter()) {
                if *current != *new || *new >= TABLE_BLOCK {
                    *current = TABLE_TRIE;
                }
            }
        }
    }

    /// Writes this table over `current`, the blocks before the first levels that name them.
    /// Call once the tries hold the policy, after [`Table::defer_changes`].
    pub fn install(&self, current: &mut Tables<'_>) {
        let first = usize::from(TABLE_BLOCK);
        current.v4_mid[first..first + self.mid.len()].copy_from_slice(&self.mid);
        current.v4_low[first..first + self.low.len()].copy_from_slice(&self.low);
        current.v4_top.copy_from_slice(&self.v4_top[..]);
        current.v6_top.copy_from_slice(&self.v6_top[..]);
    }

    /// What the table says of `address`: whether the control plane holds it, or `None` where
    /// it leaves the answer to the trie.
    #[cfg(test)]
    fn lookup(&self, address: IpAddr) -> Option<bool> {
        let decided = |entry: u8| match entry {
            TABLE_NONE => Some(Some(false)),
            TABLE_ALL => Some(Some(true)),
            TABLE_TRIE => Some(None),
            _ => None,
        };
        match address {
            IpAddr::V4(address) => {
                let [a, b, c, d] = address.octets();
                let top = self.v4_top[top_slot(a, b)];
                if let Some(answer) = decided(top) {
                    return answer;
                }
                let mid = self.mid[usize::from(top - TABLE_BLOCK)][usize::from(c)];
                if let Some(answer) = decided(mid) {
                    return answer;
                }
                let bits = &self.low[usize::from(mid - TABLE_BLOCK)];
                Some(tether_agent_common::low_block_holds(bits, d))
            }
            IpAddr::V6(address) => {
                let [a, b, ..] = address.octets();
                match self.v6_top[top_slot(a, b)] {
                    TABLE_NONE => Some(false),
                    TABLE_ALL => Some(true),
                    _ => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        Ipv4Addr::new(a, b, c, d).into()
    }

    #[test]
    fn answers_match_the_prefixes_at_every_level() {
        let prefixes = [
            "10.88.0.1/32",
            "10.88.0.64/26",
            "10.88.7.0/24",
            "10.89.0.0/17",
            "172.16.0.0/12",
            "172.16.5.0/24",
        ]
        .map(cidr);
        let table = Table::compile(&prefixes);
        let cases = [
            (v4(10, 88, 0, 1), true),
            (v4(10, 88, 0, 2), false),
            (v4(10, 88, 0, 63), false),
            (v4(10, 88, 0, 64), true),
            (v4(10, 88, 0, 127), true),
            (v4(10, 88, 0, 128), false),
            (v4(10, 88, 7, 200), true),
            (v4(10, 88, 8, 1), false),
            (v4(10, 89, 127, 255), true),
            (v4(10, 89, 128, 0), false),
            (v4(10, 87, 0, 1), false),
            (v4(172, 31, 255, 255), true),
            (v4(172, 32, 0, 0), false),
            (v4(192, 168, 7, 7), false),
        ];
        for (address, expected) in cases {
            assert_eq!(table.lookup(address), Some(expected), "{address}");
        }
        // One block for 10.88 (with one bitmap for 10.88.0), one for 10.89; 172.16/12 is
        // whole /16s.
        assert_eq!((table.mid.len(), table.low.len()), (2, 1));
    }

    #[test]
    fn ipv6_is_decided_by_the_top_or_left_to_the_trie() {
        let table = Table::compile(&[cidr("fd00::/8"), cidr("2001:db8:1::/48")]);
        let v6 = |text: &str| IpAddr::V6(text.parse::<Ipv6Addr>().unwrap());
        assert_eq!(table.lookup(v6("fd12::1")), Some(true));
        assert_eq!(table.lookup(v6("fe00::1")), Some(false));
        assert_eq!(table.lookup(v6("2001:db8:1::1")), None);
        assert_eq!(table.lookup(v6("2001:db8:2::1")), None);
        assert_eq!(table.lookup(v6("2002::1")), Some(false));
    }

    #[test]
    fn what_does_not_fit_in_the_blocks_is_left_to_the_trie() {
        // One /32 in each of 300 /16s: more second-level blocks than there are.
        let prefixes: Vec<Cidr> = (0..300u16)
            .map(|i| {
                let [a, b] = (0x0a00 + i).to_be_bytes();
                Cidr {
                    addr: v4(a, b, 1, 1),
                    len: 32,
                }
            })
            .collect();
        let table = Table::compile(&prefixes);
        assert_eq!(table.mid.len(), TABLE_BLOCKS as usize);
        assert_eq!(table.low.len(), TABLE_BLOCKS as usize);
        let mut deferred = 0;
        for prefix in &prefixes {
            match table.lookup(prefix.addr) {
                Some(answer) => assert!(answer, "{}", prefix.addr),
                None => deferred += 1,
            }
        }
        assert_eq!(deferred, 300 - TABLE_BLOCKS as usize);
    }

    #[test]
    fn while_the_policy_changes_nothing_names_a_block() {
        let old = Table::compile(&[cidr("10.88.0.1/32"), cidr("172.16.0.0/12")]);
        let new = Table::compile(&[
            cidr("10.88.0.2/32"),
            cidr("10.90.0.0/24"),
            cidr("172.16.0.0/12"),
        ]);
        let (mut v4_top, mut v6_top) = (old.v4_top, old.v6_top);
        let mut v4_mid = Box::new([[TABLE_NONE; 256]; 256]);
        let mut v4_low = Box::new([[0u64; 4]; 256]);
        let mut current = Tables {
            v4_top: &mut v4_top,
            v6_top: &mut v6_top,
            v4_mid: &mut v4_mid,
            v4_low: &mut v4_low,
        };
        new.defer_changes(&mut current);
        assert!(current.v4_top.iter().all(|e| *e < TABLE_BLOCK));
        let top = |current: &Tables<'_>, a: u8, b: u8| current.v4_top[top_slot(a, b)];
        assert_eq!(top(&current, 10, 88), TABLE_TRIE);
        assert_eq!(top(&current, 10, 90), TABLE_TRIE);
        // Old and new agree on these, so they keep answering throughout.
        assert_eq!(top(&current, 172, 20), TABLE_ALL);
        assert_eq!(top(&current, 11, 0), TABLE_NONE);
        new.install(&mut current);
        assert_eq!(top(&current, 10, 88), TABLE_BLOCK);
        let second = usize::from(TABLE_BLOCK) + 1;
        assert_eq!(current.v4_mid[second][0], TABLE_ALL);
        let first = usize::from(TABLE_BLOCK);
        assert!(tether_agent_common::low_block_holds(
            &current.v4_low[first],
            2
        ));
    }
}
