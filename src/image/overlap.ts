/**
 * QEMU's metadata overlap check (qcow2_check_metadata_overlap, its "cached" mode): which live
 * metadata, if any, lies in the clusters about to be written. Used by the write path for newly
 * allocated clusters and by check's repairs before they rewrite a table.
 */
import { type Snapshot, snapshotTableSize } from "../format/snapshot.js";

export interface MetadataLayout {
  clusterSize: number;
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  snapshotsOffset: number;
  snapshots: Snapshot[];
  bitmapDirectory?: { directoryOffset: number; directorySize: number };
  /** Offsets of the active L2 tables (0 entries are skipped). */
  l2Tables: ArrayLike<number>;
  /** Offsets of the refcount blocks (0 entries are skipped). */
  refcountBlocks: ArrayLike<number>;
}

/** The kinds in the order overlappingMetadata looks for them: the first one found is named. */
const KIND_ORDER = [
  "qcow2_header",
  "active L1 table",
  "refcount table",
  "snapshot table",
  "inactive L1 table",
  "bitmap directory",
  "active L2 table",
  "refcount block",
];

/**
 * overlappingMetadata through a metadataClusters() table: one lookup per target cluster
 * instead of a pass over every table offset, with the same answer.
 */
export function overlappingIn(clusters: ReadonlyMap<number, string>, targets: Iterable<number>): string | undefined {
  let found: string | undefined;
  for (const c of targets) {
    const kind = clusters.get(c);
    if (kind !== undefined && (found === undefined || KIND_ORDER.indexOf(kind) < KIND_ORDER.indexOf(found))) {
      found = kind;
    }
  }
  return found;
}

/**
 * Every cluster that holds metadata, with its kind (the first one `overlappingMetadata` would
 * name): a lookup table for checking writes into clusters the image already owns.
 */
export function metadataClusters(m: MetadataLayout): Map<number, string> {
  const cs = m.clusterSize;
  const out = new Map<number, string>();
  for (const [offset, length, kind] of metadataRanges(m)) {
    if (length <= 0) continue;
    for (let c = Math.floor(offset / cs); c * cs < offset + length; c++) if (!out.has(c)) out.set(c, kind);
  }
  for (const [offsets, kind] of metadataTables(m)) {
    for (let i = 0; i < offsets.length; i++) {
      const c = Math.floor(offsets[i] / cs);
      if (offsets[i] !== 0 && !out.has(c)) out.set(c, kind);
    }
  }
  return out;
}

function metadataRanges(m: MetadataLayout): [number, number, string][] {
  const ranges: [number, number, string][] = [
    [0, m.clusterSize, "qcow2_header"],
    [m.l1TableOffset, m.l1Size * 8, "active L1 table"],
    [m.refcountTableOffset, m.refcountTableClusters * m.clusterSize, "refcount table"],
  ];
  if (m.snapshots.length > 0) ranges.push([m.snapshotsOffset, snapshotTableSize(m.snapshots), "snapshot table"]);
  for (const sn of m.snapshots) ranges.push([sn.l1TableOffset, sn.l1Size * 8, "inactive L1 table"]);
  if (m.bitmapDirectory) {
    ranges.push([m.bitmapDirectory.directoryOffset, m.bitmapDirectory.directorySize, "bitmap directory"]);
  }
  return ranges;
}

function metadataTables(m: MetadataLayout): [ArrayLike<number>, string][] {
  return [
    [m.l2Tables, "active L2 table"],
    [m.refcountBlocks, "refcount block"],
  ];
}

/**
 * The kind of metadata (in QEMU's words) found in any of the `targets` clusters, other than
 * `ignore` (the kind being rewritten), or undefined.
 */
export function overlappingMetadata(
  m: MetadataLayout,
  targets: ReadonlySet<number>,
  ignore?: string,
): string | undefined {
  const cs = m.clusterSize;
  for (const [offset, length, kind] of metadataRanges(m)) {
    if (length <= 0 || kind === ignore) continue;
    for (const c of targets) if (c * cs < offset + length && (c + 1) * cs > offset) return kind;
  }
  for (const [offsets, kind] of metadataTables(m)) {
    if (kind === ignore) continue;
    for (let i = 0; i < offsets.length; i++) {
      const o = offsets[i];
      if (o !== 0 && targets.has(Math.floor(o / cs))) return kind;
    }
  }
  return undefined;
}
