//! Hand-built frames for running the XDP guard in the kernel with BPF_PROG_TEST_RUN.
//! Checksums are left zero: XDP sees frames before anything verifies them.

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;
pub const VLAN: u16 = 0x8100;
pub const QINQ: u16 = 0x88a8;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// Ethernet header; `tags` are (TPID, VID) pairs inserted before the final EtherType.
pub fn ethernet(tags: &[u16], ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (i, tpid) in tags.iter().enumerate() {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// IPv4 header with `option_words` 32-bit words of options (NOPs) and the given fragment
/// field (flags + offset).
pub fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    payload: usize,
    option_words: u8,
    fragment: u16,
) -> Vec<u8> {
    let ihl = 5 + option_words;
    let total = usize::from(ihl) * 4 + payload;
    let mut h = vec![0x40 | ihl, 0];
    h.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&fragment.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend(std::iter::repeat_n(1u8, usize::from(option_words) * 4));
    h
}

pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&u16::try_from(payload).unwrap_or(u16::MAX).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h
}

/// An IPv6 extension header (hop-by-hop 0, routing 43, destination options 60) of
/// `eight_octets` units, followed by `next`.
pub fn ipv6_extension(next: u8, eight_octets: u8) -> Vec<u8> {
    let mut h = vec![next, eight_octets - 1];
    h.resize(usize::from(eight_octets) * 8, 0);
    h
}

/// An IPv6 fragment header followed by `next`.
pub fn ipv6_fragment(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 7]);
    h
}

/// TCP header with `option_words` 32-bit words of options (NOPs).
pub fn tcp(dport: u16, flags: u8, option_words: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    h.push((5 + option_words) << 4);
    h.push(flags);
    h.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    h.extend(std::iter::repeat_n(1u8, usize::from(option_words) * 4));
    h
}

pub fn udp(dport: u16, payload: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&5353u16.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&u16::try_from(8 + payload).unwrap_or(u16::MAX).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.resize(8 + payload, 0xab);
    h
}

/// Concatenates header pieces into one frame.
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The internet checksum (RFC 1071) over `parts` laid end to end (each of even length but
/// the last).
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = parts
        .iter()
        .flat_map(|part| part.chunks(2))
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IP packet (no link-layer header) carrying TCP, with the checksums the kernel verifies
/// filled in: for packets written into a tun device, which reach the stack as they are.
pub fn with_checksums(mut packet: Vec<u8>) -> Vec<u8> {
    let (l4, pseudo) = if packet[0] >> 4 == 4 {
        let header = usize::from(packet[0] & 0x0f) * 4;
        packet[10..12].fill(0);
        let sum = internet_checksum(&[&packet[..header]]);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        let length = u16::try_from(packet.len() - header).unwrap_or(u16::MAX);
        let mut pseudo = packet[12..20].to_vec();
        pseudo.extend_from_slice(&[0, packet[9]]);
        pseudo.extend_from_slice(&length.to_be_bytes());
        (header, pseudo)
    } else {
        let length = u32::try_from(packet.len() - 40).unwrap_or(u32::MAX);
        let mut pseudo = packet[8..40].to_vec();
        pseudo.extend_from_slice(&length.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, packet[6]]);
        (40, pseudo)
    };
    packet[l4 + 16..l4 + 18].fill(0);
    let sum = internet_checksum(&[&pseudo, &packet[l4..]]);
    packet[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
    packet
}
