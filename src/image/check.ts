/**
 * Checking a qcow2 image for consistency and repairing it, as QEMU's qcow2_co_check does
 * (block/qcow2-refcount.c): every reference to a host cluster — header, active and snapshot
 * L1/L2 tables, data, snapshot table, refcount table and blocks, encryption header, bitmap
 * directory, tables and data — is counted into an in-memory refcount array and compared with
 * the refcounts on disk; the COPIED flags of the active tables are compared with "refcount is
 * one". Findings are reported one line each, in QEMU's words, and counted as corruptions,
 * leaks or internal errors.
 *
 * The check reads the raw tables itself instead of going through Qcow2Image, because an image
 * under check may hold entries the engine would refuse (reserved bits, unaligned offsets).
 *
 * Repair (fix LEAKS and/or ERRORS) writes in an order that a crash cannot make worse:
 * - refcount corrections touch only existing refcount blocks, one entry at a time;
 * - a rebuilt refcount structure is written past every cluster in use and flushed before the
 *   header points at it; the old one becomes leaked clusters, freed afterwards;
 * - COPIED flags are corrected last, after the refcounts they follow are durable.
 * Unlike QEMU, a refcount block beyond the end of the file is repaired by rebuilding the
 * refcount structure rather than by growing the file to reach it.
 */

import type { BitmapDirectoryEntry } from "../format/bitmap.js";
import { decodeBitmapTableEntry } from "../format/bitmap.js";
import { setU64, view } from "../format/bytes.js";
import {
  AUTOCLEAR_KNOWN,
  type HeaderExtensions,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  type Qcow2Header,
} from "../format/header.js";
import type { Snapshot } from "../format/snapshot.js";
import {
  entryCluster,
  exactRefcount64,
  getRefcount,
  maxRefcount,
  OFLAG_COMPRESSED_HI,
  OFLAG_COPIED_HI,
  offsetField,
  setRefcount,
} from "../format/tables.js";
import type { Storage } from "../io/storage.js";
import { checkSnapshotTable, rewriteSnapshotTable, type SnapshotTableCheck } from "./check-snapshots.js";
import { type MetadataLayout, overlappingMetadata } from "./overlap.js";
import { Qcow2Image, readBitmapDirectory } from "./qcow2.js";
import { entriesInUse, NodeBuffer, sameBytes, zeroEntriesEnd } from "./zero.js";

/** What a check may repair (QEMU's BDRV_FIX_LEAKS / BDRV_FIX_ERRORS). */
export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;

export interface CheckResult {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** End of the last cluster in use (0 when unknown). */
  imageEndOffset: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Active-layer clusters with a host cluster (or compressed data). */
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export interface CheckOptions {
  /** FIX_LEAKS | FIX_ERRORS, or 0 to only look. */
  fix?: number;
  /** Receives each finding, in QEMU's words (qemu-img prints them on stderr). */
  log?: (line: string) => void;
  /** Receives errors QEMU prints with error_report (qemu-img prefixes its name); default: `log`. */
  report?: (message: string) => void;
}

const emptyResult = (): CheckResult => ({
  checkErrors: 0,
  corruptions: 0,
  leaks: 0,
  corruptionsFixed: 0,
  leaksFixed: 0,
  imageEndOffset: 0,
  totalClusters: 0,
  allocatedClusters: 0,
  fragmentedClusters: 0,
  compressedClusters: 0,
});

// Bit masks of the 64-bit entries, as two 32-bit halves (hi, lo).
const L1_RESERVED_HI = 0x7f00_0000;
const L1_RESERVED_LO = 0x1ff;
const OFFSET_HI = 0x00ff_ffff; // bits 32-55 of L1E/L2E_OFFSET_MASK
const OFFSET_LO = 0xffff_fe00;
const L2_STD_RESERVED_HI = 0x3f00_0000;
const L2_STD_RESERVED_LO = 0x1fe;
const COPIED_HI = OFLAG_COPIED_HI;
const COMPRESSED_HI = OFLAG_COMPRESSED_HI;
const REFT_RESERVED_LO = 0x1ff;

const hex64 = (hi: number, lo: number): string =>
  hi === 0 ? (lo >>> 0).toString(16) : (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, "0");

/** The in-memory refcount array (QEMU's IMRT): references counted per host cluster. */
class ReferenceArray {
  counts: Uint32Array;
  constructor(
    public clusters: number,
    readonly max: number,
  ) {
    this.counts = new Uint32Array(Math.max(1, clusters));
  }
  get(c: number): number {
    return c < this.clusters ? this.counts[c] : 0;
  }
  set(c: number, v: number): void {
    this.grow(c + 1);
    this.counts[c] = v;
  }
  grow(clusters: number): void {
    if (clusters <= this.clusters) return;
    if (clusters > this.counts.length) {
      const n = new Uint32Array(Math.max(clusters, this.counts.length * 2));
      n.set(this.counts);
      this.counts = n;
    }
    this.clusters = clusters;
  }
}

/** The refcounts as the image's refcount table and blocks say, read without trusting them. */
class OnDiskRefcounts {
  private cache = new Map<number, DataView>();
  private signalled = false;
  constructor(
    private readonly c: Checker,
    readonly tableHi: Uint32Array,
    readonly tableLo: Uint32Array,
    /** Entries up to the last that is not zero: the rest have no refcount block. */
    readonly used: number,
  ) {}

  get entries(): number {
    return this.tableHi.length;
  }

  blockOffset(t: number): number {
    return this.tableHi[t] * 2 ** 32 + ((this.tableLo[t] & ~REFT_RESERVED_LO) >>> 0);
  }

  /** The refcount of cluster `index`, or an Error when its refcount block is unusable. */
  async get(index: number): Promise<number | Error> {
    const t = Math.floor(index / this.c.blockEntries);
    const block = await this.blockAt(t);
    if (block === null || block instanceof Error) return block ?? 0;
    return getRefcount(block, index % this.c.blockEntries, this.c.h.refcountOrder);
  }

  /**
   * The refcount of cluster `index` without waiting, when its block is the one last used or
   * the table has none for it; undefined otherwise (then `get`). Check looks up one refcount
   * per allocated cluster, mostly in one block after another.
   */
  peek(index: number): number | undefined {
    const t = Math.floor(index / this.c.blockEntries);
    if (t >= this.entries) return 0;
    const offset = this.blockOffset(t);
    if (offset === 0) return 0;
    if (offset !== this.lastOffset || this.lastBlock === undefined) return undefined;
    return getRefcount(this.lastBlock, index % this.c.blockEntries, this.c.h.refcountOrder);
  }

  /** Refcount block `t`: null where the table has none, an Error where its offset is unusable. */
  async blockAt(t: number): Promise<DataView | null | Error> {
    if (t >= this.entries) return null;
    const offset = this.blockOffset(t);
    if (offset === 0) return null;
    if (offset % this.c.cs !== 0) {
      if (!this.signalled) {
        this.signalled = true;
        this.c.log(
          `qcow2: Image is corrupt: Refblock offset 0x${offset.toString(16)} unaligned (reftable index: ${t === 0 ? "0" : `0x${t.toString(16)}`}); further non-fatal corruption events will be suppressed`,
        );
      }
      return new Error("Input/output error");
    }
    return this.block(offset);
  }

  /** Sets the refcount of cluster `index`, whose refcount block exists. */
  async set(index: number, value: number): Promise<void> {
    const offset = this.blockOffset(Math.floor(index / this.c.blockEntries));
    const block = await this.block(offset);
    const i = index % this.c.blockEntries;
    setRefcount(block, i, this.c.h.refcountOrder, value);
    // Write the bytes of the entry only: a sub-byte entry shares its byte with neighbours, which
    // this block (the latest) already holds.
    const bits = 2 ** this.c.h.refcountOrder;
    const first = Math.floor((i * bits) / 8);
    const last = Math.floor(((i + 1) * bits - 1) / 8);
    await this.c.write(new Uint8Array(block.buffer, block.byteOffset + first, last - first + 1), offset + first);
  }

  private lastOffset = -1;
  private lastBlock: DataView | undefined;

  private async block(offset: number): Promise<DataView> {
    if (offset === this.lastOffset && this.lastBlock) return this.lastBlock;
    let b = this.cache.get(offset);
    this.lastOffset = offset;
    if (b) {
      this.cache.delete(offset);
      this.cache.set(offset, b);
      this.lastBlock = b;
      return b;
    }
    this.lastBlock = undefined;
    b = view(await this.c.read(offset, this.c.cs));
    this.cache.set(offset, b);
    if (this.lastOffset === offset) this.lastBlock = b;
    if (this.cache.size * this.c.cs > 8 * 1024 * 1024) this.cache.delete(this.cache.keys().next().value as number);
    return b;
  }
}

/** checkL2's state for scanL2 over one table. */
interface L2Scan {
  readonly clusterBits: number;
  /** The offset bits below the cluster size, clear in an aligned entry. */
  readonly alignLo: number;
  readonly fileClusters: number;
  readonly max: number;
  readonly extendedL2: boolean;
  /** Count allocated and fragmented clusters (the active L1's tables). */
  readonly frag: boolean;
  /** The cluster that would continue a contiguous run: -1 before the first, -2 after an unaligned one. */
  next: number;
  allocated: number;
  fragmented: number;
}

const SCAN_HI_STOP = COMPRESSED_HI | L2_STD_RESERVED_HI;

/**
 * The entries of an L2 table that need nothing but counting, from entry `i` on: unallocated ones
 * with nothing set, and aligned data clusters inside the file, without reserved bits or a bad
 * subcluster bitmap, whose count is below the maximum. Returns the first entry it leaves to
 * checkL2 (or `end`). A small function with small integers only: V8 optimises it early, where
 * checkL2's loop ran interpreted for most of a check (check of 265k clusters: 11 -> ~4 ms).
 */
function scanL2(dv: DataView, i: number, end: number, counts: Uint32Array, s: L2Scan): number {
  const stride = s.extendedL2 ? 16 : 8;
  const { alignLo, clusterBits, fileClusters, max, frag } = s;
  // Locals only inside the loop: a property first touched after V8 optimised the loop (the
  // rare fragmented cluster) would throw the optimised code away.
  let next = s.next;
  let allocated = 0;
  let fragmented = 0;
  for (; i < end; i++) {
    const at = i * stride;
    const hi = dv.getInt32(at);
    const lo = dv.getInt32(at + 4);
    const bmZero = stride === 16 ? dv.getInt32(at + 8) : 0;
    const bmAlloc = stride === 16 ? dv.getInt32(at + 12) : 0;
    if ((hi | lo | bmZero | bmAlloc) === 0) continue;
    if ((hi & SCAN_HI_STOP) !== 0 || (lo & (L2_STD_RESERVED_LO | alignLo)) !== 0 || (bmZero & bmAlloc) !== 0) break;
    if (((hi & OFFSET_HI) | (lo & OFFSET_LO)) === 0) break;
    const k = entryCluster(hi, lo, clusterBits);
    if (k >= fileClusters || counts[k] >= max) break;
    counts[k]++;
    if (frag) {
      allocated++;
      fragmented += next !== -1 && k !== next ? 1 : 0;
      next = k + 1;
    }
  }
  s.next = next;
  s.allocated += allocated;
  s.fragmented += fragmented;
  return i;
}

/**
 * The entries of an active L2 table whose COPIED flag is right, from entry `i` on: compressed
 * and unallocated ones, and data clusters whose counted reference count (equal to the refcount
 * on disk, see Checker.counted) is 1 exactly where the flag is set. Returns the first entry it
 * leaves to checkCopied (or `end`).
 */
function scanCopied(dv: DataView, i: number, end: number, stride: number, refs: ReferenceArray, bits: number): number {
  const counts = refs.counts;
  const clusters = refs.clusters;
  for (; i < end; i++) {
    const at = i * stride;
    const hi = dv.getInt32(at);
    const lo = dv.getInt32(at + 4);
    if ((hi & COMPRESSED_HI) !== 0 || ((hi & OFFSET_HI) | (lo & OFFSET_LO)) === 0) continue;
    const k = entryCluster(hi, lo, bits);
    if (k >= clusters || (counts[k] === 1) !== hi < 0) break; // hi < 0: COPIED (bit 63) set
  }
  return i;
}

/**
 * From cluster `i` to `end` (`first` is the first cluster of `block`, null where the table has
 * none): the first cluster whose refcount on disk differs from the counted one. `st.highest`
 * follows the last cluster in use. For compare's loop, as scanL2 for checkL2's.
 */
function scanRefcounts(
  block: DataView | null,
  first: number,
  i: number,
  end: number,
  refs: ReferenceArray,
  order: number,
  st: { highest: number },
): number {
  const counts = refs.counts;
  const clusters = refs.clusters;
  // In bulk from the block's start only: after a difference the loop goes on, so that a block
  // with many differences is not compared again from each one.
  if (order === 4 && block !== null && i === first && end <= clusters && sameRefcounts16(block, counts, i, end)) {
    const inUse = entriesInUse(new Uint8Array(block.buffer, block.byteOffset, (end - i) * 2), 2);
    if (inUse > 0) st.highest = i + inUse - 1;
    return end;
  }
  let highest = st.highest;
  for (; i < end; i++) {
    const r1 = block === null ? 0 : getRefcount(block, i - first, order);
    const r2 = i < clusters ? counts[i] : 0;
    if (r1 !== r2) break;
    if (r1 > 0) highest = i;
  }
  st.highest = highest;
  return i;
}

const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Whether the 16-bit refcounts at the start of `block` are `counts[i..end)`, in bulk: the
 * counts narrowed to 16 bits and turned big-endian by native code, then compared as bytes
 * (qemu-img's default width; ~10x faster than scanRefcounts' loop, which V8 runs interpreted
 * for an image of a few thousand clusters). False where it cannot tell (no Buffer, as in a
 * browser): then the loop decides. Counts never exceed the width's maximum (see inc).
 */
function sameRefcounts16(block: DataView, counts: Uint32Array, i: number, end: number): boolean {
  if (!NodeBuffer || end <= i) return false;
  const expect = new Uint16Array(counts.subarray(i, end));
  if (littleEndian) NodeBuffer.from(expect.buffer).swap16();
  const stored = new Uint8Array(block.buffer, block.byteOffset, (end - i) * 2);
  return sameBytes(stored, new Uint8Array(expect.buffer));
}

/**
 * The entries of an L2 table from its first to its last that is not all zeros, [from, to): the
 * empty entries before and after (most of a sparse image's tables) are passed over in bulk, with
 * native comparisons, outside the tight loops (a call inside them made V8 throw their optimised
 * code away). Empty entries need neither counting nor a COPIED check.
 */
function entriesToScan(table: Uint8Array, entries: number, stride: number): [number, number] {
  const bytes = table.subarray(0, entries * stride);
  const to = entriesInUse(bytes, stride);
  return [to === 0 ? 0 : zeroEntriesEnd(view(bytes), 0, to, stride), to];
}

const CHECK_FRAG_INFO = 1;
const PREFETCH = 16;

/** One run of the check over an open storage; `run` may repeat it after a rebuild. */
class Checker {
  readonly cs: number;
  readonly blockEntries: number;
  readonly extendedL2: boolean;
  readonly externalData: boolean;
  readonly entryBytes: number;
  readonly l2Entries: number;
  readonly refcountMax: number;
  fileSize = 0;
  disk!: OnDiskRefcounts;
  /**
   * The counted references, when the last compare found the refcounts on disk equal to them for
   * every cluster it compared: then a refcount below `clusters` is read from here, without a
   * lookup in the refcount blocks (the COPIED check looks one up per allocated cluster).
   */
  counted: ReferenceArray | undefined;
  res: CheckResult = emptyResult();

  constructor(
    readonly s: Storage,
    public h: Qcow2Header,
    readonly ext: HeaderExtensions,
    readonly snapshots: Snapshot[],
    /** Bytes of the snapshot table on disk (entries as found, not as they would be rewritten). */
    readonly snapshotTableBytes: number,
    readonly bitmaps: BitmapDirectoryEntry[],
    readonly log: (line: string) => void,
  ) {
    // Shifts, not `2 **` or division: those give V8 heap numbers, which make every sum and
    // product derived from them a heap allocation until the code is optimised.
    this.cs = 1 << h.clusterBits;
    this.blockEntries = (this.cs * 8) >>> h.refcountOrder;
    this.extendedL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.externalData = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    this.entryBytes = this.extendedL2 ? 16 : 8;
    this.l2Entries = this.cs >>> (this.extendedL2 ? 4 : 3);
    this.refcountMax = maxRefcount(h.refcountOrder);
  }

  /** Reads metadata; what lies past the end of the file reads as zeros (as in QEMU). */
  async read(offset: number, length: number): Promise<Uint8Array> {
    const b = new Uint8Array(length);
    const inFile = Math.max(0, Math.min(length, this.fileSize - offset));
    if (inFile > 0) {
      const n = await this.s.read(b.subarray(0, inFile), offset);
      if (n < inFile) b.fill(0, n, inFile);
    }
    return b;
  }

  /** Writes through to the storage. */
  write(data: Uint8Array, offset: number): Promise<void> {
    return this.s.write(data, offset);
  }

  /**
   * The tables at `offsets` (cluster-sized reads), handed to `use` in order while the next
   * ones are read in parallel: one table per read as QEMU does, without waiting for each.
   */
  async eachTable(offsets: number[], use: (table: Uint8Array, i: number) => Promise<void>): Promise<void> {
    const ahead: (Promise<Uint8Array> | undefined)[] = [];
    for (let i = 0; i < offsets.length; i++) {
      for (let j = ahead.length; j < Math.min(offsets.length, i + PREFETCH); j++) {
        ahead.push(this.read(offsets[j], this.cs));
      }
      const table = await (ahead[i] as Promise<Uint8Array>);
      ahead[i] = undefined;
      await use(table, i);
    }
  }

  async loadRefcountTable(): Promise<void> {
    const entries = (this.h.refcountTableClusters * this.cs) / 8;
    const bytes = await this.read(this.h.refcountTableOffset, entries * 8);
    const dv = view(bytes);
    const hi = new Uint32Array(entries);
    const lo = new Uint32Array(entries);
    // Entries past the last one in use are zero, as the arrays start.
    const used = entriesInUse(bytes, 8);
    for (let i = 0; i < used; i++) {
      hi[i] = dv.getUint32(i * 8);
      lo[i] = dv.getUint32(i * 8 + 4);
    }
    this.disk = new OnDiskRefcounts(this, hi, lo, used);
  }

  /** Counts one reference to every cluster of [offset, offset+size) (qcow2_inc_refcounts_imrt). */
  inc(refs: ReferenceArray, offset: number, size: number): void {
    if (size <= 0) return;
    // The last cluster of an image may be partly allocated; more than that is an error.
    if (offset + size - this.fileSize >= this.cs) {
      this.log(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`,
      );
      this.res.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    refs.grow(last + 1);
    for (let k = first; k <= last; k++) {
      const r = refs.counts[k];
      if (r === this.refcountMax) {
        this.log(`ERROR: overflow cluster offset=0x${(k * this.cs).toString(16)}`);
        this.log(
          "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
        );
        this.res.corruptions++;
        continue;
      }
      refs.counts[k] = r + 1;
    }
  }

  async checkL2(refs: ReferenceArray, table: Uint8Array, l2Offset: number, flags: number, fix: number): Promise<void> {
    const dv = view(table);
    // -2 in scan.next: the last cluster was unaligned, and only `nextUnaligned` (bytes) continues it.
    let nextUnaligned = -1;
    const res = this.res;
    const scan = this.scan(refs, flags);
    const frag = scan ?? { next: -1 };
    // Without the tight loop (an external data file) every entry goes through the checks below.
    const [from, to] = scan ? entriesToScan(table, this.l2Entries, this.entryBytes) : [0, this.l2Entries];
    for (let i = from; i < to; i++) {
      // Plain entries in a tight loop; the rest one at a time below.
      if (scan) {
        i = scanL2(dv, i, to, refs.counts, scan);
        if (i >= to) break;
      }
      const at = i * this.entryBytes;
      // Signed 32-bit halves: small integers for V8 (an unsigned one with bit 31 set, as the
      // COPIED flag, would be a heap number per entry until the loop is optimised).
      let hi = dv.getInt32(at);
      const lo = dv.getInt32(at + 4);
      const bmZero = this.extendedL2 ? dv.getInt32(at + 8) : 0;
      const bmAlloc = this.extendedL2 ? dv.getInt32(at + 12) : 0;
      const compressed = (hi & COMPRESSED_HI) !== 0;
      if (!compressed && ((hi & L2_STD_RESERVED_HI) !== 0 || (lo & L2_STD_RESERVED_LO) !== 0)) {
        this.log(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
        res.corruptions++;
      }
      if (compressed) {
        const offsetBits = 62 - (this.h.clusterBits - 8);
        // Split the 64-bit entry into the host offset (low offsetBits bits) and sector count.
        const x = BigInt(hi >>> 0) * 2n ** 32n + BigInt(lo >>> 0);
        if (hi & COPIED_HI) {
          this.log(
            `ERROR: coffset=0x${(x & ((1n << BigInt(offsetBits)) - 1n)).toString(16)}: copied flag must never be set for compressed clusters`,
          );
          hi &= ~COPIED_HI;
          res.corruptions++;
        }
        const y = BigInt(hi >>> 0) * 2n ** 32n + BigInt(lo >>> 0);
        if (this.externalData) {
          this.log(`ERROR compressed cluster ${i} with data file, entry=0x${y.toString(16)}`);
          res.corruptions++;
          continue;
        }
        if (bmZero !== 0 || bmAlloc !== 0) {
          this.log(
            `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${y.toString(16)}`,
          );
          res.corruptions++;
          continue;
        }
        const coffset = Number(y & ((1n << BigInt(offsetBits)) - 1n));
        const sectors = Number((y >> BigInt(offsetBits)) & ((1n << BigInt(this.h.clusterBits - 8)) - 1n)) + 1;
        this.inc(refs, coffset, sectors * 512 - (coffset % 512));
        if (flags & CHECK_FRAG_INFO) {
          res.allocatedClusters++;
          res.compressedClusters++;
          // Compressed clusters are fragmented by nature (QEMU counts them so).
          res.fragmentedClusters++;
        }
        continue;
      }
      const offset = offsetField(hi, lo);
      const zeroFlag = !this.extendedL2 && (lo & 1) !== 0;
      const allocated = offset !== 0 || (this.externalData && (hi & COPIED_HI) !== 0);
      if (!allocated) {
        if (!zeroFlag && (bmAlloc & 0xffff_ffff) !== 0) {
          this.log("ERROR: Unallocated cluster has non-zero subcluster allocation map");
          res.corruptions++;
        }
        continue;
      }
      if ((bmZero & bmAlloc) !== 0) {
        this.log(`ERROR offset=${offset.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        res.corruptions++;
      }
      if (offset % this.cs !== 0) {
        res.corruptions++;
        const containsData = this.extendedL2 ? bmAlloc !== 0 : !zeroFlag;
        if (!containsData) {
          const fixing = (fix & FIX_ERRORS) !== 0;
          this.log(
            `${fixing ? "Repairing" : "ERROR"} offset=${offset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
          );
          if (fixing) {
            // Drop the host cluster, keep what reads as zeros: the whole cluster without extended
            // L2, else the subclusters the bitmap says are zero; the others show the backing
            // file again, as after QEMU's repair (iotest 271).
            const e = new Uint8Array(this.entryBytes);
            if (!this.extendedL2) view(e).setUint32(4, 1);
            else view(e).setUint32(8, bmZero);
            await this.write(e, l2Offset + at);
            res.corruptions--;
            res.corruptionsFixed++;
            continue;
          }
        } else {
          this.log(`ERROR offset=${offset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (flags & CHECK_FRAG_INFO) {
        res.allocatedClusters++;
        // As QEMU: fragmented where the offset is not the previous one plus a cluster.
        const aligned = offset % this.cs === 0;
        if (frag.next !== -1 && (aligned ? offset / this.cs !== frag.next : offset !== nextUnaligned))
          res.fragmentedClusters++;
        frag.next = aligned ? offset / this.cs + 1 : -2;
        nextUnaligned = aligned ? -1 : offset + this.cs;
      }
      if (!this.externalData) this.inc(refs, offset, this.cs);
    }
    if (scan) {
      res.allocatedClusters += scan.allocated;
      res.fragmentedClusters += scan.fragmented;
    }
  }

  /**
   * The state of scanL2 for one table: undefined with an external data file (whose entries
   * count no host clusters), and when the array of references must grow first.
   */
  scan(refs: ReferenceArray, flags: number): L2Scan | undefined {
    if (this.externalData) return undefined;
    const fileClusters = Math.ceil(this.fileSize / this.cs);
    if (refs.counts.length < fileClusters) return undefined;
    return {
      clusterBits: this.h.clusterBits,
      alignLo: (this.cs - 1) & OFFSET_LO,
      fileClusters,
      max: this.refcountMax,
      extendedL2: this.extendedL2,
      frag: (flags & CHECK_FRAG_INFO) !== 0,
      next: -1,
      allocated: 0,
      fragmented: 0,
    };
  }

  async checkL1(
    refs: ReferenceArray,
    l1Offset: number,
    l1Size: number,
    flags: number,
    fix: number,
    activeL2?: number[],
  ): Promise<void> {
    this.inc(refs, l1Offset, l1Size * 8);
    if (l1Size === 0) return;
    const dv = view(await this.read(l1Offset, l1Size * 8));
    const entries: number[] = [];
    for (let i = 0; i < l1Size; i++) if (dv.getUint32(i * 8) !== 0 || dv.getUint32(i * 8 + 4) !== 0) entries.push(i);
    const l2Offsets = entries.map((i) => offsetField(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4)));
    await this.eachTable(l2Offsets, async (table, k) => {
      const i = entries[k];
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0) {
        this.log(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
        this.res.corruptions++;
      }
      const l2Offset = l2Offsets[k];
      this.inc(refs, l2Offset, this.cs);
      if (l2Offset % this.cs !== 0) {
        this.log(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      activeL2?.push(l2Offset);
      await this.checkL2(refs, table, l2Offset, flags, fix);
    });
  }

  /** Refcount blocks: aligned, inside the file, referenced exactly once (check_refblocks). */
  checkRefblocks(refs: ReferenceArray, fix: number): boolean {
    let rebuild = false;
    const d = this.disk;
    for (let i = 0; i < d.used; i++) {
      if ((d.tableLo[i] & REFT_RESERVED_LO) !== 0) {
        this.log(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        rebuild = true;
        continue;
      }
      const offset = d.blockOffset(i);
      if (offset % this.cs !== 0) {
        this.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.res.corruptions++;
        rebuild = true;
        continue;
      }
      const cluster = offset / this.cs;
      if (cluster >= refs.clusters && offset !== 0) {
        this.log(`ERROR refcount block ${i} is outside image`);
        this.res.corruptions++;
        // QEMU grows the file to reach the block; a rebuilt structure simply leaves it out.
        if (fix & FIX_ERRORS) rebuild = true;
        continue;
      }
      if (offset !== 0) {
        this.inc(refs, offset, this.cs);
        if (refs.get(cluster) !== 1) {
          this.log(`ERROR refcount block ${i} refcount=${refs.get(cluster)}`);
          this.res.corruptions++;
          rebuild = true;
        }
      }
    }
    return rebuild;
  }

  /** Counts every reference of the image into a fresh array (calculate_refcounts). */
  async calculate(fix: number, activeL2?: number[]): Promise<{ refs: ReferenceArray; rebuild: boolean }> {
    const refs = new ReferenceArray(Math.ceil(this.fileSize / this.cs), this.refcountMax);
    const h = this.h;
    this.inc(refs, 0, this.cs);
    await this.checkL1(refs, h.l1TableOffset, h.l1Size, CHECK_FRAG_INFO, fix, activeL2);
    for (const sn of this.snapshots) {
      if (sn.l1TableOffset % this.cs !== 0) {
        this.log(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${sn.l1TableOffset.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
        );
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > (32 * 1024 * 1024) / 8) {
        this.log(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`,
        );
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(refs, sn.l1TableOffset, sn.l1Size, 0, fix);
    }
    this.inc(refs, h.snapshotsOffset, this.snapshotTableBytes);
    this.inc(refs, h.refcountTableOffset, h.refcountTableClusters * this.cs);
    if (this.ext.crypto) this.inc(refs, this.ext.crypto.offset, this.ext.crypto.length);
    const bm = this.ext.bitmaps;
    if (bm) {
      this.inc(refs, bm.directoryOffset, bm.directorySize);
      for (const b of this.bitmaps) {
        this.inc(refs, b.tableOffset, b.tableSize * 8);
        const dv = view(await this.read(b.tableOffset, b.tableSize * 8));
        for (let i = 0; i < b.tableSize; i++) {
          const e = decodeBitmapTableEntry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), this.cs);
          if (e.offset !== 0) this.inc(refs, e.offset, this.cs);
        }
      }
    }
    const rebuild = this.checkRefblocks(refs, fix);
    return { refs, rebuild };
  }

  /** Compares counted references with the refcounts on disk (compare_refcounts). */
  async compare(refs: ReferenceArray, fix: number): Promise<{ highest: number; rebuild: boolean }> {
    // The last cluster in use (by the refcounts on disk or the counted references).
    const st = { highest: 0 };
    let rebuild = false;
    let agrees = true;
    this.counted = undefined;
    const res = this.res;
    const E = this.blockEntries;
    const order = this.h.refcountOrder;
    for (let t = 0; t * E < refs.clusters; t++) {
      const block = await this.disk.blockAt(t);
      const end = Math.min(refs.clusters, (t + 1) * E);
      for (let i = t * E; i < end; i++) {
        if (!(block instanceof Error)) {
          i = scanRefcounts(block, t * E, i, end, refs, order, st);
          if (i >= end) break;
        }
        if (block instanceof Error) {
          this.log(`Can't get refcount for cluster ${i}: ${block.message}`);
          res.checkErrors++;
          agrees = false;
          continue;
        }
        const r1 = block ? getRefcount(block, i - t * E, order) : 0;
        const r2 = refs.get(i);
        if (r1 > 0 || r2 > 0) st.highest = i;
        if (r1 === r2) continue;
        agrees = false;
        let fixing: "leaks" | "corruptions" | undefined;
        if (r1 === 0) rebuild = true;
        else if (r1 > r2 && fix & FIX_LEAKS) fixing = "leaks";
        else if (r1 < r2 && fix & FIX_ERRORS) fixing = "corruptions";
        // A saturated 64-bit refcount is printed as stored (QEMU prints the u64).
        const shown = block && order >= 6 && r1 === Number.MAX_SAFE_INTEGER ? exactRefcount64(block, i - t * E) : r1;
        this.log(
          `${fixing ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked"} cluster ${i} refcount=${shown} reference=${r2}`,
        );
        if (fixing) {
          await this.disk.set(i, r2);
          if (fixing === "leaks") res.leaksFixed++;
          else res.corruptionsFixed++;
          continue;
        }
        if (r1 < r2) res.corruptions++;
        else res.leaks++;
      }
    }
    if (agrees) this.counted = refs;
    return { highest: st.highest, rebuild };
  }

  /**
   * Writes a new refcount table and blocks holding `refs`, past every cluster in use, then
   * points the header at them (rebuild_refcount_structure). The old structure is left behind
   * as leaked clusters.
   */
  async rebuild(refs: ReferenceArray): Promise<void> {
    this.counted = undefined;
    const cs = this.cs;
    const E = this.blockEntries;
    // First fit over the counted references: clusters nobody references are free, whatever
    // the old refcounts said. Nothing live is overwritten before the header switches.
    let hint = 0;
    const allocate = (n: number): number => {
      let start = hint;
      for (;;) {
        let run = 0;
        while (run < n && refs.get(start + run) === 0) run++;
        if (run === n) break;
        start += run + 1;
      }
      for (let c = start; c < start + n; c++) refs.set(c, 1);
      if (n === 1 || start === hint) hint = start + n;
      return start;
    };
    const blocks = new Map<number, number>();
    const usedEnd = (): number => {
      let end = refs.clusters;
      while (end > 0 && refs.get(end - 1) === 0) end--;
      return end;
    };
    let tableStart = -1;
    let tableClusters = 0;
    for (;;) {
      // A refcount block for every range that holds a referenced cluster (allocating one may
      // reach into a new range, hence the loop).
      for (let k = 0; k * E < usedEnd(); k++) {
        if (blocks.has(k)) continue;
        let used = false;
        for (let c = k * E; c < Math.min((k + 1) * E, refs.clusters) && !used; c++) used = refs.get(c) !== 0;
        if (used) blocks.set(k, allocate(1));
      }
      const ranges = Math.ceil(usedEnd() / E);
      const need = Math.max(1, Math.ceil((ranges * 8) / cs));
      if (tableStart >= 0 && need <= tableClusters && ranges * E >= usedEnd()) {
        let covered = true;
        for (let k = 0; k < ranges && covered; k++) {
          for (let c = k * E; c < Math.min((k + 1) * E, refs.clusters) && covered; c++)
            if (refs.get(c) !== 0 && !blocks.has(k)) covered = false;
        }
        if (covered) break;
      }
      if (tableStart >= 0) for (let c = tableStart; c < tableStart + tableClusters; c++) refs.set(c, 0);
      tableClusters = need;
      tableStart = allocate(need);
    }
    const table = new Uint8Array(tableClusters * cs);
    const order = this.h.refcountOrder;
    for (const [k, at] of [...blocks].sort((a, b) => a[0] - b[0])) {
      const block = new Uint8Array(cs);
      const bv = view(block);
      for (let i = 0; i < E; i++) {
        const r = refs.get(k * E + i);
        if (r !== 0) setRefcount(bv, i, order, Math.min(r, this.refcountMax));
      }
      await this.write(block, at * cs);
      setU64(view(table), k * 8, at * cs);
    }
    const tableOffset = tableStart * cs;
    await this.write(table, tableOffset);
    await this.s.flush();
    await this.pointHeaderAtRefcountTable(tableOffset, tableClusters);
    this.fileSize = Math.max(this.fileSize, usedEnd() * cs);
    await this.loadRefcountTable();
  }

  /** Points the header (durably) at a refcount table already written and flushed. */
  async pointHeaderAtRefcountTable(offset: number, clusters: number): Promise<void> {
    const hdr = new Uint8Array(12);
    setU64(view(hdr), 0, offset);
    view(hdr).setUint32(8, clusters);
    await this.write(hdr, 48);
    await this.s.flush();
    this.h = { ...this.h, refcountTableOffset: offset, refcountTableClusters: clusters };
  }

  /** Active L1/L2 entries: COPIED set exactly when the refcount is one (check_oflag_copied). */
  async checkCopied(fix: number, metadata: MetadataLayout): Promise<void> {
    const h = this.h;
    const res = this.res;
    // -r leaks repairs COPIED flags too when the refcounts they follow are known to be right.
    const fixing =
      (fix & FIX_ERRORS) !== 0 || ((fix & FIX_LEAKS) !== 0 && !res.checkErrors && !res.corruptions && !res.leaks);
    if (h.l1Size === 0) return;
    const counted = this.counted;
    const clusterBits = h.clusterBits;
    const l1 = await this.read(h.l1TableOffset, h.l1Size * 8);
    const l1v = view(l1);
    const entries: number[] = [];
    for (let i = 0; i < h.l1Size; i++)
      if (offsetField(l1v.getUint32(i * 8), l1v.getUint32(i * 8 + 4)) !== 0) entries.push(i);
    const l2Offsets = entries.map((i) => offsetField(l1v.getUint32(i * 8), l1v.getUint32(i * 8 + 4)));
    await this.eachTable(l2Offsets, async (table, k) => {
      const i = entries[k];
      const hi = l1v.getUint32(i * 8);
      const lo = l1v.getUint32(i * 8 + 4);
      const l2Offset = l2Offsets[k];
      const l2Cluster = Math.floor(l2Offset / this.cs);
      const rc =
        counted !== undefined && l2Cluster < counted.clusters
          ? counted.counts[l2Cluster]
          : await this.disk.get(l2Cluster);
      if (rc instanceof Error) return;
      if ((rc === 1) !== ((hi & COPIED_HI) !== 0)) {
        this.log(
          `${fixing ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${rc}`,
        );
        if (fixing) {
          this.guardWrite(metadata, h.l1TableOffset + i * 8, "active L1 table");
          l1v.setUint32(i * 8, rc === 1 ? (hi | COPIED_HI) >>> 0 : hi & ~COPIED_HI);
          await this.write(l1.subarray(i * 8, i * 8 + 8), h.l1TableOffset + i * 8);
          res.corruptionsFixed++;
        } else {
          res.corruptions++;
        }
      }
      const dv = view(table);
      let dirty = false;
      const [from, to] = entriesToScan(table, this.l2Entries, this.entryBytes);
      for (let j = from; j < to; j++) {
        if (counted !== undefined && !this.externalData) {
          j = scanCopied(dv, j, to, this.entryBytes, counted, clusterBits);
          if (j >= to) break;
        }
        const at = j * this.entryBytes;
        const ehi = dv.getInt32(at); // signed, as in checkL2
        const elo = dv.getInt32(at + 4);
        if (ehi & COMPRESSED_HI) continue;
        const allocated =
          ((ehi & OFFSET_HI) | (elo & OFFSET_LO)) !== 0 || (this.externalData && (ehi & COPIED_HI) !== 0);
        if (!allocated) continue;
        let refcount = 1;
        if (!this.externalData) {
          const cluster = entryCluster(ehi, elo, clusterBits);
          const r =
            counted !== undefined && cluster < counted.clusters
              ? counted.counts[cluster]
              : (this.disk.peek(cluster) ?? (await this.disk.get(cluster)));
          if (r instanceof Error) continue;
          refcount = r;
        }
        if ((refcount === 1) !== ((ehi & COPIED_HI) !== 0)) {
          this.log(
            `${fixing ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${refcount}`,
          );
          if (fixing) {
            dv.setUint32(at, refcount === 1 ? (ehi | COPIED_HI) >>> 0 : ehi & ~COPIED_HI);
            dirty = true;
            res.corruptionsFixed++;
          } else {
            res.corruptions++;
          }
        }
      }
      if (dirty) {
        this.guardWrite(metadata, l2Offset, "active L2 table");
        await this.write(table, l2Offset);
      }
    });
  }

  /**
   * QEMU's metadata overlap check for repair writes: a table written where other metadata
   * lives would destroy it, so the repair stops and reports the overlap instead.
   */
  private guardWrite(metadata: MetadataLayout, offset: number, kind: string): void {
    const other = overlappingMetadata(metadata, new Set([Math.floor(offset / this.cs)]), kind);
    if (other !== undefined) {
      throw new OverlapError(
        `qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with ${other}); further corruption events will be suppressed`,
      );
    }
  }

  /** What the overlap check of repair writes compares with (the layout as found). */
  metadataLayout(activeL2: number[]): MetadataLayout {
    const blocks: number[] = [];
    for (let t = 0; t < this.disk.used; t++) {
      const o = this.disk.blockOffset(t);
      if (o !== 0 && o % this.cs === 0 && o < this.fileSize) blocks.push(o);
    }
    return {
      clusterSize: this.cs,
      l1TableOffset: this.h.l1TableOffset,
      l1Size: this.h.l1Size,
      refcountTableOffset: this.h.refcountTableOffset,
      refcountTableClusters: this.h.refcountTableClusters,
      snapshotsOffset: this.h.snapshotsOffset,
      snapshots: this.snapshots,
      bitmapDirectory: this.ext.bitmaps,
      l2Tables: activeL2,
      refcountBlocks: blocks,
    };
  }
}

/** A repair write refused because it would land on other metadata. */
export class OverlapError extends Error {}

/**
 * Checks (and with `fix`, repairs) the qcow2 image in `storage`, as qemu-img check does.
 * The storage must be writable when fixing. Throws for an image that cannot be opened at all
 * (bad header, unknown incompatible features) and when a repair cannot proceed.
 */
export async function checkQcow2(storage: Storage, opts: CheckOptions = {}): Promise<CheckResult> {
  const fix = opts.fix ?? 0;
  const log = opts.log ?? (() => {});
  const report = opts.report ?? log;
  const { header, extensions } = await Qcow2Image.readHeader(storage, true, true);
  // As QEMU's qcow2_co_check_locked: the snapshot table first, its repair after the refcounts'.
  const sn = await checkSnapshotTable(storage, header, (fix & FIX_ERRORS) !== 0, { log, report });
  if (sn.failed) throw new CheckFailed(sn.failed, withSnapshotResult(emptyResult(), sn));
  const bitmaps = await readBitmapDirectory(storage, header, extensions);
  const c = new Checker(storage, header, extensions, sn.snapshots, sn.tableBytes, bitmaps, log);
  c.fileSize = await storage.size();
  await c.loadRefcountTable();
  if (fix && header.version >= 3 && (header.autoclearFeatures & ~AUTOCLEAR_KNOWN) !== 0n) {
    // As when QEMU opens an image for writing: autoclear bits it does not know are cleared.
    await writeFeatures(c, 88, header.autoclearFeatures & AUTOCLEAR_KNOWN);
  }
  const res = c.res;
  res.totalClusters = Math.ceil(header.size / c.cs);

  const activeL2: number[] = [];
  const first = await c.calculate(fix, activeL2);
  let refs = first.refs;
  let rebuild = first.rebuild;
  const preCompare = { ...res };
  const cmp = await c.compare(refs, 0);
  let highest = cmp.highest;
  rebuild ||= cmp.rebuild;

  if (rebuild && fix & FIX_ERRORS) {
    const old = { ...res };
    let freshLeaks = 0;
    log("Rebuilding refcount structure");
    await c.rebuild(refs);
    res.corruptions = 0;
    res.leaks = 0;
    const again = await c.calculate(0);
    refs = again.refs;
    if (fix & FIX_LEAKS) {
      // The old refcount structure is leaked now: free it. Only leaks the rebuild itself could
      // not fix count in the result.
      const saved = { ...res };
      c.res = emptyResult();
      const r = await c.compare(refs, FIX_LEAKS);
      highest = r.highest;
      if (r.rebuild) log("ERROR rebuilt refcount structure is still broken");
      freshLeaks = c.res.leaks;
      c.res = saved;
    }
    const now = c.res;
    if (now.corruptions < old.corruptions) now.corruptionsFixed += old.corruptions - now.corruptions;
    if (now.leaks < old.leaks) now.leaksFixed += old.leaks - now.leaks;
    now.leaks += freshLeaks;
  } else if (fix) {
    if (rebuild) {
      log("ERROR need to rebuild refcount structures");
      res.checkErrors++;
      throw new CheckFailed("Input/output error", res);
    }
    if (res.leaks || res.corruptions) {
      c.res = { ...preCompare };
      highest = (await c.compare(refs, fix)).highest;
    }
  }
  const result = c.res;
  if (fix) await storage.flush();
  try {
    await c.checkCopied(fix, c.metadataLayout(activeL2));
  } catch (e) {
    if (!(e instanceof OverlapError)) throw e;
    log(e.message);
    // As QEMU: a repair that would overwrite metadata stops, and the image is marked corrupt.
    await writeFeatures(c, 72, c.h.incompatibleFeatures | INCOMPAT_CORRUPT);
    result.checkErrors++;
    throw new CheckFailed("Input/output error", result);
  }
  result.imageEndOffset = (highest + 1) * c.cs;
  if (sn.corruptions && fix & FIX_ERRORS) {
    const tableMoved = (offset: number, clusters: number) => c.pointHeaderAtRefcountTable(offset, clusters);
    if (!(await rewriteSnapshotTable(storage, { ...c.h }, sn, log, tableMoved))) {
      sn.checkErrors++;
      throw new CheckFailed("File too large", withSnapshotResult(result, sn));
    }
    sn.corruptionsFixed += sn.corruptions;
    sn.corruptions = 0;
  }
  withSnapshotResult(result, sn);
  if (fix && result.checkErrors === 0 && result.corruptions === 0) {
    // qcow2_mark_clean and qcow2_mark_consistent: the image is whole again.
    const bits = c.h.incompatibleFeatures;
    const cleared = bits & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    if (cleared !== bits) {
      await storage.flush();
      await writeFeatures(c, 72, cleared);
    }
  }
  if (fix) await storage.flush();
  return result;
}

/** The check ended early (QEMU returns -errno from its check); `result` holds what was found. */
export class CheckFailed extends Error {
  constructor(
    message: string,
    readonly result: CheckResult,
  ) {
    super(message);
  }
}

/** Adds what the snapshot table check found to `r` (qcow2_add_check_result); returns `r`. */
function withSnapshotResult(r: CheckResult, sn: SnapshotTableCheck): CheckResult {
  r.corruptions += sn.corruptions;
  r.corruptionsFixed += sn.corruptionsFixed;
  r.checkErrors += sn.checkErrors;
  return r;
}

async function writeFeatures(c: Checker, at: number, value: bigint): Promise<void> {
  if (c.h.version < 3) return;
  const b = new Uint8Array(8);
  view(b).setBigUint64(0, value);
  await c.write(b, at);
  await c.s.flush();
  c.h = at === 72 ? { ...c.h, incompatibleFeatures: value } : { ...c.h, autoclearFeatures: value };
}
