/**
 * Changing an image's virtual size, as `qemu-img resize` does through QEMU's
 * qcow2_co_truncate (block/qcow2.c) and the file driver's truncate.
 *
 * qcow2, growing: when the new size needs more L1 entries, a larger L1 table is written to new
 * clusters and flushed, the header switched to it, and only then are the old table's clusters
 * freed (QEMU's qcow2_grow_l1_table). The new area is then preallocated or zeroed as asked, its
 * metadata written back, and the new size written to the header last. The L1 table therefore
 * always covers the size the header states: a crash leaves the old size or the new one, with at
 * worst leaked clusters.
 *
 * qcow2, shrinking: the clusters past the new end are discarded (L2 entries cleared, L2 tables
 * wholly past the end freed — the L1 table keeps its size, as QEMU's qcow2_shrink_l1_table
 * leaves it), refcount blocks left counting only themselves are dropped, the file is cut after
 * its last used cluster, and the new size is written to the header. Every decrement reaches the
 * disk after the entries that dropped the reference (the write path's usual ordering).
 *
 * Persistent bitmaps (qcow2) follow the disk's size, marked in_use on disk meanwhile.
 *
 * Raw: the file is truncated; `falloc` and `full` write zeros over the new part.
 */
import { invalidArgument, QcowError, unsupported } from "../errors.js";
import { BME_FLAG_IN_USE, decodeBitmapTableEntry, encodeBitmapDirectory } from "../format/bitmap.js";
import { view } from "../format/bytes.js";
import { AUTOCLEAR_DATA_FILE_RAW, MAX_L1_BYTES } from "../format/header.js";
import { encodeL1Entry, type L2Entry } from "../format/tables.js";
import { readFull } from "../io/storage.js";
import type { Image } from "./open.js";
import type { Qcow2Image } from "./qcow2.js";
import type { RawImage } from "./raw.js";
import type { Refcounts, TableMoved } from "./refcount.js";

export type ResizePreallocation = "off" | "metadata" | "falloc" | "full";

export interface ResizeOptions {
  /** How the new area of a grown image is allocated (qemu-img's --preallocation). */
  preallocation?: ResizePreallocation;
  /** Must be set to make an image smaller: everything past the new end is discarded. */
  shrink?: boolean;
}

/** What resizing a qcow2 image needs of the write path (Qcow2Writer.resize hands it over). */
export interface ResizeContext {
  refcounts: Refcounts;
  tableMoved: TableMoved;
  /** Runs `fn` holding the metadata lock. */
  locked<T>(fn: () => Promise<T>): Promise<T>;
  /** Writes dirty metadata back in crash-safe order; call holding the lock. */
  flushMetadata(): Promise<void>;
  /** Rewrites the header from `img.header` and flushes. */
  writeHeader(): Promise<void>;
  /** Clears the L2 entries of the whole clusters in [from, to), releasing what they held. */
  discardClusters(from: number, to: number): Promise<void>;
  /** Drops an L2 entry's reference to its host cluster(s), applied after write-back. */
  releaseEntry(e: L2Entry | undefined): void;
  /** Marks an L1 entry for write-back. */
  l1Changed(index: number): void;
  preallocate(from: number, to: number, fill: boolean): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  /** The image's persistent bitmaps are live (the bitmaps autoclear bit is set): resize them too. */
  bitmaps: boolean;
}

const MODES: readonly string[] = ["off", "metadata", "falloc", "full"];

/** Writes of zeros (raw full/falloc preallocation) go in pieces of this size. */
const ZERO_CHUNK = 1024 * 1024;

/** Resizes a qcow2 or raw image to `size` bytes (see the top of this file). */
export async function resizeImage(img: Image, size: number, opts: ResizeOptions = {}): Promise<void> {
  if (img.format === "raw") await resizeRaw(img, size, opts);
  else await img.resize(size, opts);
}

function checkMode(mode: string): void {
  if (!MODES.includes(mode)) throw invalidArgument(`Invalid preallocation mode '${mode}'`);
}

function checkShrink(size: number, oldSize: number, opts: ResizeOptions, mode: string): void {
  if (size >= oldSize) return;
  if (!opts.shrink) {
    throw invalidArgument("Shrinking the image discards everything past its new end: ask for it with `shrink`");
  }
  if (mode !== "off") throw invalidArgument("Preallocation can't be used for shrinking an image");
}

function checkSafe(size: number): void {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw unsupported(`Image size ${size} is not supported (at most ${Number.MAX_SAFE_INTEGER} bytes)`);
  }
}

/** A raw image: the file is truncated (file-posix's raw_co_truncate). */
async function resizeRaw(img: RawImage, size: number, opts: ResizeOptions): Promise<void> {
  const mode = opts.preallocation ?? "off";
  if (img.readOnly) throw new QcowError("read-only", `${img.filename} is open read-only`);
  checkMode(mode);
  checkSafe(size);
  checkShrink(size, img.size, opts, mode);
  if (mode === "metadata") throw unsupported("Unsupported preallocation mode: metadata");
  const fileSize = await img.storage.size();
  await img.storage.truncate(size);
  if (mode !== "off" && size > fileSize) {
    // No fallocate through Storage: falloc, like full, really writes the zeros.
    const zeros = new Uint8Array(Math.min(ZERO_CHUNK, size - fileSize));
    for (let at = fileSize; at < size; at += zeros.length) {
      await img.storage.write(zeros.subarray(0, Math.min(zeros.length, size - at)), at);
    }
  }
  img.size = Math.ceil(size / 512) * 512;
}

/** A qcow2 image (called by Qcow2Writer.resize with the write path's internals). */
export async function resizeQcow2(
  img: Qcow2Image,
  size: number,
  opts: ResizeOptions,
  ctx: ResizeContext,
): Promise<void> {
  const mode = opts.preallocation ?? "off";
  const old = img.size;
  // QEMU's checks, in its order and with its messages; nothing is written before they pass.
  checkMode(mode);
  if (size % 512 !== 0) throw invalidArgument("The new size must be a multiple of 512");
  if (img.snapshots.length > 0 && img.header.version < 3) {
    // The snapshot table of a v2 image need not record each snapshot's size.
    throw unsupported("Can't resize a v2 image which has snapshots");
  }
  const bitmaps = ctx.bitmaps ? img.bitmaps : [];
  const inconsistent = bitmaps.find((b) => b.flags & BME_FLAG_IN_USE);
  if (inconsistent) {
    throw unsupported(
      `Bitmap '${inconsistent.name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
    );
  }
  checkShrink(size, old, opts, mode);
  const plan = size < old ? undefined : planGrowth(img, size, mode as ResizePreallocation);
  if (bitmaps.length > 0) await setBitmapsInUse(img);
  if (plan) await grow(img, size, plan, ctx);
  else await shrink(img, size, ctx);
  if (bitmaps.length > 0) await resizeBitmaps(img, old, ctx);
}

interface GrowthPlan {
  l1Needed: number;
  prealloc: ResizePreallocation;
  fill: boolean;
  /** The new area is zeroed so that a longer backing file does not show through. */
  zero: boolean;
}

function planGrowth(img: Qcow2Image, size: number, mode: ResizePreallocation): GrowthPlan {
  const old = img.size;
  const l1Needed = Math.ceil(size / (img.clusterSize * img.l2Entries));
  if (l1Needed * 8 > MAX_L1_BYTES) throw unsupported("Failed to grow the L1 table: File too large");
  checkSafe(size);
  // A raw data file must read like the image: its new part is mapped 1:1 as well.
  const dataFileRaw = img.dataFile !== undefined && (img.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  const prealloc = mode === "off" && dataFileRaw ? "metadata" : mode;
  const fill = prealloc === "falloc" || prealloc === "full";
  // A longer backing file must not show through in the new area: it is zeroed (QEMU's
  // BDRV_REQ_ZERO_WRITE), unless full clusters of zeros are written there anyway.
  const zero = img.backing !== undefined && img.backing.size > old && size > old && !(fill && !img.extendedL2);
  if (zero && img.header.version < 3) {
    // No zero flag in v2: QEMU fails here (after growing the L1 table); qcowkit before.
    throw unsupported("Failed to zero out new clusters: Operation not supported");
  }
  return { l1Needed, prealloc, fill, zero };
}

async function grow(img: Qcow2Image, size: number, plan: GrowthPlan, ctx: ResizeContext): Promise<void> {
  const old = img.size;
  await ctx.locked(async () => {
    await ctx.flushMetadata();
    if (plan.l1Needed > img.l1.length) await growL1(img, plan.l1Needed, ctx);
  });
  img.size = size;
  try {
    if (size > old) {
      if (plan.prealloc !== "off") await ctx.preallocate(old, size, plan.fill);
      if (plan.zero) await ctx.writeZeroes(old, size - old);
    }
    if (img.dataFile && (await img.dataFile.size()) !== size) await img.dataFile.truncate(size);
    await ctx.locked(() => ctx.flushMetadata());
    img.header.size = size;
    await ctx.writeHeader();
  } catch (e) {
    img.size = old;
    img.header.size = old;
    throw e;
  }
}

/**
 * QEMU's qcow2_grow_l1_table with an exact size: the new table (old entries, then zeros) is
 * written in full and flushed before the header points at it; the old table is freed after.
 * Runs holding the lock, with the metadata written back (the L1 in memory is the L1 on disk).
 */
async function growL1(img: Qcow2Image, entries: number, ctx: ResizeContext): Promise<void> {
  const cs = img.clusterSize;
  const clusters = Math.ceil((entries * 8) / cs);
  const offset = await ctx.refcounts.allocateArea(clusters, ctx.tableMoved);
  await ctx.refcounts.writeBack();
  const l1 = new Float64Array(entries);
  const copied = new Uint8Array(entries);
  l1.set(img.l1);
  copied.set(img.l1Copied);
  // Written in pieces: the table may be 32 MiB.
  const total = (clusters * cs) / 8;
  const step = Math.max(cs, 1024 * 1024) / 8;
  for (let i = 0; i < total; i += step) {
    const n = Math.min(step, total - i);
    const buf = new Uint8Array(n * 8);
    const dv = view(buf);
    for (let k = 0; k < n && i + k < img.l1.length; k++) {
      const [hi, lo] = encodeL1Entry({ l2Offset: img.l1[i + k], copied: img.l1Copied[i + k] === 1 });
      dv.setUint32(k * 8, hi);
      dv.setUint32(k * 8 + 4, lo);
    }
    await img.storage.write(buf, offset + i * 8);
  }
  await img.storage.flush();
  const h = img.header;
  const oldOffset = h.l1TableOffset;
  const oldClusters = Math.ceil((h.l1Size * 8) / cs);
  h.l1TableOffset = offset;
  h.l1Size = entries;
  try {
    await ctx.writeHeader();
  } catch (e) {
    h.l1TableOffset = oldOffset;
    h.l1Size = img.l1.length;
    throw e;
  }
  img.l1 = l1;
  img.l1Copied = copied;
  for (let c = 0; c < oldClusters; c++) ctx.refcounts.release(oldOffset / cs + c);
}

async function shrink(img: Qcow2Image, size: number, ctx: ResizeContext): Promise<void> {
  const cs = img.clusterSize;
  const perTable = cs * img.l2Entries;
  const l1Kept = Math.ceil(size / perTable);
  // The last L2 table kept may map clusters past the new end: clear those entries. (The
  // cluster holding the new end keeps its bytes past it, as in QEMU.)
  const from = Math.ceil(size / cs) * cs;
  const to = Math.min(img.size, l1Kept * perTable);
  if (from < to && img.l1[l1Kept - 1] !== 0) await ctx.discardClusters(from, to);
  await ctx.locked(async () => {
    // L2 tables wholly past the end go, with what they map when no snapshot shares them.
    for (let i = l1Kept; i < img.l1.length; i++) {
      const l2Offset = img.l1[i];
      if (l2Offset === 0) continue;
      if ((await ctx.refcounts.get(l2Offset / cs)) === 1) {
        const table = await img.loadL2(l2Offset);
        for (let j = 0; j < img.l2Entries; j++) ctx.releaseEntry(img.decodeAt(table, j, l2Offset));
      }
      img.l2Cache.delete(l2Offset);
      ctx.refcounts.release(l2Offset / cs);
      img.l1[i] = 0;
      img.l1Copied[i] = 0;
      ctx.l1Changed(i);
    }
    // L1 and L2 entries reach the disk, then the decrements.
    await ctx.flushMetadata();
    await ctx.refcounts.dropUnusedBlocks();
    const fileSize = await img.storage.size();
    const last = await ctx.refcounts.lastUsedCluster(Math.ceil(fileSize / cs));
    if ((last + 1) * cs < fileSize) await img.storage.truncate((last + 1) * cs);
  });
  if (img.dataFile) await img.dataFile.truncate(size);
  img.header.size = size;
  await ctx.writeHeader();
  img.size = size;
}

/** Bitmap table entries a bitmap needs for a disk of `size` bytes (QEMU's rounding). */
function bitmapTableSize(size: number, granularityBits: number, clusterSize: number): number {
  return Math.ceil(Math.ceil(size / 2 ** granularityBits) / (clusterSize * 8));
}

/**
 * Before the size changes, every bitmap is marked in_use on disk: a bitmap table shorter than
 * the disk is only valid in that state (QEMU's check_dir_entry), and a crash then leaves the
 * bitmaps inconsistent, never wrong. The directory keeps its length, so it is rewritten in place.
 */
async function setBitmapsInUse(img: Qcow2Image): Promise<void> {
  for (const b of img.bitmaps) b.flags |= BME_FLAG_IN_USE;
  await writeBitmapDirectory(img);
}

async function writeBitmapDirectory(img: Qcow2Image): Promise<void> {
  const ext = img.extensions.bitmaps;
  if (!ext) return;
  await img.storage.write(encodeBitmapDirectory(img.bitmaps), ext.directoryOffset);
  await img.storage.flush();
}

/**
 * QEMU resizes persistent bitmaps with the disk: new bits are clean, bits past a smaller end are
 * dropped. Tables that change length are written to new clusters (their refcounts durable first),
 * the directory is rewritten pointing at them with in_use cleared, and only then are the old
 * tables and the data clusters past the end freed.
 */
async function resizeBitmaps(img: Qcow2Image, oldSize: number, ctx: ResizeContext): Promise<void> {
  const cs = img.clusterSize;
  const s = img.storage;
  const freed: number[] = [];
  for (const b of img.bitmaps) {
    const entries = bitmapTableSize(img.size, b.granularityBits, cs);
    const oldTable = new Uint8Array(b.tableSize * 8);
    await readFull(s, oldTable, b.tableOffset);
    const dv = view(oldTable);
    const entry = (i: number) => decodeBitmapTableEntry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), cs);
    if (img.size < oldSize && entries > 0 && entries <= b.tableSize) {
      // Bits past the new end in the last data cluster kept are cleared (an all-ones cluster
      // stays all ones: spare dirty bits only cost a copy).
      const last = entry(entries - 1);
      const bits = Math.ceil(img.size / 2 ** b.granularityBits) - (entries - 1) * cs * 8;
      if (last.offset !== 0 && bits < cs * 8) {
        const data = new Uint8Array(cs);
        await readFull(s, data, last.offset);
        clearBitsFrom(data, bits);
        await s.write(data, last.offset);
      }
    }
    for (let i = entries; i < b.tableSize; i++) {
      const e = entry(i);
      if (e.offset !== 0) freed.push(e.offset / cs);
    }
    if (entries === b.tableSize) continue;
    const clusters = Math.ceil((entries * 8) / cs);
    const table = new Uint8Array(clusters * cs);
    table.set(oldTable.subarray(0, Math.min(entries, b.tableSize) * 8));
    const at = await ctx.locked(() => ctx.refcounts.allocateArea(clusters, ctx.tableMoved));
    await s.write(table, at);
    for (let c = 0; c < Math.ceil((b.tableSize * 8) / cs); c++) freed.push(b.tableOffset / cs + c);
    b.tableOffset = at;
    b.tableSize = entries;
  }
  await ctx.locked(() => ctx.flushMetadata());
  await s.flush();
  for (const b of img.bitmaps) b.flags &= ~BME_FLAG_IN_USE;
  await writeBitmapDirectory(img);
  for (const c of freed) ctx.refcounts.release(c);
  await ctx.locked(() => ctx.flushMetadata());
}

/** Clears bits [from, end) of a bitmap data cluster (bit 0 of each byte is its first granule). */
function clearBitsFrom(data: Uint8Array, from: number): void {
  const byte = from >> 3;
  if (from % 8 !== 0) data[byte] &= (1 << (from % 8)) - 1;
  data.fill(0, Math.ceil(from / 8));
}
