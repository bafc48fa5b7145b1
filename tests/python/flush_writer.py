#!/usr/bin/python3
"""Writes 64 KiB blocks to a region of an export, DEPTH at a time, and FLUSHes every
FLUSH_EVERY acknowledged writes, until the connection dies or MAX_SECONDS pass.

Usage: flush_writer.py URI OFFSET LENGTH DEPTH MAX_SECONDS FLUSH_EVERY

The region [OFFSET, OFFSET + LENGTH) holds LENGTH / 64 KiB blocks; write number `seq` goes
to block i = seq mod blocks, pass g = seq div blocks, and fills it with the 16-byte unit
struct.pack('<QQ', g | tag(g, i) << 32, i) repeated, where tag is a
32-bit hash of (g, i) that is not linear in XOR: a unit rebuilt from parity
that does not match the data (the RAID 5/6 write hole) XORs several units
together, and the result's tag is then wrong (with g alone, the XOR of
passes can look like a valid pass). A block never has two writes in flight: the next write
to a block is sent only after the previous one completed, so the last acknowledged write of
a block is the one it holds (until a later, unacknowledged one lands, wholly or in part).

Output, one line per event:
  ACK <g> <i>        a write was acknowledged (lines numbered 1, 2, ... in order)
  FLUSHED <n>        a FLUSH completed that was sent after the first n ACK lines: those n
                     writes are durable (NBD: a FLUSH covers every write completed before
                     it was sent)
  ERR <errnum> <msg> a command failed
  END <reason>       the writer stopped

Used by the crash tests (SIGKILL of the array daemon during writes)."""

import struct
import sys
import time

import nbd

BS = 64 * 1024


def tag(g, i):
    return (((g + 1) * 0x9E3779B1) ^ ((i + 1) * 0x85EBCA77)) * 0xC2B2AE35 & 0xFFFFFFFF


def block(g, i):
    return struct.pack("<QQ", g | tag(g, i) << 32, i) * (BS // 16)


def main():
    uri = sys.argv[1]
    offset, length = int(sys.argv[2]), int(sys.argv[3])
    depth, max_seconds, flush_every = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    h = nbd.NBD()
    h.connect_uri(uri)
    nblocks = length // BS
    assert 0 < depth < nblocks, "DEPTH must be below the number of blocks"
    inflight = {}  # cookie -> (g, i, buffer)
    busy = set()  # blocks with a write in flight
    acks = 0
    flush = None  # (cookie, acks covered)
    acks_at_last_flush = 0
    seq = 0
    deadline = time.monotonic() + max_seconds
    reason = "timeout"
    try:
        while time.monotonic() < deadline:
            while len(inflight) < depth:
                g, i = divmod(seq, nblocks)
                if i in busy:
                    break
                buf = nbd.Buffer.from_bytearray(bytearray(block(g, i)))
                c = h.aio_pwrite(buf, offset + i * BS)
                inflight[c] = (g, i, buf)
                busy.add(i)
                seq += 1
            if flush is None and acks - acks_at_last_flush >= flush_every:
                flush = (h.aio_flush(), acks)
                acks_at_last_flush = acks
            h.poll(1000)
            for c in list(inflight):
                try:
                    done = h.aio_command_completed(c)
                except nbd.Error as e:
                    print(f"ERR {e.errnum} {e.string}", flush=True)
                    busy.discard(inflight.pop(c)[1])
                    continue
                if done:
                    g, i, _ = inflight.pop(c)
                    busy.discard(i)
                    acks += 1
                    print(f"ACK {g} {i}", flush=True)
            if flush is not None:
                try:
                    if h.aio_command_completed(flush[0]):
                        print(f"FLUSHED {flush[1]}", flush=True)
                        flush = None
                except nbd.Error as e:
                    print(f"ERR {e.errnum} flush: {e.string}", flush=True)
                    flush = None
            if h.aio_is_dead() or h.aio_is_closed():
                reason = "connection closed"
                break
    except nbd.Error as e:
        reason = f"error {e.errnum} {e.string}"
    print(f"END {reason}", flush=True)


if __name__ == "__main__":
    main()
