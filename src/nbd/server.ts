/**
 * An NBD server over any BlockDevice (doc/proto.md of NetworkBlockDevice/nbd), as qemu-nbd
 * serves one: fixed newstyle handshake, structured replies with holes, base:allocation and
 * qemu:allocation-depth block status, and pipelined requests that complete out of order.
 *
 * Each connection reads request headers in a loop and starts every request at once; replies are
 * written whole, in completion order. A client that sends faster than the image answers is
 * slowed by not reading its socket: at most MAX_INFLIGHT requests, MAX_BUFFERED bytes of their
 * data and MAX_UNSENT bytes of replies the socket has not taken yet are outstanding per client,
 * so memory stays bounded whatever clients do.
 * Malformed input ends the option haggling with the protocol's error or closes the connection;
 * nothing a client sends can reach the image except well-formed, in-bounds requests.
 */
import { EventEmitter } from "node:events";
import type * as net from "node:net";
import { QcowError } from "../errors.js";
import { type BlockDevice, type Extent, readSparse } from "../image/block-device.js";
import { ioBuffer } from "../io/buffer.js";
import { setSendBuffer } from "../io/file.js";
import { lazyBuiltin } from "../lazy-builtin.js";
import * as P from "./protocol.js";

export interface NbdExport {
  /** The export name clients ask for ("" by default, as qemu-nbd). */
  name: string;
  description?: string;
  device: BlockDevice;
  readOnly: boolean;
  /** Zero writes are cheap (qcow2 v3 zero flag): NBD_CMD_FLAG_FAST_ZERO can be honoured. */
  fastZero: boolean;
  /** Whether flushes from one client cover writes of all clients (one shared image: yes). */
  multiConn: boolean;
}

export interface NbdServerOptions {
  export: NbdExport;
  /** Clients served at once (qemu-nbd --shared); more connections wait for a free place. */
  shared: number;
  /** Called with a line for each notable event (a client error, a refused connection). */
  log?: (line: string) => void;
}

/** Requests in flight per client: 16, as qemu-nbd (MAX_NBD_REQUESTS), which bounds memory too. */
const MAX_INFLIGHT = 16;
/** The flags each command may carry besides FUA (valid on every command; it only matters for writes). */
const COMMAND_FLAGS: Record<number, number> = {
  [P.CMD_READ]: P.CMD_FLAG_DF,
  [P.CMD_WRITE]: 0,
  [P.CMD_FLUSH]: 0,
  [P.CMD_TRIM]: 0,
  [P.CMD_CACHE]: 0,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_REQ_ONE,
};
const KNOWN_OPTIONS = new Set([
  P.OPT_EXPORT_NAME,
  P.OPT_ABORT,
  P.OPT_LIST,
  P.OPT_STARTTLS,
  P.OPT_INFO,
  P.OPT_GO,
  P.OPT_STRUCTURED_REPLY,
  P.OPT_LIST_META_CONTEXT,
  P.OPT_SET_META_CONTEXT,
]);
const MAX_BUFFERED = 64 * 1024 * 1024;
/**
 * Replies queued behind a full socket: a client reading slower than the image answers stops
 * the reading of its requests here (qemu-nbd's requests wait for the socket the same way).
 */
const MAX_UNSENT = 4 * 1024 * 1024;
const MAX_EXTENTS = 1024;
const CONTEXT_BASE = 1;
const CONTEXT_DEPTH = 2;
const CONTEXTS = new Map([
  ["base:allocation", CONTEXT_BASE],
  ["qemu:allocation-depth", CONTEXT_DEPTH],
]);

/**
 * Read buffers, reused: a fresh large Buffer per request costs more than the read itself (the
 * allocation zeroes it). Sizes are powers of two from 4 KiB (fio's 4 KiB reads at queue depth 32
 * held 2 MiB in 64 KiB buffers when 64 KiB was the smallest). Spare buffers are kept up to a
 * total of SPARE_BYTES: as many as the requests in flight use (nbdcopy's 4 connections x 16
 * requests of 256 KiB), which a count per size (32, before) cut in half, so that every other
 * request allocated (~30 ms of a 0.7 s copy). Peak memory is what the requests in flight hold
 * either way.
 */
const SPARE_BYTES = 32 * 1024 * 1024;
class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private spare = 0;
  take(n: number): Buffer {
    const size = Math.max(4096, 2 ** Math.ceil(Math.log2(Math.max(1, n))));
    const b = this.free.get(size)?.pop();
    if (b === undefined) return pageBuffer(size);
    this.spare -= b.length;
    return b;
  }
  give(b: Buffer): void {
    if (this.spare + b.length > SPARE_BYTES) return;
    const list = this.free.get(b.length) ?? [];
    list.push(b);
    this.free.set(b.length, list);
    this.spare += b.length;
  }
}
const readBuffers = new BufferPool();
const netModule = lazyBuiltin<typeof net>("node:net");

/** A Buffer on ioBuffer's page-aligned memory: the kernel copies to and from it fastest. */
function pageBuffer(size: number): Buffer {
  const b = ioBuffer(size);
  return Buffer.from(b.buffer, b.byteOffset, b.length);
}

/**
 * A read reply straight from the page cache is tried up to this size: what the socket does not
 * take at once is copied synchronously, and that copy is bounded.
 */
const SEND_CACHED_MAX = 4 * 1024 * 1024;
/** The send buffer asked for each connection (see Connection's constructor). */
const SEND_BUFFER = 4 * 1024 * 1024;

/** The client closed, or sent something that ends the connection. */
class Hangup extends Error {}

/** Reads exact byte counts from a socket, pausing it while enough is buffered. */
class SocketReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private closed: Error | undefined;

  constructor(private readonly socket: net.Socket) {
    socket.on("data", (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      if (this.have > 2 * P.MAX_PAYLOAD) socket.pause();
      this.serve();
    });
    const end = (): void => {
      this.closed ??= new Hangup("client disconnected");
      this.serve();
    };
    socket.on("end", end);
    socket.on("close", end);
    socket.on("error", end);
  }

  /** Ends reading: a pending and every later take rejects. */
  abort(reason: string): void {
    this.closed ??= new Hangup(reason);
    this.serve();
  }

  /** `n` bytes now when they are buffered already (no promise for the common case under load). */
  takeNow(n: number): Buffer | undefined {
    return this.want === undefined && this.have >= n ? this.taken(n) : undefined;
  }

  take(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.serve();
    });
  }

  private serve(): void {
    const w = this.want;
    if (!w) return;
    if (this.have >= w.n) {
      this.want = undefined;
      w.resolve(this.taken(w.n));
    } else if (this.closed) {
      this.want = undefined;
      w.reject(this.closed);
    } else if (this.socket.isPaused()) {
      this.socket.resume();
    }
  }

  /** `n` buffered bytes; reading resumes once what is left is small enough. */
  private taken(n: number): Buffer {
    const b = this.consume(n);
    if (this.have <= P.MAX_PAYLOAD && this.socket.isPaused()) this.socket.resume();
    return b;
  }

  private consume(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    if (this.chunks[0].length === n) {
      this.have -= n;
      return this.chunks.shift() as Buffer;
    }
    if (this.chunks[0].length > n) {
      const head = this.chunks[0];
      this.chunks[0] = head.subarray(n);
      this.have -= n;
      return head.subarray(0, n);
    }
    const out = n >= 65536 ? pageBuffer(n) : Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.have -= n;
    return out;
  }
}

/** The errno a failed request reports to the client. */
function errnoOf(e: unknown): number {
  const cause = e instanceof QcowError ? (e.cause as { code?: string } | undefined) : undefined;
  if (cause?.code === "ENOSPC") return P.ENOSPC;
  if (e instanceof QcowError) {
    if (e.code === "read-only") return P.EPERM;
    if (e.code === "invalid-argument") return P.EINVAL;
    if (e.code === "unsupported") return P.ENOTSUP;
    return P.EIO;
  }
  const code = (e as { code?: string }).code;
  if (code === "ENOSPC") return P.ENOSPC;
  if (code === "ENOMEM") return P.ENOMEM;
  return P.EIO;
}

class Connection {
  private readonly reader: SocketReader;
  private structured = false;
  private noZeroes = false;
  private contexts: number[] = [];
  private inflight = 0;
  private inflightBytes = 0;
  /** Resolved (and replaced) by the next wake(): one promise for all who wait meanwhile. */
  private idle: Promise<void> | undefined;
  private wakeIdle: (() => void) | undefined;
  private stopping = false;
  private readonly fd: number;

  constructor(
    private readonly socket: net.Socket,
    private readonly exp: NbdExport,
    private readonly log: (line: string) => void,
  ) {
    this.reader = new SocketReader(socket);
    socket.setNoDelay(true);
    // The socket's descriptor, for replies sent straight from the page cache (see sendCached);
    // libuv keeps it non-blocking. -1 where there is none (a socket not backed by a descriptor).
    // Read-only exports only: such a reply refers to the file's pages until the client has read
    // it (sendfile into a socket takes references, it does not copy), so a cluster discarded and
    // reused meanwhile by a write would show another part of the disk.
    const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
    this.fd = typeof fd === "number" && fd >= 0 && exp.readOnly && exp.device.sendCached ? fd : -1;
    // Room for whole replies in the kernel: a reply the socket takes at once goes from the page
    // cache without a copy through this process; what it does not take is copied and queued, and
    // the replies after it are copied too until the queue has drained.
    if (this.fd >= 0) setSendBuffer(this.fd, SEND_BUFFER);
    const wake = (): void => this.wake();
    socket.on("drain", wake);
    socket.on("close", wake);
  }

  /** Serves the client until it leaves; never rejects. */
  async run(): Promise<void> {
    try {
      this.socket.write(P.handshake());
      const flags = (await this.reader.take(4)).readUInt32BE(0);
      if (flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) throw new Hangup("unknown client flags");
      this.noZeroes = (flags & P.FLAG_C_NO_ZEROES) !== 0;
      if (await this.haggle()) await this.transmission();
    } catch (e) {
      if (!(e instanceof Hangup)) this.log(`client error: ${(e as Error).message}`);
    } finally {
      await this.drained();
      this.socket.end();
      this.socket.destroySoon?.();
    }
  }

  /** Stops reading requests; those in flight finish and are answered. */
  stop(): void {
    this.stopping = true;
    this.reader.abort("server shutting down");
  }

  private get transmissionFlags(): number {
    let f = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_CACHE;
    if (this.exp.readOnly) f |= P.FLAG_READ_ONLY;
    else f |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO;
    if (this.structured) f |= P.FLAG_SEND_DF;
    if (this.exp.multiConn) f |= P.FLAG_CAN_MULTI_CONN;
    return f;
  }

  /** Option haggling; true when the client moves on to transmission. */
  private async haggle(): Promise<boolean> {
    for (;;) {
      const h = await this.reader.take(16);
      if (h.readBigUInt64BE(0) !== P.IHAVEOPT) throw new Hangup("bad option magic");
      const option = h.readUInt32BE(8);
      const length = h.readUInt32BE(12);
      const reply = (type: number, payload?: Uint8Array): void => {
        this.socket.write(P.optionReply(option, type, payload));
      };
      if (length > P.MAX_OPTION_LENGTH) {
        // Longer than any option this server takes: skip it (as qemu-nbd does) when that is
        // cheap, else hang up.
        if (length > P.MAX_PAYLOAD) throw new Hangup(`option ${option} too long (${length} bytes)`);
        for (let left = length; left > 0; left -= Math.min(left, 1 << 20))
          await this.reader.take(Math.min(left, 1 << 20));
        reply(KNOWN_OPTIONS.has(option) ? P.REP_ERR_TOO_BIG : P.REP_ERR_UNSUP, Buffer.from("option too long"));
        continue;
      }
      const data = length > 0 ? await this.reader.take(length) : Buffer.alloc(0);
      const invalid = (message: string): void => reply(P.REP_ERR_INVALID, Buffer.from(message));
      switch (option) {
        case P.OPT_EXPORT_NAME: {
          if (data.toString("utf8") !== this.exp.name) throw new Hangup("unknown export");
          const b = Buffer.alloc(this.noZeroes ? 10 : 134);
          b.writeBigUInt64BE(BigInt(this.exp.device.size), 0);
          b.writeUInt16BE(this.transmissionFlags, 8);
          this.socket.write(b);
          return true;
        }
        case P.OPT_ABORT:
          reply(P.REP_ACK);
          return false;
        case P.OPT_LIST: {
          if (length !== 0) {
            invalid("OPT_LIST should not have length");
            break;
          }
          const name = Buffer.from(this.exp.name);
          const desc = Buffer.from(this.exp.description ?? "");
          const b = Buffer.alloc(4 + name.length + desc.length);
          b.writeUInt32BE(name.length, 0);
          name.copy(b, 4);
          desc.copy(b, 4 + name.length);
          reply(P.REP_SERVER, b);
          reply(P.REP_ACK);
          break;
        }
        case P.OPT_STARTTLS:
          reply(P.REP_ERR_POLICY, Buffer.from("TLS not configured"));
          break;
        case P.OPT_INFO:
        case P.OPT_GO: {
          const parsed = parseInfoRequest(data);
          if (!parsed) {
            invalid("malformed info request");
            break;
          }
          if (parsed.name !== this.exp.name) {
            reply(P.REP_ERR_UNKNOWN, Buffer.from(`export '${parsed.name}' not present`));
            break;
          }
          const exportInfo = Buffer.alloc(12);
          exportInfo.writeUInt16BE(P.INFO_EXPORT, 0);
          exportInfo.writeBigUInt64BE(BigInt(this.exp.device.size), 2);
          exportInfo.writeUInt16BE(this.transmissionFlags, 10);
          if (parsed.requests.includes(P.INFO_NAME)) {
            reply(P.REP_INFO, Buffer.concat([u16(P.INFO_NAME), Buffer.from(this.exp.name)]));
          }
          if (parsed.requests.includes(P.INFO_DESCRIPTION) && this.exp.description !== undefined) {
            reply(P.REP_INFO, Buffer.concat([u16(P.INFO_DESCRIPTION), Buffer.from(this.exp.description)]));
          }
          // Block sizes: any byte alignment works; 4 KiB is the preferred size; 32 MiB at most.
          const bs = Buffer.alloc(14);
          bs.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
          bs.writeUInt32BE(1, 2);
          bs.writeUInt32BE(4096, 6);
          bs.writeUInt32BE(P.MAX_PAYLOAD, 10);
          reply(P.REP_INFO, bs);
          reply(P.REP_INFO, exportInfo);
          reply(P.REP_ACK);
          if (option === P.OPT_GO) return true;
          break;
        }
        case P.OPT_STRUCTURED_REPLY:
          if (length !== 0) invalid("OPT_STRUCTURED_REPLY should not have length");
          else if (this.structured) invalid("structured reply already negotiated");
          else {
            this.structured = true;
            reply(P.REP_ACK);
          }
          break;
        case P.OPT_LIST_META_CONTEXT:
        case P.OPT_SET_META_CONTEXT: {
          if (option === P.OPT_SET_META_CONTEXT && !this.structured) {
            invalid("use of OPT_SET_META_CONTEXT requires structured replies");
            break;
          }
          const parsed = parseMetaContextRequest(data);
          if (!parsed) {
            invalid("malformed meta context request");
            break;
          }
          if (parsed.name !== this.exp.name) {
            reply(P.REP_ERR_UNKNOWN, Buffer.from(`export '${parsed.name}' not present`));
            break;
          }
          const chosen = new Map<string, number>();
          if (parsed.queries.length === 0 && option === P.OPT_LIST_META_CONTEXT) {
            for (const [n, id] of CONTEXTS) chosen.set(n, id);
          }
          for (const q of parsed.queries) {
            for (const [n, id] of CONTEXTS) {
              if (q === n || (q.endsWith(":") && n.startsWith(q))) chosen.set(n, id);
            }
          }
          for (const [n, id] of chosen) {
            const b = Buffer.alloc(4 + Buffer.byteLength(n));
            b.writeUInt32BE(id, 0);
            b.write(n, 4);
            reply(P.REP_META_CONTEXT, b);
          }
          if (option === P.OPT_SET_META_CONTEXT) this.contexts = [...chosen.values()];
          reply(P.REP_ACK);
          break;
        }
        default:
          reply(P.REP_ERR_UNSUP, Buffer.from(`unsupported option ${option}`));
      }
    }
  }

  private async transmission(): Promise<void> {
    for (;;) {
      if (this.busy) await this.slowDown();
      if (this.stopping) return;
      const h = this.reader.takeNow(P.REQUEST_HEADER_BYTES) ?? (await this.reader.take(P.REQUEST_HEADER_BYTES));
      const req = P.decodeRequest(h);
      if (!req) throw new Hangup("bad request magic");
      let payload: Buffer | undefined;
      if (req.type === P.CMD_WRITE) {
        // A payload too large to buffer cannot be skipped safely: the connection ends.
        if (req.length > P.MAX_PAYLOAD) throw new Hangup(`write of ${req.length} bytes exceeds ${P.MAX_PAYLOAD}`);
        payload = this.reader.takeNow(req.length) ?? (await this.reader.take(req.length));
      }
      if (req.type === P.CMD_DISC) return;
      // Reads and writes hold their data until answered: count it, so that memory stays bounded.
      const bytes = req.type === P.CMD_READ || req.type === P.CMD_WRITE ? Math.min(req.length, P.MAX_PAYLOAD) : 0;
      this.inflight++;
      this.inflightBytes += bytes;
      void this.serve(req, payload, bytes);
    }
  }

  private get busy(): boolean {
    return (
      this.inflight >= MAX_INFLIGHT || this.inflightBytes > MAX_BUFFERED || this.socket.writableLength > MAX_UNSENT
    );
  }

  /** Waits until fewer requests (and bytes) are in flight and the socket has taken our replies. */
  private async slowDown(): Promise<void> {
    while (!this.stopping && this.busy) {
      if (this.socket.destroyed) throw new Hangup("client disconnected");
      await this.nextWake();
    }
  }

  /** Resolves at the next wake(). */
  private nextWake(): Promise<void> {
    this.idle ??= new Promise<void>((resolve) => {
      this.wakeIdle = resolve;
    });
    return this.idle;
  }

  /** A request ended, or the socket drained or closed: those waiting look again. */
  private wake(): void {
    const wake = this.wakeIdle;
    if (wake === undefined) return;
    this.idle = undefined;
    this.wakeIdle = undefined;
    wake();
  }

  private async drained(): Promise<void> {
    while (this.inflight > 0) await this.nextWake();
  }

  private send(b: Buffer | Uint8Array): void {
    if (!this.socket.destroyed) this.socket.write(b);
  }

  /**
   * Sends the pieces of one reply as one write (no copy into a joined buffer); `written` runs
   * once the socket is done with them (or could not send them).
   */
  private sendAll(parts: (Buffer | Uint8Array)[], written?: () => void): void {
    if (this.socket.destroyed) {
      written?.();
      return;
    }
    this.socket.cork();
    parts.forEach((p, i) => {
      if (i === parts.length - 1 && written) this.socket.write(p, () => written());
      else this.socket.write(p);
    });
    this.socket.uncork();
  }

  private done(req: P.Request, error: number, message = ""): void {
    if (!this.structured) this.send(P.simpleReply(error, req));
    else if (error) this.send(P.errorChunk(req, error, message));
    else this.send(P.chunkHeader(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, req, 0));
  }

  /** Answers one request (never rejects); `bytes` is what it counted in inflightBytes. */
  private async serve(req: P.Request, payload: Buffer | undefined, bytes: number): Promise<void> {
    const dev = this.exp.device;
    try {
      const error = this.validate(req);
      if (error) {
        this.done(req, error[0], error[1]);
        return;
      }
      const fua = (req.flags & P.CMD_FLAG_FUA) !== 0;
      switch (req.type) {
        case P.CMD_READ:
          await this.read(req);
          return;
        case P.CMD_WRITE:
          await dev.write(payload as Buffer, req.offset);
          if (fua) await dev.flush();
          break;
        case P.CMD_WRITE_ZEROES:
          if (req.flags & P.CMD_FLAG_FAST_ZERO && !this.exp.fastZero) {
            this.done(req, P.ENOTSUP, "fast zeroing is not supported");
            return;
          }
          await dev.writeZeroes(req.offset, req.length, { unmap: (req.flags & P.CMD_FLAG_NO_HOLE) === 0 });
          if (fua) await dev.flush();
          break;
        case P.CMD_TRIM:
          await dev.discard(req.offset, req.length);
          if (fua) await dev.flush();
          break;
        case P.CMD_FLUSH:
          await dev.flush();
          break;
        case P.CMD_CACHE:
          break;
        case P.CMD_BLOCK_STATUS:
          await this.blockStatus(req);
          return;
      }
      this.done(req, 0);
    } catch (e) {
      this.log(`request failed: ${(e as Error).message}`);
      this.done(req, errnoOf(e), (e as Error).message);
    } finally {
      this.inflight--;
      this.inflightBytes -= bytes;
      this.wake();
    }
  }

  /** The protocol's checks of a request: [errno, message] when it must be refused. */
  private validate(req: P.Request): [number, string] | undefined {
    const size = this.exp.device.size;
    const flagsAllowed = COMMAND_FLAGS[req.type];
    const mask = flagsAllowed === undefined ? undefined : flagsAllowed | P.CMD_FLAG_FUA;
    if (mask === undefined) return [P.EINVAL, `unsupported command ${req.type}`];
    if (req.flags & ~mask) return [P.EINVAL, `unsupported flags 0x${req.flags.toString(16)}`];
    if (req.flags & P.CMD_FLAG_DF && !this.structured) return [P.EINVAL, "DF without structured replies"];
    const writes = req.type === P.CMD_WRITE || req.type === P.CMD_WRITE_ZEROES || req.type === P.CMD_TRIM;
    if (writes && this.exp.readOnly) return [P.EPERM, "export is read-only"];
    if (req.type === P.CMD_READ && req.length > P.MAX_PAYLOAD) {
      return [P.EINVAL, `len (${req.length}) is larger than max len (${P.MAX_PAYLOAD})`];
    }
    if (req.type !== P.CMD_FLUSH && (req.offset > size || req.length > size - req.offset)) {
      const error = req.type === P.CMD_WRITE || req.type === P.CMD_WRITE_ZEROES ? P.ENOSPC : P.EINVAL;
      return [error, `operation past EOF; From: ${req.offset}, Len: ${req.length}, Size: ${size}`];
    }
    if (req.type === P.CMD_BLOCK_STATUS) {
      if (!this.structured || this.contexts.length === 0) return [P.EINVAL, "no metadata context negotiated"];
      if (req.length === 0) return [P.EINVAL, "block status of zero length"];
    }
    return undefined;
  }

  private async read(req: P.Request): Promise<void> {
    const dev = this.exp.device;
    if (req.length === 0) {
      // Nothing to send: no data chunk may be empty.
      this.done(req, 0);
      return;
    }
    if (this.sendCached(req)) return;
    const pooled = readBuffers.take(req.length);
    const buf = pooled.subarray(0, req.length);
    let handedOver = false;
    try {
      if (!this.structured) {
        await dev.read(buf, req.offset);
        handedOver = true;
        this.sendAll([P.simpleReply(0, req), buf], () => readBuffers.give(pooled));
        return;
      }
      handedOver = await this.sendSparse(req, buf, () => readBuffers.give(pooled));
    } finally {
      if (!handedOver) readBuffers.give(pooled);
    }
  }

  /**
   * The whole reply straight from the page cache to the socket (sendCached: no copy through this
   * process), where the device can: its data in one piece of a local file, all in memory, and
   * nothing queued on the socket before it. True when sent (or queued).
   */
  private sendCached(req: P.Request): boolean {
    const dev = this.exp.device;
    if (this.fd < 0 || !dev.sendCached || req.length > SEND_CACHED_MAX) return false;
    // Only behind nothing: bytes written to the descriptor here must not overtake queued replies.
    if (this.socket.writableLength > 0 || this.socket.destroyed) return false;
    let header: Buffer;
    if (this.structured) {
      header = Buffer.allocUnsafe(28);
      P.writeOffsetChunk(header, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, req, req.offset, req.length);
    } else {
      header = P.simpleReply(0, req);
    }
    let rest: Uint8Array[] | undefined;
    try {
      rest = dev.sendCached(this.fd, header, req.offset, req.length);
    } catch (e) {
      // Part of the reply is out and the rest could not be read: nothing can follow it.
      this.log(`request failed: ${(e as Error).message}`);
      this.socket.destroy();
      return true;
    }
    if (rest === undefined) return false;
    for (const part of rest) this.socket.write(part);
    return true;
  }

  /** A structured read reply: data chunks, and holes for zero runs. True once `buf` is sent. */
  private async sendSparse(req: P.Request, buf: Buffer, written: () => void): Promise<boolean> {
    // Zero runs go out as holes (unless the client wants one chunk): less to send and to read.
    let holes: number[];
    if (req.flags & P.CMD_FLAG_DF) {
      await this.exp.device.read(buf, req.offset);
      holes = [];
    } else {
      holes = await readSparse(this.exp.device, buf, req.offset);
    }
    // The chunk headers share one buffer: a data chunk's is 28 bytes (with its offset), a hole's 32.
    const end = req.offset + req.length;
    const headers = Buffer.allocUnsafe(32 * (holes.length + 1));
    const out: Buffer[] = [];
    let at = 0;
    const chunk = (type: number, start: number, length: number): void => {
      const done = start + length === end ? P.REPLY_FLAG_DONE : 0;
      const size = type === P.REPLY_TYPE_OFFSET_DATA ? 28 : 32;
      const h = headers.subarray(at, at + size);
      at += size;
      P.writeOffsetChunk(h, done, type, req, start, length);
      if (size === 28) out.push(h, buf.subarray(start - req.offset, start - req.offset + length));
      else out.push(h);
    };
    let pos = req.offset;
    for (let i = 0; i < holes.length; i += 2) {
      if (holes[i] > pos) chunk(P.REPLY_TYPE_OFFSET_DATA, pos, holes[i] - pos);
      chunk(P.REPLY_TYPE_OFFSET_HOLE, holes[i], holes[i + 1]);
      pos = holes[i] + holes[i + 1];
    }
    if (pos < end) chunk(P.REPLY_TYPE_OFFSET_DATA, pos, end - pos);
    this.sendAll(out, written);
    return true;
  }

  private async blockStatus(req: P.Request): Promise<void> {
    const one = (req.flags & P.CMD_FLAG_REQ_ONE) !== 0;
    const extents: Extent[] = [];
    for await (const e of this.exp.device.blockStatus(req.offset, req.length)) {
      const start = Math.max(e.start, req.offset);
      const end = Math.min(e.start + e.length, req.offset + req.length);
      if (end > start) extents.push({ ...e, start, length: end - start });
      if (one || extents.length >= MAX_EXTENTS) break;
    }
    const out: Buffer[] = [];
    this.contexts.forEach((id, k) => {
      const status = (e: Extent): number =>
        id === CONTEXT_BASE ? (e.data ? 0 : P.STATE_HOLE) | (e.zero ? P.STATE_ZERO : 0) : e.present ? e.depth + 1 : 0;
      const descriptors: [number, number][] = [];
      for (const e of extents) {
        const s = status(e);
        const last = descriptors[descriptors.length - 1];
        if (last && last[1] === s && !one) last[0] += e.length;
        else descriptors.push([e.length, s]);
        if (one) break;
      }
      const b = Buffer.alloc(4 + 8 * descriptors.length);
      b.writeUInt32BE(id, 0);
      descriptors.forEach(([length, s], i) => {
        b.writeUInt32BE(length, 4 + 8 * i);
        b.writeUInt32BE(s, 8 + 8 * i);
      });
      const flags = k === this.contexts.length - 1 ? P.REPLY_FLAG_DONE : 0;
      out.push(P.chunkHeader(flags, P.REPLY_TYPE_BLOCK_STATUS, req, b.length), b);
    });
    this.send(Buffer.concat(out));
  }
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

/** NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count of info requests, requests. */
function parseInfoRequest(d: Buffer): { name: string; requests: number[] } | undefined {
  if (d.length < 6) return undefined;
  const n = d.readUInt32BE(0);
  if (n > P.MAX_STRING || 4 + n + 2 > d.length) return undefined;
  const name = d.toString("utf8", 4, 4 + n);
  const count = d.readUInt16BE(4 + n);
  if (d.length !== 4 + n + 2 + 2 * count) return undefined;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(d.readUInt16BE(6 + n + 2 * i));
  return { name, requests };
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data: export name, count of queries, queries. */
function parseMetaContextRequest(d: Buffer): { name: string; queries: string[] } | undefined {
  if (d.length < 8) return undefined;
  const n = d.readUInt32BE(0);
  if (n > P.MAX_STRING || 4 + n + 4 > d.length) return undefined;
  const name = d.toString("utf8", 4, 4 + n);
  const count = d.readUInt32BE(4 + n);
  let at = 8 + n;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > d.length) return undefined;
    const len = d.readUInt32BE(at);
    if (len > P.MAX_STRING || at + 4 + len > d.length) return undefined;
    queries.push(d.toString("utf8", at + 4, at + 4 + len));
    at += 4 + len;
  }
  return at === d.length ? { name, queries } : undefined;
}

/**
 * Listens for NBD clients. Emits "idle" each time the last client has left, and "connection"
 * when one arrives.
 */
export class NbdServer extends EventEmitter {
  private readonly server: net.Server;
  private readonly connections = new Map<net.Socket, { conn: Connection; done: Promise<void> }>();
  private readonly log: (line: string) => void;
  private readonly waiting: net.Socket[] = [];
  private closing = false;

  constructor(private readonly opts: NbdServerOptions) {
    super();
    this.log = opts.log ?? (() => {});
    this.server = netModule().createServer((socket) => this.accept(socket));
  }

  /** Starts listening on a TCP address or a Unix socket path. */
  listen(target: { host: string; port: number } | { path: string }): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen("path" in target ? target.path : { host: target.host, port: target.port }, () => {
        this.server.off("error", reject);
        resolve();
      });
    });
  }

  address(): net.AddressInfo | string | null {
    return this.server.address();
  }

  get clients(): number {
    return this.connections.size;
  }

  /**
   * A connection beyond --shared waits, unanswered, until a client leaves (as with qemu-nbd,
   * which stops accepting): the client sees no greeting until then.
   */
  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.connections.size >= this.opts.shared) {
      this.waiting.push(socket);
      socket.once("close", () => {
        const i = this.waiting.indexOf(socket);
        if (i >= 0) this.waiting.splice(i, 1);
      });
      return;
    }
    const conn = new Connection(socket, this.opts.export, this.log);
    const done = conn.run().finally(() => {
      this.connections.delete(socket);
      const next = this.waiting.shift();
      if (next && !this.closing) this.accept(next);
      else if (this.connections.size === 0) this.emit("idle");
    });
    this.connections.set(socket, { conn, done });
    this.emit("connection");
  }

  /** Stops accepting; requests in flight finish and are answered; then connections close. */
  async close(): Promise<void> {
    this.closing = true;
    for (const socket of this.waiting.splice(0)) socket.destroy();
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const { conn } of this.connections.values()) conn.stop();
    await Promise.all([...this.connections.values()].map((c) => c.done));
    for (const socket of this.connections.keys()) socket.destroy();
    await closed;
  }
}
