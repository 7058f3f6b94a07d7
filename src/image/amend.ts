/**
 * Amending a qcow2 image in place, as QEMU's qcow2_amend_options does: the version (compat
 * 0.10 / 1.1), the refcount width, lazy refcounts, the virtual size (growing), the external data
 * file's name and its raw flag. Steps run in QEMU's order (upgrade, refcount width, header, lazy
 * refcounts, size, downgrade last) and fail with QEMU's messages.
 *
 * Crash safety, as in the write path: new structures are written and flushed before the header
 * (or table) that points at them; references are dropped only after the pointer to them is
 * durable. A crash leaves the old image or the new one, at worst with leaked clusters.
 */
import { corrupt, hex, invalidArgument, QcowError, qemuHex, unsupported } from "../errors.js";
import { decodeBitmapTableEntry } from "../format/bitmap.js";
import { setU64, view } from "../format/bytes.js";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_DEFLATE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  MAX_REFTABLE_BYTES,
  QEMU_FEATURE_NAMES,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH_WITH_COMPRESSION,
} from "../format/header.js";
import { encodeSnapshotTable, snapshotsRewritten, snapshotTableSize } from "../format/snapshot.js";
import {
  ClusterType,
  decodeL1Entry,
  decodeL2Entry,
  encodeStandardL2,
  type L2Geometry,
  maxRefcount,
  setRefcount,
} from "../format/tables.js";
import { readFull } from "../io/storage.js";
import type { Qcow2Image } from "./qcow2.js";
import type { Qcow2Writer } from "./qcow2-write.js";
import { Refcounts, type TableMoved } from "./refcount.js";
import { validateSnapshotL1 } from "./snapshots.js";

export interface AmendOptions {
  /** 2 (compat=0.10) or 3 (compat=1.1). */
  version?: 2 | 3;
  /** 1, 2, 4, ..., 64. */
  refcountBits?: number;
  lazyRefcounts?: boolean;
  /**
   * QEMU 7.2 cannot change the backing file through amend (it points to rebase): a value other
   * than the current one is refused, after the other changes are made, as QEMU does.
   */
  backingFile?: string;
  backingFormat?: string;
  /** A new name for the external data file (only for images that have one). */
  dataFile?: string;
  /** Can only be cleared (QEMU: "data-file-raw cannot be set on existing images"). */
  dataFileRaw?: boolean;
  /**
   * A new virtual size: the image is resized as `qcowkit resize --shrink` resizes it (QEMU's
   * amend truncates through the same driver call), bitmaps and data file included.
   */
  size?: number;
  /** Encryption options were given (`encrypt.*`): refused, as qcowkit opens no encrypted image. */
  encryption?: boolean;
  /** Called with the fraction of the work done (0..1). */
  onProgress?: (fraction: number) => void;
}

/**
 * Amends `img` (opened read-write) and closes it: after the refcount structures or the version
 * change, the open handle no longer describes the file, so it is never used again.
 */
export async function amendImage(img: Qcow2Image, opts: AmendOptions): Promise<void> {
  try {
    if (!img.writer) throw new QcowError("read-only", `${img.filename} is open read-only`);
    await img.flush();
    await new Amender(img, img.writer).run(opts);
  } finally {
    await img.close();
  }
}

class Amender {
  private readonly cs: number;
  private refcounts: Refcounts;
  private readonly tableMoved: TableMoved;

  constructor(
    private readonly img: Qcow2Image,
    private readonly writer: Qcow2Writer,
  ) {
    this.cs = img.clusterSize;
    this.refcounts = writer.refcounts;
    this.tableMoved = async (offset, clusters) => {
      img.header.refcountTableOffset = offset;
      img.header.refcountTableClusters = clusters;
      await writer.writeHeader();
    };
  }

  private get storage() {
    return this.img.storage;
  }

  async run(o: AmendOptions): Promise<void> {
    const img = this.img;
    const h = img.header;
    const oldVersion = h.version;
    const newVersion = o.version ?? oldVersion;
    const oldBits = 2 ** h.refcountOrder;
    const newBits = o.refcountBits ?? oldBits;
    const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    const dataFileRaw = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    // The checks QEMU makes while reading the options, in its option order.
    if (o.encryption) throw invalidArgument("Can't amend encryption options - encryption not present");
    if (!Number.isInteger(newBits) || newBits < 1 || newBits > 64 || (newBits & (newBits - 1)) !== 0)
      throw invalidArgument("Refcount width must be a power of two and may not exceed 64 bits");
    if (o.dataFile !== undefined && !hasDataFile)
      throw invalidArgument("data-file can only be set for images that use an external data file");
    if (o.dataFileRaw && !dataFileRaw) throw invalidArgument("data-file-raw cannot be set on existing images");

    const steps = (newVersion !== oldVersion ? 1 : 0) + (newBits !== oldBits ? 1 : 0);
    let done = 0;
    const progress = (f: number): void => o.onProgress?.(steps === 0 ? 1 : (done + f) / steps);
    progress(0);

    // Upgrade first: later steps may need v3.
    if (newVersion > oldVersion) {
      await this.upgrade();
      done++;
      progress(0);
    }
    if (newBits !== oldBits) {
      if (newVersion < 3 && newBits !== 16) {
        throw invalidArgument(
          "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        );
      }
      await this.changeRefcountOrder(Math.log2(newBits), progress);
      done++;
      progress(0);
    }
    if (o.dataFileRaw === false) h.autoclearFeatures &= ~AUTOCLEAR_DATA_FILE_RAW;
    if (o.dataFile !== undefined) img.extensions.dataFile = o.dataFile === "" ? undefined : o.dataFile;
    await this.writer.writeHeader();

    if (o.backingFile !== undefined || o.backingFormat !== undefined) {
      if (o.backingFile !== img.backingName || o.backingFormat !== img.extensions.backingFormat) {
        throw invalidArgument("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
      }
    }
    if (o.lazyRefcounts !== undefined && o.lazyRefcounts !== img.lazyRefcounts) {
      if (o.lazyRefcounts) {
        if (newVersion < 3) {
          throw invalidArgument(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
          );
        }
        h.compatibleFeatures |= COMPAT_LAZY_REFCOUNTS;
      } else {
        // qcowkit keeps refcounts exact and repairs a dirty image when it opens it for writing,
        // so the image is clean here (what QEMU's qcow2_mark_clean makes sure of).
        h.compatibleFeatures &= ~COMPAT_LAZY_REFCOUNTS;
      }
      await this.writer.writeHeader();
    }
    // size=0 means "not given" to QEMU.
    if (o.size !== undefined && o.size !== 0) await this.resize(o.size);
    // Downgrade last, once whatever v2 cannot hold may have been removed.
    if (newVersion < oldVersion) {
      await this.downgrade(progress);
      done++;
    }
    progress(1);
  }

  // ---- size ------------------------------------------------------------------------------

  /**
   * Grows the virtual disk as QEMU's qcow2_co_truncate does with preallocation=off: a larger
   * L1 table when the new size needs one (written and flushed, then the header switched to it,
   * then the old one freed), and the new size in the header.
   */
  private async resize(size: number): Promise<void> {
    if (size === this.img.size) return;
    // The same resize as qemu-img resize's (QEMU's amend truncates through the same driver call).
    await this.writer.resize(size, { shrink: true });
  }

  // ---- version ---------------------------------------------------------------------------

  /**
   * v2 to v3 (QEMU's qcow2_upgrade): v3 needs each snapshot's extra data to hold the 64-bit VM
   * state size and the disk size, so a table without them is rewritten first; then the header.
   */
  private async upgrade(): Promise<void> {
    const img = this.img;
    const h = img.header;
    if (img.snapshots.some((s) => s.extra.length < 16)) await this.rewriteSnapshotTable();
    h.version = 3;
    h.headerLength = V3_HEADER_LENGTH_WITH_COMPRESSION;
    img.extensions.featureNames = QEMU_FEATURE_NAMES;
    img.geometry.version = 3;
    await this.writer.writeHeader();
  }

  /** Writes the snapshot table to new clusters, switches the header to it, frees the old one. */
  private async rewriteSnapshotTable(): Promise<void> {
    const h = this.img.header;
    const oldOffset = h.snapshotsOffset;
    const oldBytes = snapshotTableSize(this.img.snapshots);
    const table = encodeSnapshotTable(this.img.snapshots, this.img.header.size);
    const clusters = Math.ceil(table.length / this.cs);
    const at = await this.allocateContiguous(clusters);
    const padded = new Uint8Array(clusters * this.cs);
    padded.set(table);
    await this.storage.write(padded, at);
    await this.commitRefcounts();
    h.snapshotsOffset = at;
    await this.writer.writeHeader();
    snapshotsRewritten(this.img.snapshots);
    await this.free(oldOffset, oldBytes);
  }

  /**
   * v3 to v2 (QEMU's qcow2_downgrade): refused while the image uses what v2 cannot express;
   * zero clusters become unallocated or allocated zeroed clusters; zstd goes when no
   * compressed cluster uses it. Persistent bitmaps cannot be kept in v2: QEMU keeps their
   * extension, which makes every later check report the bitmaps' clusters as leaked; qcowkit
   * removes the bitmaps and frees their clusters instead.
   */
  private async downgrade(progress: (f: number) => void): Promise<void> {
    const img = this.img;
    const h = img.header;
    if (h.refcountOrder !== 4) throw unsupported("compat=0.10 requires refcount_bits=16");
    if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) throw unsupported("Cannot downgrade an image with a data file");
    for (const s of img.snapshots) {
      if (s.vmStateSize > 0xffff_ffff || (s.diskSize ?? h.size) !== img.size) {
        throw unsupported("Internal snapshots prevent downgrade of image");
      }
    }
    const incompatible = h.incompatibleFeatures & ~INCOMPAT_COMPRESSION;
    if (incompatible !== 0n) {
      throw unsupported(`Cannot downgrade an image with incompatible features 0x${incompatible.toString(16)} set`);
    }
    try {
      await this.expandZeroClusters(progress);
    } catch (e) {
      if (!(e instanceof QcowError)) throw e;
      throw new QcowError(e.code, `Failed to turn zero into data clusters: ${e.message}`, { cause: e });
    }
    if (h.incompatibleFeatures & INCOMPAT_COMPRESSION) {
      if (await this.hasCompressedClusters()) {
        throw unsupported("Cannot downgrade an image with zstd compression type and existing compressed clusters");
      }
      h.incompatibleFeatures &= ~INCOMPAT_COMPRESSION;
      h.compressionType = COMPRESSION_DEFLATE;
    }
    const bitmapClusters = await this.bitmapExtents();
    h.compatibleFeatures = 0n;
    h.autoclearFeatures = 0n;
    h.version = 2;
    h.headerLength = V2_HEADER_LENGTH;
    h.tail = new Uint8Array(0);
    img.extensions.bitmaps = undefined;
    img.geometry.version = 2;
    await this.writer.writeHeader();
    for (const [offset, length] of bitmapClusters) await this.free(offset, length);
  }

  /** Every byte range the persistent bitmaps use: directory, tables, data clusters. */
  private async bitmapExtents(): Promise<[number, number][]> {
    const bm = this.img.extensions.bitmaps;
    if (!bm) return [];
    const out: [number, number][] = [[bm.directoryOffset, bm.directorySize]];
    for (const b of this.img.bitmaps) {
      out.push([b.tableOffset, b.tableSize * 8]);
      const buf = new Uint8Array(b.tableSize * 8);
      await readFull(this.storage, buf, b.tableOffset);
      const dv = view(buf);
      for (let i = 0; i < b.tableSize; i++) {
        const e = decodeBitmapTableEntry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), this.cs);
        if (e.offset !== 0) out.push([e.offset, this.cs]);
      }
    }
    return out;
  }

  /** Each L2 table of the active layer and the snapshots, once, with its refcount. */
  private async *l2Tables(): AsyncIterable<{ offset: number; index: number; count: number }> {
    const img = this.img;
    const seen = new Set<number>();
    const l1s: { offset: number; size: number }[] = [{ offset: img.header.l1TableOffset, size: img.header.l1Size }];
    for (const s of img.snapshots) {
      validateSnapshotL1(s, this.cs);
      l1s.push({ offset: s.l1TableOffset, size: s.l1Size });
    }
    const count = l1s.reduce((n, l) => n + l.size, 0);
    let index = 0;
    for (const l1 of l1s) {
      const buf = new Uint8Array(l1.size * 8);
      await readFull(this.storage, buf, l1.offset);
      const dv = view(buf);
      for (let i = 0; i < l1.size; i++, index++) {
        const { l2Offset } = decodeL1Entry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), this.cs, i);
        if (l2Offset === 0 || seen.has(l2Offset)) continue;
        seen.add(l2Offset);
        yield { offset: l2Offset, index, count };
      }
    }
  }

  private geometry(): L2Geometry {
    return { ...this.img.geometry };
  }

  private async readL2(offset: number): Promise<DataView> {
    const buf = new Uint8Array(this.cs);
    await readFull(this.storage, buf, offset);
    return view(buf);
  }

  /**
   * QEMU's qcow2_expand_zero_clusters: v2 has no zero flag. Without a backing file a zero
   * cluster with no host cluster simply becomes unallocated (it reads as zeros either way);
   * otherwise it gets a zeroed host cluster. A zero cluster with a host cluster keeps it,
   * zeroed, when every reference to that cluster comes through this L2 table; else it gets a
   * fresh one. An L2 table shared with snapshots counts once per table that points at it, so
   * a new cluster there takes the L2 table's refcount.
   * Order: new clusters' refcounts and zeros, flush, the L2 table, flush, then decrements.
   */
  private async expandZeroClusters(progress: (f: number) => void): Promise<void> {
    const img = this.img;
    const g = this.geometry();
    const backed = img.backingName !== undefined;
    const zeros = new Uint8Array(this.cs);
    for await (const t of this.l2Tables()) {
      progress(t.index / t.count);
      const table = await this.readL2(t.offset);
      const l2Refcount = await this.refcounts.get(t.offset / this.cs);
      let dirty = false;
      const drops: number[] = [];
      for (let j = 0; j < img.l2Entries; j++) {
        const at = j * 8;
        const e = decodeL2Entry(
          table.getUint32(at),
          table.getUint32(at + 4),
          0,
          0,
          g,
          () => `L2 offset: ${hex(t.offset)}, L2 index: ${qemuHex(j)}`,
        );
        if (e.type !== ClusterType.ZeroPlain && e.type !== ClusterType.ZeroAlloc) continue;
        dirty = true;
        let host = e.type === ClusterType.ZeroAlloc ? e.hostOffset : 0;
        if (host !== 0 && (await this.refcounts.get(host / this.cs)) !== l2Refcount) {
          // Shared through another table as well: zeroing it in place could change what that
          // table reads. Give this entry a cluster of its own.
          drops.push(host);
          host = 0;
        }
        if (host === 0 && !backed && e.type === ClusterType.ZeroPlain) {
          table.setUint32(at, 0);
          table.setUint32(at + 4, 0);
          continue;
        }
        if (host === 0) {
          host = await this.refcounts.allocate(1, this.tableMoved);
          if (l2Refcount > 1) await this.refcounts.update(host / this.cs, l2Refcount - 1, this.tableMoved);
        }
        await this.storage.write(zeros, host);
        const copied = (await this.refcounts.get(host / this.cs)) === 1;
        const [hi, lo] = encodeStandardL2(host, copied, false);
        table.setUint32(at, hi);
        table.setUint32(at + 4, lo);
      }
      if (!dirty) continue;
      await this.commitRefcounts();
      await this.storage.write(new Uint8Array(table.buffer), t.offset);
      await this.storage.flush();
      for (const d of drops) await this.refcounts.update(d / this.cs, -l2Refcount, this.tableMoved);
      if (drops.length > 0) await this.commitRefcounts();
    }
  }

  private async hasCompressedClusters(): Promise<boolean> {
    const g = this.geometry();
    for await (const t of this.l2Tables()) {
      const table = await this.readL2(t.offset);
      const step = this.img.l2EntryBytes;
      for (let j = 0; j < this.img.l2Entries; j++) {
        const at = j * step;
        const e = decodeL2Entry(
          table.getUint32(at),
          table.getUint32(at + 4),
          step === 16 ? table.getUint32(at + 8) : 0,
          step === 16 ? table.getUint32(at + 12) : 0,
          g,
          () => `L2 offset: ${hex(t.offset)}, L2 index: ${qemuHex(j)}`,
        );
        if (e.type === ClusterType.Compressed) return true;
      }
    }
    return false;
  }

  // ---- refcount width --------------------------------------------------------------------

  /**
   * QEMU's qcow2_change_refcount_order. The new refcount blocks and table are allocated in the
   * old structures (so until the switch they are ordinary clusters; a crash leaks them), until
   * they cover every cluster in use including themselves. Then each new block is filled from
   * the old refcounts, one block at a time, and flushed; the header switches to the new table
   * and width in one write; last, the old blocks and table are freed in the new structures.
   */
  private async changeRefcountOrder(order: number, progress: (f: number) => void): Promise<void> {
    const cs = this.cs;
    const old = this.refcounts;
    const entries = (cs * 8) / 2 ** order;
    const max = maxRefcount(order);
    const usedBlocks = new Set<number>();
    // Which new blocks are needed: every range holding a cluster in use. Allocating blocks and
    // the table uses more clusters (and may grow the old structures), so repeat until stable.
    // Allocated clusters may lie past the end of the file until they are written.
    let allocatedEnd = 0;
    const scan = async (): Promise<number> => {
      usedBlocks.clear();
      const end = Math.ceil(Math.max(await this.storage.size(), old.structureEnd(), allocatedEnd) / cs);
      let last = -1;
      for (let c = 0; c < end; c++) {
        const r = await old.get(c);
        if (r === 0) continue;
        if (r > max) {
          throw unsupported(
            `Cannot decrease refcount entry width to ${2 ** order} bits: Cluster at offset ${hex(c * cs)} has a refcount of ${r}`,
          );
        }
        usedBlocks.add(Math.floor(c / entries));
        last = c;
      }
      return last;
    };
    const blocks = new Map<number, number>();
    let tableOffset = 0;
    let tableClusters = 0;
    // Refuse a table qcowkit cannot place before allocating anything (it grows little after).
    const limit = (clusters: number): void => {
      if (clusters * cs > MAX_REFTABLE_BYTES || clusters > old.maxRun) {
        throw unsupported(
          `Cannot change the refcount width: the new refcount table (${clusters} clusters) is too large`,
        );
      }
    };
    for (;;) {
      const last = await scan();
      limit(Math.ceil(((Math.floor(last / entries) + 2) * 8) / cs) + 1);
      let grew = false;
      for (const t of usedBlocks) {
        if (blocks.has(t)) continue;
        const at = await old.allocate(1, this.tableMoved);
        blocks.set(t, at);
        allocatedEnd = Math.max(allocatedEnd, at + cs);
        grew = true;
      }
      const tableEntries = Math.floor(last / entries) + 1;
      const needClusters = Math.ceil((tableEntries * 8) / cs);
      if (needClusters > tableClusters) {
        if (tableOffset !== 0) {
          for (let i = 0; i < tableClusters; i++) await old.update(tableOffset / cs + i, -1, this.tableMoved);
        }
        // Room for the blocks the table's own clusters may need.
        tableClusters = needClusters + 1;
        limit(tableClusters);
        tableOffset = await this.allocateContiguous(tableClusters, old);
        allocatedEnd = Math.max(allocatedEnd, tableOffset + tableClusters * cs);
        grew = true;
      }
      if (!grew) break;
    }
    // Durable before anything is built on them: the old structures counting the new clusters.
    await old.writeBack();
    await this.storage.flush();
    const table = new Uint8Array(tableClusters * cs);
    const tv = view(table);
    let n = 0;
    for (const [t, offset] of [...blocks].sort((a, b) => a[0] - b[0])) {
      const block = view(new Uint8Array(cs));
      for (let i = 0; i < entries; i++) {
        const r = await old.get(t * entries + i);
        if (r !== 0) setRefcount(block, i, order, r);
      }
      await this.storage.write(new Uint8Array(block.buffer), offset);
      setU64(tv, t * 8, offset);
      progress((++n / blocks.size) * 0.9);
    }
    await this.storage.write(table, tableOffset);
    await this.storage.flush();
    const h = this.img.header;
    const oldTable = { offset: old.tableOffset, clusters: old.tableClusters };
    const oldBlocks = old.blockOffsets();
    h.refcountOrder = order;
    h.refcountTableOffset = tableOffset;
    h.refcountTableClusters = tableClusters;
    await this.writer.writeHeader();
    this.refcounts = await Refcounts.open(this.storage, h);
    for (const b of oldBlocks) await this.refcounts.update(b / cs, -1, this.tableMoved);
    for (let i = 0; i < oldTable.clusters; i++)
      await this.refcounts.update(oldTable.offset / cs + i, -1, this.tableMoved);
    await this.commitRefcounts();
  }

  // ---- helpers ---------------------------------------------------------------------------

  /** `n` contiguous new clusters (refcount 1 each), however many refcount blocks they span. */
  private allocateContiguous(n: number, rc = this.refcounts): Promise<number> {
    return rc.allocateArea(n, this.tableMoved);
  }

  /** Makes the refcount changes so far durable. */
  private async commitRefcounts(): Promise<void> {
    await this.refcounts.writeBack();
    await this.storage.flush();
  }

  /** Drops one reference to every cluster [offset, offset+length) touches (its pointer is gone). */
  private async free(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + length - 1) / this.cs);
    for (let c = first; c <= last; c++) {
      if ((await this.refcounts.get(c)) === 0) throw corrupt(`Refcount of cluster ${hex(c * this.cs)} is already 0`);
      await this.refcounts.update(c, -1, this.tableMoved);
    }
    await this.commitRefcounts();
  }
}
