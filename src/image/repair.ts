/**
 * Counting every reference to every host cluster, as QEMU's check does, and bringing the
 * refcounts and COPIED flags in line with them. Used when an image with lazy refcounts was not
 * closed cleanly (the dirty bit): before it is written, its refcounts are rebuilt.
 */
import { decodeBitmapTableEntry } from "../format/bitmap.js";
import { view } from "../format/bytes.js";
import { INCOMPAT_DATA_FILE } from "../format/header.js";
import { snapshotTableSize } from "../format/snapshot.js";
import { ClusterType, decodeL1Entry, encodeL1Entry } from "../format/tables.js";
import { readFull } from "../io/storage.js";
import type { Qcow2Image } from "./qcow2.js";
import type { Refcounts, TableMoved } from "./refcount.js";

/** How many references each host cluster has, indexed by cluster. */
export class ReferenceCounts {
  counts: Uint32Array;
  constructor(clusters: number) {
    this.counts = new Uint32Array(Math.max(1, clusters));
  }

  /** Counts one reference to every cluster that [offset, offset+length) touches. */
  add(offset: number, length: number, clusterSize: number): void {
    if (length <= 0) return;
    const last = Math.floor((offset + length - 1) / clusterSize);
    if (last >= this.counts.length) {
      const grown = new Uint32Array(Math.max(last + 1, this.counts.length * 2));
      grown.set(this.counts);
      this.counts = grown;
    }
    for (let c = Math.floor(offset / clusterSize); c <= last; c++) this.counts[c]++;
  }
}

/** Counts the references of every structure of the image (header, tables, data, snapshots, bitmaps). */
export async function countReferences(img: Qcow2Image, refcounts: Refcounts): Promise<ReferenceCounts> {
  const cs = img.clusterSize;
  const h = img.header;
  const s = img.storage;
  const refs = new ReferenceCounts(Math.ceil((await s.size()) / cs));
  const externalData = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  refs.add(0, cs, cs);
  if (img.extensions.crypto) refs.add(img.extensions.crypto.offset, img.extensions.crypto.length, cs);

  const countL1 = async (l1Offset: number, l1Size: number): Promise<void> => {
    if (l1Size === 0) return;
    refs.add(l1Offset, l1Size * 8, cs);
    const buf = new Uint8Array(l1Size * 8);
    await readFull(s, buf, l1Offset);
    const dv = view(buf);
    for (let i = 0; i < l1Size; i++) {
      const { l2Offset } = decodeL1Entry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), cs, i);
      if (l2Offset === 0) continue;
      refs.add(l2Offset, cs, cs);
      const table = await img.loadL2(l2Offset);
      for (let j = 0; j < img.l2Entries; j++) {
        const e = img.decodeAt(table, j, l2Offset);
        if (e.type === ClusterType.Compressed) {
          const first = Math.floor(e.hostOffset / 512) * 512;
          refs.add(first, Math.ceil(((e.hostOffset % 512) + e.compressedSize) / 512) * 512, cs);
        } else if (
          !externalData &&
          e.hostOffset !== 0 &&
          (e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc)
        ) {
          refs.add(e.hostOffset, cs, cs);
        }
      }
    }
  };
  await countL1(h.l1TableOffset, h.l1Size);
  if (h.nbSnapshots > 0) {
    for (const sn of img.snapshots) await countL1(sn.l1TableOffset, sn.l1Size);
    refs.add(h.snapshotsOffset, snapshotTableSize(img.snapshots), cs);
  }
  refs.add(refcounts.tableOffset, refcounts.tableClusters * cs, cs);
  for (const offset of refcounts.blockOffsets()) refs.add(offset, cs, cs);
  const bm = img.extensions.bitmaps;
  if (bm) {
    refs.add(bm.directoryOffset, bm.directorySize, cs);
    for (const b of img.bitmaps) {
      refs.add(b.tableOffset, b.tableSize * 8, cs);
      const buf = new Uint8Array(b.tableSize * 8);
      await readFull(s, buf, b.tableOffset);
      const dv = view(buf);
      for (let i = 0; i < b.tableSize; i++) {
        const e = decodeBitmapTableEntry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), cs);
        if (e.offset !== 0) refs.add(e.offset, cs, cs);
      }
    }
  }
  return refs;
}

/**
 * Sets every refcount to the number of references counted, then the COPIED flags of the active
 * L1 and L2 tables to "refcount is exactly one". Returns how many refcounts changed.
 */
export async function rebuildRefcounts(
  img: Qcow2Image,
  refcounts: Refcounts,
  onTableMoved: TableMoved,
): Promise<number> {
  const cs = img.clusterSize;
  let changed = 0;
  // New refcount blocks made while fixing add references of their own: count until stable.
  for (let round = 0; round < 8; round++) {
    const refs = await countReferences(img, refcounts);
    const end = Math.max(refs.counts.length, Math.ceil(refcounts.structureEnd() / cs));
    let fixed = 0;
    for (let c = 0; c < end; c++) {
      const want = c < refs.counts.length ? refs.counts[c] : 0;
      const have = await refcounts.get(c);
      if (have !== want) {
        await refcounts.update(c, want - have, onTableMoved);
        fixed++;
      }
    }
    changed += fixed;
    if (fixed === 0) break;
  }
  await fixCopiedFlags(img, refcounts);
  return changed;
}

async function fixCopiedFlags(img: Qcow2Image, refcounts: Refcounts): Promise<void> {
  const cs = img.clusterSize;
  const h = img.header;
  const externalData = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  for (let i = 0; i < img.l1.length; i++) {
    const l2Offset = img.l1[i];
    if (l2Offset === 0) continue;
    const l2Copied = (await refcounts.get(l2Offset / cs)) === 1;
    if ((img.l1Copied[i] === 1) !== l2Copied) {
      img.l1Copied[i] = l2Copied ? 1 : 0;
      const [hi, lo] = encodeL1Entry({ l2Offset, copied: l2Copied });
      const e = new Uint8Array(8);
      view(e).setUint32(0, hi);
      view(e).setUint32(4, lo);
      await img.storage.write(e, h.l1TableOffset + i * 8);
    }
    const table = await img.loadL2(l2Offset);
    let dirty = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const e = img.decodeAt(table, j, l2Offset);
      if (e.type === ClusterType.Compressed || e.type === ClusterType.Unallocated || e.type === ClusterType.ZeroPlain)
        continue;
      if (e.hostOffset === 0 && !externalData) continue;
      const want = externalData || (await refcounts.get(e.hostOffset / cs)) === 1;
      if (e.copied !== want) {
        const at = j * img.l2EntryBytes;
        const hi = table.getUint32(at);
        table.setUint32(at, want ? (hi | 0x8000_0000) >>> 0 : hi & 0x7fff_ffff);
        dirty = true;
      }
    }
    if (dirty) await img.storage.write(new Uint8Array(table.buffer, table.byteOffset, table.byteLength), l2Offset);
  }
}
