/**
 * Storage on a local file, with positional reads and writes on one file descriptor (Node only).
 * Opening, fstat and closing are synchronous (each a system call of microseconds on a local file):
 * a short command such as `info` then never starts libuv's thread pool nor loads
 * node:fs/promises, ~3 ms of its ~30.
 */
import {
  closeSync,
  fdatasync,
  read as fsRead,
  fstatSync,
  write as fsWrite,
  ftruncate,
  openSync,
  readSync,
  writeSync,
} from "node:fs";
import { createRequire } from "node:module";
import { constants as osConstants } from "node:os";
import { getSystemErrorName } from "node:util";
import { QcowError } from "../errors.js";
import { setPageOffsetProbe } from "./buffer.js";
import type { DataRun, Storage } from "./storage.js";

type SeekFn = (fd: number, offset: number, which: 0 | 1) => number;
/** op: 0 unlock, 1 shared, 2 exclusive, 3 test shared, 4 test exclusive; returns 0 or errno. */
type LockFn = (fd: number, start: number, length: number, op: 0 | 1 | 2 | 3 | 4) => number;
/** preadv2(RWF_NOWAIT): bytes read from the page cache, or -1 (then read the usual way). */
type ReadCachedFn = (fd: number, dst: Uint8Array, offset: number) => number;
/** fallocate(fd, 0, offset, length): 0 or errno. */
type AllocateFn = (fd: number, offset: number, length: number) => number;
/** Where a buffer's first byte lies within its 4096-byte page. */
type PageOffsetFn = (b: Uint8Array) => number;
/** cachestat(): how many pages of a range are in the page cache; -1 where the kernel cannot tell. */
type CachedPagesFn = (fd: number, offset: number, length: number) => number;
/** A header, then a file range with sendfile(), to a non-blocking socket: bytes sent, or -errno. */
type SendRangeFn = (socket: number, header: Uint8Array, fd: number, offset: number, length: number) => number;
/** setsockopt(SO_SNDBUF): the send buffer's size after asking for `bytes`, or -errno. */
type SendBufferFn = (socket: number, bytes: number) => number;
/** mallopt(M_ARENA_MAX or M_MMAP_THRESHOLD, value): true where glibc took it. */
type MallocOptionFn = (name: "arenaMax" | "mmapThreshold", value: number) => boolean;
/**
 * pwrite of all of a buffer on the thread pool, one at a time per file, after fallocate() of the
 * range with `allocate`: bytes written, or -errno.
 */
type WriteSerialFn = (fd: number, src: Uint8Array, offset: number, allocate: boolean) => Promise<number>;
/** V8's SetFlagsFromString, as node:v8's setFlagsFromString. */
type V8FlagsFn = (flags: string) => void;

/**
 * The native binding built at install (native/seek.c): lseek(SEEK_DATA/SEEK_HOLE), OFD locks,
 * reads from the page cache, fallocate, buffer addresses. Everything is optional: without the addon (a failed
 * build) qcowkit works without these.
 */
interface Native {
  seek?: SeekFn;
  lock?: LockFn;
  readCached?: ReadCachedFn;
  allocate?: AllocateFn;
  pageOffset?: PageOffsetFn;
  mallocOption?: MallocOptionFn;
  cachedPages?: CachedPagesFn;
  sendRange?: SendRangeFn;
  sendBuffer?: SendBufferFn;
  v8Flags?: V8FlagsFn;
  writeSerial?: WriteSerialFn;
}
const native: Native = (() => {
  try {
    return createRequire(import.meta.url)("../../../build/Release/qcowkit_seek.node") as Native;
  } catch {
    return {};
  }
})();
const seek = native.seek;
// I/O buffers (ioBuffer) start on a page where the addon can tell where they lie.
setPageOffsetProbe(native.pageOffset);

/**
 * Whether this kernel tells which pages of a file are in the page cache (cachestat, Linux 6.5):
 * without it FileStorage.sendCached never sends, as it cannot know that no page must be read.
 */
export function pageCacheVisible(): boolean {
  if (!native.cachedPages) return false;
  const fd = openSync(process.execPath, "r");
  try {
    return native.cachedPages(fd, 0, 4096) >= 0;
  } finally {
    closeSync(fd);
  }
}

/**
 * Asks for a send buffer of `bytes` on socket descriptor `socket` (SO_SNDBUF; Linux caps it at
 * net.core.wmem_max, 208 KiB by default, and doubles it): the size it got, or undefined where it
 * cannot. Kernel memory, used only while a slow reader leaves replies queued.
 */
export function setSendBuffer(socket: number, bytes: number): number | undefined {
  const r = native.sendBuffer?.(socket, bytes);
  return r === undefined || r < 0 ? undefined : r;
}

/**
 * Settings of glibc's malloc for the rest of the process; false where it cannot (no addon, not
 * glibc). Process-wide, so for the command line, not for a library's host:
 *  - `arenaMax`: threads without an arena share those there are. `serve` sets 2, which took the
 *    highest peak of its memory under fio's random writes from 62 to 60 MiB (V8's compiler
 *    threads each kept megabytes in an arena of their own).
 *  - `mmapThreshold`: blocks from this size up are mapped on their own and given back when freed.
 *    glibc otherwise raises it to the largest such block freed (up to 32 MiB), and then keeps
 *    freed megabyte buffers in its heap: convert of a compressed image peaked at 85-92 MiB
 *    instead of 71-74.
 */
export function tuneMalloc(opts: { arenaMax?: number; mmapThreshold?: number }): boolean {
  const set = native.mallocOption;
  if (!set) return false;
  let ok = true;
  if (opts.arenaMax !== undefined) ok = set("arenaMax", opts.arenaMax) && ok;
  if (opts.mmapThreshold !== undefined) ok = set("mmapThreshold", opts.mmapThreshold) && ok;
  return ok;
}

/**
 * Sets a V8 flag through the addon, without loading node:v8 (which loads Node's stream modules:
 * ~2 ms of start-up); false where there is no addon.
 */
export function setV8FlagNatively(flag: string): boolean {
  if (!native.v8Flags) return false;
  native.v8Flags(flag);
  return true;
}

/**
 * Reads up to this size are first tried from the page cache on the calling thread: for a small
 * read of data in memory the copy costs less than handing it to libuv's thread pool and back
 * (~25 µs on a 2-core VM; fio's 4 KiB random reads through `serve` run 1.4x faster). Larger reads
 * go through the pool, where their copies run beside the event loop's work: measured on 256 KiB
 * (nbdcopy) and 2 MiB (convert) reads, the main thread doing the copies itself was slower.
 */
const CACHED_READ_MAX = 64 * 1024;
const PAGE = 4096;
const readCached = native.readCached;

/**
 * Writes of at least this size first give their range blocks with fallocate() (a no-op of ~3 µs
 * where it has them): ext4 then writes into allocated blocks instead of allocating them one
 * 4 KiB block at a time, and 2 MiB writes of new data take ~30 % less time. QEMU's qcow2 driver
 * likewise allocates the clusters it is about to fill. Errors are ignored: the write itself
 * reports what matters (ENOSPC), and block devices and some file systems have no fallocate.
 */
const ALLOCATE_MIN = 64 * 1024;

/**
 * Writes up to this size are made on the calling thread. A buffered pwrite of a few KiB copies
 * into the page cache in microseconds, less than handing it to libuv's thread pool and back,
 * where each hand-off also wakes a thread that takes the CPU from the event loop: fio's 4 KiB
 * random writes through `serve` took 1.35 s this way against 1.75 s through the pool (qemu-nbd:
 * 1.40 s). Larger writes (convert's 2 MiB) stay on the pool, where their copies run beside the
 * event loop's work. The price: while the kernel throttles a writer (too much dirty data), the
 * event loop waits with it.
 */
const SYNC_WRITE_MAX = 64 * 1024;
const allocate = native.allocate;
/**
 * Larger writes go to the pool through the addon where it is (writeSerial): one at a time per
 * file, the others asleep on a mutex, each with its fallocate() on the pool too. `convert`
 * issues a chunk's write while the one before it is in flight; through fs.write the second
 * waited for the file's inode lock spinning on the other CPU (~30 ms more system time per 2 GiB
 * convert, 8 %), and the fallocate() before it, on the event loop, waited for that lock as well.
 */
const writeSerial = native.writeSerial;

/** A Node-style system error (its `code`, such as ENOSPC) for a negative errno from the addon. */
function errnoError(negErrno: number): NodeJS.ErrnoException {
  const code = getSystemErrorName(negErrno);
  return Object.assign(new Error(code), { code, errno: negErrno });
}

/**
 * QEMU's image locking (block/file-posix.c), so that qcowkit and QEMU see each other: each
 * permission a user of the file holds is a shared lock on byte 100 + bit, and each permission it
 * does not share with others a shared lock on byte 200 + bit. Opening checks that no one else
 * refuses to share what it wants (byte 200 + bit) and that no one else holds what it refuses to
 * share (byte 100 + bit). Open file description locks: released when the file is closed, also
 * on a crash, and separate for two opens in one process.
 */
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize"] as const;
const PERM_CONSISTENT_READ = 1;
const PERM_WRITE = 2;
const PERM_RESIZE = 8;
const PERM_ALL = 15;
const LOCK_PERM_BASE = 100;
const LOCK_SHARED_BASE = 200;

/**
 * How a file is locked: "read" (others may read, no one may write: qemu-img's read-only opens),
 * "write" (this user writes and resizes; others may only read), "shared" (-U, force-share:
 * reads while anyone writes), or "none".
 */
export type FileLocking = "read" | "write" | "shared" | "none";

function lockFile(fd: number, mode: FileLocking, path: string): void {
  const lock = native.lock;
  if (mode === "none" || !lock) return;
  const perm = mode === "write" ? PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE : PERM_CONSISTENT_READ;
  const shared = mode === "shared" ? PERM_ALL : PERM_ALL & ~(PERM_WRITE | PERM_RESIZE);
  const locked = (what: string): QcowError =>
    new QcowError("io", `Failed to get ${what} lock\nIs another process using the image [${path}]?`);
  for (let i = 0; i < PERM_NAMES.length; i++) {
    const bit = 1 << i;
    for (const [held, base] of [
      [perm & bit, LOCK_PERM_BASE],
      [~shared & bit, LOCK_SHARED_BASE],
    ] as const) {
      if (!held) continue;
      const err = lock(fd, base + i, 1, 1);
      if (err !== 0) throw new QcowError("io", `Failed to lock byte ${base + i}`);
    }
  }
  for (let i = 0; i < PERM_NAMES.length; i++) {
    if (perm & (1 << i) && lock(fd, LOCK_SHARED_BASE + i, 1, 4) !== 0) throw locked(`"${PERM_NAMES[i]}"`);
  }
  for (let i = 0; i < PERM_NAMES.length; i++) {
    if (!(shared & (1 << i)) && lock(fd, LOCK_PERM_BASE + i, 1, 4) !== 0) throw locked(`shared "${PERM_NAMES[i]}"`);
  }
}

export class FileStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  /** -1 once closed: a later read or write fails (EBADF) instead of reaching a file opened since. */
  private fd: number;
  private readonly sync: boolean;

  private constructor(fd: number, name: string, readOnly: boolean, sync: boolean) {
    this.fd = fd;
    this.name = name;
    this.readOnly = readOnly;
    this.sync = sync;
  }

  /**
   * `unsafe`: flush does not sync to the disk (qemu-img's cache=unsafe, its default for the
   * target of convert): fast, and durable only once the kernel writes the pages back.
   */
  static async open(
    path: string,
    opts: { readOnly?: boolean; create?: boolean; unsafe?: boolean; locking?: FileLocking } = {},
  ): Promise<FileStorage> {
    const readOnly = opts.readOnly ?? true;
    const flags = readOnly ? "r" : opts.create ? "w+" : "r+";
    let fd: number;
    try {
      fd = openSync(path, flags);
    } catch (e) {
      throw ioError(e, path);
    }
    try {
      // Only regular files: a character device such as /dev/null takes no part in locking.
      if (fstatSync(fd).isFile()) lockFile(fd, opts.locking ?? (readOnly ? "read" : "write"), path);
    } catch (e) {
      closeSync(fd);
      throw e instanceof QcowError ? e : ioError(e, path);
    }
    return new FileStorage(fd, path, readOnly, !opts.unsafe);
  }

  async size(): Promise<number> {
    return fstatSync(this.fd).size;
  }

  async allocatedSize(): Promise<number> {
    return fstatSync(this.fd).blocks * 512;
  }

  async *dataRuns(offset: number, length: number): AsyncIterable<DataRun> {
    const end = offset + length;
    if (!seek) {
      yield { start: offset, length, data: true };
      return;
    }
    for (let pos = offset; pos < end; ) {
      const data = seek(this.fd, pos, 0);
      if (data < 0 || data >= end) {
        yield { start: pos, length: end - pos, data: false };
        return;
      }
      if (data > pos) yield { start: pos, length: data - pos, data: false };
      const hole = Math.min(end, seek(this.fd, data, 1));
      yield { start: data, length: hole - data, data: true };
      pos = hole;
    }
  }

  /**
   * See Storage.sendCached: sendfile() from the page cache, only where cachestat() finds every
   * page of the range there (a page read from the disk would hold up the caller's thread, the
   * event loop). What the socket did not take is read here, synchronously, from the cache.
   */
  sendCached(socket: number, header: Uint8Array, offset: number, length: number): Uint8Array[] | undefined {
    const { cachedPages, sendRange } = native;
    if (!cachedPages || !sendRange || this.fd < 0 || length <= 0) return undefined;
    const pages = Math.ceil((offset + length) / PAGE) - Math.floor(offset / PAGE);
    if (cachedPages(this.fd, offset, length) < pages) return undefined;
    const sent = sendRange(socket, header, this.fd, offset, length);
    if (sent <= 0) return undefined;
    const rest: Uint8Array[] = [];
    if (sent < header.length) rest.push(header.subarray(sent));
    const done = Math.max(0, sent - header.length);
    if (done < length) {
      const b = Buffer.allocUnsafe(length - done);
      try {
        for (let at = 0; at < b.length; ) {
          const n = readSync(this.fd, b, at, b.length - at, offset + done + at);
          if (n === 0) {
            b.fill(0, at); // past the end of the file, as readFull
            break;
          }
          at += n;
        }
      } catch (e) {
        throw failed(e, "read from", this.name, offset + done);
      }
      rest.push(b);
    }
    return rest;
  }

  /** I/O after close (descriptor -1): EBADF, as the system call gives, not Node's check of the number. */
  private closed(what: string, offset: number): QcowError {
    return failed(errnoError(-osConstants.errno.EBADF), what, this.name, offset);
  }

  // Positional I/O through fs.read/fs.write on the handle's descriptor: the callback API costs
  // less per call than FileHandle's promise API, and convert makes many calls.
  async read(dst: Uint8Array, offset: number): Promise<number> {
    if (this.fd < 0) throw this.closed("read from", offset);
    let done = 0;
    if (readCached && dst.length <= CACHED_READ_MAX && dst.length > 0) {
      const n = readCached(this.fd, dst, offset);
      if (n === dst.length) return n;
      if (n > 0) done = n;
    }
    try {
      while (done < dst.length) {
        const n = await new Promise<number>((resolve, reject) =>
          fsRead(this.fd, dst, done, dst.length - done, offset + done, (e, bytes) => (e ? reject(e) : resolve(bytes))),
        );
        if (n === 0) break;
        done += n;
      }
    } catch (e) {
      throw failed(e, "read from", this.name, offset);
    }
    return done;
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new QcowError("read-only", `${this.name} is open read-only`);
    if (this.fd < 0) throw this.closed("write to", offset);
    try {
      if (writeSerial && src.length > SYNC_WRITE_MAX) {
        const n = await writeSerial(this.fd, src, offset, src.length >= ALLOCATE_MIN);
        // A write the file took only part of means no space, as QEMU's file driver reports it.
        if (n < src.length) throw errnoError(n < 0 ? n : -osConstants.errno.ENOSPC);
        return;
      }
      if (allocate && src.length >= ALLOCATE_MIN) allocate(this.fd, offset, src.length);
      let done = 0;
      if (src.length <= SYNC_WRITE_MAX) {
        while (done < src.length) done += writeSync(this.fd, src, done, src.length - done, offset + done);
        return;
      }
      while (done < src.length) {
        done += await new Promise<number>((resolve, reject) =>
          fsWrite(this.fd, src, done, src.length - done, offset + done, (e, bytes) => (e ? reject(e) : resolve(bytes))),
        );
      }
    } catch (e) {
      throw failed(e, "write to", this.name, offset);
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly || !this.sync) return;
    try {
      await new Promise<void>((resolve, reject) => fdatasync(this.fd, (e) => (e ? reject(e) : resolve())));
    } catch (e) {
      throw failed(e, "flush", this.name);
    }
  }

  async truncate(size: number): Promise<void> {
    try {
      await new Promise<void>((resolve, reject) => ftruncate(this.fd, size, (e) => (e ? reject(e) : resolve())));
    } catch (e) {
      throw failed(e, "resize", this.name, size);
    }
  }

  /** Closes the descriptor (once: a second close does nothing). */
  async close(): Promise<void> {
    const fd = this.fd;
    if (fd < 0) return;
    this.fd = -1;
    closeSync(fd);
  }
}

/** strerror's words for the system errors a user meets, as qemu-img prints them. */
const REASONS: Record<string, string> = {
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  EISDIR: "Is a directory",
  ENOSPC: "No space left on device",
  EBADF: "Bad file descriptor",
  EFBIG: "File too large",
  EIO: "Input/output error",
  EROFS: "Read-only file system",
  EDQUOT: "Disk quota exceeded",
};

/**
 * A failed read, write, flush or resize as a QcowError ("io"); the system error stays as its
 * `cause` (its `code`, such as ENOSPC, is what an NBD client is told).
 */
function failed(e: unknown, what: string, name: string, offset?: number): QcowError {
  const err = e as NodeJS.ErrnoException;
  const reason = (err.code && REASONS[err.code]) ?? err.message ?? String(e);
  const at = offset === undefined ? "" : ` at offset ${offset}`;
  return new QcowError("io", `Could not ${what} '${name}'${at}: ${reason}`, { cause: e });
}

/** Turns a Node system error into a QcowError that names the file, as qemu-img words it. */
export function ioError(e: unknown, path: string): QcowError {
  const err = e as NodeJS.ErrnoException;
  const reason = (err.code && REASONS[err.code]) ?? err.message ?? String(e);
  return new QcowError(err.code === "ENOENT" ? "not-found" : "io", `Could not open '${path}': ${reason}`, { cause: e });
}
