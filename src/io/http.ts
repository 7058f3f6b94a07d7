/**
 * Read-only Storage on an HTTP(S) resource, through range requests made with the global `fetch`
 * (Node 20 and browsers alike; no node: module here).
 *
 * Reads are served from a bounded LRU cache of fixed-size blocks. Blocks missing from it that
 * are wanted in the same turn of the event loop (one large read, or many concurrent ones) are
 * fetched together: each run of adjacent blocks is one `Range: bytes=a-b` request. Transient
 * failures (network errors, timeouts, 408, 429, 5xx) are retried with exponential backoff.
 * Every response's validators (ETag, Last-Modified, size) must match the ones seen when the
 * resource was opened: an image whose bytes change underneath its reader would be silently
 * mixed from two versions, so a change is an error instead.
 */
import { QcowError } from "../errors.js";
import { combinePath, type Storage, type StorageOpener } from "./storage.js";

export interface HttpStorageOptions {
  /** Extra request headers (authorization, cookies, ...), sent with every request. */
  headers?: Record<string, string>;
  /** Bytes of the block cache (default 4 MiB). */
  cacheBytes?: number;
  /** Size of a cache block, the smallest unit fetched (default 64 KiB). */
  blockSize?: number;
  /** The largest single range request (default 4 MiB); longer runs of blocks are split. */
  maxRequestBytes?: number;
  /** How many times a transient failure is retried before giving up (default 4). */
  retries?: number;
  /** The first retry's delay; each further retry waits twice as long (default 250 ms). */
  retryDelayMs?: number;
  /** A request that has not finished after this long is aborted and retried (default 30 s). */
  timeoutMs?: number;
  /** The fetch to use (default: the global fetch); tests inject one. */
  fetch?: typeof fetch;
}

const DEFAULTS = {
  cacheBytes: 4 * 1024 * 1024,
  blockSize: 64 * 1024,
  maxRequestBytes: 4 * 1024 * 1024,
  retries: 4,
  retryDelayMs: 250,
  timeoutMs: 30_000,
};

/** The longest wait a server's Retry-After may impose on one retry. */
const MAX_RETRY_AFTER_MS = 30_000;

/** True for names qcowkit opens with HttpStorage. */
export function isHttpUrl(name: string): boolean {
  return /^https?:\/\//i.test(name);
}

/** A failure worth trying again (the request may well succeed a moment later). */
class Transient extends Error {}

/** What identifies one version of the resource. */
interface Validators {
  etag: string | undefined;
  lastModified: string | undefined;
}

/** Worth retrying: timeouts, rate limits, server errors (not 501, which says "never"). */
const transientStatus = (status: number): boolean =>
  status === 408 || status === 429 || (status >= 500 && status !== 501);

const statusText = (res: Response): string => `HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ""}`;

/** Weak comparison (RFC 9110 8.8.3.2): the opaque tags, with or without W/. */
const opaqueTag = (etag: string): string => (etag.startsWith("W/") ? etag.slice(2) : etag);

/** Parses `Content-Range: bytes first-last/complete` (complete may be "*"). */
function parseContentRange(v: string | null): { first: number; last: number; complete?: number } | undefined {
  const m = v === null ? null : /^bytes\s+(\d+)-(\d+)\/(\d+|\*)$/i.exec(v.trim());
  if (!m) return undefined;
  return { first: Number(m[1]), last: Number(m[2]), complete: m[3] === "*" ? undefined : Number(m[3]) };
}

/** Drops a response's body unread (never download what will not be used). */
function discard(res: Response): void {
  res.body?.cancel().catch(() => {});
}

/** An LRU map of cache blocks with a byte budget. */
class BlockCache {
  private readonly blocks = new Map<number, Uint8Array>();
  private bytes = 0;
  constructor(private readonly budget: number) {}

  get(index: number): Uint8Array | undefined {
    const b = this.blocks.get(index);
    if (b !== undefined) {
      // Map order is insertion order: re-inserting makes the block the most recent.
      this.blocks.delete(index);
      this.blocks.set(index, b);
    }
    return b;
  }

  put(index: number, block: Uint8Array): void {
    if (block.length > this.budget) return;
    const old = this.blocks.get(index);
    if (old !== undefined) {
      this.bytes -= old.length;
      this.blocks.delete(index);
    }
    this.blocks.set(index, block);
    this.bytes += block.length;
    for (const [k, b] of this.blocks) {
      if (this.bytes <= this.budget) break;
      this.blocks.delete(k);
      this.bytes -= b.length;
    }
  }

  clear(): void {
    this.blocks.clear();
    this.bytes = 0;
  }
}

interface Waiter {
  index: number;
  resolve(block: Uint8Array): void;
  reject(e: unknown): void;
}

export class HttpStorage implements Storage {
  readonly readOnly = true;
  readonly name: string;
  private readonly opts: typeof DEFAULTS & { headers: Record<string, string>; fetch: typeof fetch };
  private readonly cache: BlockCache;
  private length = 0;
  private validators: Validators = { etag: undefined, lastModified: undefined };
  /** Blocks being fetched, so that concurrent readers of one block share one request. */
  private readonly loading = new Map<number, Promise<Uint8Array>>();
  /** Blocks wanted since the last dispatch: they go out together, adjacent ones merged. */
  private queue: Waiter[] = [];
  private dispatchScheduled = false;
  private readonly inFlight = new Set<AbortController>();
  private closed = false;

  private constructor(url: string, opts: HttpStorageOptions) {
    this.name = url;
    const fetchFn = opts.fetch ?? globalThis.fetch;
    if (typeof fetchFn !== "function") throw new QcowError("unsupported", "HTTP storage needs a global fetch");
    this.opts = {
      cacheBytes: opts.cacheBytes ?? DEFAULTS.cacheBytes,
      blockSize: opts.blockSize ?? DEFAULTS.blockSize,
      maxRequestBytes: opts.maxRequestBytes ?? DEFAULTS.maxRequestBytes,
      retries: opts.retries ?? DEFAULTS.retries,
      retryDelayMs: opts.retryDelayMs ?? DEFAULTS.retryDelayMs,
      timeoutMs: opts.timeoutMs ?? DEFAULTS.timeoutMs,
      headers: opts.headers ?? {},
      // Called unbound: browsers refuse a fetch whose `this` is not the global object.
      fetch: (input, init) => fetchFn(input, init),
    };
    const positive = (n: number): boolean => Number.isSafeInteger(n) && n > 0;
    if (!positive(this.opts.blockSize) || !positive(this.opts.maxRequestBytes)) {
      throw new QcowError("invalid-argument", "HTTP storage: blockSize and maxRequestBytes must be positive integers");
    }
    if (!Number.isInteger(this.opts.retries) || this.opts.retries < 0 || !(this.opts.cacheBytes >= 0)) {
      throw new QcowError("invalid-argument", "HTTP storage: retries and cacheBytes must not be negative");
    }
    this.cache = new BlockCache(this.opts.cacheBytes);
  }

  /**
   * Opens `url`: a HEAD request (or, where HEAD is refused or says too little, a GET of the
   * first byte) learns the size and validators and makes sure the server honours ranges.
   */
  static async open(url: string, opts: HttpStorageOptions = {}): Promise<HttpStorage> {
    if (!isHttpUrl(url)) throw new QcowError("invalid-argument", `Could not open '${url}': not an http(s) URL`);
    const s = new HttpStorage(url, opts);
    await s.probe();
    return s;
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(dst: Uint8Array, offset: number): Promise<number> {
    if (this.closed) throw new QcowError("io", `Could not read '${this.name}': the storage is closed`);
    const end = Math.min(this.length, offset + dst.length);
    if (end <= offset) return 0;
    const bs = this.opts.blockSize;
    const waits: Promise<void>[] = [];
    for (let i = Math.floor(offset / bs); i * bs < end; i++) {
      const start = i * bs;
      const copy = (block: Uint8Array): void => {
        const from = Math.max(offset, start);
        const to = Math.min(end, start + block.length);
        dst.set(block.subarray(from - start, to - start), from - offset);
      };
      const hit = this.cache.get(i);
      if (hit !== undefined) copy(hit);
      else waits.push(this.load(i).then(copy));
    }
    await Promise.all(waits);
    return end - offset;
  }

  async write(_src: Uint8Array, _offset: number): Promise<void> {
    throw new QcowError("read-only", `${this.name} is read-only`);
  }

  async truncate(_size: number): Promise<void> {
    throw new QcowError("read-only", `${this.name} is read-only`);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.closed = true;
    for (const c of this.inFlight) c.abort();
    this.cache.clear();
  }

  /** One block's bytes, fetched with whatever else is wanted in this turn of the event loop. */
  private load(index: number): Promise<Uint8Array> {
    let p = this.loading.get(index);
    if (p === undefined) {
      p = new Promise<Uint8Array>((resolve, reject) => this.queue.push({ index, resolve, reject }));
      this.loading.set(index, p);
      if (!this.dispatchScheduled) {
        this.dispatchScheduled = true;
        // A macrotask, not a microtask: readers that are a few awaits behind still join in.
        setTimeout(() => this.dispatch(), 0);
      }
    }
    return p;
  }

  private dispatch(): void {
    this.dispatchScheduled = false;
    const queue = this.queue.sort((a, b) => a.index - b.index);
    this.queue = [];
    const maxBlocks = Math.max(1, Math.floor(this.opts.maxRequestBytes / this.opts.blockSize));
    let run: Waiter[] = [];
    for (const w of queue) {
      const last = run[run.length - 1];
      if (last !== undefined && (w.index !== last.index + 1 || run.length >= maxBlocks)) {
        void this.fetchRun(run);
        run = [];
      }
      run.push(w);
    }
    if (run.length > 0) void this.fetchRun(run);
  }

  private async fetchRun(run: Waiter[]): Promise<void> {
    const bs = this.opts.blockSize;
    const start = run[0].index * bs;
    const end = Math.min(this.length, (run[run.length - 1].index + 1) * bs);
    try {
      const bytes = await this.getRange(start, end);
      for (const w of run) {
        const at = w.index * bs - start;
        const block = bytes.slice(at, Math.min(at + bs, bytes.length));
        this.cache.put(w.index, block);
        this.loading.delete(w.index);
        w.resolve(block);
      }
    } catch (e) {
      for (const w of run) {
        this.loading.delete(w.index);
        w.reject(e);
      }
    }
  }

  private baseHeaders(): Headers {
    const h = new Headers(this.opts.headers);
    // Byte ranges must count bytes of the file, not of a compressed transfer (browsers set this
    // themselves for range requests and ignore it here).
    h.set("Accept-Encoding", "identity");
    return h;
  }

  /** Fetches bytes [start, end) with one range request (retried while failures are transient). */
  private getRange(start: number, end: number): Promise<Uint8Array> {
    const where = `Could not read '${this.name}' (bytes ${start}-${end - 1})`;
    return this.attempt(where, async (signal) => {
      const headers = this.baseHeaders();
      headers.set("Range", `bytes=${start}-${end - 1}`);
      // Have the server refuse (412) rather than answer from a changed file. Only a strong tag
      // can be matched (a weak one never matches If-Match).
      const etag = this.validators.etag;
      if (etag !== undefined && !etag.startsWith("W/")) headers.set("If-Match", etag);
      const res = await this.fetchOnce({ method: "GET", headers, signal });
      if (res.status === 412 || res.status === 416) {
        discard(res);
        throw this.changed(statusText(res));
      }
      if (res.status === 200) {
        discard(res);
        throw this.noRanges();
      }
      if (res.status !== 206) throw this.failedStatus(where, res);
      this.checkValidators(res);
      const range = parseContentRange(res.headers.get("content-range"));
      if (range?.complete !== undefined && range.complete !== this.length) {
        discard(res);
        throw this.changed(`its size was ${this.length}, now ${range.complete}`);
      }
      if (range === undefined || range.first !== start || range.last !== end - 1) {
        discard(res);
        throw new QcowError(
          "io",
          `${where}: the server answered with ${res.headers.get("content-range") ?? "no Content-Range"}`,
        );
      }
      const body = new Uint8Array(await res.arrayBuffer());
      // A body cut short is a broken connection: worth another try.
      if (body.length !== end - start) throw new Transient(`received ${body.length} of ${end - start} bytes`);
      return body;
    });
  }

  /** HEAD, then if needed a one-byte ranged GET: size, validators and range support. */
  private async probe(): Promise<void> {
    const where = `Could not open '${this.name}'`;
    // Transient failures are retried; any other answer than 200 (405 or 501 for HEAD refused,
    // 403 for URLs signed for GET only, ...) leaves the decision to the GET below.
    const head = await this.attempt(where, async (signal) => {
      const res = await this.fetchOnce({ method: "HEAD", headers: this.baseHeaders(), signal });
      discard(res);
      return res;
    });
    const length = head.ok ? head.headers.get("content-length") : null;
    const acceptsRanges = head.ok && /\bbytes\b/i.test(head.headers.get("accept-ranges") ?? "");
    if (length !== null && /^\d+$/.test(length) && acceptsRanges) {
      this.length = Number(length);
      this.validators = { etag: head.headers.get("etag") ?? undefined, lastModified: lastModified(head) };
      return;
    }
    await this.attempt(where, async (signal) => {
      const headers = this.baseHeaders();
      headers.set("Range", "bytes=0-0");
      const res = await this.fetchOnce({ method: "GET", headers, signal });
      discard(res);
      if (res.status === 416) {
        // Nothing to read: an empty file ("bytes */0").
        const complete = /\/(\d+)\s*$/.exec(res.headers.get("content-range") ?? "");
        if (complete && Number(complete[1]) === 0) {
          this.length = 0;
          this.validators = { etag: res.headers.get("etag") ?? undefined, lastModified: lastModified(res) };
          return;
        }
      }
      if (res.status === 200) throw this.noRanges();
      if (res.status !== 206) throw this.failedStatus(where, res);
      const range = parseContentRange(res.headers.get("content-range"));
      if (range?.complete === undefined) {
        throw new QcowError("unsupported", `${where}: the server does not tell the file's size (Content-Range)`);
      }
      this.length = range.complete;
      this.validators = { etag: res.headers.get("etag") ?? undefined, lastModified: lastModified(res) };
    });
  }

  /**
   * Runs `request` until it succeeds, fails permanently (a QcowError), or has failed transiently
   * `retries + 1` times; waits between tries double, or follow the server's Retry-After.
   */
  private async attempt<T>(where: string, request: (signal: AbortSignal) => Promise<T>): Promise<T> {
    for (let tries = 0; ; tries++) {
      if (this.closed) throw new QcowError("io", `${where}: the storage was closed`);
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(new Transient("timed out")), this.opts.timeoutMs);
      this.inFlight.add(controller);
      let retryAfterMs = 0;
      try {
        return await request(controller.signal);
      } catch (e) {
        if (this.closed) throw new QcowError("io", `${where}: the storage was closed`);
        if (e instanceof QcowError) throw e;
        const reason =
          e instanceof RetryableStatus
            ? e.message
            : controller.signal.aborted
              ? `no answer within ${this.opts.timeoutMs} ms`
              : describe(e);
        if (e instanceof RetryableStatus) retryAfterMs = e.retryAfterMs;
        if (tries >= this.opts.retries) {
          const times = tries + 1;
          throw new QcowError("io", `${where}: ${reason} (after ${times} attempt${times === 1 ? "" : "s"})`, {
            cause: e,
          });
        }
      } finally {
        clearTimeout(timer);
        this.inFlight.delete(controller);
      }
      const backoff = this.opts.retryDelayMs * 2 ** tries;
      await new Promise((r) => setTimeout(r, Math.max(backoff, Math.min(retryAfterMs, MAX_RETRY_AFTER_MS))));
    }
  }

  /** One fetch; a transient HTTP status becomes a RetryableStatus error. */
  private async fetchOnce(init: RequestInit): Promise<Response> {
    const res = await this.opts.fetch(this.name, init);
    if (transientStatus(res.status)) {
      discard(res);
      throw new RetryableStatus(statusText(res), retryAfter(res));
    }
    return res;
  }

  private checkValidators(res: Response): void {
    const etag = res.headers.get("etag");
    const was = this.validators;
    if (was.etag !== undefined && etag !== null && opaqueTag(etag) !== opaqueTag(was.etag)) {
      discard(res);
      throw this.changed(`ETag ${was.etag}, now ${etag}`);
    }
    const lm = lastModified(res);
    if (was.lastModified !== undefined && lm !== undefined && lm !== was.lastModified) {
      discard(res);
      throw this.changed(`Last-Modified ${was.lastModified}, now ${lm}`);
    }
  }

  private changed(detail: string): QcowError {
    return new QcowError("io", `Could not read '${this.name}': the file changed on the server (${detail})`);
  }

  private noRanges(): QcowError {
    return new QcowError("unsupported", `server does not support range requests: ${this.name}`);
  }

  private failedStatus(where: string, res: Response): QcowError {
    discard(res);
    return new QcowError(res.status === 404 || res.status === 410 ? "not-found" : "io", `${where}: ${statusText(res)}`);
  }
}

/** A transient HTTP status (408, 429, 5xx), with the server's Retry-After if it gave one. */
class RetryableStatus extends Transient {
  constructor(
    message: string,
    readonly retryAfterMs: number,
  ) {
    super(message);
  }
}

function retryAfter(res: Response): number {
  const v = res.headers.get("retry-after");
  if (v === null) return 0;
  if (/^\d+$/.test(v.trim())) return Number(v) * 1000;
  const at = Date.parse(v);
  return Number.isNaN(at) ? 0 : Math.max(0, at - Date.now());
}

function lastModified(res: Response): string | undefined {
  return res.headers.get("last-modified") ?? undefined;
}

/** A network error's words: fetch wraps the real cause (ECONNREFUSED, ...) in a TypeError. */
function describe(e: unknown): string {
  if (!(e instanceof Error)) return String(e);
  const cause = e.cause as { code?: string; message?: string } | undefined;
  if (cause?.code) return `${e.message} (${cause.code})`;
  if (cause?.message) return `${e.message} (${cause.message})`;
  return e.message;
}

/**
 * A StorageOpener for http:// and https:// names, read-only: backing files named relative to a
 * remote image are fetched from next to it (QEMU's path_combine on the URL).
 */
export function createHttpOpener(opts: HttpStorageOptions = {}): StorageOpener {
  return {
    async open(name, { readOnly }) {
      if (!isHttpUrl(name)) {
        throw new QcowError("invalid-argument", `Could not open '${name}': not an http(s) URL`);
      }
      if (!readOnly) {
        throw new QcowError("read-only", `Could not open '${name}': the http driver does not support writes`);
      }
      try {
        return await HttpStorage.open(name, opts);
      } catch (e) {
        // Opening an image names the file itself (as qemu-img does, once for a URL).
        const prefix = `Could not open '${name}': `;
        if (e instanceof QcowError && e.message.startsWith(prefix)) {
          throw new QcowError(e.code, e.message.slice(prefix.length), { cause: e });
        }
        throw e;
      }
    },
    resolve: combinePath,
    async identity(name) {
      try {
        return new URL(name).href;
      } catch {
        return name;
      }
    },
  };
}

/** The HTTP(S) opener with default options. */
export const httpOpener: StorageOpener = createHttpOpener();
