/**
 * L1, L2 (standard, extended, compressed) and refcount table entries, from hand-built 64-bit
 * values (docs/interop/qcow2.rst, "Cluster mapping", "Extended L2 Entries",
 * "Host cluster management").
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ClusterType,
  decodeCompressed,
  decodeL1Entry,
  decodeL2Entry,
  decodeRefcountTableEntry,
  encodeCompressed,
  encodeL1Entry,
  encodeStandardL2,
  getRefcount,
  type L2Entry,
  type L2Geometry,
  l1EntryOffset,
  maxRefcount,
  SubclusterType,
  setRefcount,
  subclusterType,
} from "../../src/format/tables.js";
import { throwsQcow } from "./assert-qcow.js";

/** Splits a 64-bit entry into the [hi, lo] halves the codecs take. */
function halves(entry: bigint): [number, number] {
  return [Number(entry >> 32n), Number(entry & 0xffff_ffffn)];
}

function join(hi: number, lo: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const where = (): string => "L2 table at 0x40000, index 7";

// ---------------------------------------------------------------------------------------------
// L1 entries

test("decodeL1Entry: offset and COPIED flag", () => {
  assert.deepEqual(decodeL1Entry(...halves(COPIED | 0x1234_5678_0000n), 65536, 0), {
    l2Offset: 0x1234_5678_0000,
    copied: true,
  });
  assert.deepEqual(decodeL1Entry(...halves(0x5_0000n), 65536, 1), { l2Offset: 0x5_0000, copied: false });
  assert.deepEqual(decodeL1Entry(0, 0, 65536, 2), { l2Offset: 0, copied: false });
  // Bits 9-55: the highest offset below 2^53 with 512-byte clusters.
  assert.equal(decodeL1Entry(...halves(0x1f_ffff_ffff_fe00n), 512, 3).l2Offset, 2 ** 53 - 512);
});

test("l1EntryOffset: the same offsets and errors from signed halves (DataView.getInt32)", () => {
  const signed = (e: bigint): [number, number] => halves(e).map((x) => x | 0) as [number, number];
  for (const e of [COPIED | 0x1234_5678_0000n, 0x5_0000n, 0n, COPIED | 0x80_0000_0000n, 0x1f_ffff_ffff_fe00n]) {
    const cs = e === 0x1f_ffff_ffff_fe00n ? 512 : 65536;
    assert.equal(
      l1EntryOffset(...signed(e), cs, 1),
      decodeL1Entry(...halves(e), cs, 1).l2Offset,
      `0x${e.toString(16)}`,
    );
    assert.equal(l1EntryOffset(...halves(e), cs, 1), decodeL1Entry(...halves(e), cs, 1).l2Offset);
  }
  throwsQcow(
    () => l1EntryOffset(...signed(COPIED | (1n << 62n) | 0x5_0000n), 65536, 9),
    "corrupt",
    /L1 entry 9 has reserved bits set \(0xc000000000050000\)/,
  );
  throwsQcow(() => l1EntryOffset(...signed(1n << 55n), 512, 5), "corrupt", /L1 entry 5.*2\^53/);
  // A refcount table entry with bit 63 set, from signed halves: beyond 2^53, not negative.
  throwsQcow(() => decodeRefcountTableEntry(...signed(1n << 63n), 512, 5), "corrupt", /2\^53/);
  assert.equal(decodeRefcountTableEntry(...signed(0x8000_0000n), 65536, 0), 0x8000_0000);
});

test("decodeL1Entry: reserved bits 0-8 and 56-62", () => {
  for (let bit = 0n; bit <= 8n; bit++) {
    throwsQcow(
      () => decodeL1Entry(...halves(0x5_0000n | (1n << bit)), 65536, 9),
      "corrupt",
      /L1 entry 9 has reserved bits/,
    );
  }
  for (let bit = 56n; bit <= 62n; bit++) {
    throwsQcow(
      () => decodeL1Entry(...halves(0x5_0000n | (1n << bit)), 65536, 9),
      "corrupt",
      /L1 entry 9 has reserved bits/,
    );
  }
});

test("decodeL1Entry: misaligned and beyond 2^53", () => {
  throwsQcow(
    () => decodeL1Entry(...halves(0x5_0200n), 65536, 4),
    "corrupt",
    /L2 table offset 0x50200 unaligned \(L1 index: 0x4\)/,
  );
  throwsQcow(() => decodeL1Entry(...halves(1n << 53n), 512, 5), "corrupt", /L1 entry 5.*2\^53/);
  throwsQcow(() => decodeL1Entry(...halves(1n << 55n), 512, 5), "corrupt", /2\^53/);
});

test("encodeL1Entry: bit layout and round trip", () => {
  assert.deepEqual(encodeL1Entry({ l2Offset: 0x1234_5678_0000, copied: true }), halves(COPIED | 0x1234_5678_0000n));
  assert.deepEqual(encodeL1Entry({ l2Offset: 0x8000_0000, copied: false }), [0, 0x8000_0000]);
  for (const l2Offset of [0, 0x10000, 0xffff_0000, 0x1_0000_0000, 0x7f_ffff_0000, 2 ** 53 - 65536]) {
    for (const copied of [false, true]) {
      const [hi, lo] = encodeL1Entry({ l2Offset, copied });
      assert.deepEqual(decodeL1Entry(hi, lo, 65536, 0), { l2Offset, copied });
    }
  }
});

// ---------------------------------------------------------------------------------------------
// Standard L2 entries

const V3: L2Geometry = { clusterBits: 16, extendedL2: false, externalData: false, version: 3 };
const V2: L2Geometry = { ...V3, version: 2 };
const EXT: L2Geometry = { ...V3, extendedL2: true };
const DATA_FILE: L2Geometry = { ...V3, externalData: true };

function l2(entry: bigint, g: L2Geometry, bitmap = 0n): L2Entry {
  return decodeL2Entry(...halves(entry), ...halves(bitmap), g, where);
}

test("decodeL2Entry: normal and COPIED clusters", () => {
  assert.deepEqual(l2(0x1_0005_0000n, V3), {
    type: ClusterType.Normal,
    hostOffset: 0x1_0005_0000,
    copied: false,
    compressedSize: 0,
    allocMask: 0,
    zeroMask: 0,
  });
  const c = l2(COPIED | 0x7_0000n, V3);
  assert.equal(c.type, ClusterType.Normal);
  assert.equal(c.hostOffset, 0x7_0000);
  assert.equal(c.copied, true);
  // v2 reads the same.
  assert.equal(l2(COPIED | 0x7_0000n, V2).type, ClusterType.Normal);
});

test("decodeL2Entry: unallocated", () => {
  assert.equal(l2(0n, V3).type, ClusterType.Unallocated);
  // COPIED with offset 0 means host offset 0 only with an external data file.
  assert.equal(l2(COPIED, V3).type, ClusterType.Unallocated);
  assert.equal(l2(0n, DATA_FILE).type, ClusterType.Unallocated);
  const d = l2(COPIED, DATA_FILE);
  assert.equal(d.type, ClusterType.Normal);
  assert.equal(d.hostOffset, 0);
  assert.equal(d.copied, true);
  assert.equal(l2(COPIED | 0x3_0000n, DATA_FILE).hostOffset, 0x3_0000);
});

test("decodeL2Entry: zero flag (v3 without extended L2)", () => {
  const plain = l2(1n, V3);
  assert.equal(plain.type, ClusterType.ZeroPlain);
  assert.equal(plain.hostOffset, 0);
  const alloc = l2(COPIED | 0x9_0000n | 1n, V3);
  assert.equal(alloc.type, ClusterType.ZeroAlloc);
  assert.equal(alloc.hostOffset, 0x9_0000);
  assert.equal(alloc.copied, true);
  // The zero flag wins over an external data file's host offset 0.
  assert.equal(l2(COPIED | 1n, DATA_FILE).type, ClusterType.ZeroPlain);
});

test("decodeL2Entry: bit 0 is reserved on v2, ignored with extended L2 (QEMU, iotest 271)", () => {
  throwsQcow(() => l2(0x5_0000n | 1n, V2), "corrupt", /reserved bits.*L2 table at 0x40000, index 7/);
  throwsQcow(() => l2(1n, V2), "corrupt", /reserved bits/);
  const e = l2(0x5_0000n | 1n, EXT, 1n);
  assert.equal(e.type, ClusterType.Normal);
  assert.equal(e.allocMask, 1);
  assert.equal(l2(1n, EXT).type, ClusterType.Unallocated);
});

test("decodeL2Entry: reserved bits 1-8 and 56-61", () => {
  for (const g of [V3, V2, EXT]) {
    for (let bit = 1n; bit <= 8n; bit++) {
      throwsQcow(() => l2(0x5_0000n | (1n << bit), g), "corrupt", /reserved bits/);
    }
    for (let bit = 56n; bit <= 61n; bit++) {
      throwsQcow(
        () => l2(0x5_0000n | (1n << bit), g),
        "corrupt",
        new RegExp(`reserved bits set: 0x${(0x5_0000n | (1n << bit)).toString(16).padStart(16, "0")}`),
      );
    }
  }
});

test("decodeL2Entry: misaligned host offset and offsets beyond 2^53", () => {
  throwsQcow(
    () => l2(0x5_0200n, V3),
    "corrupt",
    /Cluster allocation offset 0x50200 unaligned \(L2 table at 0x40000, index 7\)/,
  );
  // Unaligned with a zero flag is still an error: the offset describes a preallocation.
  throwsQcow(() => l2(0x5_0200n | 1n, V3), "corrupt", /unaligned/);
  // 512-byte clusters: 2^53 - 512 is the last representable offset.
  assert.equal(l2(0x1f_ffff_ffff_fe00n, { ...V3, clusterBits: 9 }).hostOffset, 2 ** 53 - 512);
  throwsQcow(() => l2(1n << 53n, { ...V3, clusterBits: 9 }), "corrupt", /2\^53/);
  throwsQcow(() => l2(0xff_ffff_ffff_fe00n, { ...V3, clusterBits: 9 }), "corrupt", /2\^53/);
});

test("encodeStandardL2: bit layout and round trip", () => {
  assert.deepEqual(encodeStandardL2(0x1_2345_0000, true, false), halves(COPIED | 0x1_2345_0000n));
  assert.deepEqual(encodeStandardL2(0x1_2345_0000, false, true), halves(0x1_2345_0001n));
  assert.deepEqual(encodeStandardL2(0, false, true), [0, 1]);
  for (const off of [0x1_0000, 0xffff_0000, 0x1_0000_0000, 0xab_cdef_0000, 2 ** 53 - 65536]) {
    for (const copied of [false, true]) {
      const e = l2(join(...encodeStandardL2(off, copied, false)), V3);
      assert.deepEqual([e.type, e.hostOffset, e.copied], [ClusterType.Normal, off, copied]);
      const z = l2(join(...encodeStandardL2(off, copied, true)), V3);
      assert.deepEqual([z.type, z.hostOffset, z.copied], [ClusterType.ZeroAlloc, off, copied]);
    }
  }
});

// ---------------------------------------------------------------------------------------------
// Compressed cluster descriptors

/** Reads a compressed descriptor independently, with bigints, the way QEMU does. */
function qemuCompressed(entry: bigint, clusterBits: number): { offset: number; size: number; nbCsectors: number } {
  const x = BigInt(62 - (clusterBits - 8));
  const offset = entry & ((1n << x) - 1n);
  const nbCsectors = ((entry >> x) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1n;
  return { offset: Number(offset), size: Number(nbCsectors * 512n - (offset & 511n)), nbCsectors: Number(nbCsectors) };
}

test("decodeCompressed: a hand-built descriptor (64 KiB clusters, x = 54)", () => {
  // Offset 0x1_2345_6789, 3 additional sectors.
  const entry = COMPRESSED | (3n << 54n) | 0x1_2345_6789n;
  const [hi, lo] = halves(entry);
  const d = decodeCompressed(hi, lo, 16, where);
  assert.equal(d.offset, 0x1_2345_6789);
  assert.equal(d.size, 4 * 512 - 0x189);
  const e = l2(entry, V3);
  assert.deepEqual(e, {
    type: ClusterType.Compressed,
    hostOffset: 0x1_2345_6789,
    copied: false,
    compressedSize: 4 * 512 - 0x189,
    allocMask: 0,
    zeroMask: 0,
  });
});

test("decodeCompressed: 512-byte clusters (x = 61) and 2 MiB clusters (x = 49)", () => {
  // cluster_bits 9: a one-bit sector count at bit 61.
  assert.deepEqual(decodeCompressed(...halves(COMPRESSED | (1n << 61n) | 0x3ffn), 9, where), {
    offset: 0x3ff,
    size: 2 * 512 - 0x1ff,
  });
  assert.deepEqual(decodeCompressed(...halves(COMPRESSED | 0x200n), 9, where), { offset: 0x200, size: 512 });
  // cluster_bits 21: a 13-bit sector count at bits 49-61; the offset has 49 bits.
  const entry = COMPRESSED | (0x1fffn << 49n) | ((1n << 49n) - 1n);
  assert.deepEqual(decodeCompressed(...halves(entry), 21, where), { offset: 2 ** 49 - 1, size: 8192 * 512 - 511 });
});

test("encodeCompressed / decodeCompressed: round trip for every cluster_bits 9..21", () => {
  for (let cb = 9; cb <= 21; cb++) {
    const clusterSize = 2 ** cb;
    const x = 62 - (cb - 8);
    const maxOffset = Math.min(2 ** x, 2 ** 53) - 1;
    const offsets = [1, 511, 519, 0x1_2345_6789, clusterSize * 7 - 3, maxOffset - 2 * clusterSize, maxOffset];
    for (const offset of offsets) {
      const o = offset % 512;
      // Tiny, one cluster, and as much as the sector count can describe (two clusters).
      const sizes = [1, 100, 512 - o, 513 - o, clusterSize, clusterSize + 1, 2 * clusterSize - o];
      for (const size of sizes) {
        const [hi, lo] = encodeCompressed(offset, size, cb);
        const entry = join(hi, lo);
        const label = `cluster_bits ${cb}, offset 0x${offset.toString(16)}, size ${size}`;
        assert.equal(entry >> 62n, 1n, `${label}: bit 62 set, bit 63 clear`);
        // QEMU: nb_csectors - 1 = last sector - first sector.
        const expectSectors = Number((BigInt(offset) + BigInt(size) - 1n) / 512n - BigInt(offset) / 512n);
        const q = qemuCompressed(entry, cb);
        assert.equal(q.offset, offset, label);
        assert.equal(q.nbCsectors - 1, expectSectors, label);
        const d = decodeCompressed(hi, lo, cb, where);
        assert.deepEqual(d, { offset: q.offset, size: q.size }, label);
        assert.ok(d.size >= size && d.size - size < 512, `${label}: decoded size ${d.size}`);
        const e = decodeL2Entry(hi, lo, 0, 0, { ...V3, clusterBits: cb }, where);
        assert.equal(e.type, ClusterType.Compressed, label);
        assert.equal(e.hostOffset, offset, label);
        assert.equal(e.compressedSize, d.size, label);
      }
    }
  }
});

test("encodeCompressed: values that do not fit the descriptor are refused", () => {
  // 2 MiB clusters leave 49 bits of offset.
  throwsQcow(() => encodeCompressed(2 ** 49, 100, 21), "unsupported", /49 bits/);
  // The sector count reaches two clusters at most.
  throwsQcow(() => encodeCompressed(0, 2 * 65536 + 1, 16), "invalid-argument", /size 131073/);
  throwsQcow(() => encodeCompressed(1, 2 * 65536, 16), "invalid-argument", /size/);
  throwsQcow(() => encodeCompressed(512, 0, 16), "invalid-argument", /size 0/);
});

test("decodeL2Entry: compressed descriptors that are corrupt", () => {
  throwsQcow(
    () => l2(COPIED | COMPRESSED | 0x1234n, V3),
    "corrupt",
    /Compressed cluster has the COPIED flag set \(L2 table at 0x40000, index 7\)/,
  );
  // A compressed cluster's bitmap is ignored (QEMU, iotest 271; only check reports it).
  for (const bitmap of [1n, 1n << 40n]) {
    const e = l2(COMPRESSED | 0x1234n, EXT, bitmap);
    assert.equal(e.type, ClusterType.Compressed);
    assert.equal(e.allocMask | e.zeroMask, 0);
  }
  // cluster_bits 9: offset bits 56-60 must be zero.
  throwsQcow(() => l2(COMPRESSED | (1n << 56n), { ...V3, clusterBits: 9 }), "corrupt", /bits above 55/);
  throwsQcow(() => l2(COMPRESSED | (1n << 53n), { ...V3, clusterBits: 9 }), "corrupt", /2\^53/);
  // cluster_bits 16 (x = 54): bit 53 is offset, bit 54 is already the sector count.
  throwsQcow(() => l2(COMPRESSED | (1n << 53n), V3), "corrupt", /2\^53/);
  assert.equal(l2(COMPRESSED | (1n << 54n) | 0x200n, V3).compressedSize, 1024);
});

// ---------------------------------------------------------------------------------------------
// Extended L2 entries and subcluster types

test("extended L2: allocation and zero bitmaps of a normal cluster", () => {
  // alloc: subclusters 0, 2, 31; zero: subclusters 1, 30.
  const alloc = (1n << 0n) | (1n << 2n) | (1n << 31n);
  const zero = ((1n << 1n) | (1n << 30n)) << 32n;
  const e = l2(0x7_0000n, EXT, zero | alloc);
  assert.equal(e.type, ClusterType.Normal);
  assert.equal(e.allocMask, 0x8000_0005);
  assert.equal(e.zeroMask, 0x4000_0002);
  const types = Array.from({ length: 32 }, (_, sc) => subclusterType(e, sc, true));
  const expected = Array.from({ length: 32 }, () => SubclusterType.UnallocatedAlloc);
  expected[0] = SubclusterType.Normal;
  expected[2] = SubclusterType.Normal;
  expected[31] = SubclusterType.Normal;
  expected[1] = SubclusterType.ZeroAlloc;
  expected[30] = SubclusterType.ZeroAlloc;
  assert.deepEqual(types, expected);
});

test("extended L2: all allocated, and COPIED", () => {
  const e = l2(COPIED | 0x7_0000n, EXT, 0xffff_ffffn);
  assert.equal(e.copied, true);
  for (let sc = 0; sc < 32; sc++) assert.equal(subclusterType(e, sc, true), SubclusterType.Normal);
});

test("extended L2: unallocated cluster with zero subclusters", () => {
  const e = l2(0n, EXT, 0x8000_0001n << 32n);
  assert.equal(e.type, ClusterType.Unallocated);
  for (let sc = 0; sc < 32; sc++) {
    assert.equal(
      subclusterType(e, sc, true),
      sc === 0 || sc === 31 ? SubclusterType.ZeroPlain : SubclusterType.UnallocatedPlain,
      `sc ${sc}`,
    );
  }
});

test("extended L2: a subcluster both allocated and zero is an error", () => {
  throwsQcow(() => l2(0x7_0000n, EXT, (1n << 32n) | 1n), "corrupt", /both allocated and zero.*index 7/);
  throwsQcow(() => l2(0x7_0000n, EXT, (1n << 63n) | (1n << 31n)), "corrupt", /both allocated and zero/);
  throwsQcow(() => l2(0n, EXT, 0xffff_ffff_ffff_ffffn), "corrupt", /both allocated and zero/);
});

test("extended L2: an unallocated cluster with allocated subclusters is an error", () => {
  throwsQcow(() => l2(0n, EXT, 1n), "corrupt", /Unallocated cluster has allocated subclusters/);
  throwsQcow(() => l2(0n, EXT, 1n << 31n), "corrupt", /Unallocated cluster has allocated subclusters/);
});

test("extended L2: the bitmap is ignored without extended L2", () => {
  const e = decodeL2Entry(0, 0x7_0000, 0xffff_ffff, 0xffff_ffff, V3, where);
  assert.equal(e.allocMask, 0);
  assert.equal(e.zeroMask, 0);
  assert.equal(subclusterType(e, 5, false), SubclusterType.Normal);
});

test("subclusterType: one subcluster per cluster without extended L2", () => {
  assert.equal(subclusterType(l2(0x7_0000n, V3), 0, false), SubclusterType.Normal);
  assert.equal(subclusterType(l2(0n, V3), 0, false), SubclusterType.UnallocatedPlain);
  assert.equal(subclusterType(l2(1n, V3), 0, false), SubclusterType.ZeroPlain);
  assert.equal(subclusterType(l2(0x7_0001n, V3), 0, false), SubclusterType.ZeroAlloc);
  assert.equal(subclusterType(l2(COMPRESSED | 0x7_0123n, V3), 0, false), SubclusterType.Compressed);
  // Compressed clusters have no subclusters even with extended L2.
  const c = l2(COMPRESSED | 0x7_0123n, EXT);
  for (const sc of [0, 17, 31]) assert.equal(subclusterType(c, sc, true), SubclusterType.Compressed);
});

// ---------------------------------------------------------------------------------------------
// Refcount table and blocks

test("decodeRefcountTableEntry: offsets, 0, reserved bits, misaligned, beyond 2^53", () => {
  assert.equal(decodeRefcountTableEntry(...halves(0x2_0000n), 65536, 0), 0x2_0000);
  assert.equal(decodeRefcountTableEntry(...halves(0x1234_5678_0000n), 65536, 0), 0x1234_5678_0000);
  assert.equal(decodeRefcountTableEntry(0, 0, 65536, 0), 0);
  for (let bit = 0n; bit <= 8n; bit++) {
    throwsQcow(
      () => decodeRefcountTableEntry(...halves(0x2_0000n | (1n << bit)), 65536, 3),
      "corrupt",
      /Refcount table entry 3 has reserved bits/,
    );
  }
  throwsQcow(
    () => decodeRefcountTableEntry(...halves(0x2_0200n), 65536, 4),
    "corrupt",
    /Refcount block offset 0x20200 unaligned \(reftable index: 0x4\)/,
  );
  // Bits 9-63 are all offset; anything from 2^53 up cannot be held.
  throwsQcow(() => decodeRefcountTableEntry(...halves(1n << 53n), 512, 5), "corrupt", /Refcount table entry 5.*2\^53/);
  throwsQcow(() => decodeRefcountTableEntry(...halves(1n << 63n), 512, 5), "corrupt", /2\^53/);
});

test("maxRefcount for every refcount_order", () => {
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map(maxRefcount), [
    1,
    3,
    15,
    255,
    65535,
    0xffff_ffff,
    Number.MAX_SAFE_INTEGER,
  ]);
});

test("getRefcount: sub-byte widths count from the least significant bit", () => {
  const block = new DataView(Uint8Array.of(0b1010_0101, 0b0000_0001).buffer);
  assert.deepEqual(
    Array.from({ length: 16 }, (_, i) => getRefcount(block, i, 0)),
    [1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
  );
  // 2 bits: 0b10_10_01_01 -> entries 1, 1, 2, 2.
  assert.deepEqual(
    [0, 1, 2, 3, 4].map((i) => getRefcount(block, i, 1)),
    [1, 1, 2, 2, 1],
  );
  // 4 bits: low nibble first.
  assert.deepEqual(
    [0, 1, 2, 3].map((i) => getRefcount(block, i, 2)),
    [5, 10, 1, 0],
  );
});

test("getRefcount: byte and wider widths are big-endian", () => {
  const bytes = Uint8Array.of(
    0x12,
    0x34,
    0x56,
    0x78,
    0x9a,
    0xbc,
    0xde,
    0xf0,
    0x00,
    0x00,
    0x00,
    0x01,
    0x00,
    0x00,
    0x00,
    0x02,
  );
  const block = new DataView(bytes.buffer);
  assert.deepEqual(
    [0, 1, 7].map((i) => getRefcount(block, i, 3)),
    [0x12, 0x34, 0xf0],
  );
  assert.deepEqual(
    [0, 1, 3].map((i) => getRefcount(block, i, 4)),
    [0x1234, 0x5678, 0xdef0],
  );
  assert.deepEqual(
    [0, 1, 2].map((i) => getRefcount(block, i, 5)),
    [0x1234_5678, 0x9abc_def0, 1],
  );
  assert.equal(getRefcount(block, 1, 6), 0x1_0000_0002);
  // A 64-bit refcount beyond 2^53 reads as saturated.
  assert.equal(getRefcount(block, 0, 6), Number.MAX_SAFE_INTEGER);
  const edge = new DataView(new Uint8Array(8).buffer);
  edge.setBigUint64(0, 2n ** 53n - 1n);
  assert.equal(getRefcount(edge, 0, 6), Number.MAX_SAFE_INTEGER);
  edge.setBigUint64(0, 2n ** 53n - 2n);
  assert.equal(getRefcount(edge, 0, 6), Number.MAX_SAFE_INTEGER - 1);
});

test("setRefcount: exact bytes for each width", () => {
  const cases: [order: number, i: number, value: number, expect: number[]][] = [
    [0, 0, 1, [0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [0, 3, 1, [0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [0, 9, 1, [0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [1, 1, 3, [0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [1, 7, 2, [0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [2, 1, 0xa, [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [2, 2, 0x7, [0, 0x07, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [3, 2, 0xfe, [0, 0, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [4, 1, 0x1234, [0, 0, 0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    [5, 1, 0x89ab_cdef, [0, 0, 0, 0, 0x89, 0xab, 0xcd, 0xef, 0, 0, 0, 0, 0, 0, 0, 0]],
    [6, 1, 0x1f_1234_5678_9abc, [0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x1f, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]],
  ];
  for (const [order, i, value, expect] of cases) {
    const bytes = new Uint8Array(16);
    setRefcount(new DataView(bytes.buffer), i, order, value);
    assert.deepEqual(Array.from(bytes), expect, `order ${order}, entry ${i}, value ${value}`);
  }
});

test("setRefcount / getRefcount: neighbouring entries stay untouched, every order", () => {
  for (let order = 0; order <= 6; order++) {
    const bits = 2 ** order;
    const n = (64 * 8) / bits; // a 64-byte block
    const max = maxRefcount(order);
    const refcountOf = (i: number, round: number): number =>
      order === 6 ? (i * 0x1_0000_0001 + round * 977) % 2 ** 53 : (i * 7 + 3 + round) % (max + 1);
    for (const fill of [0x00, 0xff]) {
      const bytes = new Uint8Array(64).fill(fill);
      const block = new DataView(bytes.buffer);
      const before = fill === 0 ? 0 : order === 6 ? Number.MAX_SAFE_INTEGER : max;
      // Write every third entry, in a scrambled order; the others keep the fill.
      const touched = Array.from({ length: n }, (_, i) => i).filter((i) => i % 3 === 1);
      touched.sort((a, b) => ((a * 37) % 101) - ((b * 37) % 101));
      for (const i of touched) setRefcount(block, i, order, refcountOf(i, 0));
      for (let i = 0; i < n; i++) {
        assert.equal(
          getRefcount(block, i, order),
          i % 3 === 1 ? refcountOf(i, 0) : before,
          `order ${order}, fill ${fill}, entry ${i}`,
        );
      }
      // Rewrite all of them, then check each reads back.
      for (let i = n - 1; i >= 0; i--) setRefcount(block, i, order, refcountOf(i, 1));
      for (let i = 0; i < n; i++)
        assert.equal(getRefcount(block, i, order), refcountOf(i, 1), `order ${order}, entry ${i}`);
    }
    // The maximum of each width round-trips (2^53 - 1 for 64-bit entries).
    const block = new DataView(new Uint8Array(64).buffer);
    setRefcount(block, 3, order, max);
    assert.equal(getRefcount(block, 3, order), max);
    assert.equal(getRefcount(block, 2, order), 0);
    assert.equal(getRefcount(block, 4, order), 0);
  }
});
