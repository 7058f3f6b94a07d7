/**
 * Keeping persistent dirty bitmaps in step with writes (docs/interop/qcow2.rst, "Bitmaps").
 *
 * Like QEMU: an enabled ("auto") bitmap is marked in_use on disk before the first write, the
 * ranges written are remembered in memory, and on close their bits are set in the bitmap's data
 * clusters and in_use is cleared. A crash in between leaves in_use set, which QEMU reads as
 * "this bitmap is inconsistent" — never as a bitmap that misses writes.
 */

import {
  type BitmapDirectoryEntry,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
} from "../format/bitmap.js";
import { setU64, view } from "../format/bytes.js";
import { readFull, type Storage } from "../io/storage.js";

/** Host clusters for new bitmap data (refcount 1 each). */
export type AllocateCluster = () => Promise<number>;

export class BitmapTracker {
  private readonly tracked: BitmapDirectoryEntry[];
  /** Dirty guest byte ranges, kept sorted and merged. */
  private ranges: [number, number][] = [];
  private marked = false;

  constructor(
    private readonly storage: Storage,
    private readonly directory: BitmapDirectoryEntry[],
    private readonly directoryOffset: number,
    private readonly clusterSize: number,
    private readonly diskSize: number,
  ) {
    this.tracked = directory.filter((b) => b.flags & BME_FLAG_AUTO && !(b.flags & BME_FLAG_IN_USE));
  }

  get active(): boolean {
    return this.tracked.length > 0;
  }

  /** Before the first write: mark the tracked bitmaps in_use on disk (durably). */
  async beforeWrite(): Promise<void> {
    if (this.marked || !this.active) return;
    this.marked = true;
    for (const b of this.tracked) b.flags |= BME_FLAG_IN_USE;
    await this.writeDirectory();
  }

  /** Remembers that [offset, offset+length) was written. */
  record(offset: number, length: number): void {
    if (!this.active || length <= 0) return;
    const end = offset + length;
    const merged: [number, number][] = [];
    let placed = false;
    let cur: [number, number] = [offset, end];
    for (const r of this.ranges) {
      if (r[1] < cur[0]) merged.push(r);
      else if (cur[1] < r[0]) {
        if (!placed) {
          merged.push(cur);
          placed = true;
        }
        merged.push(r);
      } else cur = [Math.min(r[0], cur[0]), Math.max(r[1], cur[1])];
    }
    if (!placed) merged.push(cur);
    this.ranges = merged;
  }

  /**
   * Sets the bits of every remembered range in each tracked bitmap, then clears in_use. The
   * caller makes new clusters' refcounts durable (`commitRefcounts`) before tables point at them.
   */
  async store(allocate: AllocateCluster, commitRefcounts: () => Promise<void>): Promise<void> {
    if (!this.marked) return;
    const tableWrites: (() => Promise<void>)[] = [];
    for (const b of this.tracked) {
      const granularity = 2 ** b.granularityBits;
      const tableBytes = new Uint8Array(b.tableSize * 8);
      await readFull(this.storage, tableBytes, b.tableOffset);
      const table = view(tableBytes);
      let tableChanged = false;
      const bitsPerCluster = this.clusterSize * 8;
      // Group the granules to set by bitmap data cluster.
      const byCluster = new Map<number, [number, number][]>();
      for (const [from, to] of this.ranges) {
        const g0 = Math.floor(from / granularity);
        const g1 = Math.ceil(Math.min(to, this.diskSize) / granularity);
        for (let c = Math.floor(g0 / bitsPerCluster); c * bitsPerCluster < g1; c++) {
          const list = byCluster.get(c) ?? [];
          list.push([
            Math.max(g0, c * bitsPerCluster) - c * bitsPerCluster,
            Math.min(g1, (c + 1) * bitsPerCluster) - c * bitsPerCluster,
          ]);
          byCluster.set(c, list);
        }
      }
      for (const [c, spans] of byCluster) {
        if (c >= b.tableSize) continue;
        const e = decodeBitmapTableEntry(table.getUint32(c * 8), table.getUint32(c * 8 + 4), this.clusterSize);
        if (e.allOnes) continue;
        const data = new Uint8Array(this.clusterSize);
        if (e.offset !== 0) await readFull(this.storage, data, e.offset);
        for (const [s, t] of spans) setBits(data, s, t);
        let at = e.offset;
        if (at === 0) {
          at = await allocate();
          setU64(table, c * 8, at);
          tableChanged = true;
        }
        await this.storage.write(data, at);
      }
      if (tableChanged) tableWrites.push(() => this.storage.write(tableBytes, b.tableOffset));
    }
    await commitRefcounts();
    for (const w of tableWrites) await w();
    await this.storage.flush();
    for (const b of this.tracked) b.flags &= ~BME_FLAG_IN_USE;
    await this.writeDirectory();
    this.ranges = [];
    this.marked = false;
  }

  private async writeDirectory(): Promise<void> {
    // Only flags change, so the directory keeps its size and is rewritten where it is.
    await this.storage.write(encodeBitmapDirectory(this.directory), this.directoryOffset);
    await this.storage.flush();
  }
}

/** Sets bits [from, to) of a bitmap cluster (bit 0 of each byte is its first granule). */
export function setBits(data: Uint8Array, from: number, to: number): void {
  let i = from;
  while (i < to && i % 8 !== 0) {
    data[i >> 3] |= 1 << (i & 7);
    i++;
  }
  if (i + 8 <= to) {
    data.fill(0xff, i >> 3, to >> 3);
    i = to - (to % 8);
  }
  while (i < to) {
    data[i >> 3] |= 1 << (i & 7);
    i++;
  }
}
