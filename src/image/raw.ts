/** RawImage: a plain file (or any Storage) as a BlockDevice. */
import { QcowError } from "../errors.js";
import { isZero } from "./zero.js";
import { type Storage, readFull } from "../io/storage.js";
import type { BlockDevice, Extent } from "./block-device.js";

/** Granularity at which a raw file's holes are told apart from data (a file system block). */
const HOLE_GRANULARITY = 4096;
const SCAN_CHUNK = 1024 * 1024;

export class RawImage implements BlockDevice {
  readonly format = "raw";
  readonly filename: string;
  readonly readOnly: boolean;
  size: number;

  private constructor(
    readonly storage: Storage,
    size: number,
    filename: string,
  ) {
    this.size = size;
    this.filename = filename;
    this.readOnly = storage.readOnly;
  }

  static async open(storage: Storage, filename = storage.name): Promise<RawImage> {
    return new RawImage(storage, await storage.size(), filename);
  }

  async read(dst: Uint8Array, offset: number): Promise<void> {
    this.check(offset, dst.length);
    await readFull(this.storage, dst, offset);
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    this.check(offset, src.length);
    await this.storage.write(src, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    const chunk = new Uint8Array(Math.min(length, SCAN_CHUNK));
    for (let pos = offset; pos < offset + length; pos += chunk.length) {
      await this.storage.write(chunk.subarray(0, Math.min(chunk.length, offset + length - pos)), pos);
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    this.check(offset, length);
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.storage.flush();
  }

  async close(): Promise<void> {
    await this.storage.close();
  }

  /**
   * Data and holes. A fully allocated file is all data and a file with no blocks all holes;
   * otherwise all-zero blocks are reported as holes (a written block of zeros reads the same).
   */
  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    const end = Math.min(this.size, offset + length);
    if (offset >= end) return;
    const allocated = this.storage.allocatedSize ? await this.storage.allocatedSize() : this.size;
    if (allocated === 0 || allocated >= this.size) {
      const data = allocated !== 0;
      yield { start: offset, length: end - offset, present: true, zero: !data, data, depth: 0, offset, file: this.filename };
      return;
    }
    const buf = new Uint8Array(SCAN_CHUNK);
    let run: Extent | undefined;
    for (let chunkAt = offset; chunkAt < end; chunkAt += SCAN_CHUNK) {
      const n = Math.min(SCAN_CHUNK, end - chunkAt);
      await readFull(this.storage, buf.subarray(0, n), chunkAt);
      for (let at = 0; at < n; ) {
        const blockEnd = Math.min(n, at - ((chunkAt + at) % HOLE_GRANULARITY) + HOLE_GRANULARITY);
        const hole = isZero(buf.subarray(at, blockEnd));
        if (run && run.zero === hole) {
          run.length += blockEnd - at;
        } else {
          if (run) yield run;
          run = { start: chunkAt + at, length: blockEnd - at, present: true, zero: hole, data: !hole, depth: 0, offset: chunkAt + at, file: this.filename };
        }
        at = blockEnd;
      }
    }
    if (run) yield run;
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError("invalid-argument", `Request of ${length} bytes at ${offset} is beyond the end of ${this.filename} (${this.size})`);
    }
  }
}
