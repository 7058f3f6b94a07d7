import { QcowError } from "../errors.js";
import type { Storage } from "./storage.js";

/** Storage in memory, growing as it is written. */
export class MemoryStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  private buf: Uint8Array;
  private length: number;

  constructor(initial?: Uint8Array, opts: { readOnly?: boolean; name?: string } = {}) {
    this.buf = initial ? initial.slice() : new Uint8Array(0);
    this.length = this.buf.length;
    this.readOnly = opts.readOnly ?? false;
    this.name = opts.name ?? "memory";
  }

  /** The current contents (a copy). */
  bytes(): Uint8Array {
    return this.buf.slice(0, this.length);
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(dst: Uint8Array, offset: number): Promise<number> {
    const n = Math.max(0, Math.min(dst.length, this.length - offset));
    dst.set(this.buf.subarray(offset, offset + n));
    return n;
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new QcowError("read-only", `${this.name} is read-only`);
    this.ensure(offset + src.length);
    this.buf.set(src, offset);
    this.length = Math.max(this.length, offset + src.length);
  }

  async flush(): Promise<void> {}

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new QcowError("read-only", `${this.name} is read-only`);
    this.ensure(size);
    if (size < this.length) this.buf.fill(0, size, this.length);
    this.length = size;
  }

  async close(): Promise<void> {}

  private ensure(n: number): void {
    if (n <= this.buf.length) return;
    const grown = new Uint8Array(Math.max(n, this.buf.length * 2));
    grown.set(this.buf.subarray(0, this.length));
    this.buf = grown;
  }
}
