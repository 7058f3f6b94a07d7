/**
 * `create`: a new qcow2 image with qemu-img's options and qemu-img's refusals, laid out as
 * QEMU lays it out: header, refcount table, refcount block(s), L1 table.
 */
import { invalidArgument } from "../errors.js";
import { setU64, view } from "../format/bytes.js";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  encodeHeader,
  type HeaderExtensions,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  type Qcow2Header,
  QEMU_FEATURE_NAMES,
} from "../format/header.js";
import { setRefcount } from "../format/tables.js";
import type { Storage } from "../io/storage.js";

export type Preallocation = "off" | "metadata" | "falloc" | "full";

export interface Qcow2CreateOptions {
  size: number;
  /** 2 (compat=0.10) or 3 (compat=1.1, the default). */
  version?: 2 | 3;
  clusterSize?: number;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  compressionType?: "zlib" | "zstd";
  extendedL2?: boolean;
  preallocation?: Preallocation;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw?: boolean;
}

const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/** qemu-img's check of cluster_size, with its message. */
export function checkClusterSize(clusterSize: number): void {
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw invalidArgument("Cluster size must be a power of two between 512 and 2048k");
  }
}

/** qemu-img's check of refcount_bits, with its message. */
export function checkRefcountBits(refcountBits: number): void {
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) {
    throw invalidArgument("Refcount width must be a power of two and may not exceed 64 bits");
  }
}

/** qemu-img's checks, with its messages. Returns the options with defaults filled in. */
export function validateCreateOptions(
  o: Qcow2CreateOptions,
): Required<Omit<Qcow2CreateOptions, "backingFile" | "backingFormat" | "dataFile">> & Qcow2CreateOptions {
  const version = o.version ?? 3;
  const clusterSize = o.clusterSize ?? 65536;
  const extendedL2 = o.extendedL2 ?? false;
  const refcountBits = o.refcountBits ?? 16;
  const v3 = "(use version=v3 or greater)";
  checkClusterSize(clusterSize);
  if (extendedL2 && version < 3)
    throw invalidArgument(`Extended L2 entries are only supported with compatibility level 1.1 and above ${v3}`);
  if (extendedL2 && clusterSize < 16384)
    throw invalidArgument("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  if (o.backingFile !== undefined && (o.preallocation ?? "off") !== "off" && !extendedL2) {
    throw invalidArgument("Backing file and preallocation can only be used at the same time if extended_l2 is on");
  }
  if (o.backingFormat !== undefined && o.backingFile === undefined)
    throw invalidArgument("Backing format cannot be used without backing file");
  if (o.lazyRefcounts && version < 3)
    throw invalidArgument(`Lazy refcounts only supported with compatibility level 1.1 and above ${v3}`);
  checkRefcountBits(refcountBits);
  if (version < 3 && refcountBits !== 16) {
    throw invalidArgument(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${v3}`);
  }
  if (o.dataFileRaw && o.dataFile === undefined) throw invalidArgument("data-file-raw requires data-file");
  if (o.dataFileRaw && o.backingFile !== undefined)
    throw invalidArgument("Backing file and data-file-raw cannot be used at the same time");
  if (o.dataFile !== undefined && version < 3) {
    throw invalidArgument(`External data files are only supported with compatibility level 1.1 and above ${v3}`);
  }
  if (o.compressionType === "zstd" && version < 3) {
    throw invalidArgument(`Non-zlib compression type is only supported with compatibility level 1.1 and above ${v3}`);
  }
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw invalidArgument(`Invalid image size ${o.size}`);
  // A raw data file must read like the image: map every cluster 1:1 from the start.
  const preallocation = o.preallocation ?? (o.dataFileRaw ? "metadata" : "off");
  return {
    ...o,
    version,
    clusterSize,
    refcountBits,
    lazyRefcounts: o.lazyRefcounts ?? false,
    compressionType: o.compressionType ?? "zlib",
    extendedL2,
    preallocation,
    dataFileRaw: o.dataFileRaw ?? false,
  };
}

/**
 * Writes an empty qcow2 image into `storage` (which should be empty): every guest cluster
 * unallocated. Preallocation is done afterwards by the engine (Qcow2Writer.preallocate).
 */
export async function writeEmptyQcow2(storage: Storage, opts: Qcow2CreateOptions): Promise<void> {
  const o = validateCreateOptions(opts);
  const cs = o.clusterSize;
  const clusterBits = Math.log2(cs);
  const refcountOrder = Math.log2(o.refcountBits);
  const l2Entries = cs / (o.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(o.size / cs / l2Entries);
  if (l1Size * 8 > MAX_L1_BYTES)
    throw invalidArgument("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  // Find refcount table and block counts that cover every metadata cluster, themselves included.
  const blockEntries = (cs * 8) / o.refcountBits;
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(total / blockEntries);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  const total = 1 + tableClusters + blocks + l1Clusters;
  let incompat = 0n;
  if (o.compressionType === "zstd") incompat |= INCOMPAT_COMPRESSION;
  if (o.extendedL2) incompat |= INCOMPAT_EXTL2;
  if (o.dataFile !== undefined) incompat |= INCOMPAT_DATA_FILE;
  const h: Qcow2Header = {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size: o.size,
    cryptMethod: 0,
    l1Size,
    // An empty image has no L1 table, and QEMU then leaves the offset 0.
    l1TableOffset: l1Size === 0 ? 0 : (1 + tableClusters + blocks) * cs,
    refcountTableOffset: cs,
    refcountTableClusters: tableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: o.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder,
    headerLength: o.version === 3 ? 112 : 72,
    compressionType: o.compressionType === "zstd" ? COMPRESSION_ZSTD : COMPRESSION_DEFLATE,
    tail: new Uint8Array(0),
  };
  const ext: HeaderExtensions = {
    featureNames: o.version === 3 ? QEMU_FEATURE_NAMES : [],
    unknown: [],
  };
  if (o.backingFormat !== undefined) ext.backingFormat = o.backingFormat;
  if (o.dataFile !== undefined) ext.dataFile = o.dataFile;
  const image = new Uint8Array(total * cs);
  image.set(encodeHeader(h, ext, o.backingFile), 0);
  const table = view(image.subarray(cs, (1 + tableClusters) * cs));
  for (let b = 0; b < blocks; b++) {
    const offset = (1 + tableClusters + b) * cs;
    setU64(table, b * 8, offset);
    const block = view(image.subarray(offset, offset + cs));
    for (let i = 0; i < blockEntries; i++) {
      const cluster = b * blockEntries + i;
      if (cluster < total) setRefcount(block, i, refcountOrder, 1);
    }
  }
  // The file ends with the L1 table's last entry, as qemu-img's does (the rest of its cluster
  // is counted, and reads as zeros).
  await storage.write(image.subarray(0, (1 + tableClusters + blocks) * cs + l1Size * 8), 0);
  await storage.flush();
}
