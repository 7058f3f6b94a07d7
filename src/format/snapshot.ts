/** The internal snapshot table (docs/interop/qcow2.rst, "Snapshots"). */
import { corrupt, hex, invalidArgument, type QcowError, truncated } from "../errors.js";
import { concatBytes, getU64, setU64, textDecoder, textEncoder, view } from "./bytes.js";

/** QEMU's limits (block/qcow2.h): extra data per entry, and the whole table. */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
/** The fixed part of an entry, and the largest entry (most extra data, longest ID and name, padding). */
export const SNAPSHOT_ENTRY_FIXED = 40;
export const SNAPSHOT_ENTRY_MAX = SNAPSHOT_ENTRY_FIXED + MAX_SNAPSHOT_EXTRA_DATA + 2 * 0xffff + 7;
const ENTRY_FIXED = SNAPSHOT_ENTRY_FIXED;
/** Extra data QEMU knows: vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA_DATA = 24;

export interface Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  /** Guest run time in nanoseconds (u64; exact below 2^53 ns, about 104 days). */
  vmClockNsec: number;
  vmStateSize: number;
  /** Virtual disk size when the snapshot was taken (extra data), if recorded. */
  diskSize?: number;
  /** -1 when icount was disabled, if recorded. */
  icount?: bigint;
  /** The raw extra data, kept verbatim when the table is rewritten. */
  extra: Uint8Array;
  /**
   * Bytes the entry takes in the table it was read from (padded to 8), until the table is
   * rewritten: an ID or name cut at a NUL takes less once rewritten.
   */
  diskBytes?: number;
}

/** The fixed 40-byte part of a table entry: its fields and the sizes of what follows it. */
export interface SnapshotEntryHeader {
  l1TableOffset: number;
  l1Size: number;
  idSize: number;
  nameSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  extraDataSize: number;
}

/** Decodes the fixed part of an entry from `b` at `at`; `where` names it in errors. */
export function decodeSnapshotEntryHeader(b: Uint8Array, at: number, where: string): SnapshotEntryHeader {
  const dv = view(b);
  return {
    l1TableOffset: getU64(dv, at, `${where}: l1_table_offset`),
    l1Size: dv.getUint32(at + 8),
    idSize: dv.getUint16(at + 12),
    nameSize: dv.getUint16(at + 14),
    dateSec: dv.getUint32(at + 16),
    dateNsec: dv.getUint32(at + 20),
    vmClockNsec: Number(dv.getBigUint64(at + 24)),
    vmStateSize: dv.getUint32(at + 32),
    extraDataSize: dv.getUint32(at + 36),
  };
}

/**
 * The snapshot an entry describes, from its fixed part and the bytes that follow it: `extra`
 * (as much of the extra data as is kept), the ID and the name.
 */
export function snapshotFromEntry(
  e: SnapshotEntryHeader,
  extra: Uint8Array,
  id: Uint8Array,
  name: Uint8Array,
  where: string,
): Snapshot {
  const ev = view(extra);
  const s: Snapshot = {
    l1TableOffset: e.l1TableOffset,
    l1Size: e.l1Size,
    id: cString(id),
    name: cString(name),
    dateSec: e.dateSec,
    dateNsec: e.dateNsec,
    vmClockNsec: e.vmClockNsec,
    vmStateSize: e.vmStateSize,
    extra,
    diskBytes: Math.ceil((ENTRY_FIXED + e.extraDataSize + e.idSize + e.nameSize) / 8) * 8,
  };
  if (extra.length >= 8) s.vmStateSize = getU64(ev, 0, `${where}: vm_state_size`);
  if (extra.length >= 16) s.diskSize = getU64(ev, 8, `${where}: disk_size`);
  if (extra.length >= 24) s.icount = ev.getBigInt64(16);
  return s;
}

/** QEMU reads the ID and name as C strings: they end at the first NUL. */
function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return textDecoder.decode(nul < 0 ? b : b.subarray(0, nul));
}

/** QEMU's refusal of an entry with more extra data than it keeps (qcow2_do_read_snapshots). */
export function tooMuchExtraData(i: number): QcowError {
  return corrupt(
    `Too much extra metadata in snapshot table entry ${i}\nYou can force-remove this extra metadata with qemu-img check -r all`,
  );
}

/** QEMU's refusal of a table past MAX_SNAPSHOT_TABLE_BYTES, `overhanging` entries from its end. */
export function snapshotTableTooBig(overhanging: number): QcowError {
  return corrupt(
    `Snapshot table is too big\nYou can force-remove all ${overhanging} overhanging snapshots with qemu-img check -r all`,
  );
}

/** Decodes `count` entries from the snapshot table bytes; `base` is the table's file offset. */
export function decodeSnapshotTable(buf: Uint8Array, count: number, base: number): Snapshot[] {
  const out: Snapshot[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    const where = `snapshot table entry ${i} at ${hex(base + at)}`;
    if (at + ENTRY_FIXED > buf.length) throw truncated(`Snapshot table truncated: ${where}`);
    const e = decodeSnapshotEntryHeader(buf, at, where);
    // QEMU's words and hints; qemu-img check -r all (and qcowkit's) repairs these.
    if (e.extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) throw tooMuchExtraData(i);
    const total = ENTRY_FIXED + e.extraDataSize + e.idSize + e.nameSize;
    if (at + total > MAX_SNAPSHOT_TABLE_BYTES) throw snapshotTableTooBig(count - i);
    if (at + total > buf.length) throw truncated(`Snapshot table truncated: ${where} needs ${total} bytes`);
    const x = at + ENTRY_FIXED;
    const idAt = x + e.extraDataSize;
    const nameAt = idAt + e.idSize;
    out.push(
      snapshotFromEntry(
        e,
        buf.slice(x, idAt),
        buf.subarray(idAt, nameAt),
        buf.subarray(nameAt, nameAt + e.nameSize),
        where,
      ),
    );
    at += Math.ceil(total / 8) * 8;
  }
  return out;
}

/** Bytes the table takes on disk (entries padded to 8): as read, else as encodeSnapshotTable lays it out. */
export function snapshotTableSize(snapshots: Snapshot[]): number {
  return snapshots.reduce((n, s) => n + (s.diskBytes ?? encodedEntrySize(s)), 0);
}

/** The padded size of an entry as encodeSnapshotTable writes it. */
function encodedEntrySize(s: Snapshot): number {
  const id = textEncoder.encode(s.id).length;
  const name = textEncoder.encode(s.name).length;
  return Math.ceil((ENTRY_FIXED + Math.max(KNOWN_EXTRA_DATA, s.extra.length) + id + name) / 8) * 8;
}

/** After `snapshots` were written as a new table by encodeSnapshotTable: their sizes on disk now. */
export function snapshotsRewritten(snapshots: Snapshot[]): void {
  for (const s of snapshots) s.diskBytes = encodedEntrySize(s);
}

/**
 * Encodes the table as QEMU 7.2's qcow2_write_snapshots does, whatever the version: every entry
 * gets the 24 bytes of extra data QEMU knows (64-bit VM state size, disk size, icount), followed
 * by any unknown extra data it had. `imageSize` stands in for a disk size that was not recorded
 * (QEMU takes the image's size when it reads such an entry); an unrecorded icount becomes -1.
 * `minExtra` 0 or 16 lays entries out as older QEMUs wrote them (for test fixtures).
 */
export function encodeSnapshotTable(snapshots: Snapshot[], imageSize: number, minExtra = KNOWN_EXTRA_DATA): Uint8Array {
  const parts = snapshots.map((s) => {
    const id = textEncoder.encode(s.id);
    const name = textEncoder.encode(s.name);
    if (id.length > 0xffff || name.length > 0xffff) {
      throw invalidArgument(`Snapshot ID or name of ${Math.max(id.length, name.length)} bytes is too long`);
    }
    let extra = s.extra;
    if (extra.length < minExtra) {
      const grown = new Uint8Array(minExtra);
      grown.set(extra);
      extra = grown;
    }
    const ev = view(extra);
    if (extra.length >= 8) setU64(ev, 0, s.vmStateSize);
    if (extra.length >= 16) setU64(ev, 8, s.diskSize ?? imageSize);
    if (extra.length >= 24) ev.setBigInt64(16, s.icount ?? -1n);
    const total = Math.ceil((ENTRY_FIXED + extra.length + id.length + name.length) / 8) * 8;
    const b = new Uint8Array(total);
    const dv = view(b);
    setU64(dv, 0, s.l1TableOffset);
    dv.setUint32(8, s.l1Size);
    dv.setUint16(12, id.length);
    dv.setUint16(14, name.length);
    dv.setUint32(16, s.dateSec);
    dv.setUint32(20, s.dateNsec);
    dv.setBigUint64(24, BigInt(s.vmClockNsec));
    dv.setUint32(32, s.vmStateSize > 0xffff_ffff ? 0 : s.vmStateSize);
    dv.setUint32(36, extra.length);
    b.set(extra, ENTRY_FIXED);
    b.set(id, ENTRY_FIXED + extra.length);
    b.set(name, ENTRY_FIXED + extra.length + id.length);
    return b;
  });
  return concatBytes(parts);
}
