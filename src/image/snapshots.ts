/**
 * Internal snapshots (docs/interop/qcow2.rst, "Snapshots"): creating, applying and deleting them,
 * with refcounts and COPIED flags kept exact, as QEMU's block/qcow2-snapshot.c does.
 *
 * A snapshot is a copy of the active L1 table plus an entry in the snapshot table. Every L2
 * table and host cluster holds one reference per L1 table that reaches it (through any L2
 * table), which is what `qemu-img check` counts; an entry has COPIED set exactly when its
 * refcount is 1, i.e. when it may be written in place.
 *
 * Crash safety (invariant 3): new structures (an L1 copy, a snapshot table, a new active L1) and
 * the refcount increments they need are durable before the header write that makes them live;
 * the decrements of what the old state referenced come after it. The header fields that switch
 * (nb_snapshots and snapshots_offset; l1_table_offset, l1_size and size) lie in its first
 * sector, so the switch is one atomic write. A crash leaks clusters at worst; as with QEMU, a
 * crash between a refcount change and the COPIED flags that follow it can leave flags that
 * `qemu-img check` reports (and `-r all` corrects), but never COPIED on a cluster that is really
 * shared. Unlike QEMU, applying a snapshot builds the new active L1 table in new clusters instead
 * of overwriting the old one in place, so no crash can leave an active L1 entry with COPIED set
 * on a table the snapshot still shares.
 *
 * Memory stays bounded: L1 tables are held whole (QEMU caps them at 32 MiB), L2 tables go through
 * the image's cache and dirty ones are written back whenever the cache fills.
 */
import { hex, QcowError } from "../errors.js";
import { view } from "../format/bytes.js";
import { AUTOCLEAR_BITMAPS, INCOMPAT_DATA_FILE, MAX_REFTABLE_BYTES } from "../format/header.js";
import {
  encodeSnapshotTable,
  MAX_SNAPSHOT_TABLE_BYTES,
  type Snapshot,
  snapshotsRewritten,
  snapshotTableSize,
} from "../format/snapshot.js";
import { ClusterType, decodeL1Entry, encodeL1Entry, maxRefcount, OFLAG_COPIED_HI } from "../format/tables.js";
import { readFull } from "../io/storage.js";
import type { Qcow2Image } from "./qcow2.js";
import type { MetadataAccess, Qcow2Writer } from "./qcow2-write.js";

/** QEMU's limits (block/qcow2.h): snapshots per image, bytes of an L1 table. */
export const MAX_SNAPSHOTS = 65536;
const MAX_L1_BYTES = 32 * 1024 * 1024;

/**
 * A refusal, with the errno QEMU returns for it (qemu-img prints some as `-errno (strerror)`).
 */
/** Loading a snapshot to read it failed (qemu-img's "Failed to load snapshot: ..."). */
export class SnapshotLoadError extends QcowError {
  constructor(e: QcowError) {
    super(e.code, `Failed to load snapshot: ${e.message}`, { cause: e });
  }
}

export class SnapshotError extends QcowError {
  constructor(
    code: QcowError["code"],
    message: string,
    readonly errno: number,
  ) {
    super(code, message);
    this.name = "SnapshotError";
  }
}

/**
 * Which snapshot: a string is looked up by id, then by name (QEMU's find_snapshot_by_id_or_name,
 * as `qemu-img snapshot -a` does); an object matches the fields it gives (both when it gives both).
 */
export type SnapshotRef = string | { id?: string; name?: string };

export function lookupSnapshot(snapshots: readonly Snapshot[], ref: SnapshotRef): number {
  if (typeof ref === "string") {
    const byId = snapshots.findIndex((s) => s.id === ref);
    return byId >= 0 ? byId : snapshots.findIndex((s) => s.name === ref);
  }
  if (ref.id === undefined && ref.name === undefined) return -1;
  return snapshots.findIndex(
    (s) => (ref.id === undefined || s.id === ref.id) && (ref.name === undefined || s.name === ref.name),
  );
}

/** QEMU's find_new_snapshot_id: one more than the largest id read as a number (strtoul). */
export function nextSnapshotId(snapshots: readonly Snapshot[]): string {
  let max = 0;
  for (const s of snapshots) {
    const m = /^\s*\+?(\d+)/.exec(s.id);
    if (m) max = Math.max(max, Number(m[1]));
  }
  return String(max + 1);
}

export interface CreateSnapshotOptions {
  /** Default: the next free numeric id, as QEMU picks it. */
  id?: string;
  /** Default: now (date_nsec with microsecond precision, as qemu-img writes it). */
  dateSec?: number;
  dateNsec?: number;
  /** Guest clock in nanoseconds (qemu-img writes 0). */
  vmClockNsec?: number;
  /** Instruction count (qemu-img writes 0; -1 means icount was off). */
  icount?: bigint;
}

/**
 * Creates an internal snapshot of the active layer (QEMU's qcow2_snapshot_create, without VM
 * state): a copy of the active L1 table, one more reference to everything it reaches, and a new
 * snapshot table entry. Returns the entry.
 */
export async function createSnapshot(
  img: Qcow2Image,
  name: string,
  opts: CreateSnapshotOptions = {},
): Promise<Snapshot> {
  const w = writerOf(img);
  if (img.snapshots.length >= MAX_SNAPSHOTS) {
    throw new SnapshotError("unsupported", `Too many snapshots (at most ${MAX_SNAPSHOTS})`, 27);
  }
  const now = Math.floor((performance.timeOrigin + performance.now()) * 1000); // microseconds
  const sn: Snapshot = {
    l1TableOffset: 0,
    l1Size: img.l1.length,
    id: opts.id ?? nextSnapshotId(img.snapshots),
    name,
    dateSec: opts.dateSec ?? Math.floor(now / 1e6),
    dateNsec: opts.dateNsec ?? (now % 1e6) * 1000,
    vmClockNsec: opts.vmClockNsec ?? 0,
    vmStateSize: 0,
    diskSize: img.size,
    icount: opts.icount ?? 0n,
    // vm_state_size_large, disk_size and icount, as QEMU 7.2 writes them for v2 and v3 alike.
    extra: new Uint8Array(24),
  };
  if (img.snapshots.some((s) => s.id === sn.id)) {
    throw new SnapshotError("invalid-argument", `A snapshot with id '${sn.id}' exists already`, 17);
  }
  encodeTable(img, [...img.snapshots, sn]); // refuses a table grown too large before anything is written
  return w.exclusive(async (m) => {
    const cs = img.clusterSize;
    // The snapshot's L1 table: the active one as it is (COPIED flags included, as QEMU copies it).
    if (sn.l1Size > 0) {
      sn.l1TableOffset = await allocate(m, clustersFor(sn.l1Size * 8, cs));
      await img.storage.write(encodeL1(img.l1, img.l1Copied), sn.l1TableOffset);
    }
    // Every active COPIED flag goes, durably, before any refcount rises: a crash in between
    // leaves clusters of refcount 1 without the flag, which costs one copy on the next write
    // (qemu-img check reports it, -r all clears it). The other order could leave a shared
    // cluster flagged as the active layer's own, to be overwritten in place.
    let switched = false;
    let raised = false;
    try {
      await clearActiveCopied(img, m);
      await m.writeBack();
      // One more reference to everything the active layer reaches, durable before the table.
      // A walk that fails part-way undoes its own increments.
      await updateReferences(img, m, img.l1, 1);
      raised = true;
      await m.writeBack();
      const snapshots = [...img.snapshots, sn];
      await switchSnapshotTable(img, w, m, snapshots, encodeTable(img, snapshots), () => {
        switched = true;
        img.snapshots.push(sn);
      });
    } catch (e) {
      // Not created: the references and flags go back to what they were (as far as the disk
      // lets us; what it refuses stays a leak or a harmless missing COPIED flag). The flags go
      // back too when the failure came before any reference rose: a write that failed in the
      // write-back after clearing them leaves them cleared in memory otherwise.
      if (!switched) await restoreActive(img, m, sn, raised);
      throw e;
    }
    return sn;
  });
}

/** Undoes a snapshot creation that failed before its table was switched (best effort). */
async function restoreActive(img: Qcow2Image, m: MetadataAccess, sn: Snapshot, raised: boolean): Promise<void> {
  try {
    // Only a completed walk's increments are dropped here: one that failed part-way undid its own.
    if (raised) await updateReferences(img, m, img.l1, -1);
    setActiveCopied(img, m, await updateReferences(img, m, img.l1, 0));
    if (sn.l1Size > 0) await freeRange(m, sn.l1TableOffset, sn.l1Size * 8, img.clusterSize);
    await m.writeBack();
  } catch {
    // The original error is what the caller hears about.
  }
}

/**
 * Makes a snapshot's contents the active layer (QEMU's qcow2_snapshot_goto): the active L1 table
 * becomes a copy of the snapshot's, and the disk size the snapshot's. Returns the snapshot.
 */
export async function applySnapshot(img: Qcow2Image, ref: SnapshotRef): Promise<Snapshot> {
  const w = writerOf(img);
  const index = lookupSnapshot(img.snapshots, ref);
  if (index < 0) throw notFound(ref);
  const sn = img.snapshots[index];
  if (img.bitmaps.length > 0 && img.header.autoclearFeatures & AUTOCLEAR_BITMAPS) {
    // QEMU loads persistent bitmaps as dirty bitmaps of the device, and refuses then.
    throw new SnapshotError("invalid-argument", "Device has active dirty bitmaps", 16);
  }
  return w.exclusive(async (m) => {
    const cs = img.clusterSize;
    const h = img.header;
    const snL1 = await readSnapshotL1(img, sn);
    // As QEMU reads a snapshot without a disk size: the current one.
    const size = sn.diskSize ?? img.size;
    const coverage = cs * img.l2Entries;
    const l1Size = Math.max(img.l1.length, sn.l1Size, Math.ceil(size / coverage));
    if (l1Size * 8 > MAX_L1_BYTES) throw new SnapshotError("unsupported", `L1 table too large: ${l1Size} entries`, 27);
    const l1 = new Float64Array(l1Size);
    l1.set(snL1);
    // The snapshot's tables and clusters gain the active layer's reference (so none can be
    // written in place any more: every COPIED flag comes out clear).
    const copied = await updateReferences(img, m, l1, 1);
    const l1Offset = l1Size > 0 ? await allocate(m, clustersFor(l1Size * 8, cs)) : 0;
    if (l1Size > 0) await img.storage.write(encodeL1(l1, copied), l1Offset);
    await m.writeBack();
    const old = { l1: img.l1, offset: h.l1TableOffset, size: h.l1Size };
    h.l1TableOffset = l1Offset;
    h.l1Size = l1Size;
    h.size = size;
    await w.writeHeader();
    img.l1 = l1;
    img.l1Copied = copied;
    img.size = Math.floor(size / 512) * 512;
    // What the old active layer referenced loses that reference; its L1 table is freed.
    await updateReferences(img, m, old.l1, -1);
    await freeRange(m, old.offset, old.size * 8, cs);
    await m.writeBack();
    return sn;
  });
}

/**
 * Deletes a snapshot (QEMU's qcow2_snapshot_delete): a new snapshot table without its entry, then
 * one reference less for everything its L1 table reaches, its L1 table freed, and COPIED set
 * again on active entries whose refcount came back to 1. Returns the deleted entry.
 */
export async function deleteSnapshot(img: Qcow2Image, ref: SnapshotRef): Promise<Snapshot> {
  const w = writerOf(img);
  const index = lookupSnapshot(img.snapshots, ref);
  if (index < 0) throw notFound(ref);
  const sn = img.snapshots[index];
  const rest = img.snapshots.filter((_, i) => i !== index);
  const table = encodeTable(img, rest);
  return w.exclusive(async (m) => {
    const cs = img.clusterSize;
    const snL1 = await readSnapshotL1(img, sn);
    await switchSnapshotTable(img, w, m, rest, table, () => img.snapshots.splice(index, 1));
    // The entry is gone on disk: from here a failure only leaks clusters. COPIED flags are set
    // again where refcounts came back to 1, after the decrements (write-back puts refcounts
    // first): a crash in between leaves flags missing, never one too many.
    try {
      await updateReferences(img, m, snL1, -1);
      await freeRange(m, sn.l1TableOffset, sn.l1Size * 8, cs);
    } finally {
      setActiveCopied(img, m, await updateReferences(img, m, img.l1, 0));
      await m.writeBack();
    }
    return sn;
  });
}

// ---- helpers -----------------------------------------------------------------------------

function writerOf(img: Qcow2Image): Qcow2Writer {
  if (!img.writer) throw new QcowError("read-only", `${img.filename} is open read-only`);
  if (img.header.incompatibleFeatures & INCOMPAT_DATA_FILE) {
    // QEMU refuses too (-ENOTSUP): guest clusters in a data file are not refcounted.
    throw new SnapshotError("unsupported", "Internal snapshots are not supported with an external data file", 95);
  }
  return img.writer;
}

function notFound(ref: SnapshotRef): SnapshotError {
  const what = typeof ref === "string" ? ref : (ref.name ?? ref.id);
  return new SnapshotError("not-found", `Can't find snapshot '${what}'`, 2);
}

function clustersFor(bytes: number, cs: number): number {
  return Math.ceil(bytes / cs);
}

function encodeTable(img: Qcow2Image, snapshots: Snapshot[]): Uint8Array {
  const table = encodeSnapshotTable(snapshots, img.size);
  if (table.length > MAX_SNAPSHOT_TABLE_BYTES) {
    throw new SnapshotError("unsupported", `Snapshot table too large: ${table.length} bytes`, 27);
  }
  return table;
}

/** `n` contiguous new clusters (refcount 1 each, not yet durable). */
async function allocate(m: MetadataAccess, n: number): Promise<number> {
  return m.refcounts.allocateArea(n, m.tableMoved);
}

/** One reference less for every cluster [offset, offset+bytes) touches (a freed table). */
async function freeRange(m: MetadataAccess, offset: number, bytes: number, cs: number): Promise<void> {
  if (bytes <= 0) return;
  for (let c = Math.floor(offset / cs); c < Math.ceil((offset + bytes) / cs); c++) {
    await m.refcounts.update(c, -1, m.tableMoved);
  }
}

function encodeL1(l1: Float64Array, copied: Uint8Array): Uint8Array {
  const buf = new Uint8Array(l1.length * 8);
  const dv = view(buf);
  for (let i = 0; i < l1.length; i++) {
    if (l1[i] === 0) continue;
    const [hi, lo] = encodeL1Entry({ l2Offset: l1[i], copied: copied[i] === 1 });
    dv.setUint32(i * 8, hi);
    dv.setUint32(i * 8 + 4, lo);
  }
  return buf;
}

/**
 * Refuses a snapshot's L1 table as QEMU's qcow2_validate_table does (an error, not a corrupt
 * image): too large (EFBIG), or an offset off a cluster boundary (EINVAL). QEMU's words first.
 */
export function validateSnapshotL1(sn: Snapshot, clusterSize: number): void {
  if (sn.l1Size * 8 > MAX_L1_BYTES) {
    throw new SnapshotError(
      "invalid-argument",
      `Snapshot L1 table too large: ${sn.l1Size} entries (snapshot ${sn.id})`,
      27,
    );
  }
  if (sn.l1Size > 0 && sn.l1TableOffset % clusterSize !== 0) {
    throw new SnapshotError(
      "invalid-argument",
      `Snapshot L1 table offset invalid: ${hex(sn.l1TableOffset)} (snapshot ${sn.id})`,
      22,
    );
  }
}

async function readSnapshotL1(img: Qcow2Image, sn: Snapshot): Promise<Float64Array> {
  const cs = img.clusterSize;
  validateSnapshotL1(sn, cs);
  const buf = new Uint8Array(sn.l1Size * 8);
  if (buf.length > 0) await readFull(img.storage, buf, sn.l1TableOffset);
  const dv = view(buf);
  const l1 = new Float64Array(sn.l1Size);
  for (let i = 0; i < sn.l1Size; i++)
    l1[i] = decodeL1Entry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), cs, i).l2Offset;
  return l1;
}

/** Clears every COPIED flag of the active layer in memory (L1 entries and L2 entries). */
async function clearActiveCopied(img: Qcow2Image, m: MetadataAccess): Promise<void> {
  for (let i = 0; i < img.l1.length; i++) {
    const l2Offset = img.l1[i];
    if (l2Offset === 0) continue;
    const table = await img.loadL2(l2Offset);
    let dirty = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const at = j * img.l2EntryBytes;
      const hi = table.getUint32(at);
      if (hi & OFLAG_COPIED_HI) {
        table.setUint32(at, (hi & ~OFLAG_COPIED_HI) >>> 0);
        dirty = true;
      }
    }
    if (dirty) img.l2Cache.markDirty(l2Offset, table);
    if (img.l1Copied[i]) {
      img.l1Copied[i] = 0;
      m.markL1Dirty(i);
    }
    if (img.l2Cache.overBudget) await m.writeBack();
  }
}

/** New COPIED flags for the active L1 entries, marked for write-back where they changed. */
function setActiveCopied(img: Qcow2Image, m: MetadataAccess, copied: Uint8Array): void {
  for (let i = 0; i < copied.length; i++) {
    if (img.l1[i] !== 0 && img.l1Copied[i] !== copied[i]) {
      img.l1Copied[i] = copied[i];
      m.markL1Dirty(i);
    }
  }
}

/**
 * QEMU's qcow2_update_snapshot_refcount: adds `addend` (1, -1 or 0) to the refcount of every L2
 * table of `l1` and of every host cluster those tables reference (compressed data: every cluster
 * its bytes touch), and sets each standard entry's COPIED flag to "refcount is now 1". Returns
 * the COPIED flags the L1 entries should have. A table whose refcount drops to 0 is freed: its
 * entries are left as they are and it leaves the cache, so it is never written back.
 *
 * A refcount that would overflow its width (1-bit refcounts hold no second reference) stops the
 * walk: the increments made so far are undone and the error (EINVAL, as QEMU's) is thrown.
 *
 * Changed refcount blocks and tables stay in the caches, written back (refcounts first) whenever
 * they fill: partial increments or decrements on disk are leaks and harmless COPIED states only.
 */
async function updateReferences(
  img: Qcow2Image,
  m: MetadataAccess,
  l1: Float64Array,
  addend: number,
): Promise<Uint8Array> {
  const done = { changes: 0 };
  try {
    return await walkReferences(img, m, l1, addend, done, Number.POSITIVE_INFINITY);
  } catch (e) {
    if (addend > 0 && done.changes > 0) {
      // Same walk, same order: undo exactly the changes that were made (whatever stopped the
      // walk: a refused refcount or an I/O error). If the undo fails too, what it leaves is a leak.
      await walkReferences(img, m, l1, -addend, { changes: 0 }, done.changes).catch(() => {});
    }
    throw e;
  }
}

async function walkReferences(
  img: Qcow2Image,
  m: MetadataAccess,
  l1: Float64Array,
  addend: number,
  done: { changes: number },
  limit: number,
): Promise<Uint8Array> {
  const cs = img.clusterSize;
  const rc = m.refcounts;
  const max = maxRefcount(rc.order);
  const copied = new Uint8Array(l1.length);
  const change = async (cluster: number): Promise<number> => {
    if (addend === 0) return rc.get(cluster);
    if (addend > 0 && !rc.covered(cluster)) {
      // A cluster in use has a refcount block: this reference points outside the refcount
      // structure (e.g. beyond the end of the file). QEMU refuses too: with EFBIG past what any
      // refcount table can cover, else EAGAIN (it would need a new refcount block).
      const beyondAnyTable = cluster >= (MAX_REFTABLE_BYTES / 8) * rc.blockEntries;
      throw new SnapshotError(
        "corrupt",
        `Cluster ${hex(cluster * cs)} is referenced but no refcount block covers it`,
        beyondAnyTable ? 27 : 11,
      );
    }
    if (addend > 0 && (await rc.get(cluster)) + addend > max) {
      throw new SnapshotError(
        "invalid-argument",
        `Refcount of cluster ${hex(cluster * cs)} would exceed ${max} (refcount_bits=${2 ** rc.order})`,
        22,
      );
    }
    const value = await rc.update(cluster, addend, m.tableMoved);
    done.changes++;
    return value;
  };
  for (let i = 0; i < l1.length && done.changes < limit; i++) {
    const l2Offset = l1[i];
    if (l2Offset === 0) continue;
    const freeing = addend < 0 && (await rc.get(l2Offset / cs)) === 1;
    const table = await img.loadL2(l2Offset);
    let dirty = false;
    for (let j = 0; j < img.l2Entries && done.changes < limit; j++) {
      const e = img.decodeAt(table, j, l2Offset);
      let refcount = 0;
      if (e.type === ClusterType.Compressed) {
        if (addend !== 0) {
          const first = Math.floor(e.hostOffset / 512) * 512;
          const end = first + Math.ceil(((e.hostOffset % 512) + e.compressedSize) / 512) * 512;
          for (let c = Math.floor(first / cs); c < Math.ceil(end / cs) && done.changes < limit; c++) await change(c);
        }
        continue; // never COPIED: compressed clusters are not written in place
      }
      if ((e.type === ClusterType.Normal || e.type === ClusterType.ZeroAlloc) && e.hostOffset !== 0) {
        refcount = await change(e.hostOffset / cs);
      }
      if (!freeing && e.copied !== (refcount === 1)) {
        const at = j * img.l2EntryBytes;
        const hi = table.getUint32(at);
        table.setUint32(at, (refcount === 1 ? hi | OFLAG_COPIED_HI : hi & ~OFLAG_COPIED_HI) >>> 0);
        dirty = true;
      }
    }
    if (dirty) img.l2Cache.markDirty(l2Offset, table);
    if (done.changes >= limit) break;
    const tableRefcount = await change(l2Offset / cs);
    copied[i] = tableRefcount === 1 ? 1 : 0;
    if (tableRefcount === 0) img.l2Cache.delete(l2Offset);
    if (img.l2Cache.overBudget || rc.overBudget) await m.writeBack();
  }
  return copied;
}

/**
 * Writes a new snapshot table in new clusters (durable with its refcounts), points the header at
 * it, and frees the old one (QEMU's qcow2_write_snapshots). No snapshots: offset 0, as QEMU.
 */
async function switchSnapshotTable(
  img: Qcow2Image,
  w: Qcow2Writer,
  m: MetadataAccess,
  snapshots: Snapshot[],
  table: Uint8Array,
  switched: () => void,
): Promise<void> {
  const cs = img.clusterSize;
  const h = img.header;
  const old = { offset: h.snapshotsOffset, bytes: h.nbSnapshots > 0 ? snapshotTableSize(img.snapshots) : 0 };
  let offset = 0;
  if (snapshots.length > 0) {
    offset = await allocate(m, clustersFor(Math.max(table.length, 1), cs));
    await img.storage.write(table, offset);
  }
  await m.writeBack();
  h.nbSnapshots = snapshots.length;
  h.snapshotsOffset = offset;
  await w.writeHeader();
  switched();
  snapshotsRewritten(snapshots);
  await freeRange(m, old.offset, old.bytes, cs);
  await m.writeBack();
}
