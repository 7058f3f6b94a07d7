/** `compare`: qemu-img compare's walk, verdicts and messages. */
import type { BlockDevice, Extent } from "../image/block-device.js";
import { isZero } from "../image/zero.js";
import { ExtentCursor } from "./extents.js";

const IO_BUF_SIZE = 2 * 1024 * 1024;
const SECTOR = 512;

export interface CompareResult {
  identical: boolean;
  /** What qemu-img prints on stdout (without -q). */
  messages: string[];
}

export interface CompareOptions {
  strict?: boolean;
  onProgress?: (fraction: number) => void;
}

/** Start of the first 512-byte sector holding a non-zero byte, or -1 (qemu-img's find_nonzero). */
function firstNonZero(buf: Uint8Array): number {
  for (let i = 0; i < buf.length; i += SECTOR) {
    if (!isZero(buf.subarray(i, Math.min(buf.length, i + SECTOR)))) return i;
  }
  return -1;
}

/** Where two buffers first differ, at 512-byte sector granularity as qemu-img reports it. */
function firstDifferingSector(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i += SECTOR) {
    const end = Math.min(a.length, i + SECTOR);
    for (let j = i; j < end; j++) if (a[j] !== b[j]) return i;
  }
  return -1;
}

/**
 * The block status flags qemu-img compare -s compares: allocated, zero, data, offset valid,
 * and whether the run reaches the end of the image.
 */
function statusBits(e: Extent, size: number): number {
  return (
    (e.present ? 1 : 0) |
    (e.zero ? 2 : 0) |
    (e.data ? 4 : 0) |
    (e.offset !== undefined ? 8 : 0) |
    (e.start + e.length >= size ? 16 : 0)
  );
}

export async function compareImages(a: BlockDevice, b: BlockDevice, opts: CompareOptions = {}): Promise<CompareResult> {
  const messages: string[] = [];
  const common = Math.min(a.size, b.size);
  const total = Math.max(a.size, b.size);
  const progress = (at: number): void => opts.onProgress?.(total === 0 ? 1 : at / total);
  if (opts.strict && a.size !== b.size) {
    return { identical: false, messages: ["Strict mode: Image size mismatch!"] };
  }
  const buf1 = new Uint8Array(IO_BUF_SIZE);
  const buf2 = new Uint8Array(IO_BUF_SIZE);
  const ca = new ExtentCursor(a, 0, a.size);
  const cb = new ExtentCursor(b, 0, b.size);
  const differs = (at: number): CompareResult => ({
    identical: false,
    messages: [...messages, `Content mismatch at offset ${at}!`],
  });
  let offset = 0;
  while (offset < common) {
    const ea = await ca.at(offset);
    const eb = await cb.at(offset);
    let chunk = Math.min(ea.length, eb.length, common - offset);
    if (opts.strict && statusBits(ea, a.size) !== statusBits(eb, b.size)) {
      return { identical: false, messages: [`Strict mode: Offset ${offset} block status mismatch!`] };
    }
    if (!(ea.zero && eb.zero)) {
      chunk = Math.min(chunk, IO_BUF_SIZE);
      if (ea.present === eb.present) {
        if (ea.present) {
          const x = buf1.subarray(0, chunk);
          const y = buf2.subarray(0, chunk);
          await Promise.all([a.read(x, offset), b.read(y, offset)]);
          const d = firstDifferingSector(x, y);
          if (d >= 0) return differs(offset + d);
        }
      } else {
        const x = buf1.subarray(0, chunk);
        await (ea.present ? a : b).read(x, offset);
        const nz = firstNonZero(x);
        if (nz >= 0) return differs(offset + nz);
      }
    }
    offset += chunk;
    progress(offset);
  }
  if (a.size !== b.size) {
    messages.push("Warning: Image size mismatch!");
    const over = a.size > b.size ? a : b;
    const c = new ExtentCursor(over, offset, over.size);
    while (offset < total) {
      const e = await c.at(offset);
      let chunk = e.length;
      if (e.present && !e.zero) {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        const x = buf1.subarray(0, chunk);
        await over.read(x, offset);
        const nz = firstNonZero(x);
        if (nz >= 0) return differs(offset + nz);
      }
      offset += chunk;
      progress(offset);
    }
  }
  messages.push("Images are identical.");
  return { identical: true, messages };
}
