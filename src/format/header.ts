/**
 * The qcow2 header (docs/interop/qcow2.rst, "Header") and its extensions.
 * Pure encode/decode with the validation QEMU applies when it opens an image.
 */
import { corrupt, hex, unsupported } from "../errors.js";
import { getU64, setU64, textDecoder, textEncoder, view } from "./bytes.js";

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** Header length qcowkit writes for v3: through compression_type, padded to 8. */
export const V3_HEADER_LENGTH_WITH_COMPRESSION = 112;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_BACKING_NAME = 1023;
/** QEMU's implementation limits (block/qcow2.h). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = 0x3n;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past compression_type up to header_length, kept verbatim on rewrite. */
  tail: Uint8Array;
}

export type FeatureType = "incompatible" | "compatible" | "autoclear";
export interface FeatureName {
  type: FeatureType;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface HeaderExtensions {
  backingFormat?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  crypto?: { offset: number; length: number };
  dataFile?: string;
  /** Extensions qcowkit does not know, kept byte for byte. */
  unknown: { type: number; data: Uint8Array }[];
}

/**
 * Decodes and validates the fixed part of the header. `buf` holds at least the first 512 bytes.
 * `forCheck`: as QEMU opens an image for check, the snapshot table pointer is not validated
 * here; the check reports (and may repair) it itself.
 */
export function decodeHeader(buf: Uint8Array, opts: { forCheck?: boolean } = {}): Qcow2Header {
  if (buf.length < V2_HEADER_LENGTH) throw corrupt(`qcow2 header truncated: ${buf.length} bytes`);
  const dv = view(buf);
  if (dv.getUint32(0) !== QCOW2_MAGIC) throw corrupt("Image is not in qcow2 format");
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) throw unsupported(`Unsupported qcow2 version ${version}`);
  const clusterBits = dv.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(
      `Unsupported cluster size: 2^${clusterBits} (header field cluster_bits at 0x14 must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS})`,
    );
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: getOffset(dv, 8),
    backingFileSize: dv.getUint32(16),
    clusterBits,
    size: getU64(dv, 24, "header field size"),
    cryptMethod: dv.getUint32(32),
    l1Size: dv.getUint32(36),
    l1TableOffset: getOffset(dv, 40),
    refcountTableOffset: getOffset(dv, 48),
    refcountTableClusters: dv.getUint32(56),
    nbSnapshots: dv.getUint32(60),
    snapshotsOffset: getOffset(dv, 64),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_DEFLATE,
    tail: new Uint8Array(0),
  };
  if (version === 3) {
    if (buf.length < V3_HEADER_LENGTH) throw corrupt(`qcow2 v3 header truncated: ${buf.length} bytes`);
    h.incompatibleFeatures = dv.getBigUint64(72);
    h.compatibleFeatures = dv.getBigUint64(80);
    h.autoclearFeatures = dv.getBigUint64(88);
    h.refcountOrder = dv.getUint32(96);
    h.headerLength = dv.getUint32(100);
    if (h.headerLength < V3_HEADER_LENGTH) {
      throw corrupt(`qcow2 header too short: header_length ${h.headerLength} (at 0x64) is below ${V3_HEADER_LENGTH}`);
    }
    if (h.headerLength > clusterSize) {
      throw corrupt(`qcow2 header exceeds cluster size: header_length ${h.headerLength} > ${clusterSize}`);
    }
    if (h.headerLength % 8 !== 0) throw corrupt(`qcow2 header_length ${h.headerLength} is not a multiple of 8`);
    if (buf.length < h.headerLength) throw corrupt(`qcow2 header truncated: ${buf.length} of ${h.headerLength} bytes`);
    if (h.headerLength > V3_HEADER_LENGTH) h.compressionType = buf[104];
    if (h.headerLength > V3_HEADER_LENGTH_WITH_COMPRESSION) {
      h.tail = buf.slice(V3_HEADER_LENGTH_WITH_COMPRESSION, h.headerLength);
    }
  }
  validateHeader(h, opts.forCheck === true);
  return h;
}

function validateHeader(h: Qcow2Header, forCheck: boolean): void {
  const clusterSize = 2 ** h.clusterBits;
  if (h.refcountOrder > 6)
    throw corrupt(`Reference count entry width too large: refcount_order ${h.refcountOrder} (at 0x60) exceeds 6`);
  if (h.backingFileOffset !== 0) {
    if (h.backingFileOffset > clusterSize) {
      throw corrupt(
        `Invalid backing file offset: ${describeOffset(h.backingFileOffset)} (at 0x8) is beyond the first cluster`,
      );
    }
    if (h.backingFileSize > MAX_BACKING_NAME) {
      throw corrupt(`Backing file name too long: ${h.backingFileSize} bytes (at most ${MAX_BACKING_NAME})`);
    }
    if (h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw corrupt(`Backing file name at ${hex(h.backingFileOffset)} runs past the first cluster`);
    }
  }
  if (h.cryptMethod > CRYPT_LUKS) throw unsupported(`Unsupported encryption method: ${h.cryptMethod}`);
  // The checks and their first words are QEMU's (qcow2_do_open), in its order.
  // An empty refcount table opens (as in QEMU) so that check can rebuild it; writing refuses it.
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw corrupt(`Reference count table too large: refcount_table_clusters ${h.refcountTableClusters} (at 0x38)`);
  }
  checkTable(
    "Reference count table",
    h.refcountTableOffset,
    0x30,
    h.refcountTableClusters * clusterSize,
    clusterSize,
    h.refcountTableClusters > 0,
  );
  if (!forCheck) {
    if (h.nbSnapshots > MAX_SNAPSHOTS) {
      throw corrupt(`Snapshot table too large: nb_snapshots ${h.nbSnapshots} (at 0x3c), at most ${MAX_SNAPSHOTS}`);
    }
    checkTable("Snapshot table", h.snapshotsOffset, 0x40, 0, clusterSize, h.nbSnapshots > 0);
  }
  if (h.l1Size * 8 > MAX_L1_BYTES) throw corrupt(`Active L1 table too large: l1_size ${h.l1Size} (at 0x24)`);
  // Every guest cluster must be reachable from the L1 table.
  const l2Entries = clusterSize / (h.incompatibleFeatures & INCOMPAT_EXTL2 ? 16 : 8);
  const needed = Math.ceil(h.size / clusterSize / l2Entries);
  if (h.l1Size < needed)
    throw corrupt(`L1 table is too small: l1_size ${h.l1Size} for a ${h.size}-byte disk needs ${needed}`);
  checkTable("Active L1 table", h.l1TableOffset, 0x28, h.l1Size * 8, clusterSize, h.l1Size > 0);
  // QEMU's words (validate_compression_type).
  if (h.compressionType > COMPRESSION_ZSTD) {
    throw unsupported(`qcow2: unknown compression type: ${h.compressionType} (header byte 0x68)`);
  }
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION) {
    if (h.compressionType === COMPRESSION_DEFLATE) {
      throw corrupt("qcow2: Compression type incompatible feature bit must not be set (compression_type is zlib)");
    }
  } else if (h.compressionType !== COMPRESSION_DEFLATE) {
    throw corrupt(
      `qcow2: Invalid compression type: incompatible feature bit must be set (compression_type ${h.compressionType})`,
    );
  }
  if (h.incompatibleFeatures & INCOMPAT_EXTL2 && h.clusterBits < 14) {
    throw corrupt("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  }
}

/**
 * A 64-bit header offset, as a number that is exact up to 2^53 and larger beyond it, so that the
 * table checks can refuse it with QEMU's words ("... offset invalid").
 */
function getOffset(dv: DataView, at: number): number {
  return dv.getUint32(at) * 0x1_0000_0000 + dv.getUint32(at + 4);
}

/** An offset for a message: exact below 2^53, where a number holds it exactly. */
function describeOffset(offset: number): string {
  return offset > Number.MAX_SAFE_INTEGER ? "an offset beyond 2^53" : hex(offset);
}

/**
 * A table must start on a cluster boundary and its end must stay representable; as QEMU's
 * validate_table_offset, even an empty table's offset. A table that holds entries must not
 * start at offset 0, on the header.
 */
function checkTable(
  what: string,
  offset: number,
  field: number,
  bytes: number,
  clusterSize: number,
  present: boolean,
): void {
  if (offset + bytes > Number.MAX_SAFE_INTEGER) {
    throw corrupt(`${what} offset invalid: ${describeOffset(offset)} (at ${hex(field)}) is too large`);
  }
  if (offset % clusterSize !== 0) {
    throw corrupt(`${what} offset invalid: ${hex(offset)} (at ${hex(field)}) is not aligned to a cluster boundary`);
  }
  if (present && offset === 0) throw corrupt(`${what} at offset 0 overlaps the qcow2 header`);
}

/** Names the set bits of `mask` in one feature bitmap, from the image's own feature-name table. */
export function nameFeatures(mask: bigint, type: FeatureType, table: FeatureName[]): string {
  // As QEMU's report_unsupported_feature: named bits in table order, then the rest as a mask.
  const names: string[] = [];
  let rest = mask;
  for (const f of table) {
    const bit = 1n << BigInt(f.bit);
    if (f.type === type && rest & bit) {
      names.push(f.name);
      rest &= ~bit;
    }
  }
  if (rest !== 0n) names.push(`Unknown ${type} feature: ${rest.toString(16)}`);
  return names.join(", ");
}

const FEATURE_TYPES: FeatureType[] = ["incompatible", "compatible", "autoclear"];

/**
 * Decodes the header extensions that follow the header, up to `end` (the backing file name,
 * or the end of the first cluster).
 */
export function decodeExtensions(buf: Uint8Array, h: Qcow2Header): HeaderExtensions {
  const clusterSize = 2 ** h.clusterBits;
  const start = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  const end = Math.min(buf.length, h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize);
  const ext: HeaderExtensions = { featureNames: [], unknown: [] };
  const dv = view(buf);
  const seen = new Set<number>();
  let at = start;
  // As QEMU: every extension header that starts before `end` is read, and it and its data
  // (even the end marker's) must fit before `end`.
  while (at < end) {
    if (at + 8 > buf.length)
      throw corrupt(`Header extension too large: the extension at ${hex(at)} runs past ${hex(end)}`);
    const type = dv.getUint32(at);
    const len = dv.getUint32(at + 4);
    const dataAt = at + 8;
    if (dataAt + len > end) {
      throw corrupt(
        `Header extension too large: ${hex(type)} at ${hex(at)} has ${len} bytes, running past ${hex(end)}`,
      );
    }
    if (type === EXT_END) break;
    const data = buf.subarray(dataAt, dataAt + len);
    if (seen.has(type) && type !== EXT_END)
      throw corrupt(`Header extension ${hex(type)} appears twice (at ${hex(at)})`);
    seen.add(type);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len > 1023) throw corrupt(`Backing format name too long (${len} bytes) in header extension at ${hex(at)}`);
        ext.backingFormat = textDecoder.decode(data);
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const t = data[i];
          if (t > 2) continue;
          const nameBytes = data.subarray(i + 2, i + 48);
          const nul = nameBytes.indexOf(0);
          ext.featureNames.push({
            type: FEATURE_TYPES[t],
            bit: data[i + 1],
            name: textDecoder.decode(nul < 0 ? nameBytes : nameBytes.subarray(0, nul)),
          });
        }
        break;
      case EXT_BITMAPS: {
        if (len !== 24) throw corrupt(`Bitmaps header extension at ${hex(at)} has length ${len}, expected 24`);
        const b = view(data);
        ext.bitmaps = {
          nbBitmaps: b.getUint32(0),
          directorySize: getU64(b, 8, "bitmap_directory_size"),
          directoryOffset: getU64(b, 16, "bitmap_directory_offset"),
        };
        if (b.getUint32(4) !== 0) throw corrupt(`Bitmaps header extension at ${hex(at)}: reserved field is not zero`);
        break;
      }
      case EXT_CRYPTO: {
        if (len !== 16)
          throw corrupt(`Full disk encryption header extension at ${hex(at)} has length ${len}, expected 16`);
        const c = view(data);
        ext.crypto = { offset: getU64(c, 0, "crypto header offset"), length: getU64(c, 8, "crypto header length") };
        break;
      }
      case EXT_DATA_FILE:
        if (len > 1023)
          throw corrupt(`External data file name too long (${len} bytes) in header extension at ${hex(at)}`);
        ext.dataFile = textDecoder.decode(data);
        break;
      default:
        ext.unknown.push({ type, data: data.slice() });
    }
    at = dataAt + Math.ceil(len / 8) * 8;
  }
  return ext;
}

/** The backing file name stored in the first cluster, if any. */
export function decodeBackingName(buf: Uint8Array, h: Qcow2Header): string | undefined {
  if (h.backingFileOffset === 0) return undefined;
  return textDecoder.decode(buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
}

/** The feature names QEMU writes into every v3 image's feature-name table. */
export const QEMU_FEATURE_NAMES: FeatureName[] = [
  { type: "incompatible", bit: 0, name: "dirty bit" },
  { type: "incompatible", bit: 1, name: "corrupt bit" },
  { type: "incompatible", bit: 2, name: "external data file" },
  { type: "incompatible", bit: 3, name: "compression type" },
  { type: "incompatible", bit: 4, name: "extended L2 entries" },
  { type: "compatible", bit: 0, name: "lazy refcounts" },
  { type: "autoclear", bit: 0, name: "bitmaps" },
  { type: "autoclear", bit: 1, name: "raw external data" },
];

/**
 * Encodes the header, its extensions and the backing file name into the first cluster.
 * Extensions are written in QEMU's order; unknown ones are kept byte for byte after them.
 */
export function encodeHeader(h: Qcow2Header, ext: HeaderExtensions, backingName: string | undefined): Uint8Array {
  const clusterSize = 2 ** h.clusterBits;
  const buf = new Uint8Array(clusterSize);
  const dv = view(buf);
  dv.setUint32(0, QCOW2_MAGIC);
  dv.setUint32(4, h.version);
  dv.setUint32(20, h.clusterBits);
  setU64(dv, 24, h.size);
  dv.setUint32(32, h.cryptMethod);
  dv.setUint32(36, h.l1Size);
  setU64(dv, 40, h.l1TableOffset);
  setU64(dv, 48, h.refcountTableOffset);
  dv.setUint32(56, h.refcountTableClusters);
  dv.setUint32(60, h.nbSnapshots);
  setU64(dv, 64, h.snapshotsOffset);
  let at = V2_HEADER_LENGTH;
  if (h.version === 3) {
    dv.setBigUint64(72, h.incompatibleFeatures);
    dv.setBigUint64(80, h.compatibleFeatures);
    dv.setBigUint64(88, h.autoclearFeatures);
    dv.setUint32(96, h.refcountOrder);
    const headerLength = Math.max(V3_HEADER_LENGTH_WITH_COMPRESSION, V3_HEADER_LENGTH_WITH_COMPRESSION + h.tail.length);
    dv.setUint32(100, headerLength);
    buf[104] = h.compressionType;
    buf.set(h.tail, V3_HEADER_LENGTH_WITH_COMPRESSION);
    at = headerLength;
  }
  const put = (type: number, data: Uint8Array): void => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (at + 8 + padded + 8 > clusterSize) throw corrupt("Header extensions do not fit in the first cluster");
    dv.setUint32(at, type);
    dv.setUint32(at + 4, data.length);
    buf.set(data, at + 8);
    at += 8 + padded;
  };
  if (ext.backingFormat !== undefined) put(EXT_BACKING_FORMAT, textEncoder.encode(ext.backingFormat));
  if (ext.dataFile !== undefined) put(EXT_DATA_FILE, textEncoder.encode(ext.dataFile));
  if (ext.crypto) {
    const c = new Uint8Array(16);
    setU64(view(c), 0, ext.crypto.offset);
    setU64(view(c), 8, ext.crypto.length);
    put(EXT_CRYPTO, c);
  }
  // The feature-name table is only a help for messages. QEMU (qcow2_update_header) writes it
  // only with clusters larger than 4 KiB, where it always fits beside everything else; with
  // smaller ones it would crowd out the backing file name.
  const padded = (n: number): number => 8 + Math.ceil(n / 8) * 8;
  const after =
    (ext.bitmaps ? padded(24) : 0) +
    ext.unknown.reduce((n, u) => n + padded(u.data.length), 0) +
    8 +
    (backingName !== undefined ? textEncoder.encode(backingName).length : 0);
  const tableFits = at + padded(48 * ext.featureNames.length) + after <= clusterSize;
  if (h.version === 3 && clusterSize > 4096 && ext.featureNames.length > 0 && tableFits) {
    const t = new Uint8Array(48 * ext.featureNames.length);
    ext.featureNames.forEach((f, i) => {
      t[i * 48] = FEATURE_TYPES.indexOf(f.type);
      t[i * 48 + 1] = f.bit;
      t.set(textEncoder.encode(f.name).subarray(0, 46), i * 48 + 2);
    });
    put(EXT_FEATURE_TABLE, t);
  }
  if (ext.bitmaps) {
    const b = new Uint8Array(24);
    const bv = view(b);
    bv.setUint32(0, ext.bitmaps.nbBitmaps);
    setU64(bv, 8, ext.bitmaps.directorySize);
    setU64(bv, 16, ext.bitmaps.directoryOffset);
    put(EXT_BITMAPS, b);
  }
  for (const u of ext.unknown) put(u.type, u.data);
  at += 8; // end-of-extensions marker (zeros)
  if (backingName !== undefined) {
    const name = textEncoder.encode(backingName);
    if (name.length > MAX_BACKING_NAME) throw corrupt(`Backing file name too long: ${name.length} bytes`);
    if (at + name.length > clusterSize) throw corrupt("Backing file name does not fit in the first cluster");
    setU64(dv, 8, at);
    dv.setUint32(16, name.length);
    buf.set(name, at);
  }
  return buf;
}
