/**
 * `convert`: copy the guest contents of one or more sources (concatenated) into a target.
 * Work follows the sources' extents: holes and zero runs cost nothing on a target that
 * already reads as zeros; data is copied in chunks with several in flight.
 */
import type { BlockDevice } from "../image/block-device.js";
import { allDone } from "../image/lock.js";
import { isZero } from "../image/zero.js";
import { ioBuffer } from "../io/buffer.js";
import { mapExtents } from "./map.js";

/**
 * Milliseconds, for the pacer. Node's `performance` global loads its perf_hooks modules on first
 * use (~1 ms of start-up); `process.hrtime` is already there. Browsers have only `performance`.
 */
const hrtime = (globalThis as { process?: { hrtime?: () => [number, number] } }).process?.hrtime;
const now: () => number = hrtime
  ? () => {
      const [s, ns] = hrtime();
      return s * 1e3 + ns / 1e6;
    }
  : () => performance.now();

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
 * writes busy. Each chunk in flight holds a buffer (2 MiB) until its write is done. Since a
 * chunk's write is queued behind the one in flight, at least six: with two, the writer waited
 * for the next chunk's read between most writes (the addon counted 526 writes of ~180 ms in all
 * and 90-180 ms of waiting between them), and the 2 GiB raw -> qcow2 copy took 322 ms, with four
 * 275-279, with six 267, with eight 272 (qemu-img: 271-276 in the same batches; qcow2 -> raw 316,
 * 274, 262 against qemu-img's 303). Slow reads (decompression, HTTP, compression for -c) raise it
 * up to the limit.
 */
const MIN_WINDOW = 6;

class Pacer {
  private readMs = -1;
  private writeMs = -1;
  constructor(private readonly max: number) {}

  get window(): number {
    const min = Math.min(MIN_WINDOW, this.max);
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

type Slot = {
  /**
   * Resolves when this chunk's writes may start: with `dataOnly`, once the chunk before it has
   * issued its writes; otherwise once every earlier write is done.
   */
  start: (dataOnly: boolean) => Promise<void>;
  /** This chunk's writes are issued. */
  issued: () => void;
  /** This chunk's writes are done (or failed, or there were none). */
  done: () => void;
};

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
  // Without -W, writes are issued in guest order, as qemu-img's are: a new image allocates its
  // clusters in guest order. A chunk of data only (its zero blocks skipped) is issued as soon as
  // the chunk before it has issued its writes: the target allocates in call order, and the
  // chunk's pwrite is queued behind those in flight instead of waiting for their completion to
  // come back through the event loop. (Letting at most two chunks' writes out at once, so that
  // writes waiting for the file hold fewer of libuv's threads, made raw -> qcow2 322 ms against
  // 280.) Anything else (zero writes, compressed clusters) starts once every earlier write is
  // done.
  let previousIssued: Promise<void> = Promise.resolve();
  let previousDone: Promise<void> = Promise.resolve();
  const takeSlot = (): Slot => {
    if (opts.outOfOrder) return { start: () => Promise.resolve(), issued: () => {}, done: () => {} };
    const issuedBefore = previousIssued;
    const doneBefore = previousDone;
    let issued!: () => void;
    let own!: () => void;
    previousIssued = new Promise<void>((r) => {
      issued = r;
    });
    const ownDone = new Promise<void>((r) => {
      own = r;
    });
    previousDone = doneBefore.then(() => ownDone);
    return {
      start: (dataOnly) => (dataOnly ? issuedBefore : doneBefore),
      issued: () => issued(),
      done: () => {
        issued();
        own();
      },
    };
  };

  /** Copies [dst, dst+length); `counted` of it is progress (the rest belongs to other ranges). */
  const copyChunk = async (dst: number, length: number, counted: number): Promise<void> => {
    const slot = takeSlot();
    const buf = (buffers.pop() ?? ioBuffer(chunkSize)).subarray(0, length);
    try {
      const t0 = now();
      await readSources(sources, buf, dst);
      const packed = compressor ? await compressor.compress(buf, (target as CompressedTarget).clusterSize) : undefined;
      const readMs = now() - t0;
      try {
        const runs = packed ? undefined : sparseRuns(buf, dst, minSparse, target.size);
        const dataOnly = runs !== undefined && (targetZeroed || runs.every((r) => !r.zero));
        await slot.start(dataOnly);
        const t1 = now();
        if (packed) await writeClusters(target as CompressedTarget, buf, dst, packed.clusters, targetZeroed);
        else await writeRuns(target, buf, dst, runs as Run[], targetZeroed, dataOnly ? slot.issued : undefined);
        if (pacer) {
          pacer.observe(readMs, now() - t1);
          pool.limit = pacer.window;
        }
      } finally {
        packed?.release();
      }
    } finally {
      slot.done();
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
        await pool.add(() =>
          slot
            .start(false)
            .then(() => target.writeZeroes(start, length))
            .finally(slot.done),
        );
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

type Run = { start: number; end: number; zero: boolean };

/**
 * `buf` (at `offset`) in runs of data and zeros: all-zero blocks of `minSparse` bytes aligned in
 * the target are zero runs. With `minSparse` 0, one run of data.
 */
function sparseRuns(buf: Uint8Array, offset: number, minSparse: number, targetSize: number): Run[] {
  if (minSparse <= 0) return [{ start: 0, end: buf.length, zero: false }];
  const runs: Run[] = [];
  for (let at = 0; at < buf.length; ) {
    const blockEnd = Math.min(buf.length, at + minSparse - ((offset + at) % minSparse));
    const zero =
      blockEnd - at === minSparse || offset + blockEnd === targetSize ? isZero(buf.subarray(at, blockEnd)) : false;
    const last = runs[runs.length - 1];
    if (last !== undefined && last.zero === zero) last.end = blockEnd;
    else runs.push({ start: at, end: blockEnd, zero });
    at = blockEnd;
  }
  return runs;
}

/**
 * Writes the runs of `buf` at `offset`: data runs written, zero runs left out (or zero-written,
 * on a target that is not zeroed). With `issued`, the runs are data only (or zeros left out):
 * their writes are all issued at once, in order, and `issued` is called before they complete.
 * Otherwise each run is written once the one before it is done.
 */
async function writeRuns(
  target: BlockDevice,
  buf: Uint8Array,
  offset: number,
  runs: Run[],
  targetZeroed: boolean,
  issued?: () => void,
): Promise<void> {
  if (issued) {
    const writes: Promise<void>[] = [];
    for (const r of runs) if (!r.zero) writes.push(target.write(buf.subarray(r.start, r.end), offset + r.start));
    issued();
    return allDone(writes);
  }
  for (const r of runs) {
    const at = offset + r.start;
    if (!r.zero) await target.write(buf.subarray(r.start, r.end), at);
    else if (!targetZeroed) await target.writeZeroes(at, r.end - r.start);
  }
}
