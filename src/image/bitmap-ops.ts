/**
 * Managing persistent dirty bitmaps (docs/interop/qcow2.rst, "Bitmaps"), as `qemu-img bitmap`
 * does: add, remove, clear, enable, disable and merge. Checks and messages are QEMU's
 * (block/qcow2-bitmap.c, block/monitor/bitmap-qmp-cmds.c, block/dirty-bitmap.c).
 *
 * Crash safety: nothing reachable from the header is changed in place. A change writes new
 * bitmap tables and data clusters and a new bitmap directory, makes them and their refcounts
 * durable, and only then rewrites the bitmaps header extension to point at the new directory;
 * the old directory and the tables and data it alone referred to are freed after that. A crash
 * leaves the old directory or the new one, and at worst leaks clusters.
 *
 * Writes through qcowkit keep enabled bitmaps in step (bitmaps.ts); before the directory is
 * replaced the bits recorded so far are stored, and afterwards the writer tracks the new
 * directory, so a bitmap added here records the writes that follow.
 */
import { invalidArgument, QcowError, unsupported } from "../errors.js";
import {
  BITMAP_TYPE_DIRTY_TRACKING,
  type BitmapDirectoryEntry,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
  MAX_BITMAP_DIRECTORY_BYTES,
  MAX_BITMAP_NAME,
  MAX_BITMAPS,
} from "../format/bitmap.js";
import { setU64, textEncoder, view } from "../format/bytes.js";
import { AUTOCLEAR_BITMAPS, type BitmapsExtension, encodeHeader } from "../format/header.js";
import { readFull, type Storage } from "../io/storage.js";
import { setBits } from "./bitmaps.js";
import type { Qcow2Image } from "./qcow2.js";
import type { Qcow2Writer } from "./qcow2-write.js";

/** QEMU's limits on a bitmap (block/qcow2-bitmap.c). */
const MIN_GRANULARITY_BITS = 9;
const MAX_GRANULARITY_BITS = 31;
const MAX_TABLE_SIZE = 0x800_0000;
const MAX_PHYS_SIZE = 0x2000_0000;

export interface AddBitmapOptions {
  /** Bytes of guest data per bit: a power of two from 512 to 2 GiB (default: see below). */
  granularity?: number;
  /** Create it disabled: writes do not mark it dirty (qemu-img bitmap --add --disable). */
  disabled?: boolean;
}

/** QEMU's default granularity: the cluster size, kept within 4 KiB .. 64 KiB. */
export function defaultBitmapGranularity(clusterSize: number): number {
  return Math.min(65536, Math.max(4096, clusterSize));
}

/**
 * Adds an empty persistent bitmap (enabled unless `disabled`), with QEMU's checks:
 * name, granularity, qcow2 v3, the size of the bitmap, the number of bitmaps and the size of
 * the directory.
 */
export async function addBitmap(img: Qcow2Image, name: string, opts: AddBitmapOptions = {}): Promise<void> {
  const w = await begin(img);
  if (name === "") throw invalidArgument("Bitmap name cannot be empty");
  const granularity = opts.granularity ?? defaultBitmapGranularity(img.clusterSize);
  const bits = Math.log2(granularity);
  if (!Number.isInteger(bits) || bits < MIN_GRANULARITY_BITS || bits > MAX_GRANULARITY_BITS) {
    throw invalidArgument("Granularity must be power of 2 and at least 512");
  }
  const list = liveBitmaps(img);
  if (list.some((b) => b.name === name)) throw invalidArgument(`Bitmap already exists: ${name}`);
  const refuse = (why: string): QcowError =>
    invalidArgument(`Can't make bitmap '${name}' persistent in '${img.filename}': ${why}`);
  if (img.header.version < 3) throw refuse("Cannot store dirty bitmaps in qcow2 v2 files");
  const granules = Math.ceil(img.size / granularity);
  const bytes = Math.ceil(granules / 8);
  if (bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * img.clusterSize) {
    throw refuse("Too much space will be occupied by the bitmap. Use larger granularity");
  }
  const nameBytes = textEncoder.encode(name).length;
  if (nameBytes > MAX_BITMAP_NAME) throw refuse(`Name length exceeds maximum (${MAX_BITMAP_NAME} characters)`);
  if (list.length + 1 > MAX_BITMAPS) throw refuse("Maximum number of persistent bitmaps is already reached");
  const dirBytes = directoryBytes(list) + entryBytes({ name, extra: new Uint8Array(0) });
  if (dirBytes > MAX_BITMAP_DIRECTORY_BYTES) throw refuse("Not enough space in the bitmap directory");
  // QEMU cannot store the bitmap of an empty disk either (it reports "Lost persistent bitmaps").
  if (granules === 0) throw refuse("The image is empty: a bitmap of it would have no bits");
  checkHeaderRoom(img);
  const tableSize = Math.ceil(granules / (img.clusterSize * 8));
  checkContiguous(img, w, "table", tableSize * 8);
  checkContiguous(img, w, "directory", dirBytes);

  const tableOffset = await writeTable(img, w, new Uint8Array(tableSize * 8));
  const entry: BitmapDirectoryEntry = {
    tableOffset,
    tableSize,
    flags: opts.disabled ? 0 : BME_FLAG_AUTO,
    type: BITMAP_TYPE_DIRTY_TRACKING,
    granularityBits: bits,
    name,
    extra: new Uint8Array(0),
  };
  await commitDirectory(img, w, [...list, entry], []);
}

/** Removes a bitmap and frees its table and data clusters (an in-use bitmap too, as QEMU). */
export async function removeBitmap(img: Qcow2Image, name: string): Promise<void> {
  const w = await begin(img);
  const list = liveBitmaps(img);
  const b = findBitmap(list, name);
  checkContiguous(img, w, "directory", directoryBytes(list));
  let freed: Run[] = [];
  try {
    freed = await bitmapClusters(img, b);
  } catch (e) {
    // An unreadable table of a removed bitmap is leaked rather than followed (QEMU does the same).
    if (!(e instanceof QcowError && e.code === "corrupt")) throw e;
  }
  await commitDirectory(
    img,
    w,
    list.filter((x) => x !== b),
    freed,
  );
}

/** Resets every bit of a bitmap: a new, empty table replaces the old one. */
export async function clearBitmap(img: Qcow2Image, name: string): Promise<void> {
  const w = await begin(img);
  const list = liveBitmaps(img);
  const b = findBitmap(list, name);
  checkConsistent(b);
  checkContiguous(img, w, "table", b.tableSize * 8);
  checkContiguous(img, w, "directory", directoryBytes(list));
  const freed = await bitmapClusters(img, b);
  const tableOffset = await writeTable(img, w, new Uint8Array(b.tableSize * 8));
  await commitDirectory(
    img,
    w,
    list.map((x) => (x === b ? { ...b, tableOffset } : x)),
    freed,
  );
}

/** Enables (writes mark it dirty: the `auto` flag) or disables a bitmap. */
export async function setBitmapEnabled(img: Qcow2Image, name: string, enabled: boolean): Promise<void> {
  const w = await begin(img);
  const list = liveBitmaps(img);
  const b = findBitmap(list, name);
  checkConsistent(b);
  const flags = enabled ? b.flags | BME_FLAG_AUTO : b.flags & ~BME_FLAG_AUTO;
  if (flags === b.flags) return;
  checkContiguous(img, w, "directory", directoryBytes(list));
  await commitDirectory(
    img,
    w,
    list.map((x) => (x === b ? { ...b, flags } : x)),
    [],
  );
}

/**
 * Sets in bitmap `target` every bit for guest data that bitmap `source` (of `sourceImage`,
 * by default this image) calls dirty. The granularities may differ; the disk sizes may not.
 */
export async function mergeBitmap(
  img: Qcow2Image,
  target: string,
  source: string,
  sourceImage: Qcow2Image = img,
): Promise<void> {
  const w = await begin(img);
  const list = liveBitmaps(img);
  const dst = findBitmap(list, target);
  const sources = sourceImage === img ? list : liveBitmaps(sourceImage);
  const src = findBitmap(sources, source);
  if (sourceImage !== img) for (const b of sources) checkEntry(sourceImage, b);
  checkConsistent(dst);
  checkConsistent(src);
  if (sourceImage.size !== img.size) {
    throw invalidArgument(
      `Bitmaps are of different sizes (destination size is ${img.size}, source size is ${sourceImage.size}) and can't be merged`,
    );
  }
  checkContiguous(img, w, "table", dst.tableSize * 8);
  checkContiguous(img, w, "directory", directoryBytes(list));
  const cs = img.clusterSize;
  const size = img.size;
  const dstData = await BitmapData.load(img.storage, cs, size, dst);
  const srcData = await BitmapData.load(sourceImage.storage, sourceImage.clusterSize, size, src);
  const freed = await bitmapClusters(img, dst);
  const table = new Uint8Array(dst.tableSize * 8);
  for (let c = 0; c < dst.tableSize; c++) {
    const buf = await dstData.copyCluster(c);
    await srcData.markInto(buf, dstData, c);
    dstData.clearTail(buf, c);
    if (buf.some((x) => x !== 0)) {
      const at = await w.allocateClusters(1);
      await img.storage.write(buf, at);
      setU64(view(table), c * 8, at);
    }
  }
  const tableOffset = await writeTable(img, w, table);
  await commitDirectory(
    img,
    w,
    list.map((x) => (x === dst ? { ...dst, tableOffset } : x)),
    freed,
  );
}

// ---- the directory ---------------------------------------------------------------------------

/** [first cluster offset, number of clusters]. */
type Run = [number, number];

function writerOf(img: Qcow2Image): Qcow2Writer {
  if (!img.writer) throw new QcowError("read-only", `${img.filename} is open read-only`);
  return img.writer;
}

/**
 * Every operation starts here: the image must be writable, the bits of the writes made so
 * far are stored, and the directory must be one QEMU would open.
 */
async function begin(img: Qcow2Image): Promise<Qcow2Writer> {
  const w = writerOf(img);
  await w.storeBitmaps();
  for (const b of liveBitmaps(img)) checkEntry(img, b);
  return w;
}

/**
 * The bitmaps that count: with the `bitmaps` autoclear bit clear, a program without bitmap
 * support has written the image since they were stored, and QEMU ignores (and drops) them.
 * (Qcow2Image.open already leaves them out; an image changed in between is checked again.)
 */
function liveBitmaps(img: Qcow2Image): BitmapDirectoryEntry[] {
  return img.extensions.bitmaps && img.header.autoclearFeatures & AUTOCLEAR_BITMAPS ? img.bitmaps : [];
}

function findBitmap(list: BitmapDirectoryEntry[], name: string): BitmapDirectoryEntry {
  const b = list.find((x) => x.name === name);
  if (!b) throw new QcowError("not-found", `Dirty bitmap '${name}' not found`);
  return b;
}

/** An in-use bitmap missed writes (its writer did not close the image): QEMU refuses to use it. */
function checkConsistent(b: BitmapDirectoryEntry): void {
  if (b.flags & BME_FLAG_IN_USE) {
    throw invalidArgument(
      `Bitmap '${b.name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
    );
  }
}

/** QEMU's check_dir_entry: a directory entry QEMU would refuse to open makes us stop too. */
function checkEntry(img: Qcow2Image, b: BitmapDirectoryEntry): void {
  if (b.extra.length !== 0) throw unsupported("Bitmap extra data is not supported");
  const phys = b.tableSize * img.clusterSize;
  const bad =
    b.tableSize === 0 ||
    b.tableOffset === 0 ||
    b.tableOffset % img.clusterSize !== 0 ||
    b.tableSize > MAX_TABLE_SIZE ||
    b.granularityBits > MAX_GRANULARITY_BITS ||
    b.granularityBits < MIN_GRANULARITY_BITS ||
    b.type !== BITMAP_TYPE_DIRTY_TRACKING ||
    phys > MAX_PHYS_SIZE ||
    (!(b.flags & BME_FLAG_IN_USE) && img.size > phys * 8 * 2 ** b.granularityBits);
  if (bad) throw new QcowError("corrupt", `Bitmap '${b.name}' doesn't satisfy the constraints`);
}

function entryBytes(b: { name: string; extra: Uint8Array }): number {
  return Math.ceil((24 + b.extra.length + textEncoder.encode(b.name).length) / 8) * 8;
}

function directoryBytes(list: BitmapDirectoryEntry[]): number {
  return list.reduce((n, b) => n + entryBytes(b), 0);
}

/**
 * qcowkit allocates a table or directory in one run of at most `maxRun` clusters (fresh space
 * has a refcount block every so many clusters): refuses, before anything is written, a larger one.
 */
function checkContiguous(img: Qcow2Image, w: Qcow2Writer, what: "table" | "directory", bytes: number): void {
  const clusters = Math.max(1, Math.ceil(bytes / img.clusterSize));
  if (clusters > w.refcounts.maxRun) {
    const hint = what === "table" ? "; use a larger granularity" : "";
    throw unsupported(
      `A bitmap ${what} of ${clusters} clusters is more than qcowkit allocates contiguously (${w.refcounts.maxRun})${hint}`,
    );
  }
}

/** Refuses before anything is written when the first cluster has no room for the extension. */
function checkHeaderRoom(img: Qcow2Image): void {
  if (img.extensions.bitmaps) return;
  try {
    encodeHeader(
      img.header,
      { ...img.extensions, bitmaps: { nbBitmaps: 1, directorySize: 0, directoryOffset: 0 } },
      img.backingName,
    );
  } catch {
    throw unsupported("No space left in the image header for the bitmaps extension");
  }
}

/** The clusters a bitmap's table and data occupy. */
async function bitmapClusters(img: Qcow2Image, b: BitmapDirectoryEntry): Promise<Run[]> {
  const cs = img.clusterSize;
  const runs: Run[] = [[b.tableOffset, Math.ceil((b.tableSize * 8) / cs)]];
  const table = await readTable(img.storage, b);
  for (let i = 0; i < b.tableSize; i++) {
    const e = decodeBitmapTableEntry(table.getUint32(i * 8), table.getUint32(i * 8 + 4), cs);
    if (e.offset !== 0) runs.push([e.offset, 1]);
  }
  return runs;
}

async function readTable(storage: Storage, b: BitmapDirectoryEntry): Promise<DataView> {
  const bytes = new Uint8Array(b.tableSize * 8);
  await readFull(storage, bytes, b.tableOffset);
  return view(bytes);
}

/** Writes a bitmap table (or directory) into new contiguous clusters; returns its offset. */
async function writeTable(
  img: Qcow2Image,
  w: Qcow2Writer,
  bytes: Uint8Array,
  what: "table" | "directory" = "table",
): Promise<number> {
  const cs = img.clusterSize;
  checkContiguous(img, w, what, bytes.length);
  const clusters = Math.max(1, Math.ceil(bytes.length / cs));
  const at = await w.allocateClusters(clusters);
  const padded = new Uint8Array(clusters * cs);
  padded.set(bytes);
  await img.storage.write(padded, at);
  return at;
}

/**
 * Makes `entries` the bitmap directory: the new directory (and every new table and data
 * cluster written before it) and their refcounts are flushed, then the header extension is
 * switched to it, then the old directory and the `freed` clusters are released.
 */
async function commitDirectory(
  img: Qcow2Image,
  w: Qcow2Writer,
  entries: BitmapDirectoryEntry[],
  freed: Run[],
): Promise<void> {
  const cs = img.clusterSize;
  const old = liveBitmaps(img).length > 0 ? img.extensions.bitmaps : undefined;
  let ext: BitmapsExtension | undefined;
  if (entries.length > 0) {
    const dir = encodeBitmapDirectory(entries);
    ext = {
      nbBitmaps: entries.length,
      directorySize: dir.length,
      directoryOffset: await writeTable(img, w, dir, "directory"),
    };
  }
  await w.flush();
  await switchExtension(img, w, ext);
  img.bitmaps.splice(0, img.bitmaps.length, ...entries);
  if (old) w.releaseClusters(old.directoryOffset, Math.ceil(old.directorySize / cs));
  for (const [offset, n] of freed) w.releaseClusters(offset, n);
  await w.flush();
  w.reloadBitmaps();
}

/**
 * Points the header at a new bitmap directory (or at none) so that even a header write torn
 * at a 512-byte boundary leaves the old state or the new one. A write that changes a single
 * sector cannot tear; otherwise (the extension appears, goes, or its fields straddle a sector
 * boundary) the change passes through states whose `bitmaps` autoclear bit is clear, which
 * QEMU (and qcowkit) read as "no bitmaps": the old state when the extension appears, the new one
 * when it goes. Only a change of fields straddling a sector (rare layouts) can, on a crash,
 * lose the bitmaps in between, as with QEMU's own in-place update. A backing file name that
 * moves with the extension relies on the header's first sectors being written whole, as in
 * QEMU.
 */
async function switchExtension(img: Qcow2Image, w: Qcow2Writer, ext: BitmapsExtension | undefined): Promise<void> {
  const h = img.header;
  const state = (e: BitmapsExtension | undefined, bit: boolean): Uint8Array =>
    encodeHeader(
      {
        ...h,
        autoclearFeatures: bit ? h.autoclearFeatures | AUTOCLEAR_BITMAPS : h.autoclearFeatures & ~AUTOCLEAR_BITMAPS,
      },
      { ...img.extensions, bitmaps: e },
      img.backingName,
    );
  const write = async (e: BitmapsExtension | undefined, bit: boolean): Promise<void> => {
    img.extensions.bitmaps = e;
    if (bit) h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
    else h.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
    await w.writeHeader();
  };
  const bit = (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
  if (sectorsChanged(state(img.extensions.bitmaps, bit), state(ext, ext !== undefined)) <= 1) {
    await write(ext, ext !== undefined);
    return;
  }
  if (bit) await write(img.extensions.bitmaps, false);
  await write(ext, false);
  if (ext) await write(ext, true);
}

function sectorsChanged(a: Uint8Array, b: Uint8Array): number {
  let n = 0;
  for (let at = 0; at < a.length; at += 512) {
    for (let i = at; i < Math.min(a.length, at + 512); i++) {
      if (a[i] !== b[i]) {
        n++;
        break;
      }
    }
  }
  return n;
}

// ---- bitmap data -----------------------------------------------------------------------------

/** A stored bitmap's bits, read one data cluster at a time (the last one kept). */
class BitmapData {
  /** Granules (bits) per data cluster. */
  readonly perCluster: number;
  readonly granularity: number;
  /** Bits in the whole bitmap. */
  readonly granules: number;
  private cachedIndex = -1;
  private cached: Uint8Array | undefined;

  private constructor(
    private readonly storage: Storage,
    private readonly clusterSize: number,
    private readonly size: number,
    private readonly entries: { offset: number; allOnes: boolean }[],
    granularityBits: number,
  ) {
    this.perCluster = clusterSize * 8;
    this.granularity = 2 ** granularityBits;
    this.granules = Math.ceil(size / this.granularity);
  }

  static async load(storage: Storage, clusterSize: number, size: number, b: BitmapDirectoryEntry): Promise<BitmapData> {
    const table = await readTable(storage, b);
    const entries: { offset: number; allOnes: boolean }[] = [];
    for (let i = 0; i < b.tableSize; i++) {
      entries.push(decodeBitmapTableEntry(table.getUint32(i * 8), table.getUint32(i * 8 + 4), clusterSize));
    }
    return new BitmapData(storage, clusterSize, size, entries, b.granularityBits);
  }

  /** Data cluster `k` (a shared buffer, or "zero"/"ones" for entries without one). */
  private async cluster(k: number): Promise<Uint8Array | "zero" | "ones"> {
    const e = k < this.entries.length ? this.entries[k] : { offset: 0, allOnes: false };
    if (e.offset === 0) return e.allOnes ? "ones" : "zero";
    if (this.cachedIndex !== k || !this.cached) {
      this.cached = new Uint8Array(this.clusterSize);
      await readFull(this.storage, this.cached, e.offset);
      this.cachedIndex = k;
    }
    return this.cached;
  }

  /** A copy of data cluster `c`, to change. */
  async copyCluster(c: number): Promise<Uint8Array> {
    const d = await this.cluster(c);
    if (d === "zero") return new Uint8Array(this.clusterSize);
    if (d === "ones") return new Uint8Array(this.clusterSize).fill(0xff);
    return d.slice();
  }

  /** Clears the bits of cluster `c` past the end of the bitmap (an all-ones entry sets them). */
  clearTail(buf: Uint8Array, c: number): void {
    const end = this.granules - c * this.perCluster;
    if (end >= this.perCluster) return;
    let i = end;
    for (; i % 8 !== 0; i++) buf[i >> 3] &= ~(1 << (i & 7));
    buf.fill(0, i >> 3);
  }

  /**
   * Sets in `buf` (data cluster `c` of `dst`) every granule of `dst` whose guest range holds a
   * dirty granule of this bitmap. Reads only the source clusters covering that guest range.
   */
  async markInto(buf: Uint8Array, dst: BitmapData, c: number): Promise<void> {
    const first = c * dst.perCluster;
    const guestStart = first * dst.granularity;
    const guestEnd = Math.min(this.size, (first + dst.perCluster) * dst.granularity);
    if (guestStart >= guestEnd) return;
    const s0 = Math.floor(guestStart / this.granularity);
    const s1 = Math.ceil(guestEnd / this.granularity);
    const mark = (a: number, b: number): void => {
      const from = Math.max(guestStart, a * this.granularity);
      const to = Math.min(guestEnd, b * this.granularity);
      if (from >= to) return;
      setBits(buf, Math.floor(from / dst.granularity) - first, Math.ceil(to / dst.granularity) - first);
    };
    for (let k = Math.floor(s0 / this.perCluster); k * this.perCluster < s1; k++) {
      const base = k * this.perCluster;
      const from = Math.max(s0, base);
      const to = Math.min(s1, base + this.perCluster);
      const d = await this.cluster(k);
      if (d === "zero") continue;
      if (d === "ones") {
        mark(from, to);
        continue;
      }
      let run = -1;
      for (let i = from - base; i < to - base; ) {
        // Whole bytes that only continue the current state: no run and zeros, or a run and ones.
        if (i % 8 === 0 && i + 8 <= to - base && d[i >> 3] === (run < 0 ? 0 : 0xff)) {
          i += 8;
          continue;
        }
        const set = (d[i >> 3] >> (i & 7)) & 1;
        if (set && run < 0) run = i;
        else if (!set && run >= 0) {
          mark(base + run, base + i);
          run = -1;
        }
        i++;
      }
      if (run >= 0) mark(base + run, to);
    }
  }
}
