#!/usr/bin/env python3
"""Writes the push_decode seeds (corpus/push_decode/): a small pprof in each of the target's
five forms. Byte 0 of each file picks the decoder (see fuzz_targets/push_decode.rs)."""

import gzip
import os
import sys


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    """A varint (int) or length-delimited (bytes, str) protobuf field."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def packed(num, values):
    return field(num, b"".join(varint(v) for v in values))


def pprof():
    strings = ["", "samples", "count", "cpu", "nanoseconds", "main", "spin", "/spin", "comm"]
    s = strings.index
    out = field(1, field(1, s("samples")) + field(2, s("count")))
    out += field(1, field(1, s("cpu")) + field(2, s("nanoseconds")))
    out += field(2, packed(1, [2, 1]) + packed(2, [3, 30000000])
                 + field(3, field(1, s("comm")) + field(2, s("spin"))))
    out += field(3, field(1, 1) + field(2, 0x400000) + field(3, 0x401000) + field(5, s("/spin")))
    for loc, fn, addr in [(1, 1, 0x400100), (2, 2, 0x400200)]:
        out += field(4, field(1, loc) + field(2, 1) + field(3, addr)
                     + field(4, field(1, fn) + field(2, 10 * loc)))
    for fn, name in [(1, "main"), (2, "spin")]:
        out += field(5, field(1, fn) + field(2, s(name)) + field(4, s("/spin")))
    for st in strings:
        out += field(6, st)
    out += field(9, 1700000000000000000) + field(10, 15000000000)
    out += field(11, field(1, s("cpu")) + field(2, s("nanoseconds"))) + field(12, 10309278)
    return out


def main(outdir):
    raw = pprof()
    gz = gzip.compress(raw, mtime=0)
    series = field(1, field(1, "service_name") + field(2, "spin"))
    series += field(1, field(1, "__name__") + field(2, "process_cpu"))
    series += field(2, field(1, gz) + field(2, "0b6a8f9e-2c1d-4e3f-9a8b-7c6d5e4f3a2b"))
    push = field(1, series)
    boundary = "f1e2d3c4b5a6"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"profile\"; "
            f"filename=\"profile.pprof\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + gz + (f"\r\n--{boundary}\r\nContent-Disposition: form-data; "
                               f"name=\"event\"\r\n\r\n{{\"family\":\"ebpf\"}}\r\n"
                               f"--{boundary}--\r\n").encode()
    seeds = {
        "0-push": b"\0" + push,
        "1-gzip-pprof": b"\1" + gz,
        "2-pprof": b"\2" + raw,
        "3-multipart": b"\3" + f"multipart/form-data; boundary={boundary}\n".encode() + body,
        "4-query": b"\4/ingest?name=spin%7Bpod%3Da%2Cb%7D&from=1700000000&until=1700000015"
                   b"&spyName=ebpf&sampleRate=97&units=samples&aggregationType=sum",
    }
    for name, data in seeds.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corpus/push_decode")
