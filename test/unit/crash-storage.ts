/**
 * Crash simulation for the write path (DESIGN.md, "Write ordering", invariant 3).
 *
 * CrashStorage wraps a MemoryStorage and records every write, truncate and flush in the order
 * the engine issued them. A crash is then any state the disk could be left in: everything
 * issued before some flush, plus any subset of the writes issued after it (and before the next
 * flush), each of which may also be torn at a sector boundary. `crashImage` builds such a state.
 */
import type { MemoryStorage } from "../../src/io/memory.js";
import type { Storage } from "../../src/io/storage.js";

export type StorageOp =
  | { kind: "write"; offset: number; data: Uint8Array }
  | { kind: "truncate"; size: number }
  | { kind: "flush" };

export class CrashStorage implements Storage {
  readonly log: StorageOp[] = [];
  /** The contents when recording started. */
  readonly initial: Uint8Array;

  constructor(private readonly inner: MemoryStorage) {
    this.initial = inner.bytes();
  }

  get name(): string {
    return this.inner.name;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  read(dst: Uint8Array, offset: number): Promise<number> {
    return this.inner.read(dst, offset);
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    this.log.push({ kind: "write", offset, data: src.slice() });
    await this.inner.write(src, offset);
  }

  async truncate(size: number): Promise<void> {
    this.log.push({ kind: "truncate", size });
    await this.inner.truncate(size);
  }

  async flush(): Promise<void> {
    this.log.push({ kind: "flush" });
    await this.inner.flush();
  }

  async close(): Promise<void> {
    await this.inner.close();
  }

  /** Log positions of the flushes, in order. */
  flushPositions(): number[] {
    const out: number[] = [];
    this.log.forEach((op, i) => {
      if (op.kind === "flush") out.push(i);
    });
    return out;
  }

  /**
   * The crash window after the flush at log position `flushAt` (-1: before any flush): the log
   * positions of the writes and truncates issued after it and before the next flush.
   */
  windowAfter(flushAt: number): { start: number; end: number; ops: number[] } {
    const start = flushAt + 1;
    let end = start;
    while (end < this.log.length && this.log[end].kind !== "flush") end++;
    const ops: number[] = [];
    for (let i = start; i < end; i++) ops.push(i);
    return { start, end, ops };
  }

  /**
   * The disk after a crash: the initial contents, every op before log position `durable`, and
   * then the ops of `persisted` (log positions, applied in log order, each possibly replaced by
   * a torn version).
   */
  crashImage(durable: number, persisted: readonly (number | StorageOp)[]): Uint8Array {
    const disk = new Disk(this.initial);
    for (let i = 0; i < durable; i++) disk.apply(this.log[i]);
    for (const p of persisted) disk.apply(typeof p === "number" ? this.log[p] : p);
    return disk.bytes();
  }
}

/**
 * A write torn at the 512-byte boundary `at` (0 < at < length, a multiple of 512 from the
 * write's start): only the first part, or only the second, reached the disk.
 */
export function tornWrite(op: StorageOp & { kind: "write" }, at: number, keepFirst: boolean): StorageOp {
  return keepFirst
    ? { kind: "write", offset: op.offset, data: op.data.subarray(0, at) }
    : { kind: "write", offset: op.offset + at, data: op.data.subarray(at) };
}

/** A growable byte array that ops are applied to synchronously. */
class Disk {
  private buf: Uint8Array;
  private length: number;

  constructor(initial: Uint8Array) {
    this.buf = initial.slice();
    this.length = initial.length;
  }

  apply(op: StorageOp): void {
    if (op.kind === "write") {
      this.ensure(op.offset + op.data.length);
      this.buf.set(op.data, op.offset);
      this.length = Math.max(this.length, op.offset + op.data.length);
    } else if (op.kind === "truncate") {
      this.ensure(op.size);
      if (op.size < this.length) this.buf.fill(0, op.size, this.length);
      this.length = op.size;
    }
  }

  bytes(): Uint8Array {
    return this.buf.slice(0, this.length);
  }

  private ensure(n: number): void {
    if (n <= this.buf.length) return;
    const grown = new Uint8Array(Math.max(n, this.buf.length * 2));
    grown.set(this.buf.subarray(0, this.length));
    this.buf = grown;
  }
}

/** A Storage that yields to the event loop a random number of times before each request. */
export class DelayStorage implements Storage {
  constructor(
    private readonly inner: Storage,
    private readonly random: (n: number) => number,
    private readonly maxYields = 4,
  ) {}

  get name(): string {
    return this.inner.name;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  private async pause(): Promise<void> {
    const n = this.random(this.maxYields + 1);
    for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
  }

  async size(): Promise<number> {
    await this.pause();
    return this.inner.size();
  }

  async read(dst: Uint8Array, offset: number): Promise<number> {
    await this.pause();
    return this.inner.read(dst, offset);
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    // No copy: like a real file, the bytes are taken when the write happens, so a caller that
    // changes a buffer while its write is in flight is caught.
    await this.pause();
    await this.inner.write(src, offset);
  }

  async flush(): Promise<void> {
    await this.pause();
    await this.inner.flush();
  }

  async truncate(size: number): Promise<void> {
    await this.pause();
    await this.inner.truncate(size);
  }

  async close(): Promise<void> {
    await this.inner.close();
  }
}
