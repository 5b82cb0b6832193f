#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz targets whose inputs are plain bytes into
fuzz/corpus/<target>/: frames for xdp_guard (a mode byte, then an Ethernet frame), encoded
packets for packet_decode, query strings for identifiers. The fuzzers grow the corpora from
these; run it again after changing it (`python3 fuzz/seeds/generate.py`)."""

import hashlib
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent / "corpus"

CP4, OTHER4, ALLOWED4, NODE4 = [10, 1, 2, 3], [172, 16, 0, 9], [192, 168, 7, 7], [10, 200, 0, 2]
CP6 = [0xFD] + [0] * 14 + [1]
OTHER6 = [0x20, 1, 0x0D, 0xB8] + [0] * 11 + [9]
NODE6 = [0xFE, 0x80] + [0] * 13 + [2]


def ethernet(ethertype, tags=()):
    frame = bytes([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2])
    for i, tpid in enumerate(tags):
        frame += struct.pack(">HH", tpid, 100 + i)
    return frame + struct.pack(">H", ethertype)


def ipv4(src, protocol, payload, fragment=0, option_words=0):
    ihl = 5 + option_words
    total = ihl * 4 + payload
    header = bytes([0x40 | ihl, 0]) + struct.pack(">HHH", total, 1, fragment)
    header += bytes([64, protocol, 0, 0] + src + NODE4)
    return header + bytes([1]) * (option_words * 4)


def ipv6(src, next_header, payload):
    return bytes([0x60, 0, 0, 0]) + struct.pack(">HBB", payload, next_header, 64) + bytes(src + NODE6)


def extension(next_header, units):
    return bytes([next_header, units - 1]) + bytes(units * 8 - 2)


def fragment6(next_header, offset, more):
    return bytes([next_header, 0]) + struct.pack(">H", (offset << 3) | more) + bytes([0, 0, 0, 7])


def tcp(port, flags):
    return struct.pack(">HHII", 40000, port, 1, 0) + bytes([0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0])


def udp(port):
    return struct.pack(">HHHH", 5353, port, 8, 0)


SYN, ACK = 0x02, 0x10


def frames():
    for src in (CP4, OTHER4, ALLOWED4):
        for port in (443, 10250, 10255):
            for flags in (SYN, ACK, SYN | ACK, 0x04 | ACK):
                yield ethernet(0x0800) + ipv4(src, 6, 20) + tcp(port, flags)
        for port in (53, 4789, 8472, 10250):
            yield ethernet(0x0800) + ipv4(src, 17, 8) + udp(port)
        for protocol in (1, 4, 41, 47, 50):
            yield ethernet(0x0800) + ipv4(src, protocol, 20) + bytes(20)
        yield ethernet(0x0800) + ipv4(src, 6, 20, fragment=0x2000) + tcp(10250, SYN)[:8]
        yield ethernet(0x0800) + ipv4(src, 6, 20, fragment=0x0003) + bytes(20)
        yield ethernet(0x0800, (0x8100,)) + ipv4(src, 6, 20, option_words=2) + tcp(10250, SYN)
        yield ethernet(0x0800, (0x88A8, 0x8100)) + ipv4(src, 6, 20) + tcp(22, SYN)
    for src in (CP6, OTHER6):
        yield ethernet(0x86DD) + ipv6(src, 6, 20) + tcp(10250, SYN)
        yield ethernet(0x86DD) + ipv6(src, 6, 20) + tcp(10250, ACK)
        yield ethernet(0x86DD) + ipv6(src, 17, 8) + udp(4789)
        yield ethernet(0x86DD) + ipv6(src, 0, 36) + extension(60, 1) + extension(6, 1) + tcp(10250, SYN)
        yield ethernet(0x86DD) + ipv6(src, 44, 28) + fragment6(6, 0, 0) + tcp(10250, SYN)
        yield ethernet(0x86DD) + ipv6(src, 44, 28) + fragment6(6, 0, 1) + tcp(10250, SYN)[:6]
        yield ethernet(0x86DD) + ipv6(src, 44, 28) + fragment6(6, 9, 0) + bytes(20)
        yield ethernet(0x86DD) + ipv6(src, 51, 28) + bytes([6, 1]) + bytes(10) + tcp(10255, SYN)
        chain = b"".join(extension(60, 1) for _ in range(9))
        yield ethernet(0x86DD) + ipv6(src, 60, len(chain)) + chain
    yield ethernet(0x0806) + bytes(28)


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def field(tag, wire, value):
    key = varint(tag << 3 | wire)
    if wire == 0:
        return key + varint(value & 0xFFFFFFFFFFFFFFFF)
    return key + varint(len(value)) + value


def packets():
    dial = field(1, 2, b"tcp") + field(2, 2, b"10.0.0.1:10250") + field(3, 0, 5)
    yield field(2, 2, dial)
    yield field(1, 0, 1) + field(3, 2, field(2, 0, 7) + field(3, 0, 5))
    yield field(1, 0, 1) + field(3, 2, field(1, 2, b"connection refused") + field(3, 0, 5))
    yield field(1, 0, 2) + field(5, 2, field(1, 0, 7))
    yield field(1, 0, 3) + field(6, 2, field(1, 0, 7) + field(2, 2, b"EOF"))
    yield field(1, 0, 4) + field(4, 2, field(1, 0, 7) + field(3, 2, b"hello"))
    yield field(1, 0, 5) + field(7, 2, field(1, 0, 5))
    yield field(1, 0, 6) + field(8, 2, b"")
    yield field(1, 0, 100) + field(100, 2, field(1, 0, 7) + field(2, 0, 65536))
    yield field(1, 0, -1)


QUERIES = [
    "host=node-1&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.1.0.0/16&default-route=true",
    "host=10.0.0.5&ipv4=::ffff:10.0.0.5",
    "default-route=T&default-route=garbage",
    "cidr=::ffff:10.0.0.0/104&host=Node%2D1",
    "ipv4=1.2.3.4;host=a",
]


def write(target, items):
    directory = ROOT / target
    directory.mkdir(parents=True, exist_ok=True)
    for item in items:
        (directory / ("seed-" + hashlib.sha1(item).hexdigest())).write_bytes(item)


write("xdp_guard", [bytes([mode]) + frame for frame in frames() for mode in (0, 1)])
write("packet_decode", packets())
write("identifiers", [q.encode() for q in QUERIES])
