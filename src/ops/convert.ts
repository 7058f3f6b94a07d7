/**
 * `convert`: copy the guest contents of one or more sources (concatenated) into a target.
 * Work follows the sources' extents: holes and zero runs cost nothing on a target that
 * already reads as zeros; data is copied in chunks with several in flight.
 */
import type { BlockDevice } from "../image/block-device.js";
import { isZero } from "../image/zero.js";
import { ioBuffer } from "../io/buffer.js";
import { mapExtents } from "./map.js";

/** qemu-img's I/O buffer: data is copied at most this much per request. */
export const CONVERT_CHUNK = 2 * 1024 * 1024;
/**
 * With -c, chunks of this size (or one cluster, if larger): each takes milliseconds to compress,
 * so a smaller chunk costs little time (~0.35x qemu-img's either way on the bench's zlib case),
 * and the chunks in flight and their results hold a quarter of the memory (71 -> 61 MiB peak).
 */
export const COMPRESS_CHUNK = 512 * 1024;

export interface ConvertOptions {
  /** -S: zero runs at least this long (and aligned to it) are not written; 0 writes everything. */
  minSparse?: number;
  /**
   * -m: the most requests in flight (default 8). Without -W only as many chunks are read ahead
   * of the in-order writes as keep them busy (see Pacer).
   */
  parallel?: number;
  /** The target reads as zeros before the copy (a new image), so zeros need no writes. */
  targetZeroed?: boolean;
  /** Without -W, writes reach the target in guest order, so a new image is laid out in order. */
  outOfOrder?: boolean;
  /** -B: copy only what the sources' top layers hold; the rest comes from the target's backing file. */
  topLayerOnly?: boolean;
  /** -c: compress whole clusters into a target that stores compressed clusters. */
  compressor?: Compressor;
  onProgress?: (fraction: number) => void;
}

/** Compresses a run of whole clusters. */
export interface Compressor {
  /** Chunks it compresses at once: more than twice as many in flight only wait in its queue. */
  readonly threads: number;
  compress(clusters: Uint8Array, clusterSize: number): Promise<CompressedClusters>;
}

export interface CompressedClusters {
  /** Each cluster compressed, or undefined where it does not shrink. */
  clusters: (Uint8Array | undefined)[];
  /** The results are written: their memory may be reused. */
  release(): void;
}

/** A target that stores compressed clusters (a qcow2 image). */
export interface CompressedTarget extends BlockDevice {
  readonly clusterSize: number;
  writeCompressed(guestCluster: number, data: Uint8Array): Promise<void>;
}

/** Runs tasks with at most `limit` in flight; the first failure stops new work and is thrown. */
class TaskPool {
  private readonly running = new Set<Promise<void>>();
  private failure: unknown;
  private failed = false;
  constructor(public limit: number) {}

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

/**
 * How many chunks to have in flight when writes go in order: enough reads ahead to keep the
 * writes busy, and no more. Each chunk in flight holds a 2 MiB buffer and a thread; when reading
 * a chunk costs about what writing one does (a local raw or qcow2 source), two — one read while
 * one is written — copied the 2 GiB bench disk with 15 % less CPU than eight (the buffers stay in
 * the CPU's cache, and fewer threads contend for two cores). Slow reads (decompression, HTTP,
 * compression for -c) raise it up to the limit.
 */
class Pacer {
  private readMs = -1;
  private writeMs = -1;
  constructor(private readonly max: number) {}

  get window(): number {
    const min = Math.min(2, this.max);
    if (this.readMs < 0) return min;
    const ahead = Math.ceil(this.readMs / Math.max(this.writeMs, 0.01)) + 1;
    return Math.max(min, Math.min(this.max, ahead));
  }

  /** One chunk's read (with compression) and write times, in milliseconds. */
  observe(readMs: number, writeMs: number): void {
    const avg = (old: number, v: number): number => (old < 0 ? v : old * 0.8 + v * 0.2);
    this.readMs = avg(this.readMs, readMs);
    this.writeMs = avg(this.writeMs, writeMs);
  }
}

type Range = { start: number; length: number; zero: boolean };

/** The sources' extents in target coordinates: data to copy, zeros, and (-B) nothing. */
async function* targetRanges(sources: BlockDevice[], topLayerOnly: boolean): AsyncIterable<Range> {
  let base = 0;
  for (const src of sources) {
    for await (const e of mapExtents(src)) {
      if (topLayerOnly && (e.depth > 0 || !e.present)) continue;
      yield { start: base + e.start, length: e.length, zero: !e.data && e.zero };
    }
    base += src.size;
  }
}

/** Reads target range [offset, offset+dst.length) from the concatenated sources. */
async function readSources(sources: BlockDevice[], dst: Uint8Array, offset: number): Promise<void> {
  let base = 0;
  for (const src of sources) {
    const from = Math.max(offset, base);
    const to = Math.min(offset + dst.length, base + src.size);
    if (from < to) await src.read(dst.subarray(from - offset, to - offset), from - base);
    base += src.size;
  }
}

export async function convert(sources: BlockDevice[], target: BlockDevice, opts: ConvertOptions = {}): Promise<void> {
  // A target with clusters gets whole clusters: skipping zeros inside one would only make it
  // copy-on-write the rest (qemu-img aligns its zero detection to the cluster size too).
  const targetCluster = (target as Partial<CompressedTarget>).clusterSize ?? 0;
  const minSparse = opts.minSparse === 0 ? 0 : Math.max(opts.minSparse ?? 4096, targetCluster);
  const targetZeroed = opts.targetZeroed ?? false;
  const compressor = opts.compressor;
  // Data is copied in whole target clusters: a write of part of a new cluster would have to
  // assemble the rest of it (copy-on-write) and the next range would write into it again.
  const cs = Math.max(1, targetCluster);
  const total = sources.reduce((n, s) => n + s.size, 0);
  const parallel = Math.max(1, Math.min(opts.parallel ?? 8, compressor ? 2 * compressor.threads : Infinity));
  const chunkSize = compressor ? Math.max(cs, COMPRESS_CHUNK) : CONVERT_CHUNK;
  const pacer = opts.outOfOrder ? undefined : new Pacer(parallel);
  const pool = new TaskPool(pacer?.window ?? parallel);
  const buffers: Uint8Array[] = [];
  let done = 0;
  const advance = (n: number): void => {
    done += n;
    opts.onProgress?.(total === 0 ? 1 : done / total);
  };
  // Without -W, a chunk's writes start only once the previous chunk's writes are done (the
  // place in line is taken when the chunk is dispatched, in guest order), as qemu-img does: a
  // new image allocates its clusters in guest order, and one file never has two writers
  // contending for its inode lock. Reads still run ahead in parallel.
  let previousDone: Promise<void> = Promise.resolve();
  const takeSlot = (): { run: (write: () => Promise<void>) => Promise<void>; release: () => void } => {
    if (opts.outOfOrder) return { run: (write) => write(), release: () => {} };
    const previous = previousDone;
    let done!: () => void;
    previousDone = new Promise<void>((r) => {
      done = r;
    });
    return { run: (write) => previous.then(write), release: () => done() };
  };

  /** Copies [dst, dst+length); `counted` of it is progress (the rest belongs to other ranges). */
  const copyChunk = async (dst: number, length: number, counted: number): Promise<void> => {
    const slot = takeSlot();
    const buf = (buffers.pop() ?? ioBuffer(chunkSize)).subarray(0, length);
    try {
      const t0 = performance.now();
      await readSources(sources, buf, dst);
      const packed = compressor ? await compressor.compress(buf, (target as CompressedTarget).clusterSize) : undefined;
      const readMs = performance.now() - t0;
      try {
        await slot.run(async () => {
          const t1 = performance.now();
          if (packed) await writeClusters(target as CompressedTarget, buf, dst, packed.clusters, targetZeroed);
          else await writeSparse(target, buf, dst, minSparse, targetZeroed);
          if (pacer) {
            pacer.observe(readMs, performance.now() - t1);
            pool.limit = pacer.window;
          }
        });
      } finally {
        packed?.release();
      }
    } finally {
      slot.release();
      buffers.push(new Uint8Array(buf.buffer, buf.byteOffset, chunkSize));
    }
    advance(counted);
  };

  // Data is copied in chunks aligned in the target (to whole clusters), so a chunk may reach into
  // the ranges before and after its own; each range counts its own bytes once for progress.
  let copiedTo = 0;
  for await (const r of targetRanges(sources, opts.topLayerOnly ?? false)) {
    if (r.zero) {
      if (!targetZeroed) {
        const { start, length } = r;
        const slot = takeSlot();
        await pool.add(() => slot.run(() => target.writeZeroes(start, length)).finally(slot.release));
      }
      advance(r.length);
      continue;
    }
    const rangeEnd = r.start + r.length;
    let at = Math.max(Math.floor(r.start / cs) * cs, copiedTo);
    const end = Math.min(total, Math.ceil(rangeEnd / cs) * cs);
    // The part the previous range's last chunk already copied.
    if (copiedTo > r.start) advance(Math.min(copiedTo, rangeEnd) - r.start);
    while (at < end) {
      // Chunks run on from the range's start, as qemu-img's do (not from multiples of the chunk
      // size): a new image's clusters, and the refcount blocks placed after them, land where
      // qemu-img puts them.
      const n = Math.min(chunkSize, end - at);
      const from = at;
      const counted = Math.max(0, Math.min(from + n, rangeEnd) - Math.max(from, r.start));
      await pool.add(() => copyChunk(from, n, counted));
      at += n;
    }
    copiedTo = Math.max(copiedTo, end);
  }
  await pool.drain();
  opts.onProgress?.(1);
}

/** Writes whole clusters compressed where they shrink; all-zero clusters are left out. */
async function writeClusters(
  target: CompressedTarget,
  buf: Uint8Array,
  offset: number,
  packed: (Uint8Array | undefined)[],
  targetZeroed: boolean,
): Promise<void> {
  const cs = target.clusterSize;
  for (let i = 0; i * cs < buf.length; i++) {
    const part = buf.subarray(i * cs, Math.min(buf.length, (i + 1) * cs));
    const at = offset + i * cs;
    if (isZero(part)) {
      if (!targetZeroed) await target.writeZeroes(at, part.length);
    } else if (packed[i] !== undefined && part.length === cs) {
      await target.writeCompressed(at / cs, packed[i] as Uint8Array);
    } else {
      await target.write(part, at);
    }
  }
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
  // Each run is written as soon as it ends, one after another, in order: a new image allocates
  // their clusters in guest order.
  let runStart = 0;
  let runZero: boolean | undefined;
  const flush = async (end: number): Promise<void> => {
    if (runZero === undefined || end === runStart) return;
    const at = offset + runStart;
    if (!runZero) await target.write(buf.subarray(runStart, end), at);
    else if (!targetZeroed) await target.writeZeroes(at, end - runStart);
  };
  for (let at = 0; at < buf.length; ) {
    const blockEnd = Math.min(buf.length, at + minSparse - ((offset + at) % minSparse));
    const zero =
      blockEnd - at === minSparse || offset + blockEnd === target.size ? isZero(buf.subarray(at, blockEnd)) : false;
    if (zero !== runZero) {
      await flush(at);
      runStart = at;
      runZero = zero;
    }
    at = blockEnd;
  }
  await flush(buf.length);
}
