/**
 * Host cluster refcounts (docs/interop/qcow2.rst, "Host cluster management"): reading them,
 * allocating clusters, and growing the refcount structures.
 *
 * Crash safety: increments live in dirty cached refcount blocks that `writeBack` writes (and
 * the owner flushes) before any L2/L1 entry that needs them; decrements are held back
 * (`release`) and applied by `applyReleases` only after the entries that dropped the
 * references are durable. So on disk a refcount is never lower than the references to it: a
 * crash can leak clusters, never corrupt. New refcount blocks and a grown refcount table are
 * written and flushed before anything points at them.
 */
import { corrupt, hex } from "../errors.js";
import { setU64, view } from "../format/bytes.js";
import type { Qcow2Header } from "../format/header.js";
import { addRefcount64, decodeRefcountTableEntry, getRefcount, maxRefcount, setRefcount } from "../format/tables.js";
import { readFull, type Storage } from "../io/storage.js";
import { TableCache } from "./cache.js";

/** Called when the refcount table moves; must write the header durably. */
export type TableMoved = (offset: number, clusters: number) => Promise<void>;

export class Refcounts {
  readonly clusterSize: number;
  readonly order: number;
  /** Refcount entries per refcount block. */
  readonly blockEntries: number;
  tableOffset: number;
  tableClusters: number;
  private table: Float64Array;
  /** Changes whenever a refcount block is added, moved or dropped (or the table moves). */
  tableVersion = 0;
  private readonly blocks: TableCache<DataView>;
  private readonly releases: number[] = [];
  /**
   * Where the search for free clusters starts (QEMU's free_cluster_index): it only moves
   * forward, past each allocation, and back when a cluster is freed.
   */
  private freeHint = 0;
  private lastOffset = -1;
  private lastBlock: DataView | undefined;

  private constructor(
    private readonly storage: Storage,
    h: Qcow2Header,
    table: Float64Array,
    cacheBytes: number,
  ) {
    this.clusterSize = 1 << h.clusterBits; // a small integer for V8 (`2 **` gives a heap number)
    this.order = h.refcountOrder;
    this.blockEntries = (this.clusterSize * 8) >>> h.refcountOrder;
    this.tableOffset = h.refcountTableOffset;
    this.tableClusters = h.refcountTableClusters;
    this.table = table;
    this.blocks = new TableCache<DataView>(cacheBytes);
  }

  static async open(storage: Storage, h: Qcow2Header, cacheBytes = 4 * 1024 * 1024): Promise<Refcounts> {
    const clusterSize = 2 ** h.clusterBits;
    const entries = (h.refcountTableClusters * clusterSize) / 8;
    const buf = new Uint8Array(entries * 8);
    await readFull(storage, buf, h.refcountTableOffset);
    const dv = view(buf);
    const table = new Float64Array(entries);
    for (let i = 0; i < entries; i++) {
      // Signed halves, as small integers for V8 (the decoder takes either).
      table[i] = decodeRefcountTableEntry(dv.getInt32(i * 8), dv.getInt32(i * 8 + 4), clusterSize, i);
    }
    return new Refcounts(storage, h, table, cacheBytes);
  }

  private async block(blockOffset: number): Promise<DataView> {
    // Most lookups hit the block of the previous one: skip the LRU bookkeeping then.
    if (blockOffset === this.lastOffset && this.lastBlock && this.blocks.peek(blockOffset) === this.lastBlock)
      return this.lastBlock;
    const block = await this.blocks.get(blockOffset, async () => {
      const b = new Uint8Array(this.clusterSize);
      await readFull(this.storage, b, blockOffset);
      return view(b);
    });
    this.lastOffset = blockOffset;
    this.lastBlock = block;
    return block;
  }

  /**
   * Refcount block `blockOffset` when it is at hand without waiting: the block of the previous
   * lookup, or one in the cache.
   */
  private cachedBlock(blockOffset: number): DataView | undefined {
    const block = blockOffset === this.lastOffset ? this.lastBlock : this.blocks.peek(blockOffset);
    return block && this.blocks.peek(blockOffset) === block ? block : undefined;
  }

  /**
   * The refcount of host cluster `index` (0 where no refcount block covers it): a number where
   * its block is cached, so that callers await only a real read.
   */
  get(index: number): number | Promise<number> {
    const t = Math.floor(index / this.blockEntries);
    const blockOffset = t < this.table.length ? this.table[t] : 0;
    if (blockOffset === 0) return 0;
    const block = this.cachedBlock(blockOffset);
    if (block) return getRefcount(block, index % this.blockEntries, this.order);
    return this.block(blockOffset).then((b) => getRefcount(b, index % this.blockEntries, this.order));
  }

  /** Whether a refcount block covers host cluster `index` (else its refcount is 0). */
  covered(index: number): boolean {
    const t = Math.floor(index / this.blockEntries);
    return t < this.table.length && this.table[t] !== 0;
  }

  /**
   * Adds `delta` to the refcount of cluster `index`; the block must exist for increments. As
   * `get`: done at once (a number, or a thrown error) where the block is cached, a promise where
   * it must be read or made first.
   */
  update(index: number, delta: number, onTableMoved: TableMoved): number | Promise<number> {
    const t = Math.floor(index / this.blockEntries);
    const blockOffset = t < this.table.length ? this.table[t] : 0;
    const block = blockOffset === 0 ? undefined : this.cachedBlock(blockOffset);
    if (block) return this.apply(block, blockOffset, index, delta);
    return this.updateLoading(index, delta, onTableMoved);
  }

  private async updateLoading(index: number, delta: number, onTableMoved: TableMoved): Promise<number> {
    const t = Math.floor(index / this.blockEntries);
    if (t >= this.table.length || this.table[t] === 0) {
      if (delta < 0)
        throw corrupt(`Refcount of cluster ${hex(index * this.clusterSize)} would drop below zero (no refcount block)`);
      await this.coverClusters(index, 1, onTableMoved);
    }
    const blockOffset = this.table[t];
    return this.apply(await this.block(blockOffset), blockOffset, index, delta);
  }

  private apply(block: DataView, blockOffset: number, index: number, delta: number): number {
    const i = index % this.blockEntries;
    const current = getRefcount(block, i, this.order);
    if (this.order >= 6 && current === Number.MAX_SAFE_INTEGER) {
      // Beyond 2^53 (a damaged image): count exactly, so that a decrement leaves what QEMU leaves.
      const exact = addRefcount64(block, i, delta);
      if (exact === undefined)
        throw corrupt(`Refcount of cluster ${hex(index * this.clusterSize)} would exceed 2^64 - 1`);
      this.blocks.markDirty(blockOffset, block);
      return exact;
    }
    const value = current + delta;
    if (value < 0) throw corrupt(`Refcount of cluster ${hex(index * this.clusterSize)} would drop below zero`);
    if (value > maxRefcount(this.order)) {
      throw corrupt(`Refcount of cluster ${hex(index * this.clusterSize)} would exceed ${maxRefcount(this.order)}`);
    }
    setRefcount(block, i, this.order, value);
    this.blocks.markDirty(blockOffset, block);
    if (value === 0 && index < this.freeHint) this.freeHint = index;
    return value;
  }

  /** The most clusters one contiguous allocation may ask for (see `allocate`). */
  get maxRun(): number {
    return Math.max(1, this.blockEntries - 1);
  }

  /**
   * Allocates `n` (at most `maxRun`) contiguous free clusters and gives each refcount 1.
   * Returns the host offset. Clusters past the end of the refcount structures are free; the
   * structures grow to cover them, where QEMU grows them (qcow2_alloc_clusters and
   * alloc_refcount_block), so that a new image is laid out as QEMU lays it out: where the run
   * reaches a range without a refcount block, a new block goes into the first free cluster
   * after the run and the search starts again at the run's start.
   */
  async allocate(n: number, onTableMoved: TableMoved): Promise<number> {
    if (n > this.maxRun) throw new RangeError(`allocate(${n}) exceeds ${this.maxRun} clusters`);
    for (;;) {
      let start = this.freeHint;
      // Lookups of cached blocks answer without waiting: `await` only on a promise (an await of
      // a plain number still costs a promise and a turn of the microtask queue, per cluster).
      for (;;) {
        let run = 0;
        while (run < n) {
          const r = this.get(start + run);
          if ((typeof r === "number" ? r : await r) !== 0) break;
          run++;
        }
        if (run === n) break;
        start += run + 1;
      }
      let k = 0;
      while (k < n && this.covered(start + k)) k++;
      if (k === n) {
        for (let i = 0; i < n; i++) {
          const v = this.update(start + i, 1, onTableMoved);
          if (typeof v !== "number") await v;
        }
        this.freeHint = start + n;
        return start * this.clusterSize;
      }
      const t = Math.floor((start + k) / this.blockEntries);
      if (t >= this.table.length) {
        // The table must grow first: its new area (growTable) holds the blocks.
        await this.coverClusters(start + k, 1, onTableMoved);
        continue;
      }
      await this.placeBlock(t, start + n, onTableMoved);
      // QEMU's update_refcount on -EAGAIN: "try the same ones first".
      this.freeHint = start;
    }
  }

  /**
   * A new refcount block for range `t` in the first free cluster from `from` on. A block in its
   * own range counts itself; one in another range is counted there (durably, before the table
   * points at it).
   */
  private async placeBlock(t: number, from: number, onTableMoved: TableMoved): Promise<void> {
    let p = from;
    for (;;) {
      const r = this.get(p);
      if ((typeof r === "number" ? r : await r) === 0) break;
      p++;
    }
    const be = this.blockEntries;
    const block = view(new Uint8Array(this.clusterSize));
    if (Math.floor(p / be) === t) {
      setRefcount(block, p % be, this.order, 1);
    } else {
      if (!this.covered(p)) {
        // Its range has no block either (a run that ended at a range's end): that one first,
        // our way, and look again (it may have taken cluster p).
        await this.coverClusters(p, 1, onTableMoved);
        await this.placeBlock(t, from, onTableMoved);
        return;
      }
      await this.update(p, 1, onTableMoved);
      await this.writeBack();
    }
    const offset = p * this.clusterSize;
    await this.storage.write(new Uint8Array(block.buffer), offset);
    await this.storage.flush();
    await this.writeTableEntry(t, offset);
    await this.storage.flush();
    this.blocks.put(offset, block);
  }

  /** Allocates `n` clusters in as few contiguous runs as `maxRun` allows; one offset each. */
  async allocateMany(n: number, onTableMoved: TableMoved): Promise<number[]> {
    const out: number[] = [];
    while (out.length < n) {
      const k = Math.min(this.maxRun, n - out.length);
      const base = await this.allocate(k, onTableMoved);
      for (let i = 0; i < k; i++) out.push(base + i * this.clusterSize);
    }
    return out;
  }

  /**
   * Allocates `n` contiguous clusters however many refcount blocks they span (a grown L1 table
   * must be contiguous; `allocate` stops at `maxRun`). Refcount blocks missing for the area are
   * placed first, each in the first free cluster of the candidate area, and the search starts
   * again past them — where QEMU's allocator ends up putting them too. Used for L1 tables
   * (resize.ts, amend.ts) and snapshot tables (snapshots.ts).
   */
  async allocateArea(n: number, onTableMoved: TableMoved): Promise<number> {
    if (n <= this.maxRun) return this.allocate(n, onTableMoved);
    const be = this.blockEntries;
    for (;;) {
      let start = this.freeHint;
      for (;;) {
        let run = 0;
        while (run < n && (await this.get(start + run)) === 0) run++;
        if (run === n) break;
        start += run + 1;
      }
      const first = Math.floor(start / be);
      const last = Math.floor((start + n - 1) / be);
      let missing = -1;
      for (let t = first; t <= last && missing < 0; t++) if (t >= this.table.length || this.table[t] === 0) missing = t;
      if (missing < 0) {
        for (let i = 0; i < n; i++) await this.update(start + i, 1, onTableMoved);
        this.freeHint = start + n;
        return start * this.clusterSize;
      }
      if (missing === first) {
        // The block for the area's first cluster goes where coverClusters puts every new block:
        // the first cluster of the range it covers, at or before `start`.
        await this.coverClusters(start, 1, onTableMoved);
        continue;
      }
      // A later range: its block takes cluster `start`, counted by the (existing) first block.
      if (missing >= this.table.length) await this.growTable(missing + 1, onTableMoved);
      if ((await this.get(start)) !== 0) continue; // the grown table took it: search again
      await this.update(start, 1, onTableMoved);
      await this.writeBack();
      const offset = start * this.clusterSize;
      const block = view(new Uint8Array(this.clusterSize));
      await this.storage.write(new Uint8Array(block.buffer), offset);
      await this.storage.flush();
      await this.writeTableEntry(missing, offset);
      await this.storage.flush();
      this.blocks.put(offset, block);
    }
  }

  /**
   * QEMU's qcow2_shrink_reftable: drops the refcount blocks that count nothing but
   * themselves. The table without them is written (and flushed) first; only then is each
   * dropped block's own refcount cleared. Call with every refcount written back and no
   * release pending. Returns how many blocks were dropped.
   */
  async dropUnusedBlocks(): Promise<number> {
    const be = this.blockEntries;
    const cs = this.clusterSize;
    const unused: number[] = [];
    for (let t = 0; t < this.table.length; t++) {
      const offset = this.table[t];
      if (offset === 0) continue;
      const block = await this.block(offset);
      const own = Math.floor(offset / cs / be) === t ? (offset / cs) % be : -1;
      let empty = true;
      for (let i = 0; i < be && empty; i++) if (i !== own && getRefcount(block, i, this.order) !== 0) empty = false;
      if (empty) unused.push(t);
    }
    if (unused.length === 0) return 0;
    const bytes = new Uint8Array(this.tableClusters * cs);
    const dv = view(bytes);
    const keep = new Set(unused);
    for (let t = 0; t < this.table.length; t++) if (!keep.has(t)) setU64(dv, t * 8, this.table[t]);
    await this.storage.write(bytes, this.tableOffset);
    await this.storage.flush();
    for (const t of unused) {
      const offset = this.table[t];
      const index = offset / cs;
      this.table[t] = 0;
      this.tableVersion++;
      this.blocks.delete(offset);
      // A block covering itself went with the table entry; another one counts it elsewhere.
      if (Math.floor(index / be) !== t) await this.update(index, -1, () => Promise.resolve());
      if (index < this.freeHint) this.freeHint = index;
    }
    return unused.length;
  }

  /**
   * The last cluster below `clusters` with a non-zero refcount (-1: none), as QEMU's
   * qcow2_get_last_cluster finds where a shrunken file may end. Ranges without a block are
   * skipped whole.
   */
  async lastUsedCluster(clusters: number): Promise<number> {
    const be = this.blockEntries;
    for (let c = clusters - 1; c >= 0; c--) {
      const t = Math.floor(c / be);
      if (t >= this.table.length || this.table[t] === 0) {
        c = t * be;
        continue;
      }
      if ((await this.get(c)) !== 0) return c;
    }
    return -1;
  }

  /** Holds back a decrement until the references that dropped it are durable. */
  release(index: number): void {
    this.releases.push(index);
  }

  get pendingReleases(): number {
    return this.releases.length;
  }

  async applyReleases(onTableMoved: TableMoved): Promise<void> {
    const list = this.releases.splice(0);
    for (const index of list) await this.update(index, -1, onTableMoved);
  }

  get dirty(): boolean {
    return this.blocks.dirtyCount > 0;
  }

  get overBudget(): boolean {
    return this.blocks.overBudget;
  }

  /** Writes the dirty refcount blocks (the caller flushes). */
  async writeBack(): Promise<void> {
    for (const [offset, block] of this.blocks.dirtyEntries()) {
      await this.storage.write(new Uint8Array(block.buffer, block.byteOffset, block.byteLength), offset);
      this.blocks.markClean(offset);
    }
  }

  /** The refcount table as it is in memory (0: no block), for overlap checks; not to be changed. */
  get tableEntries(): ArrayLike<number> {
    return this.table;
  }

  /** The offsets of the refcount blocks in use. */
  blockOffsets(): number[] {
    return [...this.table].filter((b) => b !== 0);
  }

  /** Host clusters the refcount structures themselves use (for the file end and for checks). */
  structureEnd(): number {
    let end = this.tableOffset + this.tableClusters * this.clusterSize;
    for (const b of this.table) if (b + this.clusterSize > end) end = b + this.clusterSize;
    return end;
  }

  /**
   * Makes sure refcount blocks cover clusters [first, first+n). A missing block is placed in
   * the first cluster of the range it covers (all free, as nothing there is counted yet) and
   * counts itself. When the table is too short, a larger one is built past the end of
   * everything, with blocks covering it, and the header is switched to it.
   */
  private async coverClusters(first: number, n: number, onTableMoved: TableMoved): Promise<void> {
    const lastBlock = Math.floor((first + n - 1) / this.blockEntries);
    if (lastBlock >= this.table.length) await this.growTable(lastBlock + 1, onTableMoved);
    for (let t = Math.floor(first / this.blockEntries); t <= lastBlock; t++) {
      if (this.table[t] !== 0) continue;
      const blockIndex = t * this.blockEntries;
      const offset = blockIndex * this.clusterSize;
      const block = view(new Uint8Array(this.clusterSize));
      setRefcount(block, 0, this.order, 1);
      await this.storage.write(new Uint8Array(block.buffer), offset);
      await this.storage.flush();
      await this.writeTableEntry(t, offset);
      await this.storage.flush();
      this.blocks.put(offset, block);
    }
  }

  /** Writes a refcount table entry; memory follows only once the disk has it. */
  private async writeTableEntry(t: number, offset: number): Promise<void> {
    const e = new Uint8Array(8);
    setU64(view(e), 0, offset);
    await this.storage.write(e, this.tableOffset + t * 8);
    this.table[t] = offset;
    this.tableVersion++;
  }

  private async growTable(minEntries: number, onTableMoved: TableMoved): Promise<void> {
    const be = this.blockEntries;
    const cs = this.clusterSize;
    // Start the new area on a refcount block boundary past every cluster in use or about to be.
    const fileEnd = Math.max(await this.storage.size(), this.structureEnd());
    const usedEnd = Math.max(Math.ceil(fileEnd / cs), (minEntries - 1) * be + 1);
    const areaStart = Math.ceil(usedEnd / be) * be;
    let blocks = 1;
    let entries = 0;
    let clusters = 0;
    for (;;) {
      entries = Math.max(minEntries, Math.floor(areaStart / be) + blocks, Math.ceil(this.table.length * 1.5));
      clusters = Math.ceil((entries * 8) / cs);
      const needBlocks = Math.ceil((blocks + clusters) / be);
      if (needBlocks <= blocks) break;
      blocks = needBlocks;
    }
    entries = (clusters * cs) / 8;
    const table = new Float64Array(entries);
    table.set(this.table);
    // New blocks at [areaStart, areaStart+blocks), the table right after them.
    const tableOffset = (areaStart + blocks) * cs;
    for (let b = 0; b < blocks; b++) {
      const block = view(new Uint8Array(cs));
      for (let c = 0; c < be; c++) {
        const index = (Math.floor(areaStart / be) + b) * be + c;
        if (index < areaStart + blocks + clusters) setRefcount(block, c, this.order, 1);
      }
      const offset = (areaStart + b) * cs;
      await this.storage.write(new Uint8Array(block.buffer), offset);
      table[Math.floor(areaStart / be) + b] = offset;
    }
    const bytes = new Uint8Array(clusters * cs);
    const dv = view(bytes);
    for (let i = 0; i < entries; i++) {
      setU64(dv, i * 8, table[i]);
    }
    await this.storage.write(bytes, tableOffset);
    await this.storage.flush();
    // The header switches to the new table; if that fails, nothing refers to the new structures
    // and memory keeps the old ones.
    await onTableMoved(tableOffset, clusters);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = table;
    this.tableOffset = tableOffset;
    this.tableClusters = clusters;
    this.tableVersion++;
    for (let i = 0; i < oldClusters; i++) this.release(oldOffset / cs + i);
  }
}
