/**
 * Builds valid qcow2 images in memory from a description, for the engine, ops and CLI unit
 * tests. Every structure is laid out with the encoders in src/format, and refcounts (and the
 * COPIED flags that follow from them) are computed from what the image really references, so
 * that `qemu-img check` calls a built image clean (image-builder.test.ts verifies that).
 *
 * Layout: cluster 0 holds the header; then the active L1 table, its L2 tables and data clusters
 * in guest order, compressed data packed at byte granularity as QEMU packs it, each snapshot's
 * tables and data, the snapshot table, and last the refcount table and refcount blocks.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { constants, deflateRawSync } from "node:zlib";
import { setU64, view } from "../../src/format/bytes.js";
import {
  COMPRESSION_DEFLATE,
  encodeHeader,
  type FeatureName,
  INCOMPAT_EXTL2,
  type Qcow2Header,
  QEMU_FEATURE_NAMES,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH_WITH_COMPRESSION,
} from "../../src/format/header.js";
import { encodeSnapshotTable, type Snapshot } from "../../src/format/snapshot.js";
import {
  encodeCompressed,
  encodeL1Entry,
  encodeStandardL2,
  maxRefcount,
  setRefcount,
} from "../../src/format/tables.js";
import type { StorageOpener } from "../../src/image/open.js";
import { MemoryStorage } from "../../src/io/memory.js";
import type { Storage } from "../../src/io/storage.js";

/**
 * One guest cluster of a layer.
 * - data: a standard cluster holding `data` (zero-padded to the cluster size).
 * - zero: reads as zeros with no host cluster (v3 only).
 * - zero-alloc: reads as zeros, with a host cluster that holds `data` (which must not be read).
 * - compressed: `data` compressed with raw deflate (window 2^12), as QEMU writes it.
 * - subclusters (extended L2 only): `alloc` and `zero` are the 32-bit allocation and zero
 *   bitmaps; a host cluster holding `data` is allocated when `alloc` is non-zero or `host` is set.
 */
export type ClusterKind = "data" | "zero" | "zero-alloc" | "compressed" | "subclusters";

export interface ClusterSpec {
  guestCluster: number;
  kind: ClusterKind;
  data?: Uint8Array;
  alloc?: number;
  zero?: number;
  host?: boolean;
}

export interface SnapshotSpec {
  id: string;
  name: string;
  /** Virtual size when the snapshot was taken (default: the image's). */
  size?: number;
  /** The snapshot's own clusters; ignored with shareActive. */
  clusters?: ClusterSpec[];
  /** Share the active layer's L2 tables and data, as a freshly taken snapshot does. */
  shareActive?: boolean;
  dateSec?: number;
  dateNsec?: number;
  vmClockNsec?: number;
}

export interface ImageSpec {
  size: number;
  version?: 2 | 3;
  clusterBits?: number;
  refcountOrder?: number;
  extendedL2?: boolean;
  clusters?: ClusterSpec[];
  backingFile?: string;
  backingFormat?: string;
  snapshots?: SnapshotSpec[];
  /** The feature-name table of a v3 image (default: QEMU's). */
  featureNames?: FeatureName[];
  /** Active L1 entries (default: just enough for `size`). */
  l1Size?: number;
}

export interface BuiltLayer {
  l1Offset: number;
  l1Size: number;
  /** L1 index -> L2 table offset. */
  l2Offsets: Map<number, number>;
  /** Guest cluster -> host cluster offset (data, zero-alloc, subclusters with a host cluster). */
  hostOffsets: Map<number, number>;
  /** Guest cluster -> where its compressed bytes are. */
  compressed: Map<number, { offset: number; size: number }>;
}

export interface BuiltImage {
  bytes: Uint8Array;
  clusterSize: number;
  l2Entries: number;
  active: BuiltLayer;
  snapshots: BuiltLayer[];
  refcountTableOffset: number;
  snapshotsOffset: number;
  /** Refcount of every host cluster, by index. */
  refcounts: number[];
  /** A fresh MemoryStorage over a copy of the bytes. */
  storage(name?: string): MemoryStorage;
  /** The guest contents of the active layer over `backing` (zeros past its end). */
  expected(backing?: Uint8Array): Uint8Array;
  /**
   * The guest contents of snapshot `i` over `backing`, at the image's current virtual size as
   * `qemu-img convert -l` reads it (what lies beyond the snapshot's L1 table is unallocated).
   */
  expectedSnapshot(i: number, backing?: Uint8Array): Uint8Array;
}

const ALL = 0xffff_ffff;

/** Deterministic, compressible, never-zero bytes (runs of 16 equal bytes). */
export function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = 1 + (((i >> 4) + seed * 37) % 251);
  return b;
}

/** Deterministic bytes that deflate cannot shrink much, never zero. */
export function noise(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  let x = (seed * 2654435761 + 12345) >>> 0;
  for (let i = 0; i < length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    b[i] = 1 + ((x >>> 16) % 255);
  }
  return b;
}

export function deflateCluster(data: Uint8Array): Uint8Array {
  return deflateRawSync(data, { windowBits: 12, level: constants.Z_DEFAULT_COMPRESSION });
}

class Allocator {
  next = 1; // cluster 0: the header
  readonly refs: number[] = [1];
  /** Byte allocator for compressed data, as QEMU's qcow2_alloc_bytes packs it. */
  private freeByte = 0;

  constructor(readonly clusterSize: number) {}

  clusters(n: number): number {
    const at = this.next;
    this.next += n;
    for (let i = at; i < this.next; i++) this.refs[i] = 1;
    this.freeByte = 0;
    return at * this.clusterSize;
  }

  ref(offset: number, length: number): void {
    const cs = this.clusterSize;
    for (let c = Math.floor(offset / cs); c <= Math.floor((offset + length - 1) / cs); c++) {
      this.refs[c] = (this.refs[c] ?? 0) + 1;
    }
  }

  /** Packs `n` bytes after the previous compressed cluster; touched clusters gain a reference. */
  bytes(n: number): number {
    const cs = this.clusterSize;
    if (this.freeByte === 0) this.freeByte = this.next * cs;
    const start = this.freeByte;
    const end = start + n;
    // Allocate whichever clusters the bytes run into; they all belong to compressed data.
    while (this.next * cs < end) {
      this.refs[this.next] = 0;
      this.next++;
    }
    this.ref(start, n);
    this.freeByte = end % cs === 0 ? 0 : end;
    return start;
  }
}

interface PendingLayer {
  built: BuiltLayer;
  specs: Map<number, ClusterSpec>;
  /** The layer points at the active layer's L2 tables, which the active layer writes. */
  shared: boolean;
}

function normalizeData(c: ClusterSpec, cs: number): Uint8Array {
  const out = new Uint8Array(cs);
  if (c.data) out.set(c.data.subarray(0, cs));
  return out;
}

export function buildImage(spec: ImageSpec): BuiltImage {
  const version = spec.version ?? 3;
  const clusterBits = spec.clusterBits ?? 16;
  const cs = 2 ** clusterBits;
  const refcountOrder = spec.refcountOrder ?? 4;
  const extendedL2 = spec.extendedL2 ?? false;
  if (version === 2 && (refcountOrder !== 4 || extendedL2))
    throw new Error("v2 images have 16-bit refcounts and no extended L2");
  const entryBytes = extendedL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const l1For = (size: number): number => Math.ceil(size / cs / l2Entries);
  const alloc = new Allocator(cs);
  const contents = new Map<number, Uint8Array>(); // host offset -> bytes to place there

  const layout = (clusters: ClusterSpec[], size: number, l1Size: number): PendingLayer => {
    const built: BuiltLayer = {
      l1Offset: 0,
      l1Size,
      l2Offsets: new Map(),
      hostOffsets: new Map(),
      compressed: new Map(),
    };
    const specs = new Map<number, ClusterSpec>();
    for (const c of clusters) {
      if (c.guestCluster * cs >= size) throw new Error(`guest cluster ${c.guestCluster} is beyond the disk`);
      if (specs.has(c.guestCluster)) throw new Error(`guest cluster ${c.guestCluster} given twice`);
      if (version === 2 && (c.kind === "zero" || c.kind === "zero-alloc"))
        throw new Error("v2 images have no zero clusters");
      if (c.kind === "subclusters" && !extendedL2) throw new Error("subclusters need extended L2 entries");
      specs.set(c.guestCluster, c);
    }
    if (l1Size > 0) built.l1Offset = alloc.clusters(Math.ceil((l1Size * 8) / cs));
    const sorted = [...specs.values()].sort((a, b) => a.guestCluster - b.guestCluster);
    for (const c of sorted) {
      const l1Index = Math.floor(c.guestCluster / l2Entries);
      if (!built.l2Offsets.has(l1Index)) built.l2Offsets.set(l1Index, alloc.clusters(1));
      const needsHost =
        c.kind === "data" ||
        c.kind === "zero-alloc" ||
        (c.kind === "subclusters" && ((c.alloc ?? 0) !== 0 || c.host === true));
      if (needsHost) {
        const at = alloc.clusters(1);
        built.hostOffsets.set(c.guestCluster, at);
        contents.set(at, normalizeData(c, cs));
      } else if (c.kind === "compressed") {
        const z = deflateCluster(normalizeData(c, cs));
        const at = alloc.bytes(z.length);
        built.compressed.set(c.guestCluster, { offset: at, size: z.length });
        contents.set(at, z);
      }
    }
    return { built, specs, shared: false };
  };

  const active = layout(spec.clusters ?? [], spec.size, spec.l1Size ?? l1For(spec.size));
  const snaps: PendingLayer[] = (spec.snapshots ?? []).map((s) => {
    const size = s.size ?? spec.size;
    if (!s.shareActive) return layout(s.clusters ?? [], size, l1For(size));
    if (size !== spec.size) throw new Error("a snapshot sharing the active tables has the active size");
    const built: BuiltLayer = {
      l1Offset: alloc.clusters(Math.max(1, Math.ceil((active.built.l1Size * 8) / cs))),
      l1Size: active.built.l1Size,
      l2Offsets: new Map(active.built.l2Offsets),
      hostOffsets: new Map(active.built.hostOffsets),
      compressed: new Map(active.built.compressed),
    };
    // One more reference to every table and cluster the active layer references.
    for (const at of built.l2Offsets.values()) alloc.ref(at, 1);
    for (const at of built.hostOffsets.values()) alloc.ref(at, 1);
    for (const c of built.compressed.values()) alloc.ref(c.offset, csize(c.offset, c.size));
    return { built, specs: active.specs, shared: true };
  });

  const snapshotEntries: Snapshot[] = (spec.snapshots ?? []).map((s, i) => ({
    l1TableOffset: snaps[i].built.l1Offset,
    l1Size: snaps[i].built.l1Size,
    id: s.id,
    name: s.name,
    dateSec: s.dateSec ?? 1_700_000_000 + i,
    dateNsec: s.dateNsec ?? 0,
    vmClockNsec: s.vmClockNsec ?? 0,
    vmStateSize: 0,
    diskSize: s.size ?? spec.size,
    extra: new Uint8Array(0),
  }));
  let snapshotsOffset = 0;
  let snapshotTable: Uint8Array = new Uint8Array(0);
  if (snapshotEntries.length > 0) {
    snapshotTable = encodeSnapshotTable(snapshotEntries, spec.size, version >= 3 ? 16 : 0);
    snapshotsOffset = alloc.clusters(Math.ceil(snapshotTable.length / cs));
  }

  // Refcount table and blocks last, sized to cover themselves.
  const blockEntries = (cs * 8) / 2 ** refcountOrder;
  const used = alloc.next;
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = used + tableClusters + blocks;
    const b = Math.ceil(total / blockEntries);
    const t = Math.max(1, Math.ceil((b * 8) / cs));
    if (b === blocks && t === tableClusters) break;
    blocks = b;
    tableClusters = t;
  }
  const refcountTableOffset = alloc.clusters(tableClusters);
  const firstBlock = alloc.clusters(blocks);
  const totalClusters = alloc.next;

  const refs = alloc.refs;
  for (let i = 0; i < totalClusters; i++) refs[i] ??= 0;
  const max = maxRefcount(refcountOrder);
  refs.forEach((r, i) => {
    if (r > max)
      throw new Error(`host cluster ${i} needs refcount ${r}, more than refcount_order ${refcountOrder} holds`);
  });

  const bytes = new Uint8Array(totalClusters * cs);
  const dv = view(bytes);
  for (const [at, b] of contents) bytes.set(b, at);

  const writeLayer = (p: PendingLayer): void => {
    const { built } = p;
    for (const [l1Index, l2Offset] of built.l2Offsets) {
      const [hi, lo] = encodeL1Entry({ l2Offset, copied: refs[l2Offset / cs] === 1 });
      dv.setUint32(built.l1Offset + l1Index * 8, hi);
      dv.setUint32(built.l1Offset + l1Index * 8 + 4, lo);
    }
    if (p.shared) return; // the active layer writes the tables it shares
    for (const c of p.specs.values()) {
      const l2Offset = built.l2Offsets.get(Math.floor(c.guestCluster / l2Entries)) as number;
      const at = l2Offset + (c.guestCluster % l2Entries) * entryBytes;
      const host = built.hostOffsets.get(c.guestCluster) ?? 0;
      const copied = host !== 0 && refs[host / cs] === 1;
      let entry: [number, number];
      let bitmap: [number, number] = [0, 0]; // [zero mask, allocation mask]
      switch (c.kind) {
        case "data":
          entry = encodeStandardL2(host, copied, false);
          bitmap = [0, ALL];
          break;
        case "zero":
          entry = encodeStandardL2(0, false, !extendedL2);
          bitmap = [ALL, 0];
          break;
        case "zero-alloc":
          entry = encodeStandardL2(host, copied, !extendedL2);
          bitmap = [ALL, 0];
          break;
        case "compressed": {
          const z = built.compressed.get(c.guestCluster) as { offset: number; size: number };
          entry = encodeCompressed(z.offset, z.size, clusterBits);
          break;
        }
        case "subclusters":
          entry = encodeStandardL2(host, copied, false);
          bitmap = [(c.zero ?? 0) >>> 0, (c.alloc ?? 0) >>> 0];
          break;
      }
      dv.setUint32(at, entry[0]);
      dv.setUint32(at + 4, entry[1]);
      if (extendedL2) {
        dv.setUint32(at + 8, bitmap[0]);
        dv.setUint32(at + 12, bitmap[1]);
      }
    }
  };
  writeLayer(active);
  snaps.forEach(writeLayer);
  bytes.set(snapshotTable, snapshotsOffset);

  for (let b = 0; b < blocks; b++) setU64(dv, refcountTableOffset + b * 8, firstBlock + b * cs);
  for (let i = 0; i < totalClusters; i++) {
    const block = Math.floor(i / blockEntries);
    setRefcount(
      view(bytes.subarray(firstBlock + block * cs, firstBlock + (block + 1) * cs)),
      i % blockEntries,
      refcountOrder,
      refs[i],
    );
  }

  const header: Qcow2Header = {
    version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size: spec.size,
    cryptMethod: 0,
    l1Size: active.built.l1Size,
    l1TableOffset: active.built.l1Offset,
    refcountTableOffset,
    refcountTableClusters: tableClusters,
    nbSnapshots: snapshotEntries.length,
    snapshotsOffset,
    incompatibleFeatures: extendedL2 ? INCOMPAT_EXTL2 : 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder,
    headerLength: version === 3 ? V3_HEADER_LENGTH_WITH_COMPRESSION : V2_HEADER_LENGTH,
    compressionType: COMPRESSION_DEFLATE,
    tail: new Uint8Array(0),
  };
  const backingFormat = spec.backingFormat;
  const featureNames = version === 3 ? (spec.featureNames ?? QEMU_FEATURE_NAMES) : [];
  let first: Uint8Array;
  try {
    first = encodeHeader(header, { backingFormat, featureNames, unknown: [] }, spec.backingFile);
  } catch (e) {
    // As QEMU does with small clusters: the feature-name table is left out when it does not fit.
    if (spec.featureNames !== undefined) throw e;
    first = encodeHeader(header, { backingFormat, featureNames: [], unknown: [] }, spec.backingFile);
  }
  bytes.set(first, 0);

  const expectedLayer = (p: PendingLayer, size: number, backing?: Uint8Array): Uint8Array => {
    const out = new Uint8Array(size);
    if (backing) out.set(backing.subarray(0, Math.min(size, backing.length)));
    const sc = extendedL2 ? cs / 32 : cs;
    for (const c of p.specs.values()) {
      const start = c.guestCluster * cs;
      const len = Math.min(cs, size - start);
      const data = normalizeData(c, cs);
      for (let s = 0; s * sc < len; s++) {
        const a = start + s * sc;
        const n = Math.min(sc, len - s * sc);
        let kind: "data" | "zero" | "backing";
        if (c.kind === "data" || c.kind === "compressed") kind = "data";
        else if (c.kind === "zero" || c.kind === "zero-alloc") kind = "zero";
        else if (((c.zero ?? 0) >>> s) & 1) kind = "zero";
        else if (((c.alloc ?? 0) >>> s) & 1) kind = "data";
        else kind = "backing";
        if (kind === "data") out.set(data.subarray(s * sc, s * sc + n), a);
        else if (kind === "zero") out.fill(0, a, a + n);
      }
    }
    return out;
  };

  return {
    bytes,
    clusterSize: cs,
    l2Entries,
    active: active.built,
    snapshots: snaps.map((s) => s.built),
    refcountTableOffset,
    snapshotsOffset,
    refcounts: refs.slice(0, totalClusters),
    storage: (name = "memory") => new MemoryStorage(bytes, { name }),
    expected: (backing) => expectedLayer(active, spec.size, backing),
    // As qemu-img convert -l reads a snapshot: at the image's current virtual size.
    expectedSnapshot: (i, backing) => expectedLayer(snaps[i], spec.size, backing),
  };
}

/** Bytes a compressed cluster descriptor makes a reader read: to the end of the last sector. */
export function csize(offset: number, size: number): number {
  return Math.ceil(((offset % 512) + size) / 512) * 512 - (offset % 512);
}

/** A StorageOpener over named byte arrays, recording what it opened. */
export class MapOpener implements StorageOpener {
  readonly opened: string[] = [];
  readonly storages: TracingStorage[] = [];
  constructor(readonly files: Map<string, Uint8Array> = new Map()) {}

  async open(name: string, opts: { readOnly: boolean }): Promise<Storage> {
    const bytes = this.files.get(name);
    if (!bytes)
      throw Object.assign(new Error(`Could not open '${name}': No such file or directory`), { code: "ENOENT" });
    this.opened.push(name);
    const s = new TracingStorage(bytes, { name, readOnly: opts.readOnly });
    this.storages.push(s);
    return s;
  }

  resolve(_base: string, relative: string): string {
    return relative;
  }

  async identity(name: string): Promise<string> {
    return name;
  }
}

/** Runs `fn` with a fresh temporary directory, removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T> | T): Promise<T> {
  const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
  try {
    return await fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export function writeFiles(dir: string, files: Record<string, Uint8Array>): void {
  for (const [name, bytes] of Object.entries(files)) writeFileSync(join(dir, name), bytes);
}

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs qemu-img (which the unit tests that use it require) and returns its exit code and output. */
export function qemuImg(args: string[], cwd?: string): ToolResult {
  try {
    const stdout = execFileSync("qemu-img", args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    return { code: 0, stdout, stderr: "" };
  } catch (e) {
    const err = e as { status?: number; stdout?: string; stderr?: string; code?: string };
    if (err.code === "ENOENT") throw new Error("qemu-img not found: install it with `apt-get install -y qemu-utils`");
    return { code: err.status ?? -1, stdout: err.stdout ?? "", stderr: err.stderr ?? "" };
  }
}

/** A MemoryStorage that records its reads, writes and whether it was closed. */
export class TracingStorage extends MemoryStorage {
  reads: { offset: number; length: number }[] = [];
  writes: { offset: number; length: number; zero: boolean }[] = [];
  closed = false;

  override async read(dst: Uint8Array, offset: number): Promise<number> {
    this.reads.push({ offset, length: dst.length });
    return super.read(dst, offset);
  }

  override async write(src: Uint8Array, offset: number): Promise<void> {
    this.writes.push({ offset, length: src.length, zero: src.every((b) => b === 0) });
    return super.write(src, offset);
  }

  override async close(): Promise<void> {
    this.closed = true;
  }
}

/** Reads a whole device. */
export async function readAll(dev: {
  size: number;
  read(dst: Uint8Array, offset: number): Promise<void>;
}): Promise<Uint8Array> {
  const out = new Uint8Array(dev.size);
  await dev.read(out, 0);
  return out;
}

/** A small deterministic PRNG (for random request offsets and lengths). */
export function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}
