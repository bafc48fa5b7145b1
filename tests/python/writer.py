#!/usr/bin/python3
"""Keep DEPTH 64 KiB writes in flight against an export until the connection dies or
MAX_SECONDS pass. Block i (at offset i * 64 KiB, wrapping over the export) of pass g holds
the 16-byte unit struct.pack('<QQ', g, i) repeated. For every acknowledged write it prints
`ACK <g> <i>`; for every failed one `ERR <errnum> <message>`; at the end `END <reason>`.
Used by the persistence tests (SIGTERM with requests in flight)."""

import struct
import sys
import time

import nbd

BS = 64 * 1024


def block(g, i):
    return struct.pack("<QQ", g, i) * (BS // 16)


def main():
    uri, depth, max_seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    h = nbd.NBD()
    h.connect_uri(uri)
    nblocks = h.get_size() // BS
    inflight = {}
    seq = 0
    deadline = time.monotonic() + max_seconds
    reason = "timeout"
    try:
        while time.monotonic() < deadline:
            while len(inflight) < depth:
                g, i = divmod(seq, nblocks)
                buf = nbd.Buffer.from_bytearray(bytearray(block(g, i)))
                c = h.aio_pwrite(buf, i * BS)
                inflight[c] = (g, i, buf)
                seq += 1
            h.poll(1000)
            for c in list(inflight):
                try:
                    done = h.aio_command_completed(c)
                except nbd.Error as e:
                    print(f"ERR {e.errnum} {e.string}", flush=True)
                    del inflight[c]
                    continue
                if done:
                    g, i, _ = inflight.pop(c)
                    print(f"ACK {g} {i}", flush=True)
            if h.aio_is_dead() or h.aio_is_closed():
                reason = "connection closed"
                break
    except nbd.Error as e:
        reason = f"error {e.errnum} {e.string}"
    # Report what became of the commands still in flight when the connection went away.
    for c, (g, i, _) in inflight.items():
        try:
            if h.aio_command_completed(c):
                print(f"ACK {g} {i}", flush=True)
            else:
                print(f"LOST {g} {i}", flush=True)
        except nbd.Error as e:
            print(f"ERR {e.errnum} {e.string}", flush=True)
    print(f"END {reason}", flush=True)


if __name__ == "__main__":
    main()
