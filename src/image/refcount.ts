/**
 * Reading host cluster refcounts through the refcount table and refcount blocks
 * (docs/interop/qcow2.rst, "Host cluster management").
 */
import { view } from "../format/bytes.js";
import type { Qcow2Header } from "../format/header.js";
import { decodeRefcountTableEntry, getRefcount } from "../format/tables.js";
import { type Storage, readFull } from "../io/storage.js";
import { TableCache } from "./cache.js";

export class Refcounts {
  readonly clusterSize: number;
  readonly order: number;
  /** Refcount entries per refcount block. */
  readonly blockEntries: number;
  private readonly table: Float64Array;
  private readonly blocks: TableCache<DataView>;

  private constructor(
    private readonly storage: Storage,
    h: Qcow2Header,
    table: Float64Array,
    cacheBytes: number,
  ) {
    this.clusterSize = 2 ** h.clusterBits;
    this.order = h.refcountOrder;
    this.blockEntries = (this.clusterSize * 8) / 2 ** h.refcountOrder;
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
      table[i] = decodeRefcountTableEntry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), clusterSize, i);
    }
    return new Refcounts(storage, h, table, cacheBytes);
  }

  /** The refcount of host cluster `index` (0 where no refcount block covers it). */
  async get(index: number): Promise<number> {
    const t = Math.floor(index / this.blockEntries);
    const blockOffset = t < this.table.length ? this.table[t] : 0;
    if (blockOffset === 0) return 0;
    const block = await this.blocks.get(blockOffset, async () => {
      const b = new Uint8Array(this.clusterSize);
      await readFull(this.storage, b, blockOffset);
      return view(b);
    });
    return getRefcount(block, index % this.blockEntries, this.order);
  }
}
