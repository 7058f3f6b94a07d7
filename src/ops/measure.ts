/**
 * `measure`: how large a new image of a given format and options would be (QEMU's
 * qcow2_measure and raw_measure): the size it needs for a source's data, the size when fully
 * allocated, and (qcow2 v3 from a qcow2 v3 source) the space the source's persistent bitmaps
 * would take. Sizes may exceed 2^53 (`--size 2E`), so the arithmetic is done in BigInt.
 */
import { invalidArgument } from "../errors.js";
import { AUTOCLEAR_BITMAPS, MAX_L1_BYTES } from "../format/header.js";
import type { BlockDevice } from "../image/block-device.js";
import { Qcow2Image } from "../image/qcow2.js";
import { checkClusterSize, checkRefcountBits } from "./create.js";

const PREALLOCATION_MODES = ["off", "metadata", "falloc", "full"];

export interface MeasureOptions {
  format: "raw" | "qcow2";
  /** The virtual size to measure for when there is no source (bytes). */
  size?: bigint;
  clusterSize?: number;
  /** "0.10" (v2) or "1.1" (v3, the default), as the `compat` option spells it. */
  compat?: string;
  refcountBits?: number;
  extendedL2?: boolean;
  /** off, metadata, falloc or full (a string: qemu-img checks it only when measuring). */
  preallocation?: string;
  /** The new image would have a backing file: every source cluster then counts as data. */
  backingFile?: boolean;
}

export interface MeasureInfo {
  required: bigint;
  fullyAllocated: bigint;
  /** Only when both source and target can hold persistent bitmaps. */
  bitmaps?: bigint;
}

const divUp = (a: bigint, b: bigint): bigint => (a + b - 1n) / b;
const roundUp = (a: bigint, b: bigint): bigint => divUp(a, b) * b;

/**
 * Measures a new image of `opts` holding the guest contents of `source` (or, without one, of
 * `opts.size` bytes). Refuses invalid options with qemu-img's messages, in its order.
 */
export async function measure(opts: MeasureOptions, source?: BlockDevice): Promise<MeasureInfo> {
  if (opts.format === "raw") {
    // Unallocated sectors count towards the size of a raw file: both figures are the disk size.
    const required = source ? BigInt(source.size) : roundUp(opts.size ?? 0n, 512n);
    return { required, fullyAllocated: required };
  }
  const extendedL2 = opts.extendedL2 ?? false;
  const clusterSize = opts.clusterSize ?? 65536;
  checkClusterSize(clusterSize);
  if (extendedL2 && clusterSize < 16384)
    throw invalidArgument("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  const version = opts.compat === undefined || opts.compat === "1.1" ? 3 : opts.compat === "0.10" ? 2 : undefined;
  if (version === undefined) throw invalidArgument(`Invalid compatibility level: '${opts.compat}'`);
  const refcountBits = opts.refcountBits ?? 16;
  checkRefcountBits(refcountBits);
  if (version < 3 && refcountBits !== 16) {
    throw invalidArgument(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
    );
  }
  const preallocation = opts.preallocation ?? "off";
  if (!PREALLOCATION_MODES.includes(preallocation)) throw invalidArgument(`invalid parameter value: ${preallocation}`);
  const cs = BigInt(clusterSize);
  const l2EntryBytes = extendedL2 ? 16n : 8n;
  let virtualSize = roundUp(opts.size ?? 0n, cs);
  const l2Tables = divUp(virtualSize / cs, cs / l2EntryBytes);
  if (l2Tables * 8n > BigInt(MAX_L1_BYTES))
    throw invalidArgument("The image size is too large (try using a larger cluster size)");

  let required = 0n;
  if (source) {
    virtualSize = roundUp(BigInt(source.size), cs);
    // With a backing file nothing is known of what it shares with the source: count it all.
    required = opts.backingFile ? virtualSize : BigInt(await allocatedBytes(source, clusterSize));
  }
  if (preallocation === "full" || preallocation === "falloc") required = virtualSize;

  const fullyAllocated = qcow2PreallocSize(virtualSize, cs, Math.log2(refcountBits), extendedL2);
  // Metadata is counted as for a fully allocated image (an overestimate); data as needed.
  const info: MeasureInfo = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  if (version >= 3 && source && supportsBitmaps(source)) info.bitmaps = bitmapsSize(source, clusterSize);
  return info;
}

/**
 * Bytes of whole target clusters that hold data (QEMU's loop over bdrv_block_status_above):
 * zero runs are skipped; a data run counts from the start of its first cluster to the end of
 * its last, and the walk resumes there.
 */
async function allocatedBytes(source: BlockDevice, clusterSize: number): Promise<number> {
  let required = 0;
  let offset = 0;
  for await (const e of source.blockStatus(0, source.size)) {
    const end = e.start + e.length;
    if (end <= offset) continue;
    const start = Math.max(offset, e.start);
    if (e.zero || !(e.data && e.present)) {
      offset = end;
      continue;
    }
    const stop = Math.ceil(end / clusterSize) * clusterSize;
    required += (start % clusterSize) + (stop - start);
    offset = stop;
  }
  return required;
}

/** bdrv_supports_persistent_dirty_bitmap: a qcow2 v3 source. */
function supportsBitmaps(source: BlockDevice): source is Qcow2Image {
  return source instanceof Qcow2Image && source.header.version === 3;
}

/** QEMU's qcow2_get_persistent_dirty_bitmap_size: every bitmap as if fully allocated. */
function bitmapsSize(source: Qcow2Image, clusterSize: number): bigint {
  const cs = BigInt(clusterSize);
  // Bitmaps of an image whose autoclear bit is clear are ignored, as QEMU ignores them.
  const list = source.header.autoclearFeatures & AUTOCLEAR_BITMAPS ? source.bitmaps : [];
  let total = 0n;
  let directory = 0n;
  const size = BigInt(source.size);
  for (const b of list) {
    const bits = divUp(size, 1n << BigInt(b.granularityBits));
    const clusters = divUp(divUp(bits, 8n), cs);
    total += clusters * cs + roundUp(clusters * 8n, cs);
    directory += roundUp(24n + BigInt(new TextEncoder().encode(b.name).length), 8n);
  }
  return total + roundUp(directory, cs);
}

/** QEMU's qcow2_calc_prealloc_size: header, L2 and L1 tables, refcounts, and the data. */
export function qcow2PreallocSize(size: bigint, cs: bigint, refcountOrder: number, extendedL2: boolean): bigint {
  const l2EntryBytes = extendedL2 ? 16n : 8n;
  const aligned = roundUp(size, cs);
  let meta = cs;
  const l2Entries = roundUp(aligned / cs, cs / l2EntryBytes);
  meta += l2Entries * l2EntryBytes;
  const l1Entries = roundUp((l2Entries * l2EntryBytes) / cs, cs / 8n);
  meta += l1Entries * 8n;
  meta += refcountMetadataSize((meta + aligned) / cs, cs, refcountOrder);
  return meta + aligned;
}

/** QEMU's qcow2_refcount_metadata_size: refcount blocks and table that also count themselves. */
function refcountMetadataSize(clusters: bigint, cs: bigint, refcountOrder: number): bigint {
  const perTableCluster = cs / 8n;
  const perBlock = (cs * 8n) / (1n << BigInt(refcountOrder));
  let table = 0n;
  let blocks = 0n;
  let n = 0n;
  let last: bigint;
  do {
    last = n;
    blocks = divUp(clusters + table + blocks, perBlock);
    table = divUp(blocks, perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * cs;
}
