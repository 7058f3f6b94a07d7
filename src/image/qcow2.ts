/**
 * Qcow2Image: a qcow2 image as a BlockDevice. This file holds opening and the read path
 * (cluster mapping through L1/L2, compressed clusters, backing files, block status).
 */
import type { Codec, Codecs } from "../codec/codec.js";
import { corrupt, hex, QcowError, qemuHex, unsupported } from "../errors.js";
import { type BitmapDirectoryEntry, decodeBitmapDirectory, MAX_BITMAP_DIRECTORY_BYTES } from "../format/bitmap.js";
import { view } from "../format/bytes.js";
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  CRYPT_NONE,
  decodeBackingName,
  decodeExtensions,
  decodeHeader,
  type HeaderExtensions,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN,
  nameFeatures,
  type Qcow2Header,
} from "../format/header.js";
import {
  decodeSnapshotTable,
  MAX_SNAPSHOT_TABLE_BYTES,
  SNAPSHOT_ENTRY_FIXED,
  SNAPSHOT_ENTRY_MAX,
  type Snapshot,
} from "../format/snapshot.js";
import {
  ClusterType,
  decodeL2Entry,
  entryCluster,
  type L2Entry,
  type L2Geometry,
  l1EntryOffset,
  offsetField,
  SubclusterType,
  subclusterType,
} from "../format/tables.js";
import { readFull, type Storage } from "../io/storage.js";
import { addHole, type BlockDevice, type Extent, mergeHoles, readSparse, readSparseByStatus } from "./block-device.js";
import { TableCache } from "./cache.js";
import { Qcow2Writer } from "./qcow2-write.js";
import type { RawImage } from "./raw.js";
import { Refcounts } from "./refcount.js";
import type { ResizeOptions } from "./resize.js";
import { SnapshotLoadError, validateSnapshotL1 } from "./snapshots.js";
import { zeroEntriesEnd } from "./zero.js";

/** Default metadata cache budget: enough L2 tables to map 64 GiB with 64 KiB clusters. */
export const DEFAULT_L2_CACHE_BYTES = 8 * 1024 * 1024;

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  codecs?: Codecs;
  /** The backing file, already opened by the caller (see openImage), if the image has one. */
  backing?: Qcow2Image | RawImage;
  /** The external data file, if the image has one. */
  dataFile?: Storage;
  /** Read this internal snapshot (by id or name) instead of the active layer; read-only. */
  snapshot?: string;
  l2CacheBytes?: number;
  /** The name the image was opened by (for messages and `info`). */
  filename?: string;
  /** The resolved name of the backing file, as `full-backing-filename` shows it. */
  backingFilename?: string;
  /**
   * Open only to describe the image (QEMU's BDRV_O_NO_IO): encrypted images open too, but
   * reading their guest data is refused.
   */
  metadataOnly?: boolean;
}

function encryptedError(method: number): QcowError {
  return unsupported(`Encrypted images are not supported (qcow2 ${method === 1 ? "AES" : "LUKS"} encryption)`);
}

/** A guest range whose subclusters share one status, as read from one L2 table. */
export interface MappingRun {
  type: SubclusterType;
  /** Guest bytes covered (may exceed what was asked for only up to cluster granularity). */
  length: number;
  /** Host offset of the first byte for Normal, ZeroAlloc and UnallocatedAlloc runs. */
  hostOffset?: number;
  /** Compressed runs are one cluster: where the compressed bytes are. */
  compressed?: { offset: number; size: number };
}

export class Qcow2Image implements BlockDevice {
  readonly format = "qcow2";
  readonly filename: string;
  readonly backingFilename: string | undefined;
  readonly storage: Storage;
  readonly header: Qcow2Header;
  readonly extensions: HeaderExtensions;
  /** The backing file name in the header (changed by Qcow2Writer.changeBackingFile). */
  backingName: string | undefined;
  backing: Qcow2Image | RawImage | undefined;
  readonly dataFile: Storage | undefined;
  readonly readOnly: boolean;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly subclusterSize: number;
  readonly snapshots: Snapshot[];
  readonly bitmaps: BitmapDirectoryEntry[];
  size: number;

  /** @internal Engine state shared with the write path (qcow2-write.ts). */
  readonly geometry: L2Geometry;
  /** @internal */
  readonly l2EntryBytes: number;
  /**
   * @internal L2 table offsets by L1 index (0: none). Not readonly: the table is replaced when
   * it grows (resize, commit) or when an internal snapshot is applied (its size may differ).
   */
  l1: Float64Array;
  /** @internal The COPIED flag of each L1 entry (replaced with `l1`). */
  l1Copied: Uint8Array;
  /** @internal */
  readonly l2Cache: TableCache<DataView>;
  /** @internal Set when the image is open for writing. */
  writer: Qcow2Writer | undefined;
  private readonly codec: Codec | undefined;
  private readonly compressedCache = new TableCache<Uint8Array>(4 * 2 * 1024 * 1024);
  /**
   * Buffers for compressed clusters' bytes, reused: a fresh one per cluster is garbage whose
   * bytes V8 lets pile up (tens of MiB while converting a compressed image).
   */
  private readonly compressedInput: Uint8Array[] = [];
  private preallocationChecked: boolean | undefined;

  private constructor(init: {
    storage: Storage;
    header: Qcow2Header;
    extensions: HeaderExtensions;
    backingName: string | undefined;
    opts: Qcow2OpenOptions;
    l1: { offsets: Float64Array; copied: Uint8Array };
    size: number;
    snapshots: Snapshot[];
    bitmaps: BitmapDirectoryEntry[];
  }) {
    const { header: h, opts } = init;
    this.storage = init.storage;
    this.filename = opts.filename ?? init.storage.name;
    this.backingFilename = opts.backingFilename;
    this.header = h;
    this.extensions = init.extensions;
    this.backingName = init.backingName;
    this.backing = opts.backing;
    this.dataFile = opts.dataFile;
    this.readOnly = opts.readOnly ?? true;
    this.clusterBits = h.clusterBits;
    this.clusterSize = 1 << h.clusterBits; // a small integer for V8 (`2 **` gives a heap number)
    const extendedL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.l2EntryBytes = extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize >>> (extendedL2 ? 4 : 3);
    this.subclusterSize = extendedL2 ? this.clusterSize >>> 5 : this.clusterSize;
    this.geometry = {
      clusterBits: h.clusterBits,
      extendedL2,
      externalData: (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n,
      version: h.version,
    };
    this.l1 = init.l1.offsets;
    this.l1Copied = init.l1.copied;
    this.size = init.size;
    this.snapshots = init.snapshots;
    this.bitmaps = init.bitmaps;
    this.l2Cache = new TableCache<DataView>(opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES);
    const codecs = opts.codecs ?? {};
    this.codec = h.compressionType === COMPRESSION_ZSTD ? codecs.zstd : codecs.zlib;
  }

  /**
   * Reads and validates the header; the caller opens backing and data files (see openImage).
   * `forCheck`: the snapshot table pointer is left for the check to judge (see decodeHeader).
   */
  static async readHeader(
    storage: Storage,
    allowEncrypted = false,
    forCheck = false,
  ): Promise<{
    header: Qcow2Header;
    extensions: HeaderExtensions;
    backingName: string | undefined;
  }> {
    const first = new Uint8Array(512);
    await readFull(storage, first, 0);
    const clusterBits = view(first).getUint32(20);
    let buf = first;
    if (clusterBits > 9 && clusterBits <= 21) {
      buf = new Uint8Array(2 ** clusterBits);
      await readFull(storage, buf, 0);
    }
    const header = decodeHeader(buf, { forCheck });
    const extensions = decodeExtensions(buf, header);
    const unknown = header.incompatibleFeatures & ~INCOMPAT_KNOWN;
    if (unknown !== 0n) {
      throw unsupported(
        `Unsupported qcow2 feature(s): ${nameFeatures(unknown, "incompatible", extensions.featureNames)}`,
      );
    }
    if (header.cryptMethod !== CRYPT_NONE && !allowEncrypted) throw encryptedError(header.cryptMethod);
    return { header, extensions, backingName: decodeBackingName(buf, header) };
  }

  static async open(storage: Storage, opts: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    const {
      header: h,
      extensions,
      backingName,
    } = await Qcow2Image.readHeader(storage, opts.metadataOnly && opts.readOnly !== false);
    const readOnly = opts.readOnly ?? true;
    if (!readOnly && h.incompatibleFeatures & INCOMPAT_CORRUPT) {
      throw corrupt("qcow2: Image is corrupt; cannot be opened read/write");
    }
    if (h.incompatibleFeatures & INCOMPAT_DATA_FILE && !opts.dataFile) {
      throw new QcowError("invalid-argument", "Could not open the external data file: no data file given");
    }
    if (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW && !(h.incompatibleFeatures & INCOMPAT_DATA_FILE)) {
      throw corrupt("data-file-raw requires a data file");
    }
    const clusterSize = 2 ** h.clusterBits;
    // As QEMU: only check (which reads the header alone) may open such an image, to rebuild it.
    if (h.refcountTableClusters === 0) {
      throw corrupt("Image does not contain a reference count table; 'qcowkit check -r all' rebuilds it");
    }
    const snapshots = await readSnapshotTable(storage, h);
    const bitmaps = await readBitmapDirectory(storage, h, extensions);
    let l1Offset = h.l1TableOffset;
    let l1Size = h.l1Size;
    if (opts.snapshot !== undefined) {
      const sn = findSnapshot(snapshots, opts.snapshot);
      if (!sn) throw new SnapshotLoadError(new QcowError("not-found", `Can't find snapshot '${opts.snapshot}'`));
      if (!readOnly) throw new QcowError("invalid-argument", "A snapshot can only be opened read-only");
      // As QEMU's qcow2_snapshot_load_tmp: only the L1 table changes, not the disk size.
      l1Offset = sn.l1TableOffset;
      l1Size = sn.l1Size;
      try {
        validateSnapshotL1(sn, clusterSize);
      } catch (e) {
        // qemu-img opens the image, then loads the snapshot: its own error, not an open failure.
        throw new SnapshotLoadError(e as QcowError);
      }
    }
    const l1 = await readL1(storage, l1Offset, l1Size, clusterSize);
    const img = new Qcow2Image({
      storage,
      header: h,
      extensions,
      backingName,
      opts: { ...opts, readOnly },
      l1,
      size: Math.floor(h.size / 512) * 512,
      snapshots,
      bitmaps,
    });
    if (!readOnly) img.writer = await Qcow2Writer.attach(img);
    return img;
  }

  get extendedL2(): boolean {
    return this.geometry.extendedL2;
  }
  get dirty(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  }
  get corrupt(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
  }
  get lazyRefcounts(): boolean {
    return (this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  /** @internal */
  async loadL2(l2Offset: number): Promise<DataView> {
    return this.l2Cache.get(l2Offset, async () => {
      const buf = new Uint8Array(this.clusterSize);
      await readFull(this.storage, buf, l2Offset);
      return view(buf);
    });
  }

  /** The decoded L2 entry for guest cluster `gc`, or undefined when its L2 table is absent. */
  /**
   * @internal The entry of guest cluster `gc` without waiting, when its L2 table is cached:
   * null when there is no L2 table, undefined when the table would have to be read.
   */
  l2EntryIfCached(gc: number): L2Entry | null | undefined {
    const l1Index = Math.floor(gc / this.l2Entries);
    const l2Offset = l1Index < this.l1.length ? this.l1[l1Index] : 0;
    if (l2Offset === 0) return null;
    const table = this.l2Cache.peek(l2Offset);
    return table && this.decodeAt(table, gc % this.l2Entries, l2Offset);
  }

  async l2Entry(gc: number): Promise<L2Entry | undefined> {
    const l1Index = Math.floor(gc / this.l2Entries);
    const l2Offset = l1Index < this.l1.length ? this.l1[l1Index] : 0;
    if (l2Offset === 0) return undefined;
    const table = await this.loadL2(l2Offset);
    return this.decodeAt(table, gc % this.l2Entries, l2Offset);
  }

  /** @internal */
  decodeAt(table: DataView, i: number, l2Offset: number): L2Entry {
    const at = i * this.l2EntryBytes;
    const ext = this.l2EntryBytes === 16;
    return decodeL2Entry(
      table.getUint32(at),
      table.getUint32(at + 4),
      ext ? table.getUint32(at + 8) : 0,
      ext ? table.getUint32(at + 12) : 0,
      this.geometry,
      () => `L2 offset: ${hex(l2Offset)}, L2 index: ${qemuHex(i)}`,
    );
  }

  /**
   * The status of the guest range starting at `offset`: one run of subclusters that share a
   * type (and, where they have one, contiguous host offsets), limited to `maxLength` and to one
   * L2 table, or to one run of L1 entries without a table.
   */
  async mapping(offset: number, maxLength: number): Promise<MappingRun> {
    return this.mappingNow(offset, maxLength);
  }

  /**
   * `mapping` without a promise where its L2 table is cached (nearly every request of a server
   * or a read): the read path then awaits only the I/O.
   */
  mappingNow(offset: number, maxLength: number): MappingRun | Promise<MappingRun> {
    const cs = this.clusterSize;
    const l1Index = Math.floor(Math.floor(offset / cs) / this.l2Entries);
    const l2Offset = l1Index < this.l1.length ? this.l1[l1Index] : 0;
    if (l2Offset === 0) {
      // Up to the next L1 entry that has a table: a sparse image's L1 table is mostly empty.
      const span = this.l2Entries * cs;
      const end = offset + maxLength;
      let next = l1Index + 1;
      while (next * span < end && (next >= this.l1.length || this.l1[next] === 0)) {
        if (next >= this.l1.length) next = Math.ceil(end / span);
        else next++;
      }
      return { type: SubclusterType.UnallocatedPlain, length: Math.min(end, next * span) - offset };
    }
    const table = this.l2Cache.use(l2Offset);
    if (table) return this.mappingIn(table, l1Index, offset, maxLength);
    return this.loadL2(l2Offset).then((t) => this.mappingIn(t, l1Index, offset, maxLength));
  }

  /** `mapping` within the L2 table `table` of L1 entry `l1Index`, which maps `offset`. */
  private mappingIn(table: DataView, l1Index: number, offset: number, maxLength: number): MappingRun {
    const cs = this.clusterSize;
    const l2Offset = this.l1[l1Index];
    const tableEnd = (l1Index + 1) * this.l2Entries * cs;
    const limit = Math.min(offset + maxLength, tableEnd);
    const sc = this.subclusterSize;
    let pos = offset;
    let run: MappingRun | undefined;
    let expectHost = 0;
    while (pos < limit) {
      const c = Math.floor(pos / cs);
      // Empty entries (unallocated, bitmap clear) are most of a sparse image's tables: a run of
      // them is taken in one step (long runs compared 64 entries at a time, see zeroEntriesEnd).
      if (run === undefined || run.type === SubclusterType.UnallocatedPlain) {
        const tableStart = tableEnd - this.l2Entries * cs;
        const i = c - l1Index * this.l2Entries;
        const j = zeroEntriesEnd(table, i, Math.ceil((limit - tableStart) / cs), this.l2EntryBytes);
        if (j > i) {
          run ??= { type: SubclusterType.UnallocatedPlain, length: 0 };
          const stepEnd = Math.min(tableStart + j * cs, limit);
          run.length += stepEnd - pos;
          pos = stepEnd;
          continue;
        }
      }
      // A run of whole data clusters contiguous on the host, likewise (without extended L2).
      if (!this.geometry.extendedL2 && pos === c * cs && (run === undefined || run.type === SubclusterType.Normal)) {
        const tableStart = tableEnd - this.l2Entries * cs;
        const i = c - l1Index * this.l2Entries;
        const expect = run === undefined ? -1 : ((run.hostOffset as number) + run.length) / cs;
        const j = normalRunEnd(table, i, Math.ceil((limit - tableStart) / cs), expect, this.clusterBits);
        if (j > i) {
          if (run === undefined) {
            const at = i * this.l2EntryBytes;
            run = {
              type: SubclusterType.Normal,
              length: 0,
              hostOffset: offsetField(table.getInt32(at), table.getInt32(at + 4)),
            };
          }
          const stepEnd = Math.min(tableStart + j * cs, limit);
          run.length += stepEnd - pos;
          expectHost = (run.hostOffset as number) + run.length;
          pos = stepEnd;
          continue;
        }
      }
      const e = this.decodeAt(table, c % this.l2Entries, l2Offset);
      const clusterStart = c * cs;
      const clusterEnd = clusterStart + cs;
      if (e.type === ClusterType.Compressed) {
        if (run) break;
        return {
          type: SubclusterType.Compressed,
          length: Math.min(clusterEnd, limit) - pos,
          compressed: { offset: e.hostOffset, size: e.compressedSize },
        };
      }
      // Walk subclusters of this cluster (one step without extended L2).
      let s = Math.floor((pos - clusterStart) / sc);
      while (pos < limit && pos < clusterEnd) {
        const t = subclusterType(e, s, this.geometry.extendedL2);
        const hasHost =
          t === SubclusterType.Normal || t === SubclusterType.ZeroAlloc || t === SubclusterType.UnallocatedAlloc;
        const host = hasHost ? e.hostOffset + (pos - clusterStart) : 0;
        const stepEnd = Math.min(clusterStart + (s + 1) * sc, limit);
        if (!run) {
          run = { type: t, length: 0 };
          if (hasHost) run.hostOffset = host;
        } else if (run.type !== t || (hasHost && host !== expectHost)) {
          return run;
        }
        run.length += stepEnd - pos;
        expectHost = host + (stepEnd - pos);
        pos = stepEnd;
        s++;
      }
    }
    return run ?? { type: SubclusterType.UnallocatedPlain, length: limit - offset };
  }

  async read(dst: Uint8Array, offset: number): Promise<void> {
    this.checkRead(dst, offset);
    await this.readMapped(dst, offset, undefined);
  }

  /** See BlockDevice.readSparse: one pass over the tables, where block status and a read take two. */
  async readSparse(dst: Uint8Array, offset: number): Promise<number[]> {
    this.checkRead(dst, offset);
    // Data clusters of a metadata-preallocated image may be holes of the file: block status
    // looks into the file for those.
    if (this.preallocationChecked ?? (await this.metadataPreallocated())) return readSparseByStatus(this, dst, offset);
    const holes: number[] = [];
    await this.readMapped(dst, offset, holes);
    return holes;
  }

  /**
   * See BlockDevice.sendCached: where [offset, offset+length) is one run of data clusters,
   * contiguous in a local file, and its L2 table is cached (nothing to wait for).
   */
  sendCached(socket: number, header: Uint8Array, offset: number, length: number): Uint8Array[] | undefined {
    const storage = this.dataStorage;
    // Data clusters of a metadata-preallocated image may be holes of the file, sent as holes.
    if (!storage.sendCached || this.preallocationChecked !== false || this.header.cryptMethod !== CRYPT_NONE) {
      return undefined;
    }
    if (length <= 0 || offset < 0 || offset + length > this.size) return undefined;
    let run: MappingRun | Promise<MappingRun>;
    try {
      run = this.mappingNow(offset, length);
    } catch {
      return undefined; // the usual read reports it
    }
    if (run instanceof Promise) {
      run.catch(() => {}); // the table loads for the next request; the usual read reports errors
      return undefined;
    }
    if (run.type !== SubclusterType.Normal || run.length < length) return undefined;
    return storage.sendCached(socket, header, run.hostOffset as number, length);
  }

  /** @internal Where the data clusters are: the external data file, or the image itself. */
  get dataStorage(): Storage {
    return this.dataFile ?? this.storage;
  }

  private checkRead(dst: Uint8Array, offset: number): void {
    if (this.header.cryptMethod !== CRYPT_NONE) throw encryptedError(this.header.cryptMethod);
    if (offset < 0 || offset + dst.length > this.size) {
      throw new QcowError(
        "invalid-argument",
        `Read of ${dst.length} bytes at ${offset} is beyond the end of the image (${this.size})`,
      );
    }
  }

  /**
   * Reads guest bytes run by run of the mapping, the runs at once. With `holes`, runs that read
   * as zeros without data (zero clusters; unallocated past the backing file) are added to it
   * instead of filled, and the backing file is read the same way.
   */
  private async readMapped(dst: Uint8Array, offset: number, holes: number[] | undefined): Promise<void> {
    // While data is read from host clusters, clusters freed meanwhile must not be handed out again.
    this.writer?.beginIo();
    try {
      const jobs: Promise<void>[] = [];
      // The backing file's holes arrive out of order: merged in at the end.
      let backingHoles: number[][] | undefined;
      let pos = offset;
      const end = offset + dst.length;
      while (pos < end) {
        let run: MappingRun;
        try {
          const m = this.mappingNow(pos, end - pos);
          run = m instanceof Promise ? await m : m;
        } catch (e) {
          // As QEMU (qcow2_signal_corruption on any access): an invalid L1 or L2 entry found
          // while reading an image open for writing marks it corrupt (iotest 271).
          await this.writer?.signalCorruption(e);
          throw e;
        }
        const part = dst.subarray(pos - offset, pos - offset + run.length);
        const t = run.type;
        if (t === SubclusterType.Normal) {
          jobs.push(readFull(this.dataStorage, part, run.hostOffset as number));
        } else if (holes === undefined || t === SubclusterType.Compressed) {
          jobs.push(this.readRun(run, part, pos));
        } else if (t === SubclusterType.ZeroPlain || t === SubclusterType.ZeroAlloc) {
          addHole(holes, pos, run.length);
        } else {
          const b = this.backing;
          const inBacking = b ? Math.max(0, Math.min(part.length, b.size - pos)) : 0;
          if (b && inBacking > 0) {
            const list: number[] = [];
            if (backingHoles === undefined) backingHoles = [list];
            else backingHoles.push(list);
            jobs.push(
              readSparse(b, part.subarray(0, inBacking), pos).then((h) => {
                list.push(...h);
              }),
            );
          }
          if (inBacking < part.length) addHole(holes, pos + inBacking, part.length - inBacking);
        }
        pos += run.length;
      }
      // One job (most reads): awaited alone, without Promise.all's array and promise.
      if (jobs.length === 1) await jobs[0];
      else if (jobs.length > 1) await Promise.all(jobs);
      if (holes && backingHoles) mergeHoles(holes, backingHoles);
    } finally {
      this.writer?.endIo();
    }
  }

  /** A run other than plain data (which readMapped reads itself) into `dst`. */
  private async readRun(run: MappingRun, dst: Uint8Array, guestOffset: number): Promise<void> {
    switch (run.type) {
      case SubclusterType.ZeroPlain:
      case SubclusterType.ZeroAlloc:
        dst.fill(0);
        return;
      case SubclusterType.UnallocatedPlain:
      case SubclusterType.UnallocatedAlloc:
        await this.readBacking(dst, guestOffset);
        return;
      case SubclusterType.Compressed: {
        const c = run.compressed as { offset: number; size: number };
        const within = guestOffset % this.clusterSize;
        if (within === 0 && dst.length === this.clusterSize && !this.compressedCache.peek(c.offset)) {
          // A whole cluster: decompress straight into the caller's buffer, nothing kept.
          await this.decompressInto(c, dst);
        } else {
          const cluster = await this.compressedCache.get(c.offset, async () => {
            const out = new Uint8Array(this.clusterSize);
            await this.decompressInto(c, out);
            return out;
          });
          dst.set(cluster.subarray(within, within + dst.length));
        }
        return;
      }
    }
  }

  /** Reads from the backing file, with zeros past its end (or where there is none). */
  private async readBacking(dst: Uint8Array, offset: number): Promise<void> {
    const b = this.backing;
    const inBacking = b ? Math.max(0, Math.min(dst.length, b.size - offset)) : 0;
    if (b && inBacking > 0) await b.read(dst.subarray(0, inBacking), offset);
    dst.fill(0, inBacking);
  }

  /** @internal New compressed data lands at `offset`: what was cached for it is stale. */
  forgetCompressed(offset: number): void {
    this.compressedCache.delete(offset);
  }

  private async decompressInto(c: { offset: number; size: number }, out: Uint8Array): Promise<void> {
    if (!this.codec) {
      throw unsupported(
        `No ${this.header.compressionType === COMPRESSION_ZSTD ? "zstd" : "zlib"} codec for compressed clusters`,
      );
    }
    const buf = this.compressedInput.pop() ?? new Uint8Array(2 * this.clusterSize);
    const src = buf.length >= c.size ? buf.subarray(0, c.size) : new Uint8Array(c.size);
    try {
      await readFull(this.storage, src, c.offset);
      await this.codec.decompress(src, out);
    } finally {
      if (this.compressedInput.length < 16) this.compressedInput.push(buf);
    }
  }

  /**
   * Extents of [offset, offset+length) as `qemu-img map` sees them, through the backing chain.
   * Work follows the L1/L2 tables: an absent L2 table is one step, however much it covers.
   */
  async *blockStatus(offset: number, length: number): AsyncIterable<Extent> {
    if (this.header.cryptMethod !== CRYPT_NONE) throw encryptedError(this.header.cryptMethod);
    const end = Math.min(offset + length, this.size);
    const file = this.dataFile?.name ?? this.filename;
    let pos = offset;
    while (pos < end) {
      const run = await this.mapping(pos, end - pos);
      const runEnd = pos + run.length;
      const at = run.hostOffset;
      switch (run.type) {
        case SubclusterType.Normal:
          if (await this.metadataPreallocated()) {
            yield* this.splitHoles(pos, run.length, at as number, file);
          } else {
            yield {
              start: pos,
              length: run.length,
              present: true,
              zero: false,
              data: true,
              depth: 0,
              offset: at,
              file,
            };
          }
          break;
        case SubclusterType.Compressed:
          yield { start: pos, length: run.length, present: true, zero: false, data: true, depth: 0, compressed: true };
          break;
        case SubclusterType.ZeroPlain:
          yield { start: pos, length: run.length, present: true, zero: true, data: false, depth: 0 };
          break;
        case SubclusterType.ZeroAlloc:
          yield { start: pos, length: run.length, present: true, zero: true, data: false, depth: 0, offset: at, file };
          break;
        default:
          yield* this.backingStatus(pos, runEnd, at, file);
      }
      pos = runEnd;
    }
  }

  /**
   * QEMU's qcow2_detect_metadata_preallocation: when far more clusters are refcounted than the
   * file really has blocks for, data clusters may be unwritten holes, and block status then
   * looks into the file to call them zero.
   */
  private async metadataPreallocated(): Promise<boolean> {
    if (this.preallocationChecked !== undefined) return this.preallocationChecked;
    const s = this.dataFile ? undefined : this.storage;
    let result = false;
    if (s?.allocatedSize) {
      const fileLength = await s.size();
      const realClusters = Math.floor((await s.allocatedSize()) / this.clusterSize);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const endCluster = Math.ceil(fileLength / this.clusterSize);
      // At most every cluster of the file is refcounted: unless the file is much larger than
      // the blocks it has (preallocated metadata, holes), the threshold is out of reach and
      // nothing needs counting.
      if (endCluster >= threshold) {
        const refcounts = await Refcounts.open(s, this.header);
        let count = 0;
        for (let i = 0; i < endCluster && count < threshold; i++) {
          const r = refcounts.get(i); // a number where the block is cached: await only a promise
          if ((typeof r === "number" ? r : await r) !== 0) count++;
        }
        result = count >= threshold;
      }
    }
    this.preallocationChecked = result;
    return result;
  }

  /** Data extents of a metadata-preallocated image, split where the file has holes. */
  private async *splitHoles(start: number, length: number, hostOffset: number, file: string): AsyncIterable<Extent> {
    const storage = this.dataStorage;
    const fileEnd = await storage.size();
    const runs = storage.dataRuns ? storage.dataRuns(hostOffset, length) : [{ start: hostOffset, length, data: true }];
    for await (const r of runs) {
      // Past the end of the file reads as zeros too (QEMU: BDRV_BLOCK_EOF).
      const zero = !r.data || r.start >= fileEnd;
      yield {
        start: start + (r.start - hostOffset),
        length: r.length,
        present: true,
        zero,
        data: true,
        depth: 0,
        offset: r.start,
        file,
      };
    }
  }

  /**
   * Status of a range this layer leaves unallocated: the backing file's, one level deeper.
   * Past the backing file's end (or without one) it reads as zeros from this layer, keeping
   * the host offset an allocated-but-unused subcluster has.
   */
  private async *backingStatus(
    start: number,
    end: number,
    hostOffset: number | undefined,
    file: string,
  ): AsyncIterable<Extent> {
    const b = this.backing;
    const inBackingEnd = b ? Math.min(end, b.size) : start;
    if (b && start < inBackingEnd) {
      for await (const e of b.blockStatus(start, inBackingEnd - start)) yield { ...e, depth: e.depth + 1 };
    }
    const from = Math.max(start, inBackingEnd);
    if (from >= end) return;
    const e: Extent = { start: from, length: end - from, present: false, zero: true, data: false, depth: 0 };
    if (hostOffset !== undefined) {
      e.offset = hostOffset + (from - start);
      e.file = file;
    }
    yield e;
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, src.length);
    // guarded() written out: the most frequent write-side call, without a closure per call.
    const w = this.writable();
    try {
      await w.write(src, offset);
    } catch (e) {
      await w.signalCorruption(e);
      throw e;
    }
  }

  async writeZeroes(offset: number, length: number, opts: { unmap?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    await this.guarded((w) => w.writeZeroes(offset, length, opts.unmap ?? false));
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    await this.guarded((w) => w.discard(offset, length));
  }

  /**
   * Changes the virtual size as `qemu-img resize` does (see resize.ts): growing may move the
   * L1 table; shrinking needs `shrink: true`. No other request may be in flight meanwhile.
   */
  async resize(size: number, opts: ResizeOptions = {}): Promise<void> {
    await this.guarded((w) => w.resize(size, opts));
  }

  /** Stores one whole guest cluster compressed (`data` is what the codec produced). */
  async writeCompressed(guestCluster: number, data: Uint8Array): Promise<void> {
    this.checkRange(
      guestCluster * this.clusterSize,
      Math.min(this.clusterSize, this.size - guestCluster * this.clusterSize),
    );
    await this.guarded((w) => w.writeCompressed(guestCluster, data));
  }

  /** Runs a write-side operation; an inconsistency it finds marks the image corrupt. */
  private async guarded(op: (w: Qcow2Writer) => Promise<void>): Promise<void> {
    const w = this.writable();
    try {
      await op(w);
    } catch (e) {
      await w.signalCorruption(e);
      throw e;
    }
  }

  private writable(): Qcow2Writer {
    if (!this.writer) throw new QcowError("read-only", `${this.filename} is open read-only`);
    return this.writer;
  }

  private checkRange(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new QcowError(
        "invalid-argument",
        `Request of ${length} bytes at ${offset} is beyond the end of the image (${this.size})`,
      );
    }
  }

  async flush(): Promise<void> {
    if (this.writer) await this.guarded((w) => w.flush());
  }

  /**
   * Closes the backing file (with its chain) and reads through `backing` instead: how a layer
   * of the chain is reopened read-write (QEMU's bdrv_reopen), so that one handle, and one lock,
   * stays per file. The new image must hold the same guest data.
   */
  async replaceBacking(backing: Qcow2Image | RawImage | undefined): Promise<void> {
    const old = this.backing;
    this.backing = backing;
    if (old !== backing) await old?.close();
  }

  async close(): Promise<void> {
    try {
      if (this.writer) await this.writer.close();
    } finally {
      await this.storage.close();
      await this.dataFile?.close();
      await this.backing?.close();
    }
  }
}

export function findSnapshot(snapshots: Snapshot[], idOrName: string): Snapshot | undefined {
  return snapshots.find((s) => s.id === idOrName) ?? snapshots.find((s) => s.name === idOrName);
}

/**
 * The first entry in [i, end) of a table without extended L2 that is not a plain data cluster
 * (no zero flag, no reserved or compressed bits, below 2^53, aligned) at host cluster `expect`
 * (then expect + 1, and so on; -1: the first entry sets it), or `end`. Small integers only.
 */
function normalRunEnd(table: DataView, i: number, end: number, expect: number, clusterBits: number): number {
  const alignLo = ((1 << clusterBits) - 1) | 0x1ff;
  for (; i < end; i++) {
    const hi = table.getInt32(i * 8);
    const lo = table.getInt32(i * 8 + 4);
    // Bits 53-62 of the entry: an offset from 2^53, reserved bits, the compressed flag.
    if ((lo & alignLo) !== 0 || (hi & 0x7fe0_0000) !== 0) break;
    const k = entryCluster(hi, lo, clusterBits);
    if (k === 0 || (expect !== -1 && k !== expect)) break;
    expect = k + 1;
  }
  return i;
}

async function readL1(
  storage: Storage,
  offset: number,
  entries: number,
  clusterSize: number,
): Promise<{ offsets: Float64Array; copied: Uint8Array }> {
  const offsets = new Float64Array(entries);
  const copied = new Uint8Array(entries);
  if (entries === 0) return { offsets, copied };
  const buf = new Uint8Array(entries * 8);
  await readFull(storage, buf, offset);
  const dv = view(buf);
  for (let i = 0; i < entries; i++) {
    // Signed halves: small integers for V8 even with the COPIED bit (63) set.
    const hi = dv.getInt32(i * 8);
    offsets[i] = l1EntryOffset(hi, dv.getInt32(i * 8 + 4), clusterSize, i);
    copied[i] = hi < 0 ? 1 : 0;
  }
  return { offsets, copied };
}

export async function readSnapshotTable(storage: Storage, h: Qcow2Header): Promise<Snapshot[]> {
  if (h.nbSnapshots === 0) return [];
  // Past the end of the file the table reads as zeros (as in QEMU): there every entry but the
  // one that straddles the end is a bare 40-byte entry, which bounds what is worth reading.
  const available = Math.max(0, (await storage.size()) - h.snapshotsOffset);
  const pastEnd = h.nbSnapshots * SNAPSHOT_ENTRY_FIXED + SNAPSHOT_ENTRY_MAX;
  return readGrowing(storage, h.snapshotsOffset, Math.min(MAX_SNAPSHOT_TABLE_BYTES, available + pastEnd), (buf) =>
    decodeSnapshotTable(buf, h.nbSnapshots, h.snapshotsOffset),
  );
}

/**
 * Reads a variable-length table whose size is only known by decoding it: start small and grow,
 * so that an absurd entry count costs no more than what the file really holds.
 */
async function readGrowing<T>(
  storage: Storage,
  offset: number,
  limit: number,
  decode: (buf: Uint8Array) => T,
): Promise<T> {
  let n = Math.min(limit, 64 * 1024);
  for (;;) {
    const buf = new Uint8Array(n);
    await readFull(storage, buf, offset);
    try {
      return decode(buf);
    } catch (e) {
      if (n >= limit || !(e instanceof QcowError && e.truncated)) throw e;
      n = Math.min(limit, n * 4);
    }
  }
}

export async function readBitmapDirectory(
  storage: Storage,
  h: Qcow2Header,
  ext: HeaderExtensions,
): Promise<BitmapDirectoryEntry[]> {
  const b = ext.bitmaps;
  if (!b) return [];
  if (!(h.autoclearFeatures & AUTOCLEAR_BITMAPS)) {
    // A program without bitmap support has written the image since the bitmaps were stored:
    // QEMU ignores them (their clusters count as leaked) and drops the extension when it next
    // writes the header. So does qcowkit.
    ext.bitmaps = undefined;
    return [];
  }
  if (b.directorySize > MAX_BITMAP_DIRECTORY_BYTES)
    throw corrupt(`Bitmap directory too large: ${b.directorySize} bytes`);
  if (b.directoryOffset % 2 ** h.clusterBits !== 0)
    throw corrupt(`Bitmap directory offset ${hex(b.directoryOffset)} is not aligned`);
  const buf = new Uint8Array(b.directorySize);
  await readFull(storage, buf, b.directoryOffset);
  return decodeBitmapDirectory(buf, b.nbBitmaps, b.directoryOffset);
}
