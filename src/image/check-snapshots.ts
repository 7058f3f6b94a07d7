/**
 * The snapshot table part of a check, as QEMU's qcow2_check_read_snapshot_table and
 * qcow2_check_fix_snapshot_table (block/qcow2-snapshot.c) do it. An image opened for check is
 * not refused for its snapshot table: the check reads the table itself, reports what is wrong
 * in QEMU's words, and with FIX_ERRORS repairs it.
 *
 * - Past 65536 entries, or past 64 MiB of table: the entries from there on are dropped by
 *   lowering nb_snapshots in the header at once. That only leaks clusters (the refcount check
 *   that follows frees them), so it is safe before the refcounts are known to be right.
 * - An entry with more than 1 KiB of extra data keeps its first 1 KiB; a v3 entry with less than
 *   the 16 bytes v3 requires is completed. Both need the table rewritten, which allocates
 *   clusters: that waits until the refcount check has repaired the refcounts
 *   (`rewriteSnapshotTable`).
 */
import { hex, QcowError } from "../errors.js";
import { setU64, view } from "../format/bytes.js";
import { MAX_SNAPSHOTS, type Qcow2Header } from "../format/header.js";
import {
  decodeSnapshotEntryHeader,
  encodeSnapshotTable,
  MAX_SNAPSHOT_EXTRA_DATA,
  MAX_SNAPSHOT_TABLE_BYTES,
  SNAPSHOT_ENTRY_FIXED,
  type Snapshot,
  snapshotFromEntry,
  snapshotTableTooBig,
  tooMuchExtraData,
} from "../format/snapshot.js";
import { readFull, type Storage } from "../io/storage.js";
import { Refcounts, type TableMoved } from "./refcount.js";

/** What the check of the snapshot table found (QEMU's snapshot_res), and the table it read. */
export interface SnapshotTableCheck {
  snapshots: Snapshot[];
  /** Bytes of the table on disk, up to the end of the last entry kept (QEMU's snapshots_size). */
  tableBytes: number;
  corruptions: number;
  corruptionsFixed: number;
  checkErrors: number;
  /** The check cannot go on: the errno text qemu-img prints after "Check failed: ". */
  failed?: string;
}

export interface SnapshotCheckLog {
  /** A finding, printed as it is. */
  log: (line: string) => void;
  /** An error in the form of QEMU's error_report (qemu-img prefixes its name). */
  report: (message: string) => void;
}

const INT_MAX = 2 ** 31 - 1;
const WINDOW = 1024 * 1024;
/** v3 entries must hold vm_state_size_large and disk_size. */
const V3_MIN_EXTRA_DATA = 16;

/** Reads the table through a window, so that walking it costs few reads whatever its shape. */
class TableReader {
  private buf = new Uint8Array(0);
  private start = 0;
  constructor(private readonly storage: Storage) {}

  /** `length` bytes at `offset` (zeros past the end of the file), valid until the next call. */
  async bytes(offset: number, length: number): Promise<Uint8Array> {
    if (offset < this.start || offset + length > this.start + this.buf.length) {
      this.buf = new Uint8Array(Math.max(length, WINDOW));
      this.start = offset;
      await readFull(this.storage, this.buf, offset);
    }
    return this.buf.subarray(offset - this.start, offset - this.start + length);
  }
}

/**
 * Reads and judges the snapshot table of the image whose header is `h`; with `repair`, drops
 * what is past QEMU's limits (lowering nb_snapshots on disk, and in `h`) and truncates extra
 * data that is too long. Never throws for a bad table: a failure is returned in `failed`.
 */
export async function checkSnapshotTable(
  storage: Storage,
  h: Qcow2Header,
  repair: boolean,
  out: SnapshotCheckLog,
): Promise<SnapshotTableCheck> {
  const res: SnapshotTableCheck = { snapshots: [], tableBytes: 0, corruptions: 0, corruptionsFixed: 0, checkErrors: 0 };
  const fail = (errno: string): SnapshotTableCheck => {
    res.checkErrors++;
    res.snapshots = [];
    res.tableBytes = 0;
    res.failed = errno;
    return res;
  };
  let count = h.nbSnapshots;
  let reduced = 0;
  if (count > MAX_SNAPSHOTS && repair) {
    out.log(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  if (count > MAX_SNAPSHOTS) {
    out.report("ERROR snapshot table too large");
    out.log(`You can force-remove all ${count - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
    return fail("File too large");
  }
  if (h.snapshotsOffset % 2 ** h.clusterBits !== 0) {
    out.report("ERROR snapshot table offset invalid");
    return fail("Invalid argument");
  }

  // qcow2_do_read_snapshots in its repair mode: the limits count the entries as they will be
  // rewritten (extra data truncated), the offsets follow the entries as they are on disk.
  const base = h.snapshotsOffset;
  const reader = new TableReader(storage);
  let dropped = 0;
  let offset = base;
  let tableLength = 0;
  let tooLarge = false; // QEMU's EFBIG
  try {
    for (let i = 0; i < count; i++) {
      const entryEnd = offset;
      offset = Math.ceil(offset / 8) * 8;
      tableLength = Math.ceil(tableLength / 8) * 8;
      const where = `snapshot table entry ${i} at ${hex(offset)}`;
      const e = decodeSnapshotEntryHeader(await reader.bytes(offset, SNAPSHOT_ENTRY_FIXED), 0, where);
      offset += SNAPSHOT_ENTRY_FIXED;
      let kept = e.extraDataSize;
      if (kept > MAX_SNAPSHOT_EXTRA_DATA) {
        if (!repair) {
          tooLarge = true;
          throw tooMuchExtraData(i);
        }
        out.log(
          `Discarding too much extra metadata in snapshot table entry ${i} (${e.extraDataSize} > ${MAX_SNAPSHOT_EXTRA_DATA})`,
        );
        dropped++;
        kept = MAX_SNAPSHOT_EXTRA_DATA;
      }
      const extra = (await reader.bytes(offset, kept)).slice();
      offset += e.extraDataSize;
      const id = (await reader.bytes(offset, e.idSize)).slice();
      offset += e.idSize;
      const name = await reader.bytes(offset, e.nameSize);
      offset += e.nameSize;
      tableLength += SNAPSHOT_ENTRY_FIXED + kept + e.idSize + e.nameSize;
      if (tableLength > MAX_SNAPSHOT_TABLE_BYTES || offset - base > INT_MAX) {
        if (!repair) {
          tooLarge = true;
          throw snapshotTableTooBig(count - i);
        }
        out.log(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
        reduced += count - i;
        offset = entryEnd;
        break;
      }
      res.snapshots.push(snapshotFromEntry(e, extra, id, name, where));
    }
  } catch (err) {
    if (!(err instanceof QcowError)) throw err;
    out.report(`ERROR failed to read the snapshot table: ${err.message}`);
    return fail(tooLarge ? "File too large" : "Invalid argument");
  }
  res.tableBytes = offset - base;
  res.corruptions += reduced + dropped;

  if (reduced > 0) {
    // The header first (QEMU does the same): the refcount check counts what it says.
    const b = new Uint8Array(4);
    view(b).setUint32(0, res.snapshots.length);
    await storage.write(b, 60);
    await storage.flush();
    h.nbSnapshots = res.snapshots.length;
    res.corruptionsFixed += reduced;
    res.corruptions -= reduced;
  }

  if (h.version >= 3) {
    res.snapshots.forEach((s, i) => {
      if (s.extra.length < V3_MIN_EXTRA_DATA) {
        res.corruptions++;
        out.log(`${repair ? "Repairing" : "ERROR"} snapshot table entry ${i} is incomplete`);
      }
    });
  }
  return res;
}

/**
 * QEMU's qcow2_check_fix_snapshot_table: with refcounts repaired, writes `t.snapshots` as a
 * new table (every entry with its 24 known bytes of extra data) in new clusters, durable with
 * their refcounts before the header points at it; then frees the old table. A crash leaks
 * clusters at worst. Returns false (after logging it) when the table cannot be written.
 */
export async function rewriteSnapshotTable(
  storage: Storage,
  h: Qcow2Header,
  t: SnapshotTableCheck,
  log: (line: string) => void,
  onTableMoved: TableMoved,
): Promise<boolean> {
  const cs = 2 ** h.clusterBits;
  const table = encodeSnapshotTable(t.snapshots, Math.floor(h.size / 512) * 512);
  if (table.length > MAX_SNAPSHOT_TABLE_BYTES) {
    log("ERROR failed to update snapshot table: File too large");
    return false;
  }
  const refcounts = await Refcounts.open(storage, h);
  const offset = await refcounts.allocateArea(Math.max(1, Math.ceil(table.length / cs)), onTableMoved);
  await storage.write(table, offset);
  await refcounts.writeBack();
  await storage.flush();

  const pointer = new Uint8Array(12);
  view(pointer).setUint32(0, t.snapshots.length);
  setU64(view(pointer), 4, offset);
  await storage.write(pointer, 60);
  await storage.flush();
  const old = { offset: h.snapshotsOffset, bytes: t.tableBytes };
  h.nbSnapshots = t.snapshots.length;
  h.snapshotsOffset = offset;
  t.tableBytes = table.length;

  if (old.bytes > 0) {
    for (let c = Math.floor(old.offset / cs); c < Math.ceil((old.offset + old.bytes) / cs); c++) {
      await refcounts.update(c, -1, onTableMoved);
    }
    await refcounts.writeBack();
    await storage.flush();
  }
  return true;
}
