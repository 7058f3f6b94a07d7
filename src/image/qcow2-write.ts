/**
 * The qcow2 write path: cluster allocation, copy-on-write, zero clusters, discard, compressed
 * clusters, and the write-back of metadata in crash-safe order.
 *
 * Ordering (what makes a crash leak at worst, never corrupt):
 *  - guest data is written before the L2 entry that points at it reaches the disk;
 *  - refcount increments reach the disk (flushed) before L2 tables, and L2 tables before the
 *    L1 entries that point at them;
 *  - decrements are applied only after the entries that dropped the references are on disk,
 *    and freed clusters are not reused before that.
 * Metadata changes are made in memory under one lock and written back by `flushMetadata`.
 * Requests that change the mapping of a guest cluster hold a lock on it (allocation
 * dependencies); overwrites of clusters this image owns go straight to their host cluster.
 */

import { corrupt, QcowError, unsupported } from "../errors.js";
import { setU64, textEncoder, view } from "../format/bytes.js";
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  AUTOCLEAR_KNOWN,
  encodeHeader,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  MAX_BACKING_NAME,
  type Qcow2Header,
} from "../format/header.js";
import {
  ClusterType,
  encodeCompressed,
  encodeL1Entry,
  encodeStandardL2,
  type L2Entry,
  maxRefcount,
} from "../format/tables.js";
import { readFull } from "../io/storage.js";
import { BitmapTracker } from "./bitmaps.js";
import { allDone, Mutex, RangeLocks, Turns } from "./lock.js";
import { type MetadataLayout, metadataClusters, overlappingIn } from "./overlap.js";
import type { Qcow2Image } from "./qcow2.js";
import { Refcounts, type TableMoved } from "./refcount.js";
import { rebuildRefcounts } from "./repair.js";
import { type ResizeOptions, resizeQcow2 } from "./resize.js";

/** Decrements makeEmpty holds back at most before applying them (bounds its memory). */
const MAX_PENDING_RELEASES = 1 << 20;

/** Most guest clusters one allocating request handles at once (bounds its buffer). */
const MAX_ALLOC_GROUP = 256;

/** What `Qcow2Writer.exclusive` hands to a whole-image metadata operation. */
export interface MetadataAccess {
  refcounts: Refcounts;
  /** Writes the header durably when the refcount table moves. */
  tableMoved: TableMoved;
  /** Writes dirty metadata back in crash-safe order (refcounts, L2 tables, L1 entries). */
  writeBack(): Promise<void>;
  /** The active L1 entry `index` changed in memory (img.l1 / img.l1Copied): write it back. */
  markL1Dirty(index: number): void;
}

/**
 * Marks a promise that is awaited later (after other awaits) as handled now, so that a failure
 * in between is not reported as an unhandled rejection; whoever awaits it still sees the error.
 */
function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/** Spare copy-on-write buffers kept (see allocatingWrite), in bytes. */
const COW_POOL_BYTES = 4 * 1024 * 1024;

export class Qcow2Writer {
  private readonly meta = new Mutex();
  private readonly locks = new RangeLocks();
  private readonly turns = new Turns();
  private readonly cowPool: Uint8Array[] = [];
  private readonly l1Dirty = new Set<number>();
  private readonly cs: number;
  /** Next free byte for compressed data (0: start a new cluster). */
  private compressedEnd = 0;
  /** Data reads and in-place writes in flight: released clusters are not freed while any run. */
  private inflight = 0;
  private closed = false;
  /** Changes whenever metadata may have moved (see checkOverlapInPlace). */
  private layoutVersion = 0;
  private metaClusters: { stamp: unknown[]; map: ReadonlyMap<number, string> } | undefined;
  private readonly stampNow: unknown[] = new Array(10);
  /** The header as last written: a failed header write puts memory back to it. */
  private durableHeader: Qcow2Header;
  /** Set once an inconsistency was found: the image is marked corrupt and writes stop. */
  private corruption: string | undefined;
  /** Enabled persistent bitmaps, kept in step with writes. */
  private bitmaps: BitmapTracker | undefined;

  private constructor(
    private readonly img: Qcow2Image,
    readonly refcounts: Refcounts,
  ) {
    this.cs = img.clusterSize;
    this.durableHeader = { ...img.header };
    this.layoutVersion++;
  }

  /** Prepares an image opened read-write: clears unknown autoclear bits, loads refcounts. */
  static async attach(img: Qcow2Image): Promise<Qcow2Writer> {
    const h = img.header;
    if (h.refcountTableClusters === 0) {
      throw corrupt("Image does not contain a reference count table; 'qcowkit check -r all' rebuilds it");
    }
    const w = new Qcow2Writer(img, await Refcounts.open(img.storage, h));
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      // Lazy refcounts were not written back before the image was last closed: rebuild them
      // from the references, as QEMU does when it opens such an image for writing.
      await rebuildRefcounts(img, w.refcounts, w.tableMoved);
      await w.refcounts.writeBack();
      await img.storage.flush();
      h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      await w.writeHeader();
    }
    w.reloadBitmaps();
    if (h.autoclearFeatures & ~AUTOCLEAR_KNOWN) {
      h.autoclearFeatures &= AUTOCLEAR_KNOWN;
      await w.writeHeader();
    }
    return w;
  }

  /**
   * Tracks the enabled bitmaps of the current bitmap directory (at open, and again after
   * bitmap-ops.ts replaced the directory). Bitmaps whose consistency bit is clear are stale
   * already; they are left as they are.
   */
  reloadBitmaps(): void {
    const img = this.img;
    const ext = img.extensions.bitmaps;
    this.bitmaps =
      img.bitmaps.length > 0 && ext && img.header.autoclearFeatures & AUTOCLEAR_BITMAPS
        ? new BitmapTracker(img.storage, img.bitmaps, ext.directoryOffset, img.clusterSize, img.size)
        : undefined;
  }

  /**
   * Sets the bits of the writes made so far in the tracked bitmaps and clears their in_use flag
   * (what `close` does), so that bitmap-ops.ts may then replace the bitmap directory.
   */
  async storeBitmaps(): Promise<void> {
    this.checkOpen();
    await this.flush();
    if (!this.bitmaps) return;
    await this.bitmaps.store(
      () => this.meta.run(() => this.refcounts.allocate(1, this.tableMoved)),
      () => this.meta.run(() => this.flushMetadata()),
    );
    await this.flush();
  }

  /**
   * For structures outside the L1/L2 tables (bitmap-ops.ts): `n` contiguous new clusters with
   * refcount 1 (durable with the next flush). Returns the offset of the first.
   */
  async allocateClusters(n: number): Promise<number> {
    this.checkOpen();
    return this.meta.run(() => this.refcounts.allocate(n, this.tableMoved));
  }

  /**
   * Drops one reference to each of `n` clusters from `offset` (bitmap-ops.ts). As for data
   * clusters, the decrement is applied at the next flush, so the caller first makes durable
   * whatever stops referring to them.
   */
  releaseClusters(offset: number, n: number): void {
    for (let i = 0; i < n; i++) this.refcounts.release(offset / this.cs + i);
  }

  /**
   * Rewrites the first cluster from the header fields (extensions kept) and flushes. Callers
   * change the fields first; if the write fails, every field goes back to what the disk last
   * had, so that no later header write carries a change whose other half never happened.
   */
  async writeHeader(): Promise<void> {
    const img = this.img;
    try {
      await img.storage.write(encodeHeader(img.header, img.extensions, img.backingName), 0);
      await img.storage.flush();
    } catch (e) {
      Object.assign(img.header, this.durableHeader);
      throw e;
    }
    this.durableHeader = { ...img.header };
  }

  private readonly tableMoved = async (offset: number, clusters: number): Promise<void> => {
    this.img.header.refcountTableOffset = offset;
    this.img.header.refcountTableClusters = clusters;
    await this.writeHeader();
  };

  private get dataFileRaw(): boolean {
    return this.img.dataFile !== undefined && (this.img.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  }

  // ---- mapping helpers -------------------------------------------------------------------

  /** The entry of guest cluster `gc` (undefined: no L2 table). */
  private entry(gc: number): L2Entry | undefined | Promise<L2Entry | undefined> {
    // Most lookups hit a cached table: answer those without a chain of promises.
    const cached = this.img.l2EntryIfCached(gc);
    return cached === undefined ? this.img.l2Entry(gc) : (cached ?? undefined);
  }

  /** A cluster this image owns outright: overwriting it in place changes no metadata. */
  private ownsData(e: L2Entry | undefined, gc: number, from: number, to: number): boolean {
    if (!e || e.type !== ClusterType.Normal || !e.copied) return false;
    if (!this.img.extendedL2) return true;
    const sc = this.img.subclusterSize;
    const base = gc * this.cs;
    const s0 = Math.floor((from - base) / sc);
    const s1 = Math.floor((to - 1 - base) / sc);
    const mask = s1 - s0 === 31 ? 0xffff_ffff : ((2 ** (s1 - s0 + 1) - 1) * 2 ** s0) >>> 0;
    return (e.allocMask & mask) >>> 0 === mask;
  }

  /**
   * Makes sure the L2 table for `l1Index` exists and belongs to this image alone (copying a
   * table shared with a snapshot). Returns its offset. Runs under the metadata lock.
   */
  private async ownL2(l1Index: number): Promise<number> {
    const img = this.img;
    if (l1Index >= img.l1.length) throw corrupt(`Guest offset beyond the L1 table (index ${l1Index})`);
    const old = img.l1[l1Index];
    if (old !== 0 && img.l1Copied[l1Index]) return old;
    const offset = await this.refcounts.allocate(1, this.tableMoved);
    this.checkOverlap([offset]);
    const table = new Uint8Array(this.cs);
    if (old !== 0) {
      const src = await img.loadL2(old);
      table.set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength));
      this.refcounts.release(old / this.cs);
    }
    img.l2Cache.markDirty(offset, view(table));
    img.l1[l1Index] = offset;
    img.l1Copied[l1Index] = 1;
    this.l1Changed(l1Index);
    return offset;
  }

  /** Writes the first 64 bits (and the bitmap, for extended L2) of an L2 entry in memory. */
  private async setEntry(gc: number, hi: number, lo: number, alloc = 0, zero = 0): Promise<void> {
    const img = this.img;
    const l1Index = Math.floor(gc / img.l2Entries);
    const owned = img.l1Copied[l1Index] === 1 ? img.l1[l1Index] : 0;
    const l2Offset = owned !== 0 ? owned : await this.ownL2(l1Index);
    this.putEntry(img.l2Cache.peek(l2Offset) ?? (await img.loadL2(l2Offset)), l2Offset, gc, hi, lo, alloc, zero);
  }

  /**
   * setEntry without waiting, where the L2 table is this image's own and cached (most calls):
   * false when it is not, and nothing was changed.
   */
  private setCachedEntry(gc: number, hi: number, lo: number, alloc: number, zero: number): boolean {
    const img = this.img;
    const l1Index = Math.floor(gc / img.l2Entries);
    const l2Offset = img.l1Copied[l1Index] === 1 ? img.l1[l1Index] : 0;
    const table = l2Offset !== 0 ? img.l2Cache.peek(l2Offset) : undefined;
    if (table === undefined) return false;
    this.putEntry(table, l2Offset, gc, hi, lo, alloc, zero);
    return true;
  }

  private putEntry(
    table: DataView,
    l2Offset: number,
    gc: number,
    hi: number,
    lo: number,
    alloc: number,
    zero: number,
  ): void {
    const img = this.img;
    const at = (gc % img.l2Entries) * img.l2EntryBytes;
    table.setUint32(at, hi);
    table.setUint32(at + 4, lo);
    if (img.extendedL2) {
      table.setUint32(at + 8, zero >>> 0);
      table.setUint32(at + 12, alloc >>> 0);
    }
    img.l2Cache.markDirty(l2Offset, table);
  }

  /** Drops this entry's reference to its host cluster(s); the decrement waits for write-back. */
  private releaseEntry(e: L2Entry | undefined): void {
    if (!e || this.img.dataFile) return;
    if (e.type === ClusterType.Compressed) {
      const first = Math.floor(e.hostOffset / 512) * 512;
      const last = first + Math.ceil(((e.hostOffset % 512) + e.compressedSize) / 512) * 512 - 1;
      for (let c = Math.floor(first / this.cs); c <= Math.floor(last / this.cs); c++) this.refcounts.release(c);
    } else if (e.hostOffset !== 0 && (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc)) {
      this.refcounts.release(e.hostOffset / this.cs);
    }
  }

  // ---- write -----------------------------------------------------------------------------

  /** Every change of guest data: tracked bitmaps are marked in_use first, then the range noted. */
  private async changing(offset: number, length: number): Promise<void> {
    if (!this.bitmaps) return;
    await this.bitmaps.beforeWrite();
    this.bitmaps.record(offset, length);
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    this.checkOpen();
    // Writes allocate in the order they were issued (a new image is laid out in guest order
    // when its writes come in order), while their data moves in parallel.
    const turn = this.turns.take();
    const cs = this.cs;
    const end = offset + src.length;
    const jobs: Promise<void>[] = [];
    const allocations: Promise<void>[] = [];
    try {
      if (this.bitmaps) await this.changing(offset, src.length); // (an await costs a turn even when there is nothing to do)
      let pos = offset;
      while (pos < end) {
        const gc = Math.floor(pos / cs);
        // Entries of cached tables come without waiting: `await` only a promise.
        const ep = this.entry(gc);
        const e = ep instanceof Promise ? await ep : ep;
        let runEnd = Math.min(end, (gc + 1) * cs);
        if (this.ownsData(e, gc, pos, runEnd)) {
          const host = (e as L2Entry).hostOffset + (pos - gc * cs);
          // Extend over following clusters that are owned and contiguous on the host.
          while (runEnd < end) {
            const ngc = runEnd / cs;
            const nep = this.entry(ngc);
            const ne = nep instanceof Promise ? await nep : nep;
            const nEnd = Math.min(end, runEnd + cs);
            if (!this.ownsData(ne, ngc, runEnd, nEnd) || (ne as L2Entry).hostOffset !== host + (runEnd - pos)) break;
            runEnd = nEnd;
          }
          jobs.push(handled(this.writeInPlace(src.subarray(pos - offset, runEnd - offset), host)));
        } else {
          let count = 1;
          const tableEnd = (Math.floor(gc / this.img.l2Entries) + 1) * this.img.l2Entries * cs;
          while (runEnd < end && runEnd < tableEnd && count < MAX_ALLOC_GROUP) {
            const ngc = runEnd / cs;
            const nEnd = Math.min(end, runEnd + cs);
            const nep = this.entry(ngc);
            if (this.ownsData(nep instanceof Promise ? await nep : nep, ngc, runEnd, nEnd)) break;
            runEnd = nEnd;
            count++;
          }
          // The parts of one write allocate one after another, in guest order, as QEMU's do.
          const after = allocations[allocations.length - 1];
          let allocated!: () => void;
          allocations.push(new Promise<void>((r) => (allocated = r)));
          jobs.push(
            handled(this.allocatingWrite(src.subarray(pos - offset, runEnd - offset), pos, turn, allocated, after)),
          );
        }
        pos = runEnd;
      }
    } catch (e) {
      // The parts already started finish (and fail, if they must) before this write reports:
      // nothing of it keeps running after the caller has seen the error.
      await Promise.allSettled(jobs);
      throw e;
    } finally {
      // Later writes may allocate once this one has (or has nothing to allocate). Most writes
      // have one part or none to allocate: no Promise.all for them.
      if (allocations.length === 0) this.turns.done(turn);
      else if (allocations.length === 1) allocations[0].then(() => this.turns.done(turn));
      else Promise.all(allocations).then(() => this.turns.done(turn));
    }
    await allDone(jobs);
    await this.maybeWriteBack();
  }

  /**
   * Overwrites clusters the image owns: no lock, no metadata. An allocating write that finds
   * such a cluster writes only its own bytes there, so the two never undo each other.
   */
  private async writeInPlace(data: Uint8Array, host: number): Promise<void> {
    this.checkOverlapInPlace(host, data.length);
    this.beginIo();
    try {
      await this.img.dataStorage.write(data, host);
    } finally {
      this.endIo();
    }
  }

  /**
   * What the guest sees at `offset` (within one cluster, whose L2 entry is `e`) into `dst`, for
   * copy-on-write. A cluster that reads as zeros without the backing file (unallocated with no
   * backing file and no data file, or zero-flagged) is zero-filled here: a new image's first
   * write to each cluster (fio's random writes: one in eight) then runs none of the read path.
   */
  private guestView(dst: Uint8Array, offset: number, e: L2Entry | undefined): Promise<unknown> | undefined {
    const img = this.img;
    const type = e?.type ?? ClusterType.Unallocated;
    const zeros =
      (type === ClusterType.Unallocated && !img.backing && !img.dataFile) ||
      (!img.extendedL2 && (type === ClusterType.ZeroPlain || type === ClusterType.ZeroAlloc));
    if (!zeros) return img.read(dst, offset);
    dst.fill(0);
    return undefined;
  }

  /** Data I/O on host clusters in flight: freed clusters are not released while any runs. */
  beginIo(): void {
    this.inflight++;
  }

  endIo(): void {
    this.inflight--;
  }

  /**
   * Writes `data` at guest `offset` into clusters that need new host space or a change of
   * their L2 entry: copy-on-write of the parts of each cluster the request does not cover.
   * It allocates on its `turn`, and after `after` (the allocation of the same write's part
   * before it).
   */
  private async allocatingWrite(
    data: Uint8Array,
    offset: number,
    turn = this.turns.take(),
    allocated: () => void = () => this.turns.done(turn),
    after?: Promise<void>,
  ): Promise<void> {
    const img = this.img;
    const cs = this.cs;
    const end = offset + data.length;
    const c0 = Math.floor(offset / cs);
    const c1 = Math.ceil(end / cs);
    // The turn comes before the cluster lock: a write waiting for its turn holds no lock.
    try {
      await this.turns.wait(turn);
      if (after) await after;
    } catch (e) {
      allocated();
      throw e;
    }
    await this.locks.run(c0, c1, async () => {
      const entries: (L2Entry | undefined)[] = [];
      const hosts: number[] = [];
      let keep: boolean[];
      try {
        for (let gc = c0; gc < c1; gc++) {
          const e = this.entry(gc);
          entries.push(e instanceof Promise ? await e : e);
        }
        // Clusters that already have a host cluster of their own keep it.
        keep = [];
        let fresh = 0;
        for (const e of entries) {
          const k = e?.copied === true && (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc);
          keep.push(k);
          if (!k) fresh++;
        }
        await this.meta.run(async () => {
          // The L2 table before the data, as QEMU (get_cluster_table, then the data clusters):
          // a new image is laid out table, data, data..., not data, table, data.
          if (fresh > 0) {
            const l2 = img.l2Entries;
            for (let t = Math.floor(c0 / l2); t <= Math.floor((c1 - 1) / l2); t++) {
              if (img.l1Copied[t] !== 1 || img.l1[t] === 0) await this.ownL2(t);
            }
          }
          const base = fresh > 0 ? await this.allocateDataRun(c0, keep, fresh) : [];
          let next = 0;
          for (let i = 0; i < keep.length; i++) hosts.push(keep[i] ? (entries[i] as L2Entry).hostOffset : base[next++]);
        });
      } finally {
        allocated();
      }
      // What to write in each cluster: a new or zero-flagged cluster is written whole (copying
      // what the guest sees around the request); in a cluster the image already owns only the
      // request's own bytes are written — and whole subclusters where they are not allocated yet.
      const sc = img.subclusterSize;
      const pieces: { gc: number; from: number; to: number; host: number }[] = [];
      const add = (gc: number, from: number, to: number, host: number): void => {
        const last = pieces[pieces.length - 1];
        if (last && last.gc === gc && last.to === from) last.to = to;
        else pieces.push({ gc, from, to, host });
      };
      for (let i = 0; i < keep.length; i++) {
        const gc = c0 + i;
        const cStart = gc * cs;
        const cEnd = Math.min(cStart + cs, img.size);
        const wFrom = Math.max(offset, cStart);
        const wTo = Math.min(end, cEnd);
        const e = entries[i];
        const at = (guest: number): number => hosts[i] + (guest - cStart);
        if (keep[i] && e?.type === ClusterType.Normal) {
          if (!img.extendedL2) {
            add(gc, wFrom, wTo, at(wFrom));
            continue;
          }
          for (let s0 = Math.floor((wFrom - cStart) / sc); cStart + s0 * sc < wTo; s0++) {
            const scStart = cStart + s0 * sc;
            const scEnd = Math.min(cEnd, scStart + sc);
            const allocated = ((e.allocMask >>> s0) & 1) === 1;
            const from = allocated ? Math.max(wFrom, scStart) : scStart;
            add(gc, from, allocated ? Math.min(wTo, scEnd) : scEnd, at(from));
          }
          continue;
        }
        let from = cStart;
        let to = cEnd;
        if (img.extendedL2 && (!e || e.type === ClusterType.Unallocated)) {
          // Subclusters: only the touched ones are written (and allocated).
          from = cStart + Math.floor((wFrom - cStart) / sc) * sc;
          to = Math.min(cEnd, cStart + Math.ceil((wTo - cStart) / sc) * sc);
        }
        add(gc, from, to, at(from));
      }
      const writes: Promise<void>[] = [];
      // Copy-on-write buffers of up to one cluster come from a small pool: a fresh one per write
      // was zero-filled for nothing (every byte is overwritten) and, once the GC had promoted it,
      // held its memory until the next full collection (~4 MiB under fio's random writes).
      const pooled: Uint8Array[] = [];
      try {
        for (let i = 0; i < pieces.length; ) {
          let j = i + 1;
          while (
            j < pieces.length &&
            pieces[j].from === pieces[j - 1].to &&
            pieces[j].host === pieces[j - 1].host + (pieces[j - 1].to - pieces[j - 1].from)
          ) {
            j++;
          }
          const from = pieces[i].from;
          const to = pieces[j - 1].to;
          let buf: Uint8Array;
          if (offset <= from && to <= end) {
            buf = data.subarray(from - offset, to - offset);
          } else {
            buf = to - from <= cs ? this.cowBuffer(to - from, pooled) : new Uint8Array(to - from);
            // Copy-on-write: what the guest sees now around the written part.
            const head = from < offset && this.guestView(buf.subarray(0, offset - from), from, entries[0]);
            if (head) await head;
            const tail = end < to && this.guestView(buf.subarray(end - from), end, entries[entries.length - 1]);
            if (tail) await tail;
            buf.set(
              data.subarray(Math.max(0, from - offset), Math.min(data.length, to - offset)),
              Math.max(0, offset - from),
            );
          }
          if (keep[pieces[i].gc - c0]) this.checkOverlapInPlace(pieces[i].host, buf.length);
          writes.push(this.img.dataStorage.write(buf, pieces[i].host));
          i = j;
        }
        await Promise.all(writes);
      } catch (e) {
        // The pooled buffers go back only once no write still reads them.
        await Promise.allSettled(writes);
        throw e;
      } finally {
        for (const b of pooled) if (this.cowPool.length * cs < COW_POOL_BYTES) this.cowPool.push(b);
      }
      await this.meta.run(async () => {
        for (let i = 0; i < keep.length; i++) {
          const gc = c0 + i;
          const e = entries[i];
          const host = hosts[i];
          let alloc = 0;
          let zero = 0;
          if (img.extendedL2) {
            const cStart = gc * cs;
            let touched = 0;
            for (const p of pieces) {
              if (p.gc !== gc) continue;
              const s0 = Math.floor((p.from - cStart) / sc);
              const s1 = Math.ceil((p.to - cStart) / sc);
              touched = (touched | (s1 - s0 === 32 ? 0xffff_ffff : (2 ** (s1 - s0) - 1) * 2 ** s0)) >>> 0;
            }
            const keepBits = e && (e.type === ClusterType.Unallocated || (keep[i] && e.type === ClusterType.Normal));
            alloc = keepBits ? (e.allocMask | touched) >>> 0 : touched;
            zero = keepBits ? (e.zeroMask & ~touched) >>> 0 : 0;
          }
          const [hi, lo] = encodeStandardL2(host, true, false);
          if (!this.setCachedEntry(gc, hi, lo, alloc, zero)) await this.setEntry(gc, hi, lo, alloc, zero);
          if (!keep[i]) this.releaseEntry(e);
        }
      });
    });
  }

  /** A buffer of `n` (at most a cluster) bytes from the copy-on-write pool, noted in `taken`. */
  private cowBuffer(n: number, taken: Uint8Array[]): Uint8Array {
    const b = this.cowPool.pop() ?? new Uint8Array(this.cs);
    taken.push(b);
    return b.subarray(0, n);
  }

  /** New host clusters for the entries not kept, contiguous where possible. */
  private async allocateDataRun(c0: number, keep: boolean[], fresh: number): Promise<number[]> {
    if (this.img.dataFile) {
      const out: number[] = [];
      for (let i = 0; i < keep.length; i++) if (!keep[i]) out.push((c0 + i) * this.cs);
      return out;
    }
    const offsets = await this.refcounts.allocateMany(fresh, this.tableMoved);
    this.checkOverlap(offsets);
    return offsets;
  }

  /**
   * QEMU's metadata overlap check (its default "cached" mode): clusters just allocated must not
   * hold live metadata — header, L1 tables, active L2 tables, refcount table and blocks, snapshot
   * table, bitmap directory. They can only when the refcounts are wrong (a damaged image); then
   * the write is refused and the image marked corrupt, instead of a table being overwritten.
   */
  private checkOverlap(offsets: number[]): void {
    const kind = overlappingIn(
      this.metadataClusters(),
      offsets.map((o) => Math.floor(o / this.cs)),
    );
    if (kind !== undefined) throw corrupt(`Preventing invalid write on metadata (overlaps with ${kind})`);
  }

  private layout(): MetadataLayout {
    const img = this.img;
    const h = img.header;
    return {
      clusterSize: this.cs,
      l1TableOffset: h.l1TableOffset,
      l1Size: h.l1Size,
      refcountTableOffset: this.refcounts.tableOffset,
      refcountTableClusters: this.refcounts.tableClusters,
      snapshotsOffset: h.snapshotsOffset,
      snapshots: img.snapshots,
      bitmapDirectory: img.extensions.bitmaps,
      l2Tables: img.l1,
      refcountBlocks: this.refcounts.tableEntries,
    };
  }

  /**
   * The same check for writes into host clusters the image already owns (QEMU checks every
   * write): an L2 entry that a damaged image points at its own metadata must not let guest data
   * overwrite it. A lookup table of metadata clusters serves these writes; it is rebuilt when
   * the layout may have changed (an L1 entry, the header, the refcount table, an exclusive
   * operation).
   */
  /**
   * The lookup table of metadata clusters, rebuilt when anything it is made from may have
   * changed: the layout version (L1 entries, exclusive operations), the refcount table, the
   * header's tables, the snapshot list and the bitmap directory.
   */
  private metadataClusters(): ReadonlyMap<number, string> {
    const img = this.img;
    const h = img.header;
    const r = this.refcounts;
    // Filled in place and compared entry by entry: every in-place write asks, so no array per call.
    const now = this.stampNow;
    now[0] = this.layoutVersion;
    now[1] = r.tableVersion;
    now[2] = r.tableOffset;
    now[3] = r.tableClusters;
    now[4] = h.l1TableOffset;
    now[5] = h.l1Size;
    now[6] = h.snapshotsOffset;
    now[7] = img.l1;
    now[8] = img.snapshots;
    now[9] = img.extensions.bitmaps;
    const m = this.metaClusters;
    if (m) {
      let same = true;
      for (let i = 0; i < now.length && same; i++) same = m.stamp[i] === now[i];
      if (same) return m.map;
    }
    const map = metadataClusters(this.layout());
    this.metaClusters = { stamp: now.slice(), map };
    return map;
  }

  /** Active L1 entry `index` changed in memory: written back at the next flush. */
  private l1Changed(index: number): void {
    this.l1Dirty.add(index);
    this.layoutVersion++;
  }

  private checkOverlapInPlace(host: number, length: number): void {
    if (this.img.dataFile) return;
    const map = this.metadataClusters();
    for (let c = Math.floor(host / this.cs); c * this.cs < host + length; c++) {
      const kind = map.get(c);
      if (kind !== undefined) throw corrupt(`Preventing invalid write on metadata (overlaps with ${kind})`);
    }
  }

  // ---- zeroes and discard ----------------------------------------------------------------

  async writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    this.checkOpen();
    await this.changing(offset, length);
    const img = this.img;
    const canFlag = img.header.version >= 3;
    const unit = img.extendedL2 ? img.subclusterSize : this.cs;
    const end = offset + length;
    const alignedStart = Math.min(end, Math.ceil(offset / unit) * unit);
    const alignedEnd = end === img.size ? end : Math.max(alignedStart, Math.floor(end / unit) * unit);
    const partial = async (from: number, to: number): Promise<void> => {
      if (to > from) await this.write(new Uint8Array(to - from), from);
    };
    await partial(offset, alignedStart);
    if (alignedEnd > alignedStart) {
      let rest: [number, number][] = [];
      if (canFlag) rest = await this.zeroUnits(alignedStart, alignedEnd, unmap, true);
      else if (!img.backing) rest = await this.zeroUnits(alignedStart, alignedEnd, true, false);
      else rest = [[alignedStart, alignedEnd]];
      for (const [from, to] of rest) await this.writeRealZeroes(from, to);
    }
    await partial(alignedEnd, end);
    if (this.dataFileRaw) await this.writeRealZeroesToDataFile(offset, end);
    await this.maybeWriteBack();
  }

  /**
   * A guest discard, as QEMU 7.2's qcow2_co_pdiscard: whole clusters only, also with extended
   * L2 (the parts of partial clusters are left as they are), and a partial last cluster at the
   * end of the disk. On v2 with a backing file nothing happens (there is no zero flag, and
   * unallocating would show the backing data again).
   */
  async discard(offset: number, length: number): Promise<void> {
    this.checkOpen();
    await this.changing(offset, length);
    const img = this.img;
    if (img.header.version < 3 && img.backing) return;
    const end = offset + length;
    const from = Math.ceil(offset / this.cs) * this.cs;
    const to = end === img.size ? end : Math.floor(end / this.cs) * this.cs;
    if (to <= from) return;
    await this.discardClusters(from, to);
    // A raw data file is the guest disk itself: it must read as zeros there too.
    if (this.dataFileRaw) await this.writeRealZeroesToDataFile(from, to);
    await this.maybeWriteBack();
  }

  /**
   * QEMU's discard_in_l2_slice (not a full discard): a cluster with a host cluster or
   * compressed data, or any cluster over a backing file, reads as zeros afterwards (zero flag
   * on v3, all zero bits with extended L2, unallocated on v2) and gives up its host cluster;
   * other clusters already read as zeros and stay as they are. Unlike QEMU, no empty L2 table is
   * allocated where there is none and nothing changes.
   */
  private async discardClusters(from: number, to: number): Promise<void> {
    const img = this.img;
    const c0 = Math.floor(from / this.cs);
    const c1 = Math.ceil(to / this.cs);
    await this.locks.run(c0, c1, () =>
      this.meta.run(async () => {
        for (let gc = c0; gc < c1; gc++) {
          const e = await this.entry(gc);
          const allocated =
            e !== undefined &&
            (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc || e.type === ClusterType.Compressed);
          if (!allocated && !img.backing) continue;
          if (img.extendedL2) await this.setEntry(gc, 0, 0, 0, 0xffff_ffff);
          else await this.setEntry(gc, 0, img.header.version >= 3 ? 1 : 0);
          this.releaseEntry(e);
        }
      }),
    );
  }

  private async writeRealZeroes(from: number, to: number): Promise<void> {
    const chunk = new Uint8Array(Math.min(to - from, 1024 * 1024));
    for (let pos = from; pos < to; pos += chunk.length)
      await this.write(chunk.subarray(0, Math.min(chunk.length, to - pos)), pos);
  }

  private async writeRealZeroesToDataFile(from: number, to: number): Promise<void> {
    const chunk = new Uint8Array(Math.min(to - from, 1024 * 1024));
    for (let pos = from; pos < to; pos += chunk.length) {
      await this.img.dataStorage.write(chunk.subarray(0, Math.min(chunk.length, to - pos)), pos);
    }
  }

  /**
   * Sets whole clusters (subclusters with extended L2) in [from, to) to read as zeros
   * (`zeroFlag`) or to be unallocated. `unmap` gives up their host clusters; otherwise an owned
   * host cluster stays preallocated behind the zero flag. Returns the ranges that cannot take
   * a flag (parts of compressed clusters) and need real zeros written.
   */
  private async zeroUnits(from: number, to: number, unmap: boolean, zeroFlag: boolean): Promise<[number, number][]> {
    const img = this.img;
    const cs = this.cs;
    const c0 = Math.floor(from / cs);
    const c1 = Math.ceil(to / cs);
    const rest: [number, number][] = [];
    await this.locks.run(c0, c1, () =>
      this.meta.run(async () => {
        for (let gc = c0; gc < c1; gc++) {
          const e = await this.entry(gc);
          // Nothing to do where the guest already reads zeros with no backing file behind.
          if (!e && !img.backing) continue;
          const cStart = gc * cs;
          const cEnd = Math.min(cStart + cs, img.size);
          const whole = from <= cStart && cEnd <= to;
          if (img.extendedL2 && !whole) {
            const sc = img.subclusterSize;
            const s0 = Math.floor((Math.max(from, cStart) - cStart) / sc);
            const s1 = Math.ceil((Math.min(to, cEnd) - cStart) / sc);
            const bits = ((2 ** (s1 - s0) - 1) * 2 ** s0) >>> 0;
            const alloc = e ? (e.allocMask & ~bits) >>> 0 : 0;
            const zero = zeroFlag ? ((e ? e.zeroMask : 0) | bits) >>> 0 : e ? (e.zeroMask & ~bits) >>> 0 : 0;
            if (e?.type === ClusterType.Compressed) {
              // A compressed cluster has no subclusters: write real zeros instead.
              rest.push([Math.max(from, cStart), Math.min(to, cEnd)]);
              continue;
            }
            const host = e && e.type !== ClusterType.Unallocated ? e.hostOffset : 0;
            const [hi, lo] = host ? encodeStandardL2(host, e?.copied ?? false, false) : [0, 0];
            await this.setEntry(gc, hi, lo, alloc, zero);
            continue;
          }
          const owned = e?.copied && (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc);
          const keepHost = !unmap && owned && zeroFlag;
          if (img.extendedL2) {
            const host = keepHost ? (e as L2Entry).hostOffset : 0;
            const [hi, lo] = host ? encodeStandardL2(host, true, false) : [0, 0];
            await this.setEntry(gc, hi, lo, 0, zeroFlag ? 0xffff_ffff : 0);
          } else if (keepHost) {
            const [hi, lo] = encodeStandardL2((e as L2Entry).hostOffset, true, true);
            await this.setEntry(gc, hi, lo);
          } else {
            await this.setEntry(gc, 0, zeroFlag ? 1 : 0);
          }
          if (!keepHost) this.releaseEntry(e);
        }
      }),
    );
    return rest;
  }

  // ---- compressed clusters ---------------------------------------------------------------

  async writeCompressed(gc: number, data: Uint8Array): Promise<void> {
    this.checkOpen();
    if (this.img.dataFile) throw unsupported("Compressed clusters are not supported with an external data file");
    await this.changing(gc * this.cs, this.cs);
    await this.locks.run(gc, gc + 1, async () => {
      const old = await this.entry(gc);
      const at = await this.meta.run(() => this.allocateBytes(data.length));
      this.img.forgetCompressed(at);
      await this.img.storage.write(data, at);
      await this.meta.run(async () => {
        const [hi, lo] = encodeCompressed(at, data.length, this.img.clusterBits);
        await this.setEntry(gc, hi, lo, 0, 0);
        this.releaseEntry(old);
      });
    });
    await this.maybeWriteBack();
  }

  /**
   * Packs compressed data back to back, as QEMU's qcow2_alloc_bytes does: each compressed
   * cluster holds one reference on every host cluster its bytes touch.
   */
  private async allocateBytes(size: number): Promise<number> {
    const cs = this.cs;
    let start = this.compressedEnd;
    const current = Math.floor(start / cs);
    const room = start % cs === 0 ? 0 : cs - (start % cs);
    // Share the current cluster only while it is still ours and can count one more reference
    // (with 1-bit refcounts it never can).
    let shareable = room > 0;
    if (shareable) {
      const refcount = await this.refcounts.get(current);
      shareable = refcount > 0 && refcount < maxRefcount(this.refcounts.order);
    }
    if (shareable && room >= size) {
      await this.refcounts.update(current, 1, this.tableMoved);
    } else {
      const need = Math.ceil((size - (shareable ? room : 0)) / cs);
      const fresh = await this.refcounts.allocate(need, this.tableMoved);
      if (shareable && fresh === start + room) {
        await this.refcounts.update(current, 1, this.tableMoved);
      } else {
        start = fresh;
      }
    }
    this.compressedEnd = start + size;
    return start;
  }

  // ---- preallocation ---------------------------------------------------------------------

  /**
   * Gives every guest cluster of [from, to) (default: the whole disk) a host cluster (QEMU's
   * preallocation=metadata): L2 tables and data clusters, table by table, each table's new
   * clusters contiguous. Clusters that already have an entry keep it (resize preallocates the
   * new area after the old end, whose last cluster may be in use). With extended L2 the
   * subclusters stay unallocated (a backing file still shows through). `fill` also writes
   * zeros over the new data clusters so the file really holds them (falloc, full).
   */
  async preallocate(fill: boolean, from = 0, to = this.img.size): Promise<void> {
    this.checkOpen();
    const img = this.img;
    const cs = this.cs;
    const first = Math.floor(from / cs);
    const clusters = Math.ceil(to / cs);
    for (let l1Index = Math.floor(first / img.l2Entries); l1Index * img.l2Entries < clusters; l1Index++) {
      const c0 = Math.max(first, l1Index * img.l2Entries);
      const n = Math.min((l1Index + 1) * img.l2Entries, clusters) - c0;
      const hosts = await this.meta.run(async () => {
        await this.ownL2(l1Index);
        const keep: boolean[] = [];
        let fresh = 0;
        for (let i = 0; i < n; i++) {
          const e = await this.entry(c0 + i);
          keep.push(e !== undefined && e.type !== ClusterType.Unallocated);
          if (!keep[i]) fresh++;
        }
        const offsets = await this.allocateDataRun(c0, keep, fresh);
        let next = 0;
        for (let i = 0; i < n; i++) {
          if (keep[i]) continue;
          const [hi, lo] = encodeStandardL2(offsets[next++], true, false);
          await this.setEntry(c0 + i, hi, lo, 0, 0);
        }
        return offsets;
      });
      if (hosts.length === 0) continue;
      let end = 0;
      for (const h of hosts) end = Math.max(end, h + cs);
      if (fill) {
        // Zeros over each contiguous run of the new clusters.
        for (let i = 0; i < hosts.length; ) {
          let j = i + 1;
          while (j < hosts.length && hosts[j] === hosts[j - 1] + cs) j++;
          const bytes = (j - i) * cs;
          const zeros = new Uint8Array(Math.min(bytes, 4 * 1024 * 1024));
          for (let at = 0; at < bytes; at += zeros.length) {
            await this.img.dataStorage.write(zeros.subarray(0, Math.min(zeros.length, bytes - at)), hosts[i] + at);
          }
          i = j;
        }
      } else if ((await this.img.dataStorage.size()) < end) {
        // The clusters must exist in the file (as holes) for the image to be consistent.
        await this.img.dataStorage.truncate(end);
      }
      await this.maybeWriteBack();
    }
  }

  // ---- whole-image changes (commit, rebase) ----------------------------------------------

  /**
   * Makes every guest cluster unallocated, so that reads fall through to the backing file
   * (QEMU's qcow2_make_empty, which qemu-img commit runs on the committed overlay). The L1
   * entries are cleared on disk first; only then are the L2 tables and the clusters they point
   * at released (the data of an L2 table shared with a snapshot stays, the table loses one
   * reference). A crash in between leaks clusters, never corrupts. Free clusters at the end of
   * the file are cut off, as QEMU's emptying leaves a small file.
   */
  async makeEmpty(): Promise<void> {
    this.checkOpen();
    const img = this.img;
    const cs = this.cs;
    await this.meta.run(async () => {
      await this.flushMetadata();
      const tables: number[] = [];
      for (let i = 0; i < img.l1.length; i++) {
        if (img.l1[i] === 0) continue;
        tables.push(img.l1[i]);
        img.l1[i] = 0;
        img.l1Copied[i] = 0;
        this.l1Changed(i);
      }
      await this.writeL1Entries();
      await img.storage.flush();
      for (const offset of tables) {
        if ((await this.refcounts.get(offset / cs)) === 1) {
          const table = await img.loadL2(offset);
          for (let i = 0; i < img.l2Entries; i++) this.releaseEntry(img.decodeAt(table, i, offset));
        }
        this.refcounts.release(offset / cs);
        img.l2Cache.delete(offset);
        // Bounded memory: the decrements held back so far are applied (the L1 entries that
        // dropped them are already on disk).
        if (this.refcounts.pendingReleases >= MAX_PENDING_RELEASES) await this.flushMetadata();
      }
      await this.flushMetadata();
    });
    await this.flush();
    if (this.refcounts.pendingReleases === 0) {
      let end = Math.ceil((await img.storage.size()) / cs);
      while (end > 0 && (await this.refcounts.get(end - 1)) === 0) end--;
      if (end * cs < (await img.storage.size())) {
        await img.storage.truncate(end * cs);
        await img.storage.flush();
      }
    }
  }

  /**
   * The header cluster with another backing file name and format (none: undefined), or the
   * reason it cannot be: a name longer than 1023 bytes or one that does not fit in the first
   * cluster ("No space left in the file header"), a backing file beside a raw data file.
   */
  backingHeader(name: string | undefined, format: string | undefined): Uint8Array {
    const img = this.img;
    if (name !== undefined && this.dataFileRaw) {
      throw new QcowError(
        "invalid-argument",
        "Invalid argument: an image with a raw data file cannot have a backing file",
      );
    }
    if (name !== undefined && textEncoder.encode(name).length > MAX_BACKING_NAME) {
      throw new QcowError(
        "invalid-argument",
        `Invalid argument: backing file name longer than ${MAX_BACKING_NAME} bytes`,
      );
    }
    const extensions = { ...img.extensions, backingFormat: name === undefined ? undefined : format };
    try {
      return encodeHeader(img.header, extensions, name);
    } catch (e) {
      throw new QcowError("invalid-argument", "No space left in the file header", { cause: e });
    }
  }

  /**
   * Points the image at another backing file, or at none (QEMU's qcow2_change_backing_file),
   * after everything written before is durable; the other extensions are kept. A name that
   * cannot be stored (see backingHeader) is refused and nothing changes.
   *
   * When only the name changes (the extensions stay byte for byte the same, as for a new name
   * with the same backing format), the new name is first written past the old one and flushed,
   * then the 12 bytes of backing_file_offset and backing_file_size — inside the first sector,
   * so written at once — point at it: a crash leaves either name, never a mix. Otherwise the
   * header cluster is rewritten in one write, as QEMU rewrites it.
   */
  async changeBackingFile(name: string | undefined, format: string | undefined): Promise<void> {
    this.checkOpen();
    const img = this.img;
    const header = this.backingHeader(name, format);
    await this.flush();
    const current = new Uint8Array(this.cs);
    await readFull(img.storage, current, 0);
    const place = name === undefined ? undefined : this.nameBesideOld(current, header, textEncoder.encode(name));
    if (place) {
      await img.storage.write(place.bytes, place.offset);
      await img.storage.flush();
      const pointer = new Uint8Array(12);
      setU64(view(pointer), 0, place.offset);
      view(pointer).setUint32(8, place.bytes.length);
      await img.storage.write(pointer, 8);
    } else {
      await img.storage.write(header, 0);
    }
    await img.storage.flush();
    img.backingName = name;
    img.extensions.backingFormat = name === undefined ? undefined : format;
  }

  /**
   * Where a new backing file name can go without touching anything the current header uses:
   * only when `encoded` (the full new header) equals `current` up to its name, apart from the
   * name's offset and size fields, and the name fits after the old one.
   */
  private nameBesideOld(
    current: Uint8Array,
    encoded: Uint8Array,
    name: Uint8Array,
  ): { offset: number; bytes: Uint8Array } | undefined {
    const cur = view(current);
    const oldOffset = cur.getUint32(12);
    const oldLength = cur.getUint32(16);
    const newOffset = view(encoded).getUint32(12);
    if (cur.getUint32(8) !== 0 || oldOffset === 0 || newOffset !== oldOffset) return undefined;
    for (let i = 0; i < newOffset; i++) if (i >= 20 && current[i] !== encoded[i]) return undefined;
    if (current.subarray(0, 8).some((b, i) => b !== encoded[i])) return undefined;
    const offset = Math.ceil((oldOffset + oldLength) / 8) * 8;
    if (offset + name.length > this.cs) return undefined;
    return { offset, bytes: name };
  }

  // ---- whole-image metadata operations ---------------------------------------------------

  /**
   * @internal For operations that rewrite the image's tables as a whole (internal snapshots,
   * src/image/snapshots.ts). Runs `fn` with every guest cluster locked and the metadata lock
   * held, after dirty metadata was written back, so no request changes a mapping or a refcount
   * meanwhile. Guest requests must not be in flight (QEMU drains the device first): requests
   * already reading or overwriting host clusters make it refuse. A corruption `fn` finds marks
   * the image corrupt, as for writes.
   */
  async exclusive<T>(fn: (access: MetadataAccess) => Promise<T>): Promise<T> {
    this.checkOpen();
    try {
      return await this.locks.run(0, Number.MAX_SAFE_INTEGER, () =>
        this.meta.run(async () => {
          if (this.inflight > 0) {
            throw new QcowError("invalid-argument", `${this.img.filename} has requests in flight`);
          }
          await this.flushMetadata();
          try {
            return await fn({
              refcounts: this.refcounts,
              tableMoved: this.tableMoved,
              writeBack: () => this.flushMetadata(),
              markL1Dirty: (index) => this.l1Changed(index),
            });
          } finally {
            // Clusters may have been freed and handed out again: pack no more compressed data there.
            this.compressedEnd = 0;
            this.layoutVersion++;
          }
        }),
      );
    } catch (e) {
      await this.signalCorruption(e);
      throw e;
    }
  }

  // ---- resize ----------------------------------------------------------------------------

  /**
   * Changes the virtual size, as QEMU's qcow2_co_truncate (resize.ts holds the logic; these
   * are the write-path internals it needs). No other request may be in flight meanwhile.
   */
  async resize(size: number, opts: ResizeOptions): Promise<void> {
    this.checkOpen();
    // Bitmaps are resized too: what writes noted so far goes to disk first.
    await this.storeBitmaps();
    await resizeQcow2(this.img, size, opts, {
      refcounts: this.refcounts,
      tableMoved: this.tableMoved,
      locked: (fn) => this.meta.run(fn),
      flushMetadata: () => this.flushMetadata(),
      writeHeader: () => this.writeHeader(),
      discardClusters: async (from, to) => {
        await this.zeroUnits(from, to, true, false);
      },
      releaseEntry: (e) => this.releaseEntry(e),
      l1Changed: (index) => this.l1Changed(index),
      preallocate: (from, to, fill) => this.preallocate(fill, from, to),
      writeZeroes: (offset, length) => this.writeZeroes(offset, length, false),
      bitmaps: this.bitmaps !== undefined,
    });
    // The bitmaps now cover the new size: track them afresh.
    if (this.bitmaps) this.reloadBitmaps();
  }

  // ---- write-back ------------------------------------------------------------------------

  private async maybeWriteBack(): Promise<void> {
    if (this.img.l2Cache.overBudget || this.refcounts.overBudget) await this.meta.run(() => this.flushMetadata());
  }

  /** Writes dirty metadata in crash-safe order (see the top of this file). */
  private async flushMetadata(): Promise<void> {
    const img = this.img;
    const s = img.storage;
    const l2Dirty = img.l2Cache.dirtyEntries();
    if (
      !this.refcounts.dirty &&
      l2Dirty.length === 0 &&
      this.l1Dirty.size === 0 &&
      this.refcounts.pendingReleases === 0
    )
      return;
    // Data (and the data file) first, with the refcount increments that cover new clusters.
    await img.dataFile?.flush();
    await this.refcounts.writeBack();
    await s.flush();
    for (const [offset, table] of l2Dirty) {
      await s.write(new Uint8Array(table.buffer, table.byteOffset, table.byteLength), offset);
      img.l2Cache.markClean(offset);
    }
    if (this.l1Dirty.size > 0) {
      await s.flush();
      await this.writeL1Entries();
    }
    await s.flush();
    if (this.refcounts.pendingReleases > 0 && this.inflight === 0) {
      // A cluster freed here may be handed out again: never pack more compressed data into it.
      this.compressedEnd = 0;
      await this.refcounts.applyReleases(this.tableMoved);
      await this.refcounts.writeBack();
      await s.flush();
    }
  }

  private async writeL1Entries(): Promise<void> {
    const img = this.img;
    const indexes = [...this.l1Dirty].sort((a, b) => a - b);
    // An entry stays dirty until its write succeeded: a failed write is retried by the next flush.
    for (let i = 0; i < indexes.length; ) {
      let j = i + 1;
      while (j < indexes.length && indexes[j] === indexes[j - 1] + 1) j++;
      const buf = new Uint8Array((j - i) * 8);
      const dv = view(buf);
      for (let k = i; k < j; k++) {
        const [hi, lo] = encodeL1Entry({ l2Offset: img.l1[indexes[k]], copied: img.l1Copied[indexes[k]] === 1 });
        dv.setUint32((k - i) * 8, hi);
        dv.setUint32((k - i) * 8 + 4, lo);
      }
      await img.storage.write(buf, img.header.l1TableOffset + indexes[i] * 8);
      for (let k = i; k < j; k++) this.l1Dirty.delete(indexes[k]);
      i = j;
    }
  }

  async flush(): Promise<void> {
    this.checkOpen();
    await this.meta.run(() => this.flushMetadata());
    await this.img.dataFile?.flush();
    await this.img.storage.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.corruption) {
      // Nothing more is written to an image found corrupt.
      this.closed = true;
      return;
    }
    await this.storeBitmaps();
    this.closed = true;
  }

  private checkOpen(): void {
    if (this.closed) throw new QcowError("invalid-argument", `${this.img.filename} is closed`);
    if (this.corruption) throw corrupt(`qcow2: Image is corrupt; further writes refused (${this.corruption})`);
  }

  /**
   * An inconsistency found while writing (QEMU's qcow2_signal_corruption): set the corrupt bit
   * on disk so no one writes the image before it is checked, and refuse further writes here.
   */
  async markCorrupt(reason: string): Promise<void> {
    if (this.corruption) return;
    this.corruption = reason;
    this.img.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
    await this.writeHeader();
  }

  /** `e`, if it is an inconsistency in the image's metadata, marks the image corrupt. */
  async signalCorruption(e: unknown): Promise<void> {
    if (e instanceof QcowError && e.code === "corrupt") await this.markCorrupt(e.message);
  }
}
