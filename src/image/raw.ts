/** RawImage: a plain file (or any Storage) as a BlockDevice. */
import { QcowError } from "../errors.js";
import { readFull, type Storage } from "../io/storage.js";
import type { BlockDevice, Extent } from "./block-device.js";

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
    return new RawImage(storage, Math.ceil((await storage.size()) / 512) * 512, filename);
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
   * Data and holes, as QEMU's file driver reports them (holes read as zeros but are still
   * "present"). Storage that cannot tell holes is all data. The size is rounded up to a
   * 512-byte sector, as QEMU does; the part past the end of the file is a hole.
   */
  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    const end = Math.min(this.size, offset + length);
    if (offset >= end) return;
    const runs = this.storage.dataRuns
      ? this.storage.dataRuns(offset, end - offset)
      : [{ start: offset, length: end - offset, data: true }];
    for await (const r of runs) {
      yield {
        start: r.start,
        length: r.length,
        present: true,
        zero: !r.data,
        data: r.data,
        depth: 0,
        offset: r.start,
        file: this.filename,
      };
    }
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError(
        "invalid-argument",
        `Request of ${length} bytes at ${offset} is beyond the end of ${this.filename} (${this.size})`,
      );
    }
  }
}
