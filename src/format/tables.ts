/**
 * L1, L2 and refcount table entries (docs/interop/qcow2.rst, "Cluster mapping",
 * "Extended L2 Entries", "Host cluster management"). Entries are read as two u32 halves so
 * that no bigint is made per cluster.
 */
import { corrupt, hex, invalidArgument, qemuHex, unsupported } from "../errors.js";
import { setU64 } from "./bytes.js";

export const OFLAG_COPIED_HI = 0x8000_0000;
export const OFLAG_COMPRESSED_HI = 0x4000_0000;
export const OFLAG_ZERO_LO = 0x1;

/** Bits 9-55 of a table entry: an offset in the image file. */
/** The offset field (bits 9-55) of an L1 or standard L2 entry, from signed or unsigned halves. */
export function offsetField(hi: number, lo: number): number {
  return (hi & 0x00ff_ffff) * 0x1_0000_0000 + ((lo & 0xffff_fe00) >>> 0);
}

/**
 * floor(offsetField / cluster size): the host cluster of an entry, computed in small integers
 * (no heap numbers for V8 in loops over whole tables) while the offset is below 2^(31 + clusterBits).
 */
export function entryCluster(hi: number, lo: number, clusterBits: number): number {
  return (hi & 0x00ff_ffff) * (1 << (32 - clusterBits)) + (lo >>> clusterBits);
}

/** An offset past 2^53 (JavaScript numbers are exact up to there): `what` names the entry. */
function beyond53(offset: number, what: string): Error {
  return corrupt(`${what}: offset ${hex(offset)} is beyond 2^53`);
}

/** An L1 entry: the offset of an L2 table (0: none) and whether its refcount is exactly one. */
export interface L1Entry {
  l2Offset: number;
  copied: boolean;
}

export function decodeL1Entry(hi: number, lo: number, clusterSize: number, index: number): L1Entry {
  return { l2Offset: l1EntryOffset(hi, lo, clusterSize, index), copied: (hi & OFLAG_COPIED_HI) !== 0 };
}

/**
 * The L2 table offset of an L1 entry (0: none), checked as decodeL1Entry checks it; the halves may
 * be signed (DataView.getInt32) or unsigned. For loops over whole tables: no object per entry,
 * and an entry of zeros costs two tests.
 */
export function l1EntryOffset(hi: number, lo: number, clusterSize: number, index: number): number {
  if ((hi | lo) === 0) return 0;
  if ((lo & 0x1ff) !== 0 || (hi & 0x7f00_0000) !== 0) {
    throw corrupt(
      `L1 entry ${index} has reserved bits set (0x${(hi >>> 0).toString(16)}${(lo >>> 0).toString(16).padStart(8, "0")})`,
    );
  }
  // Checked inline: an entry's name is only built for the error (a string per entry costs).
  const l2Offset = offsetField(hi, lo);
  if (l2Offset > Number.MAX_SAFE_INTEGER) throw beyond53(l2Offset, `L1 entry ${index}`);
  if (l2Offset % clusterSize !== 0) {
    throw corrupt(`L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${qemuHex(index)})`);
  }
  return l2Offset;
}

export function encodeL1Entry(e: L1Entry): [number, number] {
  const hi = Math.floor(e.l2Offset / 0x1_0000_0000) | (e.copied ? OFLAG_COPIED_HI : 0);
  return [hi >>> 0, e.l2Offset >>> 0];
}

/** QEMU's cluster types (block/qcow2.h, QCow2ClusterType). */
export enum ClusterType {
  Unallocated = 0,
  ZeroPlain = 1,
  ZeroAlloc = 2,
  Normal = 3,
  Compressed = 4,
}

/** QEMU's subcluster types (QCow2SubclusterType): what one subcluster (or cluster) reads as. */
export enum SubclusterType {
  UnallocatedPlain = 0,
  UnallocatedAlloc = 1,
  ZeroPlain = 2,
  ZeroAlloc = 3,
  Normal = 4,
  Compressed = 5,
}

export interface L2Geometry {
  clusterBits: number;
  extendedL2: boolean;
  /** Images with an external data file may map guest cluster 0 to host offset 0 (COPIED set). */
  externalData: boolean;
  /** v2 images have no zero flag. */
  version: number;
}

/** A decoded L2 entry (first 64 bits) with its subcluster bitmap for extended L2 images. */
export interface L2Entry {
  type: ClusterType;
  /** Host offset of a standard cluster, or of the compressed data. */
  hostOffset: number;
  copied: boolean;
  /** Compressed clusters: bytes to read starting at hostOffset. */
  compressedSize: number;
  /** Extended L2: bits 0-31 allocation, bits 32-63 zero, as two halves. */
  allocMask: number;
  zeroMask: number;
}

/**
 * Decodes an L2 entry. `hi`/`lo` are the two halves of the first 64 bits; `bhi`/`blo` the halves
 * of the subcluster bitmap (extended L2 only). `where` names the table and index for errors.
 */
export function decodeL2Entry(
  hi: number,
  lo: number,
  bhi: number,
  blo: number,
  g: L2Geometry,
  where: () => string,
): L2Entry {
  const copied = (hi & OFLAG_COPIED_HI) !== 0;
  if (hi & OFLAG_COMPRESSED_HI) {
    if (copied) throw corrupt(`Compressed cluster has the COPIED flag set (${where()})`);
    // A compressed cluster's subcluster bitmap has no meaning: QEMU ignores it when reading and
    // writing (iotest 271); only check reports it.
    const { offset, size } = decodeCompressed(hi, lo, g.clusterBits, where);
    return {
      type: ClusterType.Compressed,
      hostOffset: offset,
      copied,
      compressedSize: size,
      allocMask: 0,
      zeroMask: 0,
    };
  }
  const clusterSize = 1 << g.clusterBits; // (at most 2 MiB; `2 **` would call pow() per entry)
  // Bit 0 is the zero flag from v3 on; with extended L2 it is unused, and ignored as QEMU does
  // (iotest 271: the subcluster bitmap says what is zero).
  const reservedLo = g.version < 3 ? 0x1ff : 0x1fe;
  if ((lo & reservedLo) !== 0 || (hi & 0x3f00_0000) !== 0) {
    throw corrupt(
      `L2 entry has reserved bits set: 0x${hi.toString(16).padStart(8, "0")}${lo.toString(16).padStart(8, "0")} (${where()})`,
    );
  }
  const hostOffset = offsetField(hi, lo);
  if (hostOffset > Number.MAX_SAFE_INTEGER) throw beyond53(hostOffset, where());
  if (hostOffset % clusterSize !== 0) {
    throw corrupt(`Cluster allocation offset ${hex(hostOffset)} unaligned (${where()})`);
  }
  let type: ClusterType;
  if (!g.extendedL2 && lo & OFLAG_ZERO_LO) {
    type = hostOffset !== 0 ? ClusterType.ZeroAlloc : ClusterType.ZeroPlain;
  } else if (hostOffset !== 0 || (copied && g.externalData)) {
    type = ClusterType.Normal;
  } else {
    type = ClusterType.Unallocated;
  }
  let allocMask = 0;
  let zeroMask = 0;
  if (g.extendedL2) {
    allocMask = blo >>> 0;
    zeroMask = bhi >>> 0;
    if ((allocMask & zeroMask) !== 0) {
      throw corrupt(`Subclusters both allocated and zero in L2 entry (${where()})`);
    }
    if (type === ClusterType.Unallocated && allocMask !== 0) {
      throw corrupt(`Unallocated cluster has allocated subclusters (${where()})`);
    }
  }
  return { type, hostOffset, copied, compressedSize: 0, allocMask, zeroMask };
}

/**
 * What subcluster `sc` of an entry reads as. Without extended L2 a cluster is one subcluster.
 */
export function subclusterType(e: L2Entry, sc: number, extendedL2: boolean): SubclusterType {
  switch (e.type) {
    case ClusterType.Compressed:
      return SubclusterType.Compressed;
    case ClusterType.ZeroPlain:
      return SubclusterType.ZeroPlain;
    case ClusterType.ZeroAlloc:
      return SubclusterType.ZeroAlloc;
    case ClusterType.Unallocated:
      if (extendedL2 && (e.zeroMask >>> sc) & 1) return SubclusterType.ZeroPlain;
      return SubclusterType.UnallocatedPlain;
    case ClusterType.Normal:
      if (!extendedL2) return SubclusterType.Normal;
      if ((e.zeroMask >>> sc) & 1) return SubclusterType.ZeroAlloc;
      if ((e.allocMask >>> sc) & 1) return SubclusterType.Normal;
      return SubclusterType.UnallocatedAlloc;
  }
}

/** Compressed cluster descriptor, x = 62 - (cluster_bits - 8). */
export function decodeCompressed(
  hi: number,
  lo: number,
  clusterBits: number,
  where: () => string,
): { offset: number; size: number } {
  const x = 62 - (clusterBits - 8); // 49..61: the offset field always reaches into `hi`
  const offsetHiBits = x - 32;
  const offsetHi = hi & ((1 << offsetHiBits) - 1);
  if (offsetHi > 0x00ff_ffff) throw corrupt(`Compressed cluster offset has bits above 55 set (${where()})`);
  if (offsetHi > 0x1f_ffff) throw corrupt(`Compressed cluster offset beyond 2^53 (${where()})`);
  const offset = offsetHi * 0x1_0000_0000 + (lo >>> 0);
  const sectors = ((hi & 0x3fff_ffff) >>> offsetHiBits) + 1;
  return { offset, size: sectors * 512 - (offset % 512) };
}

export function encodeCompressed(offset: number, size: number, clusterBits: number): [number, number] {
  const x = 62 - (clusterBits - 8);
  // Out-of-range values would spill into the neighbouring field or the flag bits.
  if (offset >= (1 << (x - 32)) * 0x1_0000_0000) {
    throw unsupported(
      `Compressed cluster offset ${hex(offset)} does not fit in ${x} bits (cluster_bits ${clusterBits})`,
    );
  }
  const sectors = Math.ceil(((offset % 512) + size) / 512) - 1;
  if (size < 1 || sectors >= 1 << (clusterBits - 8)) {
    throw invalidArgument(
      `Compressed cluster size ${size} at ${hex(offset)} does not fit a ${2 ** clusterBits}-byte cluster descriptor`,
    );
  }
  const hi = OFLAG_COMPRESSED_HI | (sectors << (x - 32)) | Math.floor(offset / 0x1_0000_0000);
  return [hi >>> 0, offset >>> 0];
}

/** A standard L2 entry's first 64 bits. */
export function encodeStandardL2(hostOffset: number, copied: boolean, zero: boolean): [number, number] {
  const hi = Math.floor(hostOffset / 0x1_0000_0000) | (copied ? OFLAG_COPIED_HI : 0);
  return [hi >>> 0, (hostOffset | (zero ? OFLAG_ZERO_LO : 0)) >>> 0];
}

/** A refcount table entry: the offset of a refcount block, 0 when none is allocated. */
export function decodeRefcountTableEntry(hi: number, lo: number, clusterSize: number, index: number): number {
  if ((hi | lo) === 0) return 0;
  if ((lo & 0x1ff) !== 0) throw corrupt(`Refcount table entry ${index} has reserved bits set`);
  const offset = (hi >>> 0) * 0x1_0000_0000 + ((lo & 0xffff_fe00) >>> 0);
  if (offset > Number.MAX_SAFE_INTEGER) throw beyond53(offset, `Refcount table entry ${index}`);
  if (offset % clusterSize !== 0)
    throw corrupt(`Refcount block offset ${hex(offset)} unaligned (reftable index: ${qemuHex(index)})`);
  return offset;
}

/** Reads entry `i` of a refcount block whose entries are 2^order bits wide. */
export function getRefcount(block: DataView, i: number, order: number): number {
  switch (order) {
    case 0:
      return (block.getUint8(i >>> 3) >>> (i & 7)) & 1;
    case 1:
      return (block.getUint8(i >>> 2) >>> ((i & 3) * 2)) & 3;
    case 2:
      return (block.getUint8(i >>> 1) >>> ((i & 1) * 4)) & 15;
    case 3:
      return block.getUint8(i);
    case 4:
      return block.getUint16(i * 2);
    case 5:
      return block.getUint32(i * 4);
    default: {
      const hi = block.getUint32(i * 8);
      const lo = block.getUint32(i * 8 + 4);
      // A refcount beyond 2^53 cannot be right for any real image; report it saturated.
      return hi > 0x1f_ffff ? Number.MAX_SAFE_INTEGER : hi * 0x1_0000_0000 + lo;
    }
  }
}

/** Writes entry `i` of a refcount block; the caller checks `value` against 2^(2^order) - 1. */
export function setRefcount(block: DataView, i: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >>> order;
      const byte = Math.floor(i / perByte);
      const shift = (i % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block.setUint8(byte, (block.getUint8(byte) & ~mask) | ((value << shift) & mask));
      return;
    }
    case 3:
      block.setUint8(i, value);
      return;
    case 4:
      block.setUint16(i * 2, value);
      return;
    case 5:
      block.setUint32(i * 4, value);
      return;
    default:
      setU64(block, i * 8, value);
  }
}

/**
 * A 64-bit refcount beyond 2^53 (getRefcount reports it saturated), exactly, as decimal text for
 * messages. Only damaged images hold such values, so the bigint is made on this rare path only.
 */
export function exactRefcount64(block: DataView, i: number): string {
  return block.getBigUint64(i * 8).toString();
}

/**
 * Adds `delta` in place to 64-bit refcount `i`, exactly (beyond 2^53 too). Returns the new value
 * as getRefcount reports it, or undefined (and changes nothing) when the sum would leave
 * 0..2^64-1.
 */
export function addRefcount64(block: DataView, i: number, delta: number): number | undefined {
  const value = block.getBigUint64(i * 8) + BigInt(delta);
  if (value < 0n || value > 0xffff_ffff_ffff_ffffn) return undefined;
  block.setBigUint64(i * 8, value);
  return getRefcount(block, i, 6);
}

/** The largest refcount of each refcount_order (64-bit ones as far as numbers are exact). */
const MAX_REFCOUNT = [1, 3, 15, 255, 65535, 0xffff_ffff, Number.MAX_SAFE_INTEGER];

/** A table, not `2 ** (2 ** order)`: the write path asks on every refcount update, and V8 computes a variable power with a call to pow(). */
export function maxRefcount(order: number): number {
  return MAX_REFCOUNT[Math.min(order, 6)];
}
