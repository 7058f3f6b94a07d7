/** The bitmap directory and bitmap table entries (docs/interop/qcow2.rst, "Bitmaps"). */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  BITMAP_TYPE_DIRTY_TRACKING,
  type BitmapDirectoryEntry,
  BME_FLAG_AUTO,
  BME_FLAG_EXTRA_DATA_COMPATIBLE,
  BME_FLAG_IN_USE,
  decodeBitmapDirectory,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
} from "../../src/format/bitmap.js";
import { concatBytes } from "../../src/format/bytes.js";
import { throwsQcow } from "./assert-qcow.js";

const concat = (...parts: Uint8Array[]): Uint8Array => concatBytes(parts);

interface RawEntry {
  tableOffset: bigint;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: Uint8Array | string;
  extra: Uint8Array;
  /** Overrides the name_size field (to build bad entries). */
  nameSizeField?: number;
}

/** Lays out one bitmap directory entry at the spec's offsets, padded to a multiple of 8. */
function layEntry(e: RawEntry): Uint8Array {
  const name = typeof e.name === "string" ? new TextEncoder().encode(e.name) : e.name;
  const len = 24 + e.extra.length + name.length;
  const buf = new Uint8Array(Math.ceil(len / 8) * 8);
  const dv = new DataView(buf.buffer);
  dv.setBigUint64(0, e.tableOffset);
  dv.setUint32(8, e.tableSize);
  dv.setUint32(12, e.flags);
  dv.setUint8(16, e.type);
  dv.setUint8(17, e.granularityBits);
  dv.setUint16(18, e.nameSizeField ?? name.length);
  dv.setUint32(20, e.extra.length);
  buf.set(e.extra, 24);
  buf.set(name, 24 + e.extra.length);
  return buf;
}

const ENTRY: RawEntry = {
  tableOffset: 0x7_0000n,
  tableSize: 4,
  flags: BME_FLAG_IN_USE | BME_FLAG_AUTO,
  type: 1,
  granularityBits: 16,
  name: "bitmap0", // 24 + 7 = 31, padded to 32
  extra: new Uint8Array(0),
};

test("decodeBitmapDirectory: flags, type, granularity, name, extra data, padding", () => {
  const a = layEntry(ENTRY);
  assert.equal(a.length, 32);
  const b = layEntry({
    tableOffset: 0x1_2345_0000n,
    tableSize: 0x10_0000,
    flags: BME_FLAG_EXTRA_DATA_COMPATIBLE,
    type: 2,
    granularityBits: 63,
    name: "b", // 24 + 5 + 1 = 30, padded to 32
    extra: Uint8Array.of(1, 2, 3, 4, 5),
  });
  const c = layEntry({ ...ENTRY, flags: 0, name: "ß".repeat(20), granularityBits: 9 }); // 40-byte name
  const dir = decodeBitmapDirectory(concat(a, b, c), 3, 0x9_0000);
  assert.deepEqual(dir, [
    {
      tableOffset: 0x7_0000,
      tableSize: 4,
      flags: 3,
      type: 1,
      granularityBits: 16,
      name: "bitmap0",
      extra: new Uint8Array(0),
    },
    {
      tableOffset: 0x1_2345_0000,
      tableSize: 0x10_0000,
      flags: 4,
      type: 2,
      granularityBits: 63,
      name: "b",
      extra: Uint8Array.of(1, 2, 3, 4, 5),
    },
    {
      tableOffset: 0x7_0000,
      tableSize: 4,
      flags: 0,
      type: 1,
      granularityBits: 9,
      name: "ß".repeat(20),
      extra: new Uint8Array(0),
    },
  ]);
});

test("decodeBitmapDirectory: name length must be 1..1023", () => {
  throwsQcow(
    () => decodeBitmapDirectory(layEntry({ ...ENTRY, name: "" }), 1, 0x9_0000),
    "corrupt",
    /name length 0.*entry 0 at 0x90000/,
  );
  const max = layEntry({ ...ENTRY, name: "n".repeat(1023) });
  assert.equal(decodeBitmapDirectory(max, 1, 0)[0].name.length, 1023);
  throwsQcow(
    () => decodeBitmapDirectory(layEntry({ ...ENTRY, name: "n".repeat(1024) }), 1, 0),
    "corrupt",
    /name length 1024/,
  );
  throwsQcow(
    () => decodeBitmapDirectory(layEntry({ ...ENTRY, name: "n".repeat(0xffff) }), 1, 0),
    "corrupt",
    /name length 65535/,
  );
});

test("decodeBitmapDirectory: reserved flag bits 3-31", () => {
  for (const bit of [3, 7, 16, 31]) {
    const flags = (BME_FLAG_AUTO | (1 << bit)) >>> 0;
    throwsQcow(
      () => decodeBitmapDirectory(layEntry({ ...ENTRY, flags }), 1, 0),
      "corrupt",
      new RegExp(`Reserved bitmap flags set \\(0x${flags.toString(16)}\\)`),
    );
  }
});

test("decodeBitmapDirectory: truncation", () => {
  const one = layEntry(ENTRY);
  throwsQcow(() => decodeBitmapDirectory(one, 2, 0x9_0000), "corrupt", /truncated.*entry 1 at 0x90020/);
  throwsQcow(() => decodeBitmapDirectory(one.subarray(0, 23), 1, 0), "corrupt", /truncated/);
  throwsQcow(() => decodeBitmapDirectory(one.subarray(0, 30), 1, 0), "corrupt", /truncated.*needs 31 bytes/);
  throwsQcow(() => decodeBitmapDirectory(layEntry({ ...ENTRY, nameSizeField: 100 }), 1, 0), "corrupt", /truncated/);
  const e = layEntry(ENTRY);
  new DataView(e.buffer).setUint32(20, 0xffff_ffff);
  throwsQcow(() => decodeBitmapDirectory(e, 1, 0), "corrupt", /truncated/);
});

test("decodeBitmapDirectory: bitmap_table_offset above 2^53", () => {
  throwsQcow(
    () => decodeBitmapDirectory(layEntry({ ...ENTRY, tableOffset: 1n << 56n }), 1, 0),
    "corrupt",
    /bitmap_table_offset/,
  );
});

test("encodeBitmapDirectory: layout and round trip", () => {
  const entries: BitmapDirectoryEntry[] = [
    {
      tableOffset: 0x5_0000,
      tableSize: 1,
      flags: BME_FLAG_AUTO,
      type: BITMAP_TYPE_DIRTY_TRACKING,
      granularityBits: 16,
      name: "bm0",
      extra: new Uint8Array(0),
    },
    {
      tableOffset: 0x12_3456_0000,
      tableSize: 123_456,
      flags: 7,
      type: 1,
      granularityBits: 31,
      name: "ünïcödé",
      extra: Uint8Array.of(9, 9, 9),
    },
    {
      tableOffset: 0,
      tableSize: 0,
      flags: 0,
      type: 1,
      granularityBits: 9,
      name: "x".repeat(1023),
      extra: new Uint8Array(17).fill(1),
    },
  ];
  const buf = encodeBitmapDirectory(entries);
  // Same bytes as laid out by hand.
  assert.deepEqual(
    buf.subarray(0, 32),
    layEntry({
      tableOffset: 0x5_0000n,
      tableSize: 1,
      flags: 2,
      type: 1,
      granularityBits: 16,
      name: "bm0",
      extra: new Uint8Array(0),
    }),
  );
  assert.equal(buf.length, 32 + Math.ceil((24 + 3 + 11) / 8) * 8 + Math.ceil((24 + 17 + 1023) / 8) * 8);
  assert.deepEqual(decodeBitmapDirectory(buf, 3, 0), entries);
});

test("decodeBitmapTableEntry: data cluster offset, all zeros, all ones", () => {
  assert.deepEqual(decodeBitmapTableEntry(0, 0x8_0000, 65536), { offset: 0x8_0000, allOnes: false });
  assert.deepEqual(decodeBitmapTableEntry(0x001f_ffff, 0xffff_0000, 65536), {
    offset: 2 ** 53 - 65536,
    allOnes: false,
  });
  assert.deepEqual(decodeBitmapTableEntry(0, 0, 65536), { offset: 0, allOnes: false });
  assert.deepEqual(decodeBitmapTableEntry(0, 1, 65536), { offset: 0, allOnes: true });
});

test("decodeBitmapTableEntry: reserved bits", () => {
  for (let bit = 1; bit <= 8; bit++) {
    throwsQcow(() => decodeBitmapTableEntry(0, 0x8_0000 | (1 << bit), 65536), "corrupt", /reserved bits/);
    throwsQcow(() => decodeBitmapTableEntry(0, 1 << bit, 65536), "corrupt", /reserved bits/);
  }
  for (let bit = 56; bit <= 63; bit++) {
    throwsQcow(() => decodeBitmapTableEntry((1 << (bit - 32)) >>> 0, 0x8_0000, 65536), "corrupt", /reserved bits/);
  }
  // Bit 0 is reserved once there is an offset.
  throwsQcow(() => decodeBitmapTableEntry(0, 0x8_0001, 65536), "corrupt", /bit 0/);
  throwsQcow(() => decodeBitmapTableEntry(1, 1, 65536), "corrupt", /bit 0/);
});

test("decodeBitmapTableEntry: offsets at or above 2^53", () => {
  throwsQcow(() => decodeBitmapTableEntry(0x0020_0000, 0, 512), "corrupt", /2\^53/);
  throwsQcow(() => decodeBitmapTableEntry(0x00ff_ffff, 0xffff_0000, 65536), "corrupt", /2\^53/);
});

test("decodeBitmapTableEntry: misaligned data cluster", () => {
  throwsQcow(() => decodeBitmapTableEntry(0, 0x8_0200, 65536), "corrupt", /0x80200 unaligned/);
  assert.equal(decodeBitmapTableEntry(0, 0x8_0200, 512).offset, 0x8_0200);
});
