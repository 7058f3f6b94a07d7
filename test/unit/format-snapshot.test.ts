/** The internal snapshot table (docs/interop/qcow2.rst, "Snapshots"), from hand-laid entries. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { concatBytes } from "../../src/format/bytes.js";
import {
  decodeSnapshotTable,
  encodeSnapshotTable,
  type Snapshot,
  snapshotsRewritten,
  snapshotTableSize,
} from "../../src/format/snapshot.js";
import { throwsQcow } from "./assert-qcow.js";

const concat = (...parts: Uint8Array[]): Uint8Array => concatBytes(parts);

interface RawEntry {
  l1TableOffset: bigint;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** The 32-bit field at byte 32. */
  vmStateSize32: number;
  extra: Uint8Array;
  /** Overrides the id length field (to build bad entries). */
  idLenField?: number;
}

/** Lays out one snapshot table entry at the spec's offsets, padded to a multiple of 8. */
function layEntry(e: RawEntry): Uint8Array {
  const id = new TextEncoder().encode(e.id);
  const name = new TextEncoder().encode(e.name);
  const len = 40 + e.extra.length + id.length + name.length;
  const buf = new Uint8Array(Math.ceil(len / 8) * 8);
  const dv = new DataView(buf.buffer);
  dv.setBigUint64(0, e.l1TableOffset);
  dv.setUint32(8, e.l1Size);
  dv.setUint16(12, e.idLenField ?? id.length);
  dv.setUint16(14, name.length);
  dv.setUint32(16, e.dateSec);
  dv.setUint32(20, e.dateNsec);
  dv.setBigUint64(24, e.vmClockNsec);
  dv.setUint32(32, e.vmStateSize32);
  dv.setUint32(36, e.extra.length);
  buf.set(e.extra, 40);
  buf.set(id, 40 + e.extra.length);
  buf.set(name, 40 + e.extra.length + id.length);
  return buf;
}

/** Extra data: vm_state_size (64-bit), disk_size, icount, then any further bytes. */
function extraData(vmState: bigint, diskSize?: bigint, icount?: bigint, more: number[] = []): Uint8Array {
  const len = icount !== undefined ? 24 : diskSize !== undefined ? 16 : 8;
  const b = new Uint8Array(len + more.length);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, vmState);
  if (diskSize !== undefined) dv.setBigUint64(8, diskSize);
  if (icount !== undefined) dv.setBigInt64(16, icount);
  b.set(more, len);
  return b;
}

const V2_ENTRY: RawEntry = {
  l1TableOffset: 0x5_0000n,
  l1Size: 2,
  id: "1",
  name: "snap-one", // 40 + 1 + 8 = 49 bytes, padded to 56
  dateSec: 1_700_000_000,
  dateNsec: 123_456_789,
  vmClockNsec: 5_000_000_000n,
  vmStateSize32: 0x1000,
  extra: new Uint8Array(0),
};

test("decodeSnapshotTable: v2 entries without extra data, padded to 8", () => {
  const first = layEntry(V2_ENTRY);
  assert.equal(first.length, 56);
  const second = layEntry({
    ...V2_ENTRY,
    l1TableOffset: 0x1_0008_0000n,
    l1Size: 300,
    id: "22",
    name: "",
    vmStateSize32: 0,
    vmClockNsec: 0n,
  });
  const table = decodeSnapshotTable(concat(first, second), 2, 0x7_0000);
  assert.deepEqual(table, [
    {
      l1TableOffset: 0x5_0000,
      l1Size: 2,
      id: "1",
      name: "snap-one",
      dateSec: 1_700_000_000,
      dateNsec: 123_456_789,
      vmClockNsec: 5_000_000_000,
      vmStateSize: 0x1000,
      extra: new Uint8Array(0),
      diskBytes: 56,
    },
    {
      l1TableOffset: 0x1_0008_0000,
      l1Size: 300,
      id: "22",
      name: "",
      dateSec: 1_700_000_000,
      dateNsec: 123_456_789,
      vmClockNsec: 0,
      vmStateSize: 0,
      extra: new Uint8Array(0),
      diskBytes: 48,
    },
  ]);
});

test("decodeSnapshotTable: v3 extra data of 16 and 24 bytes", () => {
  // The 64-bit vm_state_size in the extra data overrides the 32-bit field.
  const a = layEntry({
    ...V2_ENTRY,
    vmStateSize32: 7,
    extra: extraData(0x2_0000_0005n, 0x4000_0000n),
    id: "1",
    name: "before upgrade",
  });
  const b = layEntry({
    ...V2_ENTRY,
    vmStateSize32: 0,
    extra: extraData(0n, 0x1_0000_0000n, -1n),
    id: "2",
    name: "ünïcode",
  });
  const c = layEntry({ ...V2_ENTRY, extra: extraData(0x10n, 0x20n, 12_345n), id: "3", name: "recorded" });
  const table = decodeSnapshotTable(concat(a, b, c), 3, 0);
  assert.equal(table.length, 3);
  assert.equal(table[0].vmStateSize, 0x2_0000_0005);
  assert.equal(table[0].diskSize, 0x4000_0000);
  assert.equal(table[0].icount, undefined);
  assert.equal(table[0].name, "before upgrade");
  assert.equal(table[0].extra.length, 16);
  assert.equal(table[1].vmStateSize, 0);
  assert.equal(table[1].diskSize, 0x1_0000_0000);
  assert.equal(table[1].icount, -1n);
  assert.equal(table[1].id, "2");
  assert.equal(table[1].name, "ünïcode");
  assert.equal(table[2].vmStateSize, 0x10);
  assert.equal(table[2].diskSize, 0x20);
  assert.equal(table[2].icount, 12_345n);
  assert.deepEqual(table[2].extra, extraData(0x10n, 0x20n, 12_345n));
});

test("decodeSnapshotTable: 8 bytes of extra data hold only vm_state_size; unknown extra data is kept", () => {
  const a = layEntry({ ...V2_ENTRY, vmStateSize32: 1, extra: extraData(0x99n) });
  const more = [1, 2, 3, 4, 5, 6, 7, 8, 9];
  const b = layEntry({ ...V2_ENTRY, extra: extraData(0n, 0n, 0n, more) });
  const [sa, sb] = decodeSnapshotTable(concat(a, b), 2, 0);
  assert.equal(sa.vmStateSize, 0x99);
  assert.equal(sa.diskSize, undefined);
  assert.equal(sa.icount, undefined);
  assert.equal(sb.extra.length, 33);
  assert.deepEqual(Array.from(sb.extra.subarray(24)), more);
  assert.equal(sb.icount, 0n);
  assert.equal(sb.name, "snap-one");
});

test("decodeSnapshotTable: reads only `count` entries and ignores what follows", () => {
  const buf = concat(layEntry(V2_ENTRY), new Uint8Array(40).fill(0xff));
  assert.equal(decodeSnapshotTable(buf, 1, 0).length, 1);
  assert.deepEqual(decodeSnapshotTable(buf, 0, 0), []);
});

test("decodeSnapshotTable: truncation", () => {
  const one = layEntry(V2_ENTRY);
  // The fixed part of the second entry is missing; the error names its file offset.
  throwsQcow(() => decodeSnapshotTable(one, 2, 0x10000), "corrupt", /truncated.*entry 1 at 0x10038/);
  throwsQcow(() => decodeSnapshotTable(one.subarray(0, 39), 1, 0), "corrupt", /truncated.*entry 0 at 0x0/);
  // The id and name run past the end.
  throwsQcow(() => decodeSnapshotTable(one.subarray(0, 48), 1, 0), "corrupt", /truncated.*needs 49 bytes/);
  throwsQcow(() => decodeSnapshotTable(layEntry({ ...V2_ENTRY, idLenField: 0xffff }), 1, 0), "corrupt", /truncated/);
  // Extra data running past the end.
  const e = layEntry({ ...V2_ENTRY, extra: extraData(0n, 0n) });
  new DataView(e.buffer).setUint32(36, 512);
  throwsQcow(() => decodeSnapshotTable(e, 1, 0), "corrupt", /truncated/);
});

test("decodeSnapshotTable: extra data over 1024 bytes", () => {
  const ok = layEntry({ ...V2_ENTRY, extra: new Uint8Array(1024) });
  assert.equal(decodeSnapshotTable(ok, 1, 0)[0].extra.length, 1024);
  const big = layEntry({ ...V2_ENTRY, extra: new Uint8Array(1025) });
  throwsQcow(
    () => decodeSnapshotTable(big, 1, 0x20000),
    "corrupt",
    /^Too much extra metadata in snapshot table entry 0\n/,
  );
  // Refused before the length is trusted for anything else.
  const huge = layEntry(V2_ENTRY);
  new DataView(huge.buffer).setUint32(36, 0xffff_ffff);
  throwsQcow(() => decodeSnapshotTable(huge, 1, 0), "corrupt", /extra/);
});

test("decodeSnapshotTable: l1_table_offset above 2^53", () => {
  throwsQcow(
    () => decodeSnapshotTable(layEntry({ ...V2_ENTRY, l1TableOffset: 1n << 60n }), 1, 0),
    "corrupt",
    /l1_table_offset/,
  );
});

function snapshot(over: Partial<Snapshot>): Snapshot {
  return {
    l1TableOffset: 0x9_0000,
    l1Size: 16,
    id: "1",
    name: "base",
    dateSec: 1_650_000_000,
    dateNsec: 999_999_999,
    vmClockNsec: 86_400_000_000_000,
    vmStateSize: 0,
    extra: new Uint8Array(0),
    ...over,
  };
}

test("encodeSnapshotTable: entry layout at the spec's offsets", () => {
  const buf = encodeSnapshotTable([snapshot({ vmStateSize: 0x1234, diskSize: 0x4000_0000 })], 1 << 20);
  // 40 fixed + 24 extra + 1 id + 4 name = 69, padded to 72.
  assert.equal(buf.length, 72);
  const dv = new DataView(buf.buffer);
  assert.equal(dv.getBigUint64(0), 0x9_0000n);
  assert.equal(dv.getUint32(8), 16);
  assert.equal(dv.getUint16(12), 1);
  assert.equal(dv.getUint16(14), 4);
  assert.equal(dv.getUint32(16), 1_650_000_000);
  assert.equal(dv.getUint32(20), 999_999_999);
  assert.equal(dv.getBigUint64(24), 86_400_000_000_000n);
  assert.equal(dv.getUint32(32), 0x1234);
  assert.equal(dv.getUint32(36), 24);
  assert.equal(dv.getBigUint64(40), 0x1234n);
  assert.equal(dv.getBigUint64(48), 0x4000_0000n);
  assert.equal(dv.getBigInt64(56), -1n);
  assert.equal(new TextDecoder().decode(buf.subarray(64, 69)), "1base");
  assert.deepEqual(Array.from(buf.subarray(69)), [0, 0, 0]);
});

test("encodeSnapshotTable: every entry gets the 24 bytes QEMU 7.2 writes (iotest 261)", () => {
  // An entry without extra data (as v2 images hold them) and one with only vm_state_size: the
  // disk size becomes the image's, the icount -1, as QEMU fills them in when it reads them.
  const [bare, short] = decodeSnapshotTable(
    encodeSnapshotTable([snapshot({}), snapshot({ id: "2", extra: extraData(0n) })], 1 << 21),
    2,
    0,
  );
  for (const s of [bare, short]) {
    assert.equal(s.extra.length, 24);
    assert.equal(s.diskSize, 1 << 21);
    assert.equal(s.icount, -1n);
  }
});

test("encodeSnapshotTable: minExtra lays out entries as older QEMUs wrote them", () => {
  const buf = encodeSnapshotTable([snapshot({ vmStateSize: 77 })], 1 << 20, 0);
  assert.equal(buf.length, 48); // 40 + 1 + 4 = 45, padded
  const dv = new DataView(buf.buffer);
  assert.equal(dv.getUint32(36), 0);
  assert.equal(dv.getUint32(32), 77);
  assert.deepEqual(decodeSnapshotTable(buf, 1, 0), [{ ...snapshot({ vmStateSize: 77 }), diskBytes: 48 }]);
  const [v3] = decodeSnapshotTable(encodeSnapshotTable([snapshot({ diskSize: 5 })], 1 << 20, 16), 1, 0);
  assert.equal(v3.extra.length, 16);
  assert.equal(v3.icount, undefined);
});

test("encodeSnapshotTable / decodeSnapshotTable: round trip", () => {
  const snaps = [
    snapshot({
      vmStateSize: 2 ** 40 + 3,
      diskSize: 2 ** 34,
      icount: 123_456_789n,
      extra: extraData(0n, 0n, 0n, [0xaa, 0xbb]),
    }),
    snapshot({
      id: "17",
      name: "ein Name mit Ümlauten",
      l1Size: 0,
      l1TableOffset: 0,
      diskSize: 0,
      icount: 0n,
      vmClockNsec: 0,
    }),
    snapshot({ id: "x".repeat(300), name: "y".repeat(1000), diskSize: 5, icount: -1n, dateSec: 0xffff_ffff }),
  ];
  const encoded = encodeSnapshotTable(snaps, 1 << 20);
  assert.equal(encoded.length % 8, 0);
  const decoded = decodeSnapshotTable(encoded, 3, 0);
  assert.equal(decoded.length, 3);
  for (let i = 0; i < 3; i++) {
    const { extra: _e, diskBytes: _d, ...got } = decoded[i];
    const { extra: _x, ...want } = snaps[i];
    assert.deepEqual(got, want, `snapshot ${i}`);
  }
  // Unknown extra data past icount survives, and the known fields in it are current.
  assert.deepEqual(Array.from(decoded[0].extra.subarray(24)), [0xaa, 0xbb]);
  assert.equal(new DataView(decoded[0].extra.buffer).getBigUint64(0), 2n ** 40n + 3n);
  // A vm_state_size over 32 bits leaves the 32-bit field 0.
  assert.equal(new DataView(encoded.buffer).getUint32(32), 0);
  // Encoding what was decoded gives the same bytes.
  assert.deepEqual(encodeSnapshotTable(decoded, 1 << 20), encoded);
});

test("decodeSnapshotTable: ID and name are C strings (cut at a NUL), the entry keeps its size on disk", () => {
  const e = layEntry({ ...V2_ENTRY, id: "7\0junk", name: "\0\0\0" });
  const [sn] = decodeSnapshotTable(e, 1, 0);
  assert.equal(sn.id, "7");
  assert.equal(sn.name, "");
  assert.equal(sn.diskBytes, e.length);
  assert.equal(snapshotTableSize([sn]), e.length);
  // Rewritten, it takes what its encoding takes.
  snapshotsRewritten([sn]);
  assert.equal(snapshotTableSize([sn]), encodeSnapshotTable([sn], 1 << 20).length);
});

test("encodeSnapshotTable: an ID or name past 65535 bytes is refused, not wrapped", () => {
  throwsQcow(
    () => encodeSnapshotTable([snapshot({ id: "\u00e9".repeat(40000) })], 1 << 20),
    "invalid-argument",
    /too long/,
  );
});
