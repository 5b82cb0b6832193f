"""Drives tether-server's gRPC frontend with grpcio (gRPC's C core), an implementation that
shares no code with tether: one ProxyService/Proxy stream through DIAL_REQ, DATA both ways
(against an echo destination) and CLOSE_REQ/CLOSE_RSP.

Packets are encoded by hand from the field numbers in proto/src/lib.rs, so the
test needs nothing but grpcio. Prints one JSON line with what happened; exits non-zero on any
deviation, saying which.
"""

import argparse
import json
import os
import queue
import sys

import grpc

DIAL_REQ, DIAL_RSP, CLOSE_REQ, CLOSE_RSP, DATA = 0, 1, 2, 3, 4


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number, value):
    return varint(number << 3) + varint(value) if value else b""


def field_bytes(number, value):
    return varint(number << 3 | 2) + varint(len(value)) + value


def packet(kind, payload_field, payload):
    return field_varint(1, kind) + field_bytes(payload_field, payload)


def parse(buf):
    """Fields of one message: {number: [values]} (varints as ints, others as bytes)."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            length, i = read_varint(buf, i)
            value, i = buf[i : i + length], i + length
        else:
            raise ValueError(f"unexpected wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def read_varint(buf, i):
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if value >= 1 << 63:
                value -= 1 << 64
            return value, i


def decode(raw):
    fields = parse(raw)
    kind = fields.get(1, [0])[0]
    payload = {}
    for number in range(2, 9):
        if number in fields:
            payload = parse(fields[number][0])
    return kind, payload


def fail(why):
    print(json.dumps({"ok": False, "error": why}))
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="unix:/path or localhost:port")
    parser.add_argument("--address", required=True, help="host:port to dial through the tunnel")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--bytes", type=int, default=1 << 20)
    args = parser.parse_args()

    if args.ca:
        read = lambda path: open(path, "rb").read()
        creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
        channel = grpc.secure_channel(args.target, creds)
    else:
        channel = grpc.insecure_channel(args.target)
    proxy = channel.stream_stream(
        "/ProxyService/Proxy",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    outbox = queue.Queue()
    responses = proxy(iter(outbox.get, None), timeout=60)

    random = 0x1234_5678_9ABC
    dial = field_bytes(1, b"tcp") + field_bytes(2, args.address.encode()) + field_varint(3, random)
    outbox.put(packet(DIAL_REQ, 2, dial))
    kind, rsp = decode(next(responses))
    if kind != DIAL_RSP:
        fail(f"first packet has type {kind}, not DIAL_RSP")
    if rsp.get(3, [0])[0] != random:
        fail(f"DIAL_RSP echoed random {rsp.get(3)} instead of {random}")
    if rsp.get(1):
        fail(f"dial failed: {rsp[1][0].decode()}")
    connect_id = rsp.get(2, [0])[0]
    if connect_id <= 0:
        fail("DIAL_RSP carries no connectID")

    sent = os.urandom(args.bytes)
    for offset in range(0, len(sent), 16384):
        chunk = sent[offset : offset + 16384]
        outbox.put(packet(DATA, 4, field_varint(1, connect_id) + field_bytes(3, chunk)))
    echoed = bytearray()
    while len(echoed) < len(sent):
        kind, data = decode(next(responses))
        if kind != DATA:
            fail(f"expected DATA, got type {kind} after {len(echoed)} bytes")
        if data.get(1, [0])[0] != connect_id:
            fail(f"DATA for connectID {data.get(1)} instead of {connect_id}")
        echoed += data.get(3, [b""])[0]
    if bytes(echoed) != sent:
        fail("the echoed bytes differ from those sent")

    outbox.put(packet(CLOSE_REQ, 5, field_varint(1, connect_id)))
    kind, close = decode(next(responses))
    if kind != CLOSE_RSP:
        fail(f"expected CLOSE_RSP, got type {kind}")
    if close.get(2, [0])[0] != connect_id or close.get(1):
        fail(f"CLOSE_RSP {close} does not close {connect_id} cleanly")
    outbox.put(None)
    for extra in responses:
        fail(f"packet after CLOSE_RSP: {decode(extra)}")
    print(json.dumps({"ok": True, "connect_id": connect_id, "echoed": len(echoed)}))


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        fail(f"gRPC error {err.code()}: {err.details()}")
