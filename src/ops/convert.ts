/**
 * `convert`: copy the guest contents of one or more sources (concatenated) into a target.
 * Work follows the sources' extents: holes and zero runs cost nothing on a target that
 * already reads as zeros; data is copied in chunks with several in flight.
 */
import type { BlockDevice } from "../image/block-device.js";
import { isZero } from "../image/zero.js";
import { mapExtents } from "./map.js";

/** qemu-img's I/O buffer: data is copied at most this much per request. */
export const CONVERT_CHUNK = 2 * 1024 * 1024;

export interface ConvertOptions {
  /** -S: zero runs at least this long (and aligned to it) are not written; 0 writes everything. */
  minSparse?: number;
  /** -m: requests in flight. */
  parallel?: number;
  /** The target reads as zeros before the copy (a new image), so zeros need no writes. */
  targetZeroed?: boolean;
  onProgress?: (fraction: number) => void;
}

/** Runs tasks with at most `limit` in flight; the first failure stops new work and is thrown. */
class TaskPool {
  private readonly running = new Set<Promise<void>>();
  private failure: unknown;
  private failed = false;
  constructor(private readonly limit: number) {}

  async add(task: () => Promise<void>): Promise<void> {
    while (this.running.size >= this.limit) await Promise.race(this.running);
    if (this.failed) throw this.failure;
    const p: Promise<void> = task().then(
      () => {
        this.running.delete(p);
      },
      (e: unknown) => {
        this.running.delete(p);
        if (!this.failed) {
          this.failed = true;
          this.failure = e;
        }
      },
    );
    this.running.add(p);
  }

  async drain(): Promise<void> {
    await Promise.all(this.running);
    if (this.failed) throw this.failure;
  }
}

export async function convert(sources: BlockDevice[], target: BlockDevice, opts: ConvertOptions = {}): Promise<void> {
  const minSparse = opts.minSparse ?? 4096;
  const targetZeroed = opts.targetZeroed ?? false;
  const total = sources.reduce((n, s) => n + s.size, 0);
  const pool = new TaskPool(Math.max(1, opts.parallel ?? 8));
  const buffers: Uint8Array[] = [];
  let done = 0;
  const advance = (n: number): void => {
    done += n;
    opts.onProgress?.(total === 0 ? 1 : done / total);
  };

  const copyChunk = async (src: BlockDevice, srcOffset: number, dstOffset: number, length: number): Promise<void> => {
    const buf = (buffers.pop() ?? new Uint8Array(CONVERT_CHUNK)).subarray(0, length);
    try {
      await src.read(buf, srcOffset);
      await writeSparse(target, buf, dstOffset, minSparse, targetZeroed);
    } finally {
      buffers.push(new Uint8Array(buf.buffer, 0, CONVERT_CHUNK));
    }
    advance(length);
  };

  let base = 0;
  for (const src of sources) {
    for await (const e of mapExtents(src)) {
      const dst = base + e.start;
      if (!e.data && e.zero) {
        if (!targetZeroed) await pool.add(() => target.writeZeroes(dst, e.length));
        advance(e.length);
        continue;
      }
      for (let at = e.start; at < e.start + e.length; ) {
        const n = Math.min(CONVERT_CHUNK - (at % CONVERT_CHUNK), e.start + e.length - at);
        const from = at;
        await pool.add(() => copyChunk(src, from, base + from, n));
        at += n;
      }
    }
    base += src.size;
  }
  await pool.drain();
  opts.onProgress?.(1);
}

/**
 * Writes `buf` at `offset`, leaving out (or zero-writing, on a target that is not zeroed) the
 * all-zero blocks of `minSparse` bytes aligned in the target.
 */
async function writeSparse(
  target: BlockDevice,
  buf: Uint8Array,
  offset: number,
  minSparse: number,
  targetZeroed: boolean,
): Promise<void> {
  if (minSparse <= 0) {
    await target.write(buf, offset);
    return;
  }
  let runStart = 0;
  let runZero: boolean | undefined;
  const flush = async (end: number): Promise<void> => {
    if (runZero === undefined || end === runStart) return;
    const part = buf.subarray(runStart, end);
    if (!runZero) await target.write(part, offset + runStart);
    else if (!targetZeroed) await target.writeZeroes(offset + runStart, part.length);
  };
  for (let at = 0; at < buf.length; ) {
    const blockEnd = Math.min(buf.length, at + minSparse - ((offset + at) % minSparse));
    const zero = blockEnd - at === minSparse || offset + blockEnd === target.size ? isZero(buf.subarray(at, blockEnd)) : false;
    if (zero !== runZero) {
      await flush(at);
      runStart = at;
      runZero = zero;
    }
    at = blockEnd;
  }
  await flush(buf.length);
}
