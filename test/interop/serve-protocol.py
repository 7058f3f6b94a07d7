#!/usr/bin/python3
"""NBD client side of test/interop/serve.test.ts, built on libnbd's Python binding (python3-libnbd).

Subcommands (every one exits 0 on success, 1 with one line per failure on stderr otherwise):

  edges --rw-qcow2 SOCK --rw-raw SOCK --ro SOCK --size N
      Protocol edge cases against three exports of N bytes: reads and writes past the end, a read
      of 32 MiB + 1, writes to a read-only export, BLOCK_STATUS with REQ_ONE, FAST_ZERO on raw and
      on qcow2 v3, GO with an unknown export name, option mode (LIST, INFO, LIST_META_CONTEXT,
      ABORT), and reads without structured replies. The raw and qcow2 exports hold the pattern
      written by `pattern` below; the read-only export serves the same bytes.

  musts --sock SOCK
      What doc/proto.md says a server MUST accept: NBD_CMD_FLAG_FUA on every command (FLUSH,
      READ, CACHE), a zero-length READ answered without a chunk describing zero bytes, and
      zero-length WRITE / WRITE_ZEROES / TRIM without a disconnect. SOCK serves a writable export
      holding the pattern.

  workload --sock SOCK --seed S --size N --ops K
      A seeded random sequence of writes (random sizes and offsets, unaligned too, some FUA),
      zero writes (with and without NO_HOLE), trims, flushes, reads, and bursts of parallel
      byte-disjoint requests kept in flight with aio_*. Prints a digest of everything read, so
      that two servers given the same sequence can be compared.

  mkpattern FILE N
      Writes N bytes of the pattern to FILE (the fixture the edges subcommand expects).

  writer --sock SOCK --log FILE [--block N] [--inflight N] [--flush-every N]
      Writes block after block (block i holds its sequence number i) with several writes in
      flight and a flush every few writes, until the connection dies. Logs "W i" when write i is
      acknowledged and "F n" when a flush completes that was sent after the first n "W" lines.
      Exit 0 whatever the server does (the log is the result).
"""

import argparse
import hashlib
import os
import random
import struct
import sys

import nbd

MiB = 1024 * 1024
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL: " + msg, file=sys.stderr, flush=True)


def uri_of(sock, name=""):
    return "nbd+unix:///%s?socket=%s" % (name, sock)


def handle(sock, name="", strict=True, structured=True, contexts=(), opt_mode=False):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    if not structured:
        h.set_request_structured_replies(False)
    for c in contexts:
        h.add_meta_context(c)
    if opt_mode:
        h.set_opt_mode(True)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


PERIOD = 65537  # prime: the pattern never lines up with clusters or sectors
BASE = bytes(((i * 7 + (i >> 8)) & 0xFF) or 1 for i in range(PERIOD))


def pattern(offset, length):
    """The bytes the fixtures hold at [offset, offset + length): BASE repeated (never a zero byte)."""
    start = offset % PERIOD
    reps = (start + length) // PERIOD + 1
    return (BASE * reps)[start : start + length]


def expect_error(what, errnames, fn):
    """Runs fn; it must raise nbd.Error with one of errnames (e.g. ["EINVAL"])."""
    try:
        fn()
    except nbd.Error as e:
        if errnames is not None and e.errno not in errnames:
            fail("%s: expected %s, got %s (%s)" % (what, "/".join(errnames), e.errno, e.string))
        return
    fail("%s: expected %s, but it succeeded" % (what, "/".join(errnames or ["an error"])))


def check(what, cond, detail=""):
    if not cond:
        fail(what + (": " + detail if detail else ""))


def edges(a):
    size = a.size
    big = 32 * MiB + 1

    # --- Bounds on a writable export (strict mode off: the server must refuse, not libnbd).
    for label, sock in (("qcow2", a.rw_qcow2), ("raw", a.rw_raw)):
        h = handle(sock, strict=False)
        check(label + ": size", h.get_size() == size, "%d != %d" % (h.get_size(), size))
        expect_error(label + ": read past the end", ["EINVAL"], lambda: h.pread(4096, size - 2048))
        expect_error(label + ": read starting past the end", ["EINVAL"], lambda: h.pread(512, size + 4096))
        expect_error(label + ": write past the end", ["ENOSPC"], lambda: h.pwrite(b"\x55" * 4096, size - 2048))
        expect_error(label + ": zero past the end", ["ENOSPC"], lambda: h.zero(8192, size - 4096))
        expect_error(label + ": trim past the end", ["EINVAL"], lambda: h.trim(8192, size - 4096))
        expect_error(label + ": read of 32 MiB + 1", ["EINVAL", "ERANGE", "EOVERFLOW"], lambda: h.pread(big, 0))
        # The connection is still usable after every refusal, and nothing past the end was written.
        got = h.pread(4096, size - 4096)
        check(label + ": tail after refused writes", got == pattern(size - 4096, 4096), "tail changed")
        got = h.pread(big - 1, 0)
        check(label + ": 32 MiB read", got == pattern(0, big - 1), "data differs")
        # FAST_ZERO: raw cannot promise it, qcow2 v3 can (zero flag).
        if label == "raw":
            expect_error("raw: FAST_ZERO", ["ENOTSUP"], lambda: h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO))
            check("raw: FAST_ZERO refused left data", h.pread(65536, 65536) == pattern(65536, 65536))
        else:
            try:
                h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
                check("qcow2: FAST_ZERO zeroes", h.pread(65536, 65536) == bytes(65536))
                h.pwrite(pattern(65536, 65536), 65536)
            except nbd.Error as e:
                fail("qcow2 v3: FAST_ZERO failed: %s" % e)
        h.flush()
        h.shutdown()

    # --- Read-only export: every write kind is refused with EPERM, reads work.
    h = handle(a.ro, strict=False)
    check("ro: is_read_only", h.is_read_only() == 1)
    check("ro: cannot trim/zero", h.can_trim() == 0 and h.can_zero() == 0)
    expect_error("ro: write", ["EPERM"], lambda: h.pwrite(b"\x01" * 512, 0))
    expect_error("ro: write FUA", ["EPERM"], lambda: h.pwrite(b"\x01" * 512, 4096, nbd.CMD_FLAG_FUA))
    expect_error("ro: zero", ["EPERM"], lambda: h.zero(4096, 0))
    expect_error("ro: trim", ["EPERM"], lambda: h.trim(4096, 0))
    check("ro: data after refused writes", h.pread(8192, 0) == pattern(0, 8192))
    h.flush()
    h.shutdown()

    # --- BLOCK_STATUS with REQ_ONE and without; both contexts.
    h = handle(a.rw_qcow2, contexts=("base:allocation", "qemu:allocation-depth"))
    check("contexts negotiated", h.can_meta_context("base:allocation") == 1)
    check("depth context negotiated", h.can_meta_context("qemu:allocation-depth") == 1)
    h.zero(1 * MiB, 2 * MiB)  # a zero run between data
    seen = {}

    def collect(ctx, offset, entries, *rest):
        seen.setdefault(ctx, []).append((offset, list(entries)))
        return 0

    h.block_status(4 * MiB, 0, collect, nbd.CMD_FLAG_REQ_ONE)
    for ctx in ("base:allocation", "qemu:allocation-depth"):
        got = seen.get(ctx, [])
        check("REQ_ONE " + ctx + ": one reply", len(got) == 1, repr(got))
        if got:
            ents = got[0][1]
            check("REQ_ONE " + ctx + ": one extent", len(ents) == 2, repr(ents))
            check("REQ_ONE " + ctx + ": within the request", 0 < ents[0] <= 4 * MiB, repr(ents))
    seen.clear()
    h.block_status(3 * MiB, 1 * MiB, collect)
    base = seen.get("base:allocation", [[0, []]])[0][1]
    runs = [(base[i], base[i + 1]) for i in range(0, len(base), 2)]
    total = sum(r[0] for r in runs)
    check("block status covers at most the request", 0 < total <= 3 * MiB, repr(runs))
    # [1M, 2M) data, [2M, 3M) zero: the zero run must show the ZERO bit, the data none.
    pos, kinds = 1 * MiB, []
    for length, flags in runs:
        kinds.append((pos, length, flags))
        pos += length
    zero_ok = all((f & nbd.STATE_ZERO) for (p, l, f) in kinds if p >= 2 * MiB and p + l <= 3 * MiB)
    data_ok = all(not (f & nbd.STATE_ZERO) for (p, l, f) in kinds if p + l <= 2 * MiB)
    check("block status: zeroed run reads as zero, data not", zero_ok and data_ok, repr(kinds))
    # A read across data and the zero run (hole chunks in the reply) is exact.
    check("read across a hole", h.pread(3 * MiB, 512 * 1024) == pattern(512 * 1024, 1536 * 1024) + bytes(MiB) + pattern(3 * MiB, 512 * 1024))
    h.pwrite(pattern(2 * MiB, MiB), 2 * MiB)
    h.flush()
    h.shutdown()

    # --- GO with an unknown export name: the connection fails, no transmission.
    try:
        h = handle(a.rw_raw, name="no-such-export")
        fail("GO with unknown export: connected")
        h.shutdown()
    except nbd.Error:
        pass

    # --- Option mode.
    h = handle(a.rw_qcow2, opt_mode=True)
    names = []
    n = h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    check("opt_list: one export", n == 1 and len(names) == 1 and names[0][0] == "", repr(names))
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    check(
        "opt_list_meta_context",
        sorted(ctxs) == ["base:allocation", "qemu:allocation-depth"],
        repr(ctxs),
    )
    h.opt_info()
    check("opt_info: size", h.get_size() == size)
    check("opt_info: writable", h.is_read_only() == 0)
    check("opt_info: block size max", h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB)
    # INFO for an unknown name fails but the connection stays in option mode.
    h.set_export_name("nope")
    expect_error("opt_info unknown export", None, lambda: h.opt_info())
    h.set_export_name("")
    h.opt_info()
    check("opt_info after a refused one", h.get_size() == size)
    h.opt_abort()
    check("opt_abort closes", h.aio_is_closed() == 1 or h.aio_is_dead() == 1)

    # opt_go after haggling works.
    h = handle(a.ro, opt_mode=True)
    h.opt_go()
    check("opt_go read", h.pread(4096, 8192) == pattern(8192, 4096))
    h.shutdown()

    # --- Without structured replies: reads (data and zero runs) are still exact.
    h = handle(a.rw_qcow2, structured=False)
    check("not structured", h.get_structured_replies_negotiated() == 0)
    h.zero(256 * 1024, 256 * 1024)
    got = h.pread(1 * MiB, 0)
    want = pattern(0, 256 * 1024) + bytes(256 * 1024) + pattern(512 * 1024, 512 * 1024)
    check("simple replies: read across a zeroed run", got == want)
    expect_error("simple replies: read past the end", ["EINVAL"], lambda: h.pread(8192, size - 4096))
    h.pwrite(pattern(256 * 1024, 256 * 1024), 256 * 1024, nbd.CMD_FLAG_FUA)
    check("simple replies: read back", h.pread(1 * MiB, 0) == pattern(0, MiB))
    h.shutdown()


def musts(a):
    """Requests the protocol says a server MUST handle, sent as some clients do (libnbd's checks off)."""
    h = handle(a.sock, strict=False)
    # doc/proto.md, NBD_CMD_FLAG_FUA: "valid for all commands, provided NBD_FLAG_SEND_FUA has been
    # negotiated, in which case the server MUST accept all commands with this bit set".
    for what, fn in (
        ("FUA on FLUSH", lambda: h.flush(nbd.CMD_FLAG_FUA)),
        ("FUA on READ", lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA)),
        ("FUA on CACHE", lambda: h.cache(4096, 0, nbd.CMD_FLAG_FUA)),
    ):
        try:
            fn()
        except nbd.Error as e:
            fail("%s refused (%s); the server MUST accept FUA on every command" % (what, e))
    # A zero-length READ: any reply chunk MUST describe at least one byte (OFFSET_DATA: length
    # at least 9), so success is a lone NBD_REPLY_TYPE_NONE (or an error chunk); the connection
    # must survive either way.
    try:
        got = h.pread(0, 4096)
        check("zero-length read returns nothing", len(got) == 0)
    except nbd.Error as e:
        if h.aio_is_dead() or h.aio_is_closed():
            fail("zero-length READ broke the connection: %s" % e)
    if not (h.aio_is_dead() or h.aio_is_closed()):
        check("read after the zero-length read", h.pread(4096, 4096) == pattern(4096, 4096))
        h.shutdown()
    # Zero-length WRITE, WRITE_ZEROES and TRIM: well-formed requests, so the server may refuse
    # them but MUST NOT disconnect ("The client and the server MUST NOT initiate any form of
    # disconnect other than" on a violation of a mandatory condition, or a soft disconnect).
    for what, fn in (
        ("WRITE", lambda h: h.pwrite(b"", 8192)),
        ("WRITE_ZEROES", lambda h: h.zero(0, 8192)),
        ("TRIM", lambda h: h.trim(0, 8192)),
    ):
        h = handle(a.sock, strict=False)
        try:
            fn(h)
        except nbd.Error as e:
            if h.aio_is_dead() or h.aio_is_closed():
                fail("zero-length %s: the server hung up (%s)" % (what, e))
                continue
        check("read after a zero-length " + what, h.pread(4096, 8192) == pattern(8192, 4096))
        h.shutdown()


def workload(a):
    rnd = random.Random(a.seed)
    size = a.size
    h = handle(a.sock, contexts=())
    digest = hashlib.sha256()
    align = lambda v, m: v - v % m  # noqa: E731

    def rand_range(max_len):
        kind = rnd.random()
        if kind < 0.4:  # unaligned, small
            length = rnd.randint(1, 20000)
            off = rnd.randint(0, size - length)
        elif kind < 0.8:  # cluster aligned
            length = 65536 * rnd.randint(1, 8)
            off = align(rnd.randint(0, size - length), 65536)
        else:  # sector aligned, up to max_len
            length = 512 * rnd.randint(1, max_len // 512)
            off = align(rnd.randint(0, size - length), 512)
        return off, min(length, max_len)

    def data(length):
        k = rnd.random()
        if k < 0.1:
            return bytes(length)
        v = rnd.randint(1, 255)
        head = rnd.randbytes(min(length, 4096))
        return (head + bytes([v]) * (length - len(head)))[:length]

    def one(off, length, aio):
        """One random request on [off, off + length); returns its cookie when aio."""
        k = rnd.random()
        if k < 0.5:
            buf = data(length)
            flags = nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0
            if aio:
                return ("w", h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(buf)), off, flags=flags), None)
            h.pwrite(buf, off, flags)
        elif k < 0.65:
            flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
            if aio:
                return ("z", h.aio_zero(length, off, flags=flags), None)
            h.zero(length, off, flags)
        elif k < 0.75:
            if aio:
                return ("t", h.aio_trim(length, off), None)
            h.trim(length, off)
        else:
            if aio:
                buf = nbd.Buffer(length)
                return ("r", h.aio_pread(buf, off), (off, buf))
            digest.update(struct.pack(">QQ", off, length))
            digest.update(h.pread(length, off))
        return None

    for i in range(a.ops):
        k = rnd.random()
        if k < 0.1:
            h.flush()
        elif k < 0.25:
            # A burst: up to 32 byte-disjoint requests in flight at once, each in its own slot.
            n = rnd.randint(4, 32)
            slot = size // n
            pending = []
            for s in range(n):
                length = rnd.randint(1, min(slot, 300000))
                if rnd.random() < 0.5:
                    length = 4096 * max(1, length // 4096)
                off = s * slot + rnd.randint(0, slot - length)
                r = one(off, length, True)
                if r is not None:
                    pending.append(r)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for kind, cookie, extra in pending:
                h.aio_command_completed(cookie)  # raises on error
                if kind == "r":
                    off, buf = extra
                    digest.update(struct.pack(">QQ", off, len(buf)))
                    digest.update(buf.to_bytearray())
        else:
            off, length = rand_range(2 * MiB)
            one(off, length, False)
    h.flush()
    # Read the whole image back into the digest.
    for off in range(0, size, 4 * MiB):
        n = min(4 * MiB, size - off)
        digest.update(h.pread(n, off))
    h.shutdown()
    print(digest.hexdigest())


def writer(a):
    fd = os.open(a.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    logged = [0]

    def log(line):
        os.write(fd, (line + "\n").encode())

    try:
        h = handle(a.sock)
        nblocks = h.get_size() // a.block
        seq = 0
        pending = {}  # cookie -> ("w", seq) or ("f", n)

        def issue_write():
            nonlocal seq
            blk = seq % nblocks
            buf = struct.pack(">Q", seq) * (a.block // 8)
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(buf)), blk * a.block)
            pending[c] = ("w", seq)
            seq += 1

        while True:
            while len(pending) < a.inflight:
                if seq > 0 and seq % a.flush_every == 0 and not any(k == "f" for k, _ in pending.values()):
                    pending[h.aio_flush()] = ("f", logged[0])
                issue_write()
            h.poll(-1)
            for c in list(pending):
                try:
                    done = h.aio_command_completed(c)
                except nbd.Error as e:
                    log("E %s %s" % (pending[c][0], e))
                    del pending[c]
                    continue
                if done:
                    kind, v = pending.pop(c)
                    if kind == "w":
                        log("W %d" % v)
                        logged[0] += 1
                    else:
                        log("F %d" % v)
    except nbd.Error as e:
        log("X %s" % e)
    finally:
        os.close(fd)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edges")
    e.add_argument("--rw-qcow2", required=True)
    e.add_argument("--rw-raw", required=True)
    e.add_argument("--ro", required=True)
    e.add_argument("--size", type=int, required=True)
    u = sub.add_parser("musts")
    u.add_argument("--sock", required=True)
    w = sub.add_parser("workload")
    w.add_argument("--sock", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--ops", type=int, required=True)
    r = sub.add_parser("writer")
    r.add_argument("--sock", required=True)
    r.add_argument("--log", required=True)
    r.add_argument("--block", type=int, default=4096)
    r.add_argument("--inflight", type=int, default=8)
    r.add_argument("--flush-every", type=int, default=16)
    r.add_argument("--pattern", action="store_true")
    m = sub.add_parser("mkpattern")
    m.add_argument("file")
    m.add_argument("size", type=int)
    a = p.parse_args()
    if a.cmd == "mkpattern":
        with open(a.file, "wb") as f:
            for off in range(0, a.size, 4 * MiB):
                f.write(pattern(off, min(4 * MiB, a.size - off)))
    elif a.cmd == "edges":
        edges(a)
    elif a.cmd == "musts":
        musts(a)
    elif a.cmd == "workload":
        workload(a)
    else:
        writer(a)
    if failures:
        print("%d failure(s)" % len(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except nbd.Error as e:
        print("FAIL: unexpected NBD error: %s" % e, file=sys.stderr)
        sys.exit(1)
