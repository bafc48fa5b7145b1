#!/usr/bin/python3
"""NBD server conformance suite (libnbd + raw sockets).

Run it under Debian's /usr/bin/python3, which has python3-libnbd:

    /usr/bin/python3 tests/python/conformance.py \
        --rw-uri nbd://127.0.0.1:PORT/vol --ro-uri nbd://127.0.0.1:PORT/ro \
        --big-uri nbd://127.0.0.1:PORT/big --exports vol,ro,big \
        [--default-is vol] [--node] [--server-pid PID] [-k SUBSTRING]

* --rw-uri   a writable export, at least 64 MiB (its last MiBs hold a sentinel).
* --ro-uri   a read-only export (optional; its checks are skipped without it).
* --big-uri  a writable export of at least 200 MiB (for WRITE_ZEROES > 64 MiB).
* --exports  the export names the rw server must list (NBD_OPT_LIST).
* --default-is NAME: the default export "" of the rw server is NAME.
* --node     also assert what nbdraid-node promises beyond the spec's MUSTs
             (exact flags, block sizes, SHOULD-level errors).
* --server-pid: the server's PID, to check it stays alive and that declared
             huge lengths do not inflate its memory.

Each check prints PASS/FAIL/SKIP with its name. After every check a fresh libnbd
connection must still work and a sentinel written at start must read back intact.
Exit status: 0 when nothing failed, 1 otherwise.
"""

import argparse
import errno as E
import os
import random
import socket
import struct
import sys
import time
import traceback
import urllib.parse

import nbd

HANG = float(os.environ.get("NBDRAID_TEST_HANG_SECS", "30"))  # hang detector, seconds
MiB = 1 << 20

# --- protocol constants (doc/proto.md) ----------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
C_FIXED = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
ERR = 1 << 31
REP_ERR_UNSUP = ERR + 1
REP_ERR_POLICY = ERR + 2
REP_ERR_INVALID = ERR + 3
REP_ERR_PLATFORM = ERR + 4
REP_ERR_TLS_REQD = ERR + 5
REP_ERR_UNKNOWN = ERR + 6
REP_ERR_SHUTDOWN = ERR + 7
REP_ERR_BLOCK_SIZE_REQD = ERR + 8
REP_ERR_TOO_BIG = ERR + 9
REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CF_FUA = 1 << 0
CF_NO_HOLE = 1 << 1
CF_DF = 1 << 2
CF_REQ_ONE = 1 << 3
CF_FAST_ZERO = 1 << 4

RF_DONE = 1
RT_NONE = 0
RT_OFFSET_DATA = 1
RT_OFFSET_HOLE = 2
RT_BLOCK_STATUS = 5
RT_ERROR = (1 << 15) + 1
RT_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1
STATE_ZERO = 2

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
            95: "ENOTSUP", 108: "ESHUTDOWN", 34: "ERANGE", 71: "EPROTO", 107: "ENOTCONN"}


def ename(n):
    return ERRNAMES.get(n, str(n))


def rname(t):
    return REP_NAMES.get(t, hex(t))


class Fail(Exception):
    pass


class Skip(Exception):
    pass


class Closed(Exception):
    """The server closed (or reset) the connection."""


def need(cond, msg):
    if not cond:
        raise Fail(msg)


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


# --- libnbd helpers ---------------------------------------------------------------------------

def connect(uri, structured=True, meta=True, strict=None, hflags=None, opt_mode=False):
    h = nbd.NBD()
    h.set_handle_name("conformance")
    if not structured:
        h.set_request_structured_replies(False)
    if meta and structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if hflags is not None:
        h.set_handshake_flags(hflags)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    if strict is not None:
        h.set_strict_mode(strict)
    return h


def close(h):
    try:
        h.shutdown()
    except nbd.Error:
        pass


def expect_err(what, fn, *allowed):
    """Run fn; it must fail with an nbd.Error whose errno is in `allowed` (any if empty)."""
    try:
        fn()
    except nbd.Error as e:
        if allowed and e.errnum not in allowed:
            raise Fail(f"{what}: expected {'/'.join(ename(a) for a in allowed)}, "
                       f"got {ename(e.errnum)} ({e.string})")
        return e.errnum
    raise Fail(f"{what}: expected {'/'.join(ename(a) for a in allowed) or 'an error'}, "
               f"got success")


def block_status(h, length, offset, flags=0, ctx=nbd.CONTEXT_BASE_ALLOCATION):
    """Returns [(len, flags)...] for base:allocation; checks exactly one callback per context."""
    calls = []

    def cb(metacontext, off, entries, err):
        calls.append((metacontext, off, list(entries)))
        return 0

    h.block_status(length, offset, cb, flags)
    mine = [c for c in calls if c[0] == ctx]
    need(len(mine) == 1, f"expected one BLOCK_STATUS chunk for {ctx}, got {len(mine)}: {calls}")
    _, off, entries = mine[0]
    need(off == offset, f"block status for offset {offset} reported offset {off}")
    need(len(entries) >= 2 and len(entries) % 2 == 0, f"bad extent list {entries}")
    ext = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
    for ln, _fl in ext:
        need(ln > 0, f"zero-length extent in {ext}")
    if len(ext) > 1:
        need(sum(ln for ln, _ in ext[:-1]) < length,
             f"extents before the last already cover the request: {ext}")
    return ext


def state_at(ext, rel):
    """Flags of the extent containing relative offset rel (None if past the reply)."""
    pos = 0
    for ln, fl in ext:
        if pos <= rel < pos + ln:
            return fl
        pos += ln
    return None


def aio_wait(h, cookies):
    """Poll until every cookie completed; returns {cookie: None | errnum}."""
    deadline = time.monotonic() + HANG * 4
    pending = set(cookies)
    result = {}
    while pending:
        if time.monotonic() > deadline:
            raise Fail(f"hang detector: {len(pending)} commands still in flight after {HANG * 4}s")
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    result[c] = None
                    pending.discard(c)
            except nbd.Error as e:
                result[c] = e.errnum
                pending.discard(c)
        if pending:
            h.poll(1000)
    return result


# --- raw socket client ------------------------------------------------------------------------

class Simple:
    def __init__(self, err, cookie, data):
        self.err, self.cookie, self.data = err, cookie, data


class Chunk:
    def __init__(self, flags, typ, cookie, payload):
        self.flags, self.typ, self.cookie, self.payload = flags, typ, cookie, payload


class Result:
    def __init__(self, err=0, data=b"", simple=True, chunks=(), extents=None):
        self.err, self.data, self.simple, self.chunks, self.extents = (
            err, data, simple, list(chunks), extents or {})


class Req:
    def __init__(self, typ, offset, length):
        self.typ, self.offset, self.length = typ, offset, length


class Raw:
    def __init__(self, ctx, timeout=None):
        self.ctx = ctx
        self.s = socket.create_connection((ctx.host, ctx.port), timeout=timeout or HANG)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.next_cookie = 1
        self.size = None
        self.tflags = None
        self.hflags = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def reset(self):
        """Close with an RST (SO_LINGER 0)."""
        try:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def send(self, b):
        try:
            self.s.sendall(b)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(f"send: {e}")

    def recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                c = self.s.recv(min(n - len(buf), 4 * MiB))
            except ConnectionResetError:
                raise Closed(f"reset after {len(buf)}/{n} bytes")
            except socket.timeout:
                raise Fail(f"hang detector: server sent {len(buf)}/{n} expected bytes in {HANG}s")
            if not c:
                raise Closed(f"EOF after {len(buf)}/{n} bytes")
            buf += c
        return bytes(buf)

    def outcome(self, wait=None):
        """Wait for the server to either send something or close. Returns 'closed', 'data' or
        'silent' (nothing within `wait` seconds)."""
        self.s.settimeout(wait or HANG)
        try:
            c = self.s.recv(1, socket.MSG_PEEK)
            return "data" if c else "closed"
        except ConnectionResetError:
            return "closed"
        except socket.timeout:
            return "silent"
        finally:
            self.s.settimeout(HANG)

    def expect_closed(self, what):
        """The server must drop this connection (any bytes before EOF are ignored)."""
        deadline = time.monotonic() + HANG
        got = 0
        try:
            while time.monotonic() < deadline:
                c = self.s.recv(65536)
                if not c:
                    return
                got += len(c)
        except ConnectionResetError:
            return
        except socket.timeout:
            pass
        raise Fail(f"{what}: server did not close the connection within {HANG}s "
                   f"({got} bytes received)")

    # --- handshake ---
    def greeting(self):
        magic, ihave, hflags = struct.unpack(">QQH", self.recv(18))
        need(magic == NBDMAGIC, f"bad NBDMAGIC {magic:#x}")
        need(ihave == IHAVEOPT, f"bad IHAVEOPT {ihave:#x} (oldstyle?)")
        self.hflags = hflags
        return hflags

    def start(self, cflags=C_FIXED | C_NO_ZEROES):
        self.greeting()
        self.send(struct.pack(">I", cflags))
        self.cflags = cflags

    def send_opt(self, opt, data=b"", length=None, magic=IHAVEOPT):
        self.send(struct.pack(">QII", magic, opt, len(data) if length is None else length) + data)

    def read_opt_reply(self, opt):
        magic, ropt, typ, ln = struct.unpack(">QIII", self.recv(20))
        need(magic == OPT_REPLY_MAGIC, f"bad option reply magic {magic:#x}")
        need(ropt == opt, f"option reply echoes option {ropt}, expected {opt}")
        need(ln <= 16 * MiB, f"option reply length {ln} is absurd")
        return typ, (self.recv(ln) if ln else b"")

    def option(self, opt, data=b""):
        """Send an option; returns (intermediate replies, final type, final data)."""
        self.send_opt(opt, data)
        return self.replies(opt)

    def replies(self, opt):
        inter = []
        while True:
            typ, d = self.read_opt_reply(opt)
            if typ == REP_ACK or typ & ERR:
                return inter, typ, d
            inter.append((typ, d))
            need(len(inter) < 100000, "endless option replies")

    def list_exports(self):
        inter, typ, d = self.option(OPT_LIST)
        need(typ == REP_ACK, f"LIST: final reply {rname(typ)} {d!r}")
        names = []
        for rtyp, rd in inter:
            need(rtyp == REP_SERVER, f"LIST: unexpected reply {rname(rtyp)}")
            need(len(rd) >= 4, f"LIST: short REP_SERVER {rd!r}")
            (ln,) = struct.unpack(">I", rd[:4])
            need(ln <= len(rd) - 4, f"LIST: name length {ln} exceeds reply ({len(rd)})")
            names.append(rd[4:4 + ln].decode())
        return names

    def info_go(self, opt, name, infos=()):
        name = name.encode() if isinstance(name, str) else name
        data = (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))
        inter, typ, d = self.option(opt, data)
        res = {"final": typ, "final_data": d, "replies": inter}
        for rtyp, rd in inter:
            need(rtyp == REP_INFO, f"unexpected reply {rname(rtyp)} to INFO/GO")
            need(len(rd) >= 2, "short REP_INFO")
            (itype,) = struct.unpack(">H", rd[:2])
            if itype == INFO_EXPORT:
                need(len(rd) == 12, f"INFO_EXPORT length {len(rd)} != 12")
                res["size"], res["tflags"] = struct.unpack(">QH", rd[2:])
            elif itype == INFO_NAME:
                res["name"] = rd[2:].decode()
            elif itype == INFO_DESCRIPTION:
                res["description"] = rd[2:].decode()
            elif itype == INFO_BLOCK_SIZE:
                need(len(rd) == 14, f"INFO_BLOCK_SIZE length {len(rd)} != 14")
                res["block_size"] = struct.unpack(">III", rd[2:])
        if typ == REP_ACK:
            need("size" in res, "INFO/GO succeeded without NBD_INFO_EXPORT")
        return res

    def export_name(self, name):
        """NBD_OPT_EXPORT_NAME; reads size+flags (+124 zeroes unless NO_ZEROES)."""
        name = name.encode() if isinstance(name, str) else name
        self.send_opt(OPT_EXPORT_NAME, name)
        self.size, self.tflags = struct.unpack(">QH", self.recv(10))
        if not (self.cflags & C_NO_ZEROES):
            pad = self.recv(124)
            need(pad == bytes(124), "EXPORT_NAME padding is not 124 zero bytes")
        return self.size, self.tflags

    def go(self, name, structured=True, meta=None, infos=()):
        """Negotiate (optionally structured replies + SET_META_CONTEXT) and GO."""
        self.start()
        if structured:
            _, typ, d = self.option(OPT_STRUCTURED_REPLY)
            # Servers without structured replies may refuse; the node must not.
            need(typ == REP_ACK or (typ == REP_ERR_UNSUP and not self.ctx.node and meta is None),
                 f"STRUCTURED_REPLY: {rname(typ)} {d!r}")
            self.structured = typ == REP_ACK
        self.meta_ids = {}
        if meta is not None:
            inter, typ, d = self.option(OPT_SET_META_CONTEXT, meta_data(name, meta))
            need(typ == REP_ACK, f"SET_META_CONTEXT: {rname(typ)} {d!r}")
            for rtyp, rd in inter:
                need(rtyp == REP_META_CONTEXT, f"SET_META_CONTEXT: reply {rname(rtyp)}")
                (cid,) = struct.unpack(">I", rd[:4])
                self.meta_ids[rd[4:].decode()] = cid
        res = self.info_go(OPT_GO, name, infos)
        need(res["final"] == REP_ACK, f"GO {name!r}: {rname(res['final'])} {res['final_data']!r}")
        self.size, self.tflags = res["size"], res["tflags"]
        return res

    # --- transmission ---
    def request(self, typ, offset=0, length=0, flags=0, cookie=None, payload=b"",
                magic=REQ_MAGIC):
        if cookie is None:
            cookie = self.next_cookie
            self.next_cookie += 1
        self.send(struct.pack(">IHHQQI", magic, flags, typ, cookie, offset, length) + payload)
        return cookie

    def read_reply(self, read_len):
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            n = read_len.get(cookie, 0) if err == 0 else 0
            return Simple(err, cookie, self.recv(n) if n else b"")
        if magic == STRUCT_MAGIC:
            need(self.structured, "structured reply chunk without STRUCTURED_REPLY negotiated")
            flags, typ, cookie, ln = struct.unpack(">HHQI", self.recv(16))
            return Chunk(flags, typ, cookie, self.recv(ln) if ln else b"")
        raise Fail(f"bad reply magic {magic:#x}")

    def collect(self, pending):
        """Read replies for every pending {cookie: Req}; returns {cookie: Result}."""
        results, partial = {}, {}
        while len(results) < len(pending):
            read_len = {c: r.length for c, r in pending.items()
                        if r.typ == CMD_READ and c not in results}
            r = self.read_reply(read_len if not self.structured else {})
            need(r.cookie in pending, f"reply for cookie {r.cookie:#x} that was never sent")
            need(r.cookie not in results, f"second reply for finished cookie {r.cookie:#x}")
            req = pending[r.cookie]
            if isinstance(r, Simple):
                need(not (self.structured and req.typ == CMD_READ),
                     "simple reply to READ after structured replies were negotiated")
                need(r.cookie not in partial, "simple reply after structured chunks")
                results[r.cookie] = Result(err=r.err, data=r.data, simple=True)
            else:
                partial.setdefault(r.cookie, []).append(r)
                if r.flags & RF_DONE:
                    results[r.cookie] = finish(req, partial.pop(r.cookie))
        return results

    def cmd(self, typ, offset=0, length=0, flags=0, payload=b"", cookie=None):
        c = self.request(typ, offset, length, flags, cookie, payload)
        return self.collect({c: Req(typ, offset, length)})[c]

    def read(self, offset, length, flags=0):
        return self.cmd(CMD_READ, offset, length, flags)

    def write(self, offset, data, flags=0):
        return self.cmd(CMD_WRITE, offset, len(data), flags, data)


def finish(req, chunks):
    """Validate and assemble the chunks of one structured reply."""
    err = 0
    data = bytearray(req.length) if req.typ == CMD_READ else bytearray()
    covered = []
    extents = {}
    for i, ch in enumerate(chunks):
        last = i == len(chunks) - 1
        need(bool(ch.flags & RF_DONE) == last, "DONE flag not on exactly the last chunk")
        p = ch.payload
        if ch.typ == RT_NONE:
            need(last and len(p) == 0, "NONE chunk must be final and empty")
        elif ch.typ in (RT_ERROR, RT_ERROR_OFFSET):
            need(len(p) >= 6, "short error chunk")
            e, mlen = struct.unpack(">IH", p[:6])
            need(e != 0, "error chunk with error 0")
            need(6 + mlen <= len(p), "error message overruns chunk")
            if ch.typ == RT_ERROR_OFFSET:
                need(len(p) == 6 + mlen + 8, "ERROR_OFFSET chunk has bad length")
                (eoff,) = struct.unpack(">Q", p[6 + mlen:])
                need(req.offset <= eoff < req.offset + req.length, "ERROR_OFFSET outside request")
            err = err or e
        elif ch.typ in (RT_OFFSET_DATA, RT_OFFSET_HOLE):
            need(req.typ == CMD_READ, f"content chunk for command {req.typ}")
            (off,) = struct.unpack(">Q", p[:8])
            if ch.typ == RT_OFFSET_DATA:
                ln = len(p) - 8
                body = p[8:]
            else:
                need(len(p) == 12, "OFFSET_HOLE chunk length != 12")
                (ln,) = struct.unpack(">I", p[8:12])
                body = bytes(ln)
            need(ln > 0, "content chunk describing 0 bytes")
            need(req.offset <= off and off + ln <= req.offset + req.length,
                 f"chunk [{off}, +{ln}) outside the request [{req.offset}, +{req.length})")
            for a, b in covered:
                need(off + ln <= a or off >= b, "overlapping content chunks")
            covered.append((off, off + ln))
            data[off - req.offset:off - req.offset + ln] = body
        elif ch.typ == RT_BLOCK_STATUS:
            need(req.typ == CMD_BLOCK_STATUS, "BLOCK_STATUS chunk for another command")
            need(len(p) >= 12 and (len(p) - 4) % 8 == 0, "bad BLOCK_STATUS chunk length")
            (cid,) = struct.unpack(">I", p[:4])
            need(cid not in extents, "two BLOCK_STATUS chunks for one context")
            extents[cid] = [struct.unpack(">II", p[j:j + 8]) for j in range(4, len(p), 8)]
        else:
            raise Fail(f"unknown reply chunk type {ch.typ}")
    if req.typ == CMD_READ and err == 0:
        total = sum(b - a for a, b in covered)
        need(total == req.length, f"successful read covers {total} of {req.length} bytes")
    return Result(err=err, data=bytes(data), simple=False, chunks=chunks, extents=extents)


def meta_data(name, queries):
    name = name.encode() if isinstance(name, str) else name
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        q = q.encode() if isinstance(q, str) else q
        out += struct.pack(">I", len(q)) + q
    return out


# --- the suite --------------------------------------------------------------------------------

CHECKS = []
NOTES = []


def note(msg):
    """Informational remark printed under the check's result line."""
    NOTES.append(msg)


def check(fn):
    CHECKS.append(fn)
    return fn


class Ctx:
    def __init__(self, a):
        self.a = a
        self.node = a.node
        u = urllib.parse.urlparse(a.rw_uri)
        self.host, self.port = u.hostname, u.port or 10809
        self.rw = u.path.lstrip("/")
        self.rw_uri = a.rw_uri
        self.ro_uri = a.ro_uri
        self.big_uri = a.big_uri
        self.ro = urllib.parse.urlparse(a.ro_uri).path.lstrip("/") if a.ro_uri else None
        self.exports = [e for e in (a.exports or "").split(",") if e]
        self.pid = a.server_pid
        h = connect(self.rw_uri)
        self.size = h.get_size()
        need(self.size >= 64 * MiB, f"rw export must be >= 64 MiB, is {self.size}")
        self.sentinel_off = self.size - 2 * MiB
        self.sentinel = pattern(0x5E47, MiB)
        h.pwrite(self.sentinel, self.sentinel_off)
        h.flush()
        close(h)

    def same_server(self, uri):
        u = urllib.parse.urlparse(uri)
        return (u.hostname, u.port or 10809) == (self.host, self.port)

    def raw(self, **kw):
        return Raw(self, **kw)

    def rss_kib(self):
        if not self.pid:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def healthy(self):
        if self.pid:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                raise Fail(f"server pid {self.pid} is gone")
        h = connect(self.rw_uri)
        try:
            got = h.pread(len(self.sentinel), self.sentinel_off)
            need(got == self.sentinel, "sentinel data changed")
            need(h.get_size() == self.size, "export size changed")
        finally:
            close(h)


# ---------- handshake -------------------------------------------------------------------------

@check
def greeting_flags(ctx):
    with ctx.raw() as r:
        hf = r.greeting()
        need(hf & FLAG_FIXED_NEWSTYLE, "FIXED_NEWSTYLE not advertised")
        need(hf & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) == 0, f"unknown handshake flags {hf:#x}")
        if ctx.node:
            need(hf & FLAG_NO_ZEROES, "NO_ZEROES not advertised")


@check
def unknown_client_flags_drop_connection(ctx):
    for flags in (C_FIXED | C_NO_ZEROES | 4, C_FIXED | (1 << 31), 0xFFFFFFFF):
        with ctx.raw() as r:
            r.greeting()
            r.send(struct.pack(">I", flags))
            try:
                r.send_opt(OPT_LIST)
            except Closed:
                continue
            r.expect_closed(f"client flags {flags:#x}")


@check
def garbage_instead_of_client_flags(ctx):
    with ctx.raw() as r:
        r.greeting()
        try:
            r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        except Closed:
            return
        r.expect_closed("HTTP request as client flags")


@check
def bad_option_magic(ctx):
    with ctx.raw() as r:
        r.start()
        try:
            r.send_opt(OPT_LIST, magic=0x1122334455667788)
            r.send_opt(OPT_LIST)
        except Closed:
            return
        # A server may close, or (having lost framing) anything but a valid LIST answer.
        try:
            names = r.list_exports()
        except (Closed, Fail):
            return
        raise Fail(f"server answered LIST after a bad option magic as if valid: {names}")


@check
def option_length_0xffffffff(ctx):
    rss0 = ctx.rss_kib()
    for opt in (OPT_GO, OPT_INFO, 0x7777):
        with ctx.raw() as r:
            r.start()
            try:
                r.send_opt(opt, b"\0\0\0\0\0\0", length=0xFFFFFFFF)
                r.send(bytes(64 * 1024))
            except Closed:
                continue
            o = r.outcome(wait=2)
            note(f"option {opt:#x} with length 0xffffffff: server {o}")
            if o == "data":
                try:
                    typ, _ = r.read_opt_reply(opt)
                except Closed:
                    continue
                need(typ & ERR, f"option {opt} with length 0xffffffff got {rname(typ)}")
    rss1 = ctx.rss_kib()
    if rss0 is not None and rss1 is not None:
        need(rss1 - rss0 < 512 * 1024,
             f"server RSS grew {rss0} -> {rss1} KiB after 4 GiB option lengths")


@check
def unknown_option_unsup_keeps_framing(ctx):
    with ctx.raw() as r:
        r.start()
        for opt, data in ((0x4242, b"hello"), (OPT_PEEK_EXPORT, b""), (0xFFFF0000, bytes(300)),
                          (11, b""), (12, b"x" * 20)):
            inter, typ, d = r.option(opt, data)
            need(not inter, f"option {opt:#x}: intermediate replies {inter}")
            if opt == 11 and typ & ERR == 0:
                raise Fail("EXTENDED_HEADERS (11) must be refused (not implemented)")
            need(typ == REP_ERR_UNSUP, f"option {opt:#x}: expected ERR_UNSUP, got {rname(typ)}")
        names = r.list_exports()
        need(names, "LIST after unknown options returned nothing")


@check
def list_exports(ctx):
    with ctx.raw() as r:
        r.start()
        names = r.list_exports()
        for e in ctx.exports:
            need(e in names, f"export {e!r} not in LIST {names}")
        if ctx.exports:
            need(sorted(names) == sorted(ctx.exports), f"LIST {names} != {ctx.exports}")
        # Twice on one connection: stateless.
        need(sorted(r.list_exports()) == sorted(names), "second LIST differs")
    h = connect(ctx.rw_uri, opt_mode=True)
    got = []
    h.opt_list(lambda name, desc: got.append(name) or 0)
    need(sorted(got) == sorted(names), f"libnbd opt_list {got} != raw {names}")
    h.opt_abort()


@check
def list_with_data_is_invalid_and_keeps_framing(ctx):
    with ctx.raw() as r:
        r.start()
        inter, typ, d = r.option(OPT_LIST, b"unexpected data")
        need(typ == REP_ERR_INVALID, f"LIST with data: expected ERR_INVALID, got {rname(typ)}")
        need(not inter, f"LIST with data: replies before the error {inter}")
        need(r.list_exports(), "LIST after the invalid one failed")


@check
def abort_gets_ack(ctx):
    for data in (b"", b"ignored data"):
        with ctx.raw() as r:
            r.start()
            try:
                inter, typ, d = r.option(OPT_ABORT, data)
            except Closed:
                raise Fail(f"ABORT (data={data!r}): closed without ACK")
            need(typ == REP_ACK and not inter, f"ABORT: {rname(typ)}, {inter}")
            r.expect_closed("after ABORT ACK")
    h = connect(ctx.rw_uri, opt_mode=True)
    h.opt_abort()
    need(h.aio_is_closed(), "libnbd: not closed after opt_abort")


@check
def starttls_refused_not_tls_reqd(ctx):
    with ctx.raw() as r:
        r.start()
        inter, typ, d = r.option(OPT_STARTTLS)
        need(typ in (REP_ERR_UNSUP, REP_ERR_POLICY),
             f"STARTTLS without TLS: expected ERR_UNSUP/ERR_POLICY, got {rname(typ)}")
        inter, typ, d = r.option(OPT_STARTTLS, b"data")
        need(typ & ERR and typ != REP_ERR_TLS_REQD, f"STARTTLS with data: {rname(typ)}")
        need(r.list_exports(), "LIST after STARTTLS failed")


@check
def info_and_go_agree(ctx):
    uris = [u for u in (ctx.rw_uri, ctx.ro_uri, ctx.big_uri) if u and ctx.same_server(u)]
    for uri in uris:
        name = urllib.parse.urlparse(uri).path.lstrip("/")
        infos = (INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)
        with ctx.raw() as r:
            r.start()
            i = r.info_go(OPT_INFO, name, infos)
            need(i["final"] == REP_ACK, f"INFO {name}: {rname(i['final'])}")
            i2 = r.info_go(OPT_INFO, name, infos)
            g = r.info_go(OPT_GO, name, infos)
            need(g["final"] == REP_ACK, f"GO {name}: {rname(g['final'])}")
            for k in ("size", "tflags", "block_size", "name"):
                need(i.get(k) == g.get(k) == i2.get(k),
                     f"{name}: INFO and GO disagree on {k}: {i.get(k)} / {g.get(k)}")
            h = connect(uri)
            need(g["size"] == h.get_size(), f"{name}: GO size {g['size']} != libnbd {h.get_size()}")
            close(h)
            need(g["size"] > 0, f"{name}: size 0")
            # Transmission phase really started: a read works.
            res = r.read(0, 512)
            need(res.err == 0 and len(res.data) == 512, f"read after GO: {ename(res.err)}")
            if "block_size" in g:
                mn, pref, mx = g["block_size"]
                need(mn & (mn - 1) == 0 and mn <= 65536, f"bad minimum block size {mn}")
                need(pref & (pref - 1) == 0 and pref >= max(mn, 512), f"bad preferred {pref}")
                need(mx >= pref, f"maximum {mx} < preferred {pref}")
            if ctx.node:
                need(g.get("block_size") == (1, 4096, 32 * MiB),
                     f"{name}: block sizes {g.get('block_size')} != (1, 4096, 32M)")
                need(g.get("name") in (None, name), f"INFO_NAME {g.get('name')!r} != {name!r}")


@check
def info_via_libnbd_opt_mode(ctx):
    h = connect(ctx.rw_uri, opt_mode=True)
    h.set_full_info(True)
    h.opt_info()
    size = h.get_size()
    ro = h.is_read_only()
    mc = h.can_multi_conn()
    bs = [h.get_block_size(x) for x in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    h.opt_go()
    need(h.aio_is_ready(), "not ready after opt_go")
    need(h.get_size() == size == ctx.size, f"opt_info size {size} vs go {h.get_size()}")
    need(h.is_read_only() == ro and h.can_multi_conn() == mc, "flags differ INFO vs GO")
    if ctx.node:
        need(bs == [1, 4096, 32 * MiB], f"block sizes {bs}")
        need(mc, "CAN_MULTI_CONN not advertised")
    close(h)
    # INFO on an unknown export fails and negotiation continues.
    h = connect(ctx.rw_uri, opt_mode=True)
    h.set_export_name("no-such-export")
    expect_err("opt_info unknown export", h.opt_info)
    h.set_export_name(ctx.rw)
    h.opt_go()
    need(h.get_size() == ctx.size, "GO after failed INFO")
    close(h)


@check
def default_export(ctx):
    if not ctx.a.default_is:
        raise Skip("no --default-is")
    with ctx.raw() as r:
        r.start()
        d = r.info_go(OPT_INFO, "", (INFO_NAME,))
        n = r.info_go(OPT_INFO, ctx.a.default_is, ())
        need(d["final"] == REP_ACK, f"INFO '': {rname(d['final'])}")
        need(d["size"] == n["size"] and d["tflags"] == n["tflags"],
             f"default export {d} differs from {ctx.a.default_is}: {n}")


@check
def unknown_export_err_unknown(ctx):
    with ctx.raw() as r:
        r.start()
        for opt in (OPT_INFO, OPT_GO):
            res = r.info_go(opt, "no-such-export-xyz", (INFO_BLOCK_SIZE,))
            need(res["final"] == REP_ERR_UNKNOWN,
                 f"{opt}: unknown export: expected ERR_UNKNOWN, got {rname(res['final'])}")
            need(not res["replies"], f"REP_INFO sent before the error: {res['replies']}")
        need(r.list_exports(), "LIST after ERR_UNKNOWN")
        g = r.info_go(OPT_GO, ctx.rw)
        need(g["final"] == REP_ACK, "GO after ERR_UNKNOWN failed")


@check
def malformed_info_go_keeps_framing(ctx):
    name = ctx.rw.encode()
    bad = [
        # name length larger than the data
        struct.pack(">I", 1000) + name + struct.pack(">H", 0),
        # fewer bytes than the fixed part
        b"\0\0",
        # info count says 5, no entries
        struct.pack(">I", len(name)) + name + struct.pack(">H", 5),
        # odd trailing byte
        struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 0) + b"\0",
    ]
    with ctx.raw() as r:
        r.start()
        for opt in (OPT_INFO, OPT_GO):
            for data in bad:
                inter, typ, d = r.option(opt, data)
                need(typ == REP_ERR_INVALID,
                     f"malformed {opt} {data!r}: expected ERR_INVALID, got {rname(typ)}")
                need(not inter, f"malformed {opt}: replies before error {inter}")
        # Name longer than 4096 bytes: any error, framing kept.
        long = b"n" * 5000
        inter, typ, d = r.option(OPT_GO, struct.pack(">I", len(long)) + long + b"\0\0")
        need(typ & ERR, f"GO with a 5000-byte name: {rname(typ)}")
        need(r.list_exports(), "LIST after malformed INFO/GO")
        g = r.info_go(OPT_GO, ctx.rw)
        need(g["final"] == REP_ACK, f"GO after malformed options: {rname(g['final'])}")
        r.structured = False
        res = r.read(0, 4096)
        need(res.err == 0, "read after GO")


@check
def structured_reply_option(ctx):
    with ctx.raw() as r:
        r.start()
        inter, typ, d = r.option(OPT_STRUCTURED_REPLY, b"junk")
        need(typ == REP_ERR_INVALID, f"STRUCTURED_REPLY with data: {rname(typ)}")
        inter, typ, d = r.option(OPT_STRUCTURED_REPLY)
        need(typ == REP_ACK, f"STRUCTURED_REPLY: {rname(typ)}")
        inter, typ, d = r.option(OPT_STRUCTURED_REPLY)
        need(typ in (REP_ACK, REP_ERR_INVALID), f"repeated STRUCTURED_REPLY: {rname(typ)}")
        need(r.list_exports(), "LIST after STRUCTURED_REPLY")


@check
def list_meta_context(ctx):
    name = ctx.rw
    with ctx.raw() as r:
        r.start()
        _, typ, _ = r.option(OPT_STRUCTURED_REPLY)
        need(typ == REP_ACK, "STRUCTURED_REPLY")

        def names(queries):
            inter, typ, d = r.option(OPT_LIST_META_CONTEXT, meta_data(name, queries))
            need(typ == REP_ACK, f"LIST_META_CONTEXT {queries}: {rname(typ)} {d!r}")
            out = []
            for rtyp, rd in inter:
                need(rtyp == REP_META_CONTEXT, f"LIST_META_CONTEXT reply {rname(rtyp)}")
                need(len(rd) > 4, "short META_CONTEXT reply")
                out.append(rd[4:].decode())
            return out

        need("base:allocation" in names(["base:allocation"]), "base:allocation not listed")
        need("base:allocation" in names([]), "zero queries must list all contexts")
        need("base:allocation" in names(["base:"]), "base: wildcard must list base:allocation")
        got = names(["x-unknown-ns:foo"])
        need(got == [], f"unknown namespace must be ignored, got {got}")
        got = names(["base:no-such-leaf"])
        need(got == [], f"unknown base: leaf must be ignored, got {got}")
        # Syntactically bad: query length beyond the option.
        bad = struct.pack(">I", len(name)) + name.encode() + struct.pack(">II", 1, 500) + b"base:"
        inter, typ, d = r.option(OPT_LIST_META_CONTEXT, bad)
        need(typ == REP_ERR_INVALID, f"truncated query: expected ERR_INVALID, got {rname(typ)}")
        inter, typ, d = r.option(OPT_LIST_META_CONTEXT, b"\0\0")
        need(typ == REP_ERR_INVALID, f"2-byte LIST_META_CONTEXT: {rname(typ)}")
        need(r.list_exports(), "LIST after LIST_META_CONTEXT")
    h = connect(ctx.rw_uri, opt_mode=True)
    got = []
    n = h.opt_list_meta_context(lambda s: got.append(s) or 0)
    need(n >= 1 and "base:allocation" in got, f"libnbd opt_list_meta_context: {n} {got}")
    h.opt_abort()


@check
def set_meta_context(ctx):
    name = ctx.rw
    with ctx.raw() as r:
        r.start()
        # Before STRUCTURED_REPLY: SHOULD be ERR_INVALID.
        inter, typ, d = r.option(OPT_SET_META_CONTEXT, meta_data(name, ["base:allocation"]))
        need(typ & ERR, f"SET_META_CONTEXT without structured replies: {rname(typ)}")
        if ctx.node:
            need(typ == REP_ERR_INVALID, f"expected ERR_INVALID, got {rname(typ)}")
        _, typ, _ = r.option(OPT_STRUCTURED_REPLY)
        need(typ == REP_ACK, "STRUCTURED_REPLY")
        for q in (["base:"], ["base:nope"], ["x-foo:bar"], []):
            inter, typ, d = r.option(OPT_SET_META_CONTEXT, meta_data(name, q))
            need(typ == REP_ACK and not inter, f"SET_META_CONTEXT {q}: {rname(typ)} {inter}")
        inter, typ, d = r.option(OPT_SET_META_CONTEXT, meta_data(name, ["base:allocation"]))
        need(typ == REP_ACK and len(inter) == 1, f"SET base:allocation: {rname(typ)} {inter}")
        rtyp, rd = inter[0]
        need(rtyp == REP_META_CONTEXT and rd[4:] == b"base:allocation", f"reply {inter}")
        (cid,) = struct.unpack(">I", rd[:4])
        bad = struct.pack(">I", 4000) + b"x"
        inter, typ, d = r.option(OPT_SET_META_CONTEXT, bad)
        need(typ == REP_ERR_INVALID, f"malformed SET_META_CONTEXT: {rname(typ)}")
        # That failure replaced the selection; select again, then GO and use it.
        inter, typ, d = r.option(OPT_SET_META_CONTEXT, meta_data(name, ["base:allocation"]))
        need(typ == REP_ACK and len(inter) == 1, "SET again")
        (cid,) = struct.unpack(">I", inter[0][1][:4])
        g = r.info_go(OPT_GO, name)
        need(g["final"] == REP_ACK, "GO")
        r.structured = True
        r.write(0, pattern(1, 4096))
        res = r.cmd(CMD_BLOCK_STATUS, 0, 1 * MiB)
        need(res.err == 0, f"BLOCK_STATUS: {ename(res.err)}")
        need(list(res.extents) == [cid], f"BLOCK_STATUS contexts {list(res.extents)} != [{cid}]")
        ext = res.extents[cid]
        need(ext[0][0] >= 1 and ext[0][1] & STATE_HOLE == 0, f"written data reported hole {ext}")
        need(sum(e[0] for e in ext[:-1]) < MiB, f"extents overrun {ext}")
    # With nothing selected, BLOCK_STATUS is EINVAL.
    with ctx.raw() as r:
        r.go(name, structured=True, meta=[])
        res = r.cmd(CMD_BLOCK_STATUS, 0, 4096)
        need(res.err == EINVAL, f"BLOCK_STATUS without contexts: {ename(res.err)}")
        need(r.read(0, 512).err == 0, "connection after BLOCK_STATUS error")


@check
def transmission_flags(ctx):
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        tf = r.tflags
    with ctx.raw() as r:
        r.go(ctx.rw, structured=False)
        tf_simple = r.tflags
    need(tf & TF_HAS_FLAGS, "HAS_FLAGS not set")
    need(tf_simple & TF_SEND_DF == 0, "SEND_DF advertised without structured replies")
    need(not (tf & TF_SEND_FAST_ZERO) or tf & TF_SEND_WRITE_ZEROES, "FAST_ZERO without WRITE_ZEROES")
    need(tf & TF_READ_ONLY == 0, "rw export is READ_ONLY")
    if ctx.node:
        want = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
                | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE | TF_SEND_FAST_ZERO)
        need(tf == want, f"transmission flags {tf:#x} != {want:#x}")
        need(tf_simple == want & ~TF_SEND_DF, f"flags without SR {tf_simple:#x}")
    if ctx.ro_uri and ctx.same_server(ctx.ro_uri):
        with ctx.raw() as r:
            r.go(ctx.ro, structured=True)
            need(r.tflags & TF_READ_ONLY, f"ro export flags {r.tflags:#x} lack READ_ONLY")
            need(r.tflags & TF_HAS_FLAGS, "HAS_FLAGS")


@check
def export_name_no_zeroes(ctx):
    with ctx.raw() as r:
        r.start(C_FIXED | C_NO_ZEROES)
        size, tf = r.export_name(ctx.rw)
        need(size == ctx.size, f"EXPORT_NAME size {size} != {ctx.size}")
        need(tf & TF_HAS_FLAGS, "HAS_FLAGS")
        # No padding: the very next bytes are our read's reply.
        res = r.read(ctx.sentinel_off, 4096)
        need(res.err == 0 and res.data == ctx.sentinel[:4096], "read after EXPORT_NAME")


@check
def export_name_with_zero_padding(ctx):
    with ctx.raw() as r:
        r.start(C_FIXED)
        size, tf = r.export_name(ctx.rw)
        need(size == ctx.size, f"EXPORT_NAME size {size} != {ctx.size}")
        res = r.read(ctx.sentinel_off, 4096)
        need(res.err == 0 and res.data == ctx.sentinel[:4096], "read after EXPORT_NAME")


@check
def export_name_nonfixed_newstyle(ctx):
    with ctx.raw() as r:
        r.start(0)
        size, tf = r.export_name(ctx.rw)
        need(size == ctx.size, "size")
        res = r.read(ctx.sentinel_off, 512)
        need(res.err == 0 and res.data == ctx.sentinel[:512], "read after non-fixed EXPORT_NAME")
    # libnbd as an old-style client: no handshake flags, only EXPORT_NAME possible.
    h = connect(ctx.rw_uri, hflags=0)
    need(not h.get_structured_replies_negotiated(), "structured replies with hflags=0?")
    need(h.get_size() == ctx.size, "size via EXPORT_NAME")
    need(h.pread(4096, ctx.sentinel_off) == ctx.sentinel[:4096], "read via EXPORT_NAME")
    h.pwrite(pattern(7, 8192), 3 * MiB)
    need(h.pread(8192, 3 * MiB) == pattern(7, 8192), "write via EXPORT_NAME")
    close(h)
    # NO_ZEROES only (no FIXED_NEWSTYLE)
    h = connect(ctx.rw_uri, hflags=nbd.HANDSHAKE_FLAG_NO_ZEROES)
    need(h.pread(512, ctx.sentinel_off) == ctx.sentinel[:512], "read, hflags=NO_ZEROES")
    close(h)


@check
def export_name_unknown_closes(ctx):
    with ctx.raw() as r:
        r.start()
        r.send_opt(OPT_EXPORT_NAME, b"no-such-export")
        r.expect_closed("EXPORT_NAME of an unknown export")


@check
def simple_replies_without_structured(ctx):
    h = connect(ctx.rw_uri, structured=False)
    need(not h.get_structured_replies_negotiated(), "structured negotiated")
    need(not h.can_df(), "can_df without structured replies")
    data = pattern(11, 256 * 1024)
    h.pwrite(data, 5 * MiB)
    need(h.pread(len(data), 5 * MiB) == data, "read back (simple replies)")
    h.set_strict_mode(0)
    expect_err("read past end (simple)", lambda: h.pread(4096, ctx.size), EINVAL)
    need(h.pread(512, 5 * MiB) == data[:512], "connection usable after simple error")
    close(h)
    with ctx.raw() as r:
        r.go(ctx.rw, structured=False)
        res = r.read(5 * MiB, 4096)
        need(res.simple and res.err == 0 and res.data == data[:4096], "raw simple read")
        res = r.read(ctx.size, 4096)
        need(res.simple and res.err == EINVAL and res.data == b"", f"raw simple err {res.err}")
        res = r.read(5 * MiB, 512)
        need(res.data == data[:512], "framing after simple error")


# ---------- transmission: data path -----------------------------------------------------------

@check
def read_write_roundtrip(ctx):
    h = connect(ctx.rw_uri)
    cases = [(0, 1), (1, 1), (4095, 3), (12345, 4097), (1 * MiB, MiB), (7 * MiB + 1, 100000),
             (8 * MiB, 32 * MiB)]
    for i, (off, ln) in enumerate(cases):
        d = pattern(100 + i, ln)
        h.pwrite(d, off)
        got = h.pread(ln, off)
        need(got == d, f"roundtrip at {off}+{ln} differs")
    # Neighbouring bytes untouched by a 1-byte write.
    h.pwrite(b"\xaa" * 3, 50 * MiB)
    h.pwrite(b"\x55", 50 * MiB + 1)
    need(h.pread(3, 50 * MiB) == b"\xaa\x55\xaa", "single-byte write clobbered neighbours")
    close(h)


@check
def flush_and_fua(ctx):
    h = connect(ctx.rw_uri)
    need(h.can_flush() and h.can_fua(), "flush/fua not advertised")
    d = pattern(21, MiB)
    h.pwrite(d, 9 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    need(h.pread(MiB, 9 * MiB) == d, "after FUA write + flush")
    # FUA MUST be accepted on every command when SEND_FUA is advertised.
    h.set_strict_mode(0)
    h.pread(4096, 9 * MiB, nbd.CMD_FLAG_FUA)
    h.flush(nbd.CMD_FLAG_FUA)
    if h.can_cache():
        h.cache(4096, 9 * MiB, nbd.CMD_FLAG_FUA)
    if h.can_zero():
        h.zero(4096, 10 * MiB, nbd.CMD_FLAG_FUA)
    if h.can_trim():
        h.trim(4096, 11 * MiB, nbd.CMD_FLAG_FUA)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        block_status(h, 4096, 9 * MiB, nbd.CMD_FLAG_FUA)
    close(h)


@check
def trim(ctx):
    h = connect(ctx.rw_uri)
    need(h.can_trim(), "trim not advertised")
    d = pattern(31, 3 * MiB)
    h.pwrite(d, 12 * MiB)
    h.trim(MiB, 13 * MiB)
    got = h.pread(3 * MiB, 12 * MiB)
    need(got[:MiB] == d[:MiB] and got[2 * MiB:] == d[2 * MiB:], "trim touched data outside range")
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        ext = block_status(h, MiB, 13 * MiB)
        st = ext[0][1]
        if st & STATE_ZERO:
            need(got[MiB:2 * MiB] == bytes(MiB), "trimmed range reported ZERO but has data")
        if ctx.node:
            need(st & STATE_ZERO, f"trimmed range not reported zero: {ext}")
    # Unaligned trim, and a trim larger than the maximum payload: must not disconnect.
    h.trim(1000, 12 * MiB + 17)
    need(h.pread(17, 12 * MiB) == d[:17], "unaligned trim clobbered bytes before it")
    try:
        h.trim(48 * MiB, 14 * MiB)
    except nbd.Error as e:
        need(e.errnum in (EINVAL, EOVERFLOW), f"trim > max payload: {ename(e.errnum)}")
    need(h.pread(4096, ctx.sentinel_off) == ctx.sentinel[:4096], "connection after big trim")
    close(h)


@check
def write_zeroes(ctx):
    h = connect(ctx.rw_uri)
    need(h.can_zero(), "WRITE_ZEROES not advertised")
    for i, flags in enumerate((0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA)):
        off = (16 + 3 * i) * MiB
        d = pattern(40 + i, 3 * MiB)
        h.pwrite(d, off)
        h.zero(MiB, off + MiB, flags)
        got = h.pread(3 * MiB, off)
        need(got[MiB:2 * MiB] == bytes(MiB), f"zeroed range (flags {flags}) not zero")
        need(got[:MiB] == d[:MiB] and got[2 * MiB:] == d[2 * MiB:], "zero touched outside range")
        # A hole-punching zero must be reported as zero (NO_HOLE may legitimately be
        # written out as data).
        if ctx.node and not flags & nbd.CMD_FLAG_NO_HOLE:
            ext = block_status(h, MiB, off + MiB)
            pos = 0
            for ln, fl in ext:
                if pos >= MiB:
                    break
                need(fl & STATE_ZERO, f"zeroed range (flags {flags}) not reported ZERO: {ext}")
                pos += ln
    # Unaligned zero.
    h.pwrite(b"\xff" * 8192, 26 * MiB)
    h.zero(5000, 26 * MiB + 100)
    got = h.pread(8192, 26 * MiB)
    need(got == b"\xff" * 100 + bytes(5000) + b"\xff" * 3092, "unaligned zero")
    close(h)


@check
def fast_zero(ctx):
    h = connect(ctx.rw_uri)
    if not h.can_fast_zero():
        if ctx.node:
            raise Fail("SEND_FAST_ZERO not advertised")
        raise Skip("server does not advertise FAST_ZERO")
    d = pattern(50, 2 * MiB)
    h.pwrite(d, 27 * MiB)
    try:
        h.zero(MiB, 27 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        need(h.pread(MiB, 27 * MiB) == bytes(MiB), "fast zero succeeded but data not zero")
    except nbd.Error as e:
        need(e.errnum == ENOTSUP, f"fast zero failed with {ename(e.errnum)}, not ENOTSUP")
        need(h.pread(MiB, 27 * MiB) == d[:MiB], "failed fast zero changed the contents")
        if ctx.node:
            raise Fail("fast zero on a sparse file store returned ENOTSUP")
    try:
        h.zero(MiB, 28 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        need(h.pread(MiB, 28 * MiB) == bytes(MiB), "fast zero + no hole: not zero")
    except nbd.Error as e:
        need(e.errnum == ENOTSUP, f"fast zero + no hole failed with {ename(e.errnum)}")
        need(h.pread(MiB, 28 * MiB) == d[MiB:], "failed fast zero + no hole changed data")
    close(h)


@check
def cache(ctx):
    h = connect(ctx.rw_uri)
    if not h.can_cache():
        if ctx.node:
            raise Fail("SEND_CACHE not advertised")
        raise Skip("no SEND_CACHE")
    d = pattern(60, MiB)
    h.pwrite(d, 29 * MiB)
    h.cache(MiB, 29 * MiB)
    h.cache(40 * MiB, 0)  # larger than the maximum payload: advisory
    need(h.pread(MiB, 29 * MiB) == d, "cache changed data")
    h.set_strict_mode(0)
    expect_err("cache past end", lambda: h.cache(4096, ctx.size), EINVAL)
    expect_err("cache with unknown flag", lambda: h.cache(4096, 0, 1 << 14), EINVAL)
    need(h.pread(MiB, 29 * MiB) == d, "connection after cache errors")
    close(h)


@check
def block_status_allocation(ctx):
    h = connect(ctx.rw_uri)
    need(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    base = 30 * MiB
    h.trim(4 * MiB, base)
    h.zero(4 * MiB, base)
    ext = block_status(h, 4 * MiB, base)
    need(ext[0][1] & STATE_ZERO, f"zeroed range not ZERO: {ext}")
    h.pwrite(pattern(70, MiB), base + MiB)
    ext = block_status(h, 4 * MiB, base)
    pos = 0
    for ln, fl in ext:
        if pos < 2 * MiB and pos + ln > MiB:  # overlaps the data
            need(fl & (STATE_HOLE | STATE_ZERO) == 0, f"data reported as hole/zero: {ext}")
        if fl & STATE_ZERO:
            need(h.pread(min(ln, 4 * MiB - pos), base + pos) == bytes(min(ln, 4 * MiB - pos)),
                 f"extent at +{pos} reported ZERO but has data")
        pos += ln
    need(pos >= 4 * MiB or len(ext) >= 1, "extents")
    # REQ_ONE: exactly one extent, not longer than requested.
    ext = block_status(h, 3 * MiB, base, nbd.CMD_FLAG_REQ_ONE)
    need(len(ext) == 1 and ext[0][0] <= 3 * MiB, f"REQ_ONE gave {ext}")
    # Unaligned query inside the data.
    ext = block_status(h, 1000, base + MiB + 7)
    need(ext[0][1] & STATE_HOLE == 0, f"unaligned query: {ext}")
    # Whole export; the extents stay within a sane count and start at 0.
    ext = block_status(h, ctx.size, 0)
    need(1 <= len(ext) <= (1 << 20), f"{len(ext)} extents")
    # Past the end: EINVAL.
    h.set_strict_mode(0)
    expect_err("block status past end", lambda: block_status(h, 4096, ctx.size), EINVAL)
    if ctx.node:
        expect_err("block status straddling end",
                   lambda: block_status(h, 8192, ctx.size - 4096), EINVAL)
    need(h.pread(512, ctx.sentinel_off) == ctx.sentinel[:512], "connection after errors")
    close(h)


@check
def df_reads(ctx):
    h = connect(ctx.rw_uri)
    if not h.can_df():
        if ctx.node:
            raise Fail("SEND_DF not advertised with structured replies")
        raise Skip("no DF")
    d = pattern(80, 64 * 1024)
    h.pwrite(d, 35 * MiB)
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(64 * 1024, 35 * MiB, cb, nbd.CMD_FLAG_DF)
    need(buf == d, "DF read data")
    need(len(chunks) == 1, f"DF read gave {len(chunks)} chunks")
    close(h)


@check
def structured_reads_over_data_and_holes(ctx):
    """Structured READs across data/hole boundaries, aligned and not: chunks stay inside the
    request, never overlap, cover it exactly, and reassemble to the right bytes."""
    base = 46 * MiB
    h = connect(ctx.rw_uri)
    h.trim(2 * MiB, base)
    h.zero(2 * MiB, base)
    pieces = [(4096, b"A" * 4096), (65536 + 17, b"B" * 1000), (MiB - 3, b"C" * 7)]
    for off, d in pieces:
        h.pwrite(d, base + off)
    expect = bytearray(2 * MiB)
    for off, d in pieces:
        expect[off:off + len(d)] = d
    close(h)
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        for off, ln in ((0, 2 * MiB), (4095, 3), (4000, 70000), (65536, 65536 + 4096),
                        (MiB - 5, 11), (1, 2 * MiB - 2), (8192, 4096)):
            res = r.read(base + off, ln)
            need(res.err == 0, f"read +{off} len {ln}: {ename(res.err)}")
            need(res.data == bytes(expect[off:off + ln]), f"read +{off} len {ln}: wrong data")
        # DF: one content chunk (or EOVERFLOW above 64 KiB).
        if r.tflags & TF_SEND_DF:
            for ln in (4096, 65536, MiB):
                res = r.cmd(CMD_READ, base, ln, CF_DF)
                content = [c for c in res.chunks if c.typ in (RT_OFFSET_DATA, RT_OFFSET_HOLE)]
                if res.err == EOVERFLOW and ln > 65536:
                    continue
                need(res.err == 0, f"DF read of {ln}: {ename(res.err)}")
                need(len(content) == 1, f"DF read of {ln} gave {len(content)} content chunks")
                need(res.data == bytes(expect[:ln]), f"DF read of {ln}: wrong data")


@check
def out_of_range(ctx):
    h = connect(ctx.rw_uri)
    h.set_strict_mode(0)
    S = ctx.size
    expect_err("write past end", lambda: h.pwrite(b"x" * 512, S), ENOSPC)
    expect_err("write straddling end", lambda: h.pwrite(b"x" * 1024, S - 512), ENOSPC)
    expect_err("zero past end", lambda: h.zero(4096, S), ENOSPC)
    expect_err("zero straddling end", lambda: h.zero(8192, S - 4096), ENOSPC)
    expect_err("read past end", lambda: h.pread(512, S), EINVAL)
    expect_err("read straddling end", lambda: h.pread(1024, S - 512), EINVAL)
    expect_err("trim past end", lambda: h.trim(4096, S), EINVAL)
    expect_err("cache past end", lambda: h.cache(4096, S + MiB), EINVAL)
    # Offsets near 2^64 must not wrap around.
    top = (1 << 64) - 512
    expect_err("read near 2^64", lambda: h.pread(1024, top), EINVAL)
    expect_err("write near 2^64", lambda: h.pwrite(b"y" * 1024, top), ENOSPC, EINVAL)
    expect_err("trim near 2^64", lambda: h.trim(1024, top), EINVAL)
    expect_err("zero near 2^64", lambda: h.zero(1024, top), ENOSPC, EINVAL)
    expect_err("block status near 2^64", lambda: block_status(h, 1024, top), EINVAL)
    need(h.pread(MiB, ctx.sentinel_off) == ctx.sentinel, "data/connection after range errors")
    # The last byte is fine.
    h.pwrite(b"z", S - 1)
    need(h.pread(1, S - 1) == b"z", "last byte")
    close(h)


@check
def zero_length_requests(ctx):
    h = connect(ctx.rw_uri)
    h.set_strict_mode(0)
    for what, fn in (("read", lambda: h.pread(0, 4096)),
                     ("write", lambda: h.pwrite(b"", 4096)),
                     ("trim", lambda: h.trim(0, 4096)),
                     ("zero", lambda: h.zero(0, 4096)),
                     ("cache", lambda: h.cache(0, 4096)),
                     ("read at end", lambda: h.pread(0, ctx.size))):
        try:
            fn()
        except nbd.Error as e:
            # Unspecified by the spec (only "SHOULD NOT disconnect"); the node promises
            # success or EINVAL.
            if ctx.node:
                need(e.errnum == EINVAL, f"zero-length {what}: {ename(e.errnum)} ({e.string})")
        need(not h.aio_is_closed() and not h.aio_is_dead(), f"disconnected by zero-length {what}")
    need(h.pread(4096, ctx.sentinel_off) == ctx.sentinel[:4096], "after zero-length requests")
    close(h)


@check
def unknown_flags_and_commands(ctx):
    h = connect(ctx.rw_uri)
    h.set_strict_mode(0)
    expect_err("read with unknown flag", lambda: h.pread(4096, 0, 1 << 15), EINVAL)
    expect_err("write with unknown flag", lambda: h.pwrite(b"q" * 4096, 0, 1 << 9), EINVAL)
    expect_err("flush with unknown flag", lambda: h.flush(1 << 12), EINVAL)
    expect_err("trim with unknown flag", lambda: h.trim(4096, 0, 1 << 13), EINVAL)
    expect_err("zero with unknown flag", lambda: h.zero(4096, 0, 1 << 14), EINVAL)
    expect_err("read with NO_HOLE", lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE), EINVAL)
    expect_err("write with REQ_ONE", lambda: h.pwrite(b"q" * 512, 0, nbd.CMD_FLAG_REQ_ONE), EINVAL)
    expect_err("trim with FAST_ZERO", lambda: h.trim(4096, 0, nbd.CMD_FLAG_FAST_ZERO), EINVAL)
    need(h.pread(4096, ctx.sentinel_off) == ctx.sentinel[:4096], "after flag errors")
    close(h)
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        for typ in (8, 9, 12, 31, 0xFFFF):
            res = r.cmd(typ, 0, 4096)
            need(res.err == EINVAL, f"unknown command {typ}: {ename(res.err)}")
        # A write with a bad flag must still have its payload consumed (framing kept).
        res = r.cmd(CMD_WRITE, 0, 4096, 1 << 11, payload=b"\xee" * 4096)
        need(res.err == EINVAL, f"write with unknown flag: {ename(res.err)}")
        res = r.read(ctx.sentinel_off, 4096)
        need(res.err == 0 and res.data == ctx.sentinel[:4096], "framing after bad-flag write")
        # READ with a bad flag gets a structured error, not a simple reply (checked in collect).
        res = r.cmd(CMD_READ, 0, 4096, 1 << 15)
        need(res.err == EINVAL and not res.simple, "bad-flag read: structured EINVAL")


@check
def cookies_echoed(ctx):
    cookies = [0, (1 << 64) - 1, 1 << 63, 0xDEADBEEFCAFEBABE, 1, 0x8000000000000001]
    with ctx.raw() as r:
        r.go(ctx.rw, structured=False)
        for c in cookies:
            res = r.collect({r.request(CMD_READ, ctx.sentinel_off, 512, cookie=c):
                             Req(CMD_READ, ctx.sentinel_off, 512)})
            need(list(res) == [c] and res[c].data == ctx.sentinel[:512], f"cookie {c:#x}")
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        pend = {}
        for c in cookies:
            r.request(CMD_READ, ctx.sentinel_off, 512, cookie=c)
            pend[c] = Req(CMD_READ, ctx.sentinel_off, 512)
        res = r.collect(pend)
        for c in cookies:
            need(res[c].err == 0 and res[c].data == ctx.sentinel[:512], f"cookie {c:#x}")


@check
def many_in_flight_libnbd(ctx):
    h = connect(ctx.rw_uri)
    rnd = random.Random(90)
    base = 36 * MiB
    n = 512
    slot = 48 * 1024
    sizes = [rnd.choice((512, 4096, 4096 * 3, 65536 // 2, slot)) for _ in range(n)]
    datas = [pattern(1000 + i, sizes[i]) for i in range(n)]
    bufs = [nbd.Buffer.from_bytearray(bytearray(d)) for d in datas]
    cookies = [h.aio_pwrite(bufs[i], base + i * slot) for i in range(n)]
    need(h.aio_in_flight() > 0, "nothing in flight")
    errs = aio_wait(h, cookies)
    bad = {c: e for c, e in errs.items() if e}
    need(not bad, f"{len(bad)} writes failed: {list(bad.values())[:5]}")
    rbufs = [nbd.Buffer(sizes[i]) for i in range(n)]
    cookies = [h.aio_pread(rbufs[i], base + i * slot) for i in range(n)]
    errs = aio_wait(h, cookies)
    need(not any(errs.values()), "reads failed")
    for i in range(n):
        need(bytes(rbufs[i].to_bytearray()) == datas[i], f"read {i} returned wrong data")
    close(h)


@check
def many_in_flight_raw_pipelined(ctx):
    n = 300
    base = 8 * MiB
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        pend = {}
        for i in range(n):
            c = r.request(CMD_WRITE, base + i * 4096, 4096, payload=pattern(2000 + i, 4096),
                          cookie=(i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
            pend[c] = Req(CMD_WRITE, base + i * 4096, 4096)
        res = r.collect(pend)
        need(all(x.err == 0 for x in res.values()), "pipelined writes failed")
        pend = {}
        for i in range(n):
            c = r.request(CMD_READ, base + i * 4096, 4096, cookie=(1 << 63) | i)
            pend[c] = Req(CMD_READ, base + i * 4096, 4096)
        res = r.collect(pend)
        for i in range(n):
            x = res[(1 << 63) | i]
            need(x.err == 0 and x.data == pattern(2000 + i, 4096), f"pipelined read {i}")


@check
def multi_conn_flush_visibility(ctx):
    a = connect(ctx.rw_uri)
    b = connect(ctx.rw_uri)
    need(a.can_multi_conn(), "CAN_MULTI_CONN not advertised")
    need(b.pread(4096, 60 * MiB) is not None, "warm B")  # B may have read old data first
    d = pattern(95, MiB)
    a.pwrite(d, 60 * MiB)
    a.flush()
    need(b.pread(MiB, 60 * MiB) == d, "write+flush on A not visible on B")
    d2 = pattern(96, 4096)
    b.pwrite(d2, 60 * MiB, nbd.CMD_FLAG_FUA)
    need(a.pread(4096, 60 * MiB) == d2, "FUA write on B not visible on A")
    close(a)
    close(b)


@check
def read_only_export(ctx):
    if not ctx.ro_uri:
        raise Skip("no --ro-uri")
    h = connect(ctx.ro_uri)
    need(h.is_read_only(), "ro export not READ_ONLY")
    h.set_strict_mode(0)
    size = h.get_size()
    before = h.pread(4096, 0)
    expect_err("write to ro", lambda: h.pwrite(b"w" * 4096, 0), EPERM)
    expect_err("FUA write to ro", lambda: h.pwrite(b"w" * 4096, 0, nbd.CMD_FLAG_FUA), EPERM)
    # EPERM; if the command is not even advertised on this export, EINVAL is fine too.
    trim_errs = (EPERM,) if h.can_trim() else (EPERM, EINVAL)
    zero_errs = (EPERM,) if h.can_zero() else (EPERM, EINVAL)
    expect_err("trim on ro", lambda: h.trim(4096, 0), *trim_errs)
    expect_err("zero on ro", lambda: h.zero(4096, 0), *zero_errs)
    need(h.pread(4096, 0) == before, "ro export changed")
    expect_err("read past end of ro", lambda: h.pread(512, size), EINVAL)
    if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        block_status(h, min(size, MiB), 0)
    close(h)


@check
def disc_finishes_outstanding_requests(ctx):
    d = pattern(110, 256 * 1024)
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        r.request(CMD_WRITE, 40 * MiB, len(d), payload=d)
        r.request(CMD_FLUSH)
        r.request(CMD_DISC)
        # The server may answer the write/flush, then must close.
        r.expect_closed("after NBD_CMD_DISC")
    h = connect(ctx.rw_uri)
    need(h.pread(len(d), 40 * MiB) == d, "write pipelined before DISC was not performed")
    close(h)


@check
def write_zeroes_larger_than_64mib(ctx):
    if not ctx.big_uri:
        raise Skip("no --big-uri")
    h = connect(ctx.big_uri)
    size = h.get_size()
    need(size >= 200 * MiB, f"big export is {size} bytes, need 200 MiB")
    chunk = 8 * MiB
    for off in range(0, 200 * MiB, chunk):
        h.pwrite(pattern(off, chunk), off)
    h.zero(160 * MiB, 16 * MiB)
    for off in range(0, 200 * MiB, chunk):
        got = h.pread(chunk, off)
        if 16 * MiB <= off < 176 * MiB:
            if got != bytes(chunk):
                first = next(i for i, b in enumerate(got) if b)
                raise Fail(f"WRITE_ZEROES of 160 MiB left data at offset {off + first}")
        else:
            need(got == pattern(off, chunk), f"data outside the zeroed range changed at {off}")
    # Also a single TRIM larger than 64 MiB: must not disconnect.
    try:
        h.trim(100 * MiB, 50 * MiB)
    except nbd.Error as e:
        need(e.errnum in (EINVAL, EOVERFLOW), f"100 MiB trim: {ename(e.errnum)}")
    need(h.pread(chunk, 0) == pattern(0, chunk), "data before the trim")
    close(h)


# ---------- malformed transmission input ------------------------------------------------------

@check
def bad_request_magic(ctx):
    with ctx.raw() as r:
        r.go(ctx.rw, structured=True)
        r.request(CMD_READ, 0, 4096, magic=0xBADC0FFE)
        o = r.outcome()
        if o == "data":
            # The server answered something; it must then not treat garbage as requests.
            pass
        elif o == "silent":
            raise Fail("bad request magic: server neither replied nor closed")


@check
def garbage_after_go(ctx):
    with ctx.raw() as r:
        r.go(ctx.rw, structured=False)
        try:
            r.send(os.urandom(4096))
        except Closed:
            return
        o = r.outcome()
        need(o != "silent", "garbage after GO: server neither replied nor closed")


@check
def oversized_write_length(ctx):
    rss0 = ctx.rss_kib()
    for length, off in ((0xFFFFFFFF, 0), (0x7FFFFFFF, 0), (1 << 30, 0)):
        with ctx.raw() as r:
            r.go(ctx.rw, structured=True)
            try:
                r.request(CMD_WRITE, off, length, payload=bytes(64 * 1024))
            except Closed:
                continue
            o = r.outcome(wait=2)
            note(f"WRITE of {length:#x} bytes (64 KiB sent): server {o}")
            if o == "data":
                try:
                    res = r.collect({r.next_cookie - 1: Req(CMD_WRITE, off, length)})
                    x = list(res.values())[0]
                    need(x.err in (EINVAL, EOVERFLOW, ENOMEM, ENOSPC),
                         f"{length:#x}-byte write: {ename(x.err)}")
                except Closed:
                    pass
    rss1 = ctx.rss_kib()
    if rss0 is not None and rss1 is not None:
        need(rss1 - rss0 < 512 * 1024, f"server RSS grew {rss0} -> {rss1} KiB")


@check
def write_over_max_payload(ctx):
    """48 MiB WRITE (over the 32 MiB maximum, under 64 MiB): error, disconnect, or done right."""
    uri = ctx.big_uri if ctx.big_uri and ctx.same_server(ctx.big_uri) else ctx.rw_uri
    name = urllib.parse.urlparse(uri).path.lstrip("/")
    d = pattern(120, 48 * MiB)
    with ctx.raw() as r:
        r.go(name, structured=True)
        try:
            c = r.request(CMD_WRITE, 0, len(d), payload=d)
            x = r.collect({c: Req(CMD_WRITE, 0, len(d))})[c]
        except Closed:
            x = None
        if x is not None:
            if x.err == 0:
                y = r.read(0, 4096)
                need(y.data == d[:4096], "48 MiB write succeeded but data differs")
            else:
                need(x.err in (EINVAL, EOVERFLOW, ENOMEM), f"48 MiB write: {ename(x.err)}")
                y = r.read(0, 512)  # framing kept after the error
                need(y.err == 0, "read after oversize write error")
        # Oversized READ: error or disconnect or (if served) the right length.
        try:
            c = r.request(CMD_READ, 0, 48 * MiB)
            x = r.collect({c: Req(CMD_READ, 0, 48 * MiB)})[c]
            need(x.err in (0, EINVAL, EOVERFLOW, ENOMEM), f"48 MiB read: {ename(x.err)}")
        except Closed:
            pass


@check
def client_resets(ctx):
    """Clients vanishing at every stage cost only their own connection."""

    def mid_handshake():
        r = ctx.raw()
        r.greeting()
        r.send(b"\0\0")
        r.reset()

    def mid_option():
        r = ctx.raw()
        r.start()
        r.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0\0\0\x05ab")
        r.reset()

    def mid_header():
        r = ctx.raw()
        r.go(ctx.rw)
        r.send(struct.pack(">IHH", REQ_MAGIC, 0, CMD_READ))
        r.reset()

    def mid_payload():
        r = ctx.raw()
        r.go(ctx.rw)
        r.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, 41 * MiB, MiB) + bytes(100000))
        r.reset()

    def large_reads_in_flight():
        r = ctx.raw()
        r.go(ctx.rw)
        for i in range(64):
            r.request(CMD_READ, (i % 32) * MiB, MiB)
        time.sleep(0.05)
        r.reset()

    def fin_mid_payload():
        r = ctx.raw()
        r.go(ctx.rw, structured=False)
        r.send(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, 41 * MiB, MiB) + bytes(1000))
        r.close()

    for step in (mid_handshake, mid_option, mid_header, mid_payload, large_reads_in_flight,
                 fin_mid_payload):
        try:
            step()
            time.sleep(0.1)
            ctx.healthy()
        except Exception as e:  # noqa: BLE001
            raise Fail(f"client reset {step.__name__}: {type(e).__name__}: {e}")


@check
def concurrent_connections(ctx):
    hs = [connect(ctx.rw_uri) for _ in range(16)]
    cookies = []
    bufs = []
    for i, h in enumerate(hs):
        b = nbd.Buffer.from_bytearray(bytearray(pattern(3000 + i, 64 * 1024)))
        bufs.append(b)
        cookies.append(h.aio_pwrite(b, 44 * MiB + i * 64 * 1024))
    for h, c in zip(hs, cookies):
        aio_wait(h, [c])
    for i, h in enumerate(hs):
        need(h.pread(64 * 1024, 44 * MiB + ((i + 1) % 16) * 64 * 1024)
             == pattern(3000 + (i + 1) % 16, 64 * 1024), f"connection {i} sees others' writes")
        close(h)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rw-uri", required=True)
    p.add_argument("--ro-uri")
    p.add_argument("--big-uri")
    p.add_argument("--exports")
    p.add_argument("--default-is")
    p.add_argument("--node", action="store_true")
    p.add_argument("--server-pid", type=int)
    p.add_argument("-k", dest="filter", action="append")
    a = p.parse_args()
    print(f"libnbd {nbd.NBD().get_version()[0]}; target {a.rw_uri}", flush=True)
    ctx = Ctx(a)
    failed, passed, skipped = [], 0, 0
    for fn in CHECKS:
        name = fn.__name__
        if a.filter and not any(f in name for f in a.filter):
            continue
        t0 = time.monotonic()
        status = "PASS"
        detail = ""
        try:
            fn(ctx)
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # noqa: BLE001 - report everything
            status = "FAIL"
            detail = f"{type(e).__name__}: {e}"
            if not isinstance(e, Fail):
                detail += "\n" + traceback.format_exc()
        try:
            ctx.healthy()
        except Exception as e:  # noqa: BLE001
            status = "FAIL"
            detail += f" | server unhealthy afterwards: {type(e).__name__}: {e}"
        dt = time.monotonic() - t0
        print(f"{status} {name} ({dt:.2f}s){': ' + detail if detail else ''}", flush=True)
        for n in NOTES:
            print(f"    note: {n}", flush=True)
        NOTES.clear()
        if status == "FAIL":
            failed.append(name)
        elif status == "SKIP":
            skipped += 1
        else:
            passed += 1
    print(f"\n{passed} passed, {len(failed)} failed, {skipped} skipped")
    if failed:
        print("FAILED: " + " ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
