//! Trie keys for the guard's prefixes (the prefix type itself is `tether_proto::cidr::Cidr`).

/// The address with the bits beyond the prefix cleared, as the tries store keys.
pub(super) fn masked<const N: usize>(mut bytes: [u8; N], len: u8) -> [u8; N] {
    let len = usize::from(len);
    for (i, byte) in bytes.iter_mut().enumerate() {
        let keep = len.saturating_sub(i * 8).min(8);
        *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    bytes
}
