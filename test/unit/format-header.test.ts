/**
 * The qcow2 header and its extensions (docs/interop/qcow2.rst, "Header", "Header extensions"),
 * decoded from bytes laid out here by hand at the spec's offsets.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { concatBytes } from "../../src/format/bytes.js";
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  decodeBackingName,
  decodeExtensions,
  decodeHeader,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  encodeHeader,
  type HeaderExtensions,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  nameFeatures,
  type Qcow2Header,
  QEMU_FEATURE_NAMES,
} from "../../src/format/header.js";
import { throwsQcow } from "./assert-qcow.js";

const concat = (...parts: Uint8Array[]): Uint8Array => concatBytes(parts);

// ---------------------------------------------------------------------------------------------
// Hand layout of a header

type U64 = number | bigint;
interface Fields {
  magic: number;
  version: number;
  backingFileOffset: U64;
  backingFileSize: number;
  clusterBits: number;
  size: U64;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: U64;
  refcountTableOffset: U64;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: U64;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Length of the returned buffer; defaults to the cluster size (at most 64 KiB). */
  bufLen: number;
}

/** A valid 1 GiB v3 image with 64 KiB clusters: reftable at 0x10000, L1 at 0x30000. */
const DEFAULTS: Fields = {
  magic: 0x514649fb,
  version: 3,
  backingFileOffset: 0,
  backingFileSize: 0,
  clusterBits: 16,
  size: 1 << 30,
  cryptMethod: 0,
  l1Size: 2,
  l1TableOffset: 0x30000,
  refcountTableOffset: 0x10000,
  refcountTableClusters: 1,
  nbSnapshots: 0,
  snapshotsOffset: 0,
  incompatible: 0n,
  compatible: 0n,
  autoclear: 0n,
  refcountOrder: 4,
  headerLength: 112,
  compressionType: 0,
  bufLen: 0,
};

function layHeader(over: Partial<Fields> = {}): Uint8Array {
  const f = { ...DEFAULTS, ...over };
  const len = f.bufLen || Math.max(512, 2 ** Math.min(Math.max(f.clusterBits, 0), 16));
  const buf = new Uint8Array(len);
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, f.magic);
  dv.setUint32(4, f.version);
  dv.setBigUint64(8, BigInt(f.backingFileOffset));
  dv.setUint32(16, f.backingFileSize);
  dv.setUint32(20, f.clusterBits);
  dv.setBigUint64(24, BigInt(f.size));
  dv.setUint32(32, f.cryptMethod);
  dv.setUint32(36, f.l1Size);
  dv.setBigUint64(40, BigInt(f.l1TableOffset));
  dv.setBigUint64(48, BigInt(f.refcountTableOffset));
  dv.setUint32(56, f.refcountTableClusters);
  dv.setUint32(60, f.nbSnapshots);
  dv.setBigUint64(64, BigInt(f.snapshotsOffset));
  if (f.version >= 3) {
    dv.setBigUint64(72, f.incompatible);
    dv.setBigUint64(80, f.compatible);
    dv.setBigUint64(88, f.autoclear);
    dv.setUint32(96, f.refcountOrder);
    dv.setUint32(100, f.headerLength);
    if (f.headerLength > 104) buf[104] = f.compressionType;
  }
  return buf;
}

/** Writes one header extension at `at`; returns where the next one starts (padded to 8). */
function putExt(buf: Uint8Array, at: number, type: number, data: Uint8Array | string): number {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const dv = new DataView(buf.buffer, buf.byteOffset);
  dv.setUint32(at, type);
  dv.setUint32(at + 4, bytes.length);
  buf.set(bytes, at + 8);
  return at + 8 + Math.ceil(bytes.length / 8) * 8;
}

/** A feature-name table entry: type byte, bit byte, 46 name bytes padded with zeros. */
function featureEntry(type: number, bit: number, name: string | Uint8Array): Uint8Array {
  const e = new Uint8Array(48);
  e[0] = type;
  e[1] = bit;
  e.set(typeof name === "string" ? new TextEncoder().encode(name) : name, 2);
  return e;
}

// ---------------------------------------------------------------------------------------------
// decodeHeader

test("decodeHeader: the default hand-laid header is valid", () => {
  const h = decodeHeader(layHeader());
  assert.equal(h.version, 3);
  assert.equal(h.size, 1 << 30);
});

test("decodeHeader: v2 header is 72 bytes, refcount_order 4, no v3 fields read", () => {
  const buf = layHeader({
    version: 2,
    clusterBits: 12,
    size: 0x1_0000_0000, // 4 GiB: 4096-byte clusters, 512 entries per L2 => 2048 L1 entries
    l1Size: 2048,
    l1TableOffset: 0x3000,
    refcountTableOffset: 0x1000,
    refcountTableClusters: 2,
    nbSnapshots: 3,
    snapshotsOffset: 0x7000,
    cryptMethod: 1,
  });
  // Whatever follows byte 72 in a v2 image is not header: fill it with garbage.
  buf.fill(0xa5, 72, 112);
  const h = decodeHeader(buf);
  assert.deepEqual(h, {
    version: 2,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: 12,
    size: 0x1_0000_0000,
    cryptMethod: 1,
    l1Size: 2048,
    l1TableOffset: 0x3000,
    refcountTableOffset: 0x1000,
    refcountTableClusters: 2,
    nbSnapshots: 3,
    snapshotsOffset: 0x7000,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    tail: new Uint8Array(0),
  });
});

test("decodeHeader: v2 needs only 72 bytes", () => {
  const h = decodeHeader(layHeader({ version: 2 }).subarray(0, 72));
  assert.equal(h.headerLength, 72);
  throwsQcow(() => decodeHeader(layHeader({ version: 2 }).subarray(0, 71)), "corrupt", /truncated/);
});

test("decodeHeader: v3 reads every field", () => {
  const buf = layHeader({
    backingFileOffset: 0x300,
    backingFileSize: 9,
    clusterBits: 12,
    size: 0x1_2345_6000, // needs ceil(size / 2 MiB) = 2331 L1 entries
    cryptMethod: 2,
    l1Size: 2400,
    l1TableOffset: 0x5000,
    refcountTableOffset: 0x1000,
    refcountTableClusters: 3,
    nbSnapshots: 2,
    snapshotsOffset: 0x9000,
    incompatible: INCOMPAT_DIRTY | INCOMPAT_COMPRESSION,
    compatible: COMPAT_LAZY_REFCOUNTS | (1n << 63n),
    autoclear: AUTOCLEAR_BITMAPS | (1n << 40n),
    refcountOrder: 5,
    headerLength: 128,
    compressionType: 1,
  });
  // Padding 105..111 is not part of the tail; 112..127 is an unknown additional field.
  for (let i = 0; i < 16; i++) buf[112 + i] = 0x10 + i;
  buf[128] = 0xee; // first byte past header_length: not header
  const h = decodeHeader(buf);
  assert.equal(h.version, 3);
  assert.equal(h.backingFileOffset, 0x300);
  assert.equal(h.backingFileSize, 9);
  assert.equal(h.clusterBits, 12);
  assert.equal(h.size, 0x1_2345_6000);
  assert.equal(h.cryptMethod, 2);
  assert.equal(h.l1Size, 2400);
  assert.equal(h.l1TableOffset, 0x5000);
  assert.equal(h.refcountTableOffset, 0x1000);
  assert.equal(h.refcountTableClusters, 3);
  assert.equal(h.nbSnapshots, 2);
  assert.equal(h.snapshotsOffset, 0x9000);
  assert.equal(h.incompatibleFeatures, 0b1001n);
  assert.equal(h.compatibleFeatures, 0x8000_0000_0000_0001n);
  assert.equal(h.autoclearFeatures, 0x100_0000_0001n);
  assert.equal(h.refcountOrder, 5);
  assert.equal(h.headerLength, 128);
  assert.equal(h.compressionType, 1);
  assert.deepEqual(
    h.tail,
    Uint8Array.from({ length: 16 }, (_, i) => 0x10 + i),
  );
});

test("decodeHeader: v3 with header_length 104 has no compression_type field", () => {
  const buf = layHeader({ headerLength: 104 });
  buf[104] = 1; // the first byte of an extension, not compression_type
  const h = decodeHeader(buf);
  assert.equal(h.headerLength, 104);
  assert.equal(h.compressionType, 0);
  assert.equal(h.tail.length, 0);
});

test("decodeHeader: v3 with header_length 112 has compression_type and an empty tail", () => {
  const buf = layHeader({ incompatible: INCOMPAT_COMPRESSION, compressionType: 1 });
  const h = decodeHeader(buf);
  assert.equal(h.compressionType, 1);
  assert.equal(h.tail.length, 0);
});

test("decodeHeader: v3 buffer shorter than the header", () => {
  throwsQcow(() => decodeHeader(layHeader().subarray(0, 100)), "corrupt", /truncated/);
  throwsQcow(() => decodeHeader(layHeader({ headerLength: 160 }).subarray(0, 150)), "corrupt", /truncated.*160/);
});

test("decodeHeader: bad magic", () => {
  throwsQcow(() => decodeHeader(layHeader({ magic: 0x514649fc })), "corrupt", /not in qcow2 format/);
  throwsQcow(() => decodeHeader(new Uint8Array(512)), "corrupt", /not in qcow2 format/);
});

test("decodeHeader: versions 1 and 4 are unsupported", () => {
  throwsQcow(() => decodeHeader(layHeader({ version: 1 })), "unsupported", /version 1/);
  throwsQcow(() => decodeHeader(layHeader({ version: 4 })), "unsupported", /version 4/);
});

test("decodeHeader: cluster_bits must be 9..21", () => {
  throwsQcow(() => decodeHeader(layHeader({ clusterBits: 8 })), "corrupt", /cluster_bits.*2\^8|2\^8.*cluster_bits/);
  throwsQcow(() => decodeHeader(layHeader({ clusterBits: 22, bufLen: 512 })), "corrupt", /cluster_bits/);
  // The bounds themselves are fine (L1 sized for 1 GiB: 512 B clusters need 2^21/64 entries).
  assert.equal(
    decodeHeader(layHeader({ clusterBits: 9, l1Size: 32768, l1TableOffset: 0x400, refcountTableOffset: 0x200 }))
      .clusterBits,
    9,
  );
  assert.equal(
    decodeHeader(layHeader({ clusterBits: 21, l1Size: 1, l1TableOffset: 0x400000, refcountTableOffset: 0x200000 }))
      .clusterBits,
    21,
  );
});

test("decodeHeader: header_length must be >= 104, <= cluster size, a multiple of 8", () => {
  throwsQcow(() => decodeHeader(layHeader({ headerLength: 96 })), "corrupt", /header_length 96/);
  throwsQcow(() => decodeHeader(layHeader({ headerLength: 0 })), "corrupt", /header_length 0/);
  throwsQcow(
    () =>
      decodeHeader(
        layHeader({
          clusterBits: 9,
          headerLength: 520,
          l1Size: 32768,
          l1TableOffset: 0x400,
          refcountTableOffset: 0x200,
          bufLen: 1024,
        }),
      ),
    "corrupt",
    /header_length 520/,
  );
  throwsQcow(() => decodeHeader(layHeader({ headerLength: 108 })), "corrupt", /header_length 108/);
  // A header of exactly one cluster is allowed.
  const h = decodeHeader(
    layHeader({ clusterBits: 9, headerLength: 512, l1Size: 32768, l1TableOffset: 0x400, refcountTableOffset: 0x200 }),
  );
  assert.equal(h.tail.length, 400);
});

test("decodeHeader: refcount_order at most 6", () => {
  assert.equal(decodeHeader(layHeader({ refcountOrder: 6 })).refcountOrder, 6);
  assert.equal(decodeHeader(layHeader({ refcountOrder: 0 })).refcountOrder, 0);
  throwsQcow(() => decodeHeader(layHeader({ refcountOrder: 7 })), "corrupt", /refcount_order 7/);
});

test("decodeHeader: backing file name limits", () => {
  assert.equal(decodeHeader(layHeader({ backingFileOffset: 0x200, backingFileSize: 1023 })).backingFileSize, 1023);
  throwsQcow(
    () => decodeHeader(layHeader({ backingFileOffset: 0x200, backingFileSize: 1024 })),
    "corrupt",
    /[Bb]acking file name too long: 1024/,
  );
  throwsQcow(
    () => decodeHeader(layHeader({ backingFileOffset: 0x10008, backingFileSize: 4 })),
    "corrupt",
    /^Invalid backing file offset: 0x10008/,
  );
  // The name must end inside the first cluster.
  throwsQcow(
    () => decodeHeader(layHeader({ backingFileOffset: 0xfff0, backingFileSize: 17 })),
    "corrupt",
    /[Bb]acking file name/,
  );
  assert.equal(decodeHeader(layHeader({ backingFileOffset: 0xfff0, backingFileSize: 16 })).backingFileOffset, 0xfff0);
  // backing_file_size is undefined without a backing file.
  assert.equal(decodeHeader(layHeader({ backingFileSize: 5000 })).backingFileOffset, 0);
});

test("decodeHeader: L1 table size and placement", () => {
  // 32 MiB of L1 entries is QEMU's limit: 4 Mi entries pass, one more does not.
  assert.equal(decodeHeader(layHeader({ l1Size: 4 * 1024 * 1024 })).l1Size, 4 * 1024 * 1024);
  throwsQcow(() => decodeHeader(layHeader({ l1Size: 4 * 1024 * 1024 + 1 })), "corrupt", /l1_size 4194305/);
  throwsQcow(() => decodeHeader(layHeader({ l1Size: 0xffff_ffff })), "corrupt", /l1_size/);
  // 1 GiB + 1 byte with 64 KiB clusters needs 3 L1 entries.
  throwsQcow(() => decodeHeader(layHeader({ size: (1 << 30) + 1, l1Size: 2 })), "corrupt", /l1_size 2.*needs 3/);
  assert.equal(decodeHeader(layHeader({ size: (1 << 30) + 1, l1Size: 3 })).l1Size, 3);
  // Extended L2 halves the entries per L2 table, so 1 GiB needs 4.
  throwsQcow(
    () => decodeHeader(layHeader({ incompatible: INCOMPAT_EXTL2, l1Size: 3 })),
    "corrupt",
    /l1_size 3.*needs 4/,
  );
  assert.equal(decodeHeader(layHeader({ incompatible: INCOMPAT_EXTL2, l1Size: 4 })).l1Size, 4);
  // An empty disk needs no L1 table at all, but its offset must still be aligned (QEMU's
  // validate_table_offset checks it whatever the size).
  assert.equal(decodeHeader(layHeader({ size: 0, l1Size: 0, l1TableOffset: 0 })).l1Size, 0);
  throwsQcow(
    () => decodeHeader(layHeader({ size: 0, l1Size: 0, l1TableOffset: 0x123 })),
    "corrupt",
    /^Active L1 table offset invalid: 0x123/,
  );
  throwsQcow(
    () => decodeHeader(layHeader({ l1TableOffset: 0x30200 })),
    "corrupt",
    /^Active L1 table offset invalid: 0x30200.*align/,
  );
  throwsQcow(() => decodeHeader(layHeader({ l1TableOffset: 0 })), "corrupt", /L1 table/);
});

test("decodeHeader: refcount table size and placement", () => {
  // An empty refcount table decodes, as in QEMU, so that check -r all can rebuild it.
  assert.equal(decodeHeader(layHeader({ refcountTableClusters: 0 })).refcountTableClusters, 0);
  // 8 MiB is QEMU's limit: 128 clusters of 64 KiB pass, 129 do not.
  assert.equal(decodeHeader(layHeader({ refcountTableClusters: 128 })).refcountTableClusters, 128);
  throwsQcow(() => decodeHeader(layHeader({ refcountTableClusters: 129 })), "corrupt", /refcount_table_clusters 129/);
  throwsQcow(
    () => decodeHeader(layHeader({ refcountTableOffset: 0x10008 })),
    "corrupt",
    /^Reference count table offset invalid: 0x10008.*align/,
  );
  throwsQcow(() => decodeHeader(layHeader({ refcountTableOffset: 0 })), "corrupt", /Reference count table/);
});

test("decodeHeader: snapshot table count and placement", () => {
  assert.equal(decodeHeader(layHeader({ nbSnapshots: 65536, snapshotsOffset: 0x40000 })).nbSnapshots, 65536);
  throwsQcow(
    () => decodeHeader(layHeader({ nbSnapshots: 65537, snapshotsOffset: 0x40000 })),
    "corrupt",
    /^Snapshot table too large: nb_snapshots 65537/,
  );
  throwsQcow(
    () => decodeHeader(layHeader({ nbSnapshots: 1, snapshotsOffset: 0x40100 })),
    "corrupt",
    /^Snapshot table offset invalid: 0x40100.*align/,
  );
  // Even without snapshots (as QEMU, iotest 080).
  throwsQcow(
    () => decodeHeader(layHeader({ nbSnapshots: 0, snapshotsOffset: 0x40100 })),
    "corrupt",
    /^Snapshot table offset invalid: 0x40100/,
  );
  assert.equal(decodeHeader(layHeader({ nbSnapshots: 0, snapshotsOffset: 0 })).snapshotsOffset, 0);
});

test("decodeHeader: compression_type and its incompatible bit go together", () => {
  throwsQcow(
    () => decodeHeader(layHeader({ incompatible: INCOMPAT_COMPRESSION, compressionType: 0 })),
    "corrupt",
    /[Cc]ompression type.*bit.*compression_type/,
  );
  throwsQcow(() => decodeHeader(layHeader({ compressionType: 1 })), "corrupt", /compression_type 1/);
  throwsQcow(
    () => decodeHeader(layHeader({ incompatible: INCOMPAT_COMPRESSION, compressionType: 2 })),
    "unsupported",
    /^qcow2: unknown compression type: 2/,
  );
  // header_length 104 with the bit set: the field is absent, which counts as deflate.
  throwsQcow(
    () => decodeHeader(layHeader({ incompatible: INCOMPAT_COMPRESSION, headerLength: 104 })),
    "corrupt",
    /compression_type/,
  );
});

test("decodeHeader: extended L2 needs cluster_bits >= 14", () => {
  // 16 KiB clusters, 1024 extended entries per L2 table: 1 GiB needs 64 L1 entries.
  const ok = decodeHeader(
    layHeader({
      clusterBits: 14,
      incompatible: INCOMPAT_EXTL2,
      l1Size: 64,
      l1TableOffset: 0xc000,
      refcountTableOffset: 0x4000,
    }),
  );
  assert.equal(ok.incompatibleFeatures, INCOMPAT_EXTL2);
  throwsQcow(
    () =>
      decodeHeader(
        layHeader({
          clusterBits: 13,
          incompatible: INCOMPAT_EXTL2,
          l1Size: 256,
          l1TableOffset: 0x6000,
          refcountTableOffset: 0x2000,
        }),
      ),
    "corrupt",
    /Extended L2.*16384/,
  );
});

test("decodeHeader: crypt_method 3 is unsupported", () => {
  assert.equal(decodeHeader(layHeader({ cryptMethod: 2 })).cryptMethod, 2);
  throwsQcow(() => decodeHeader(layHeader({ cryptMethod: 3 })), "unsupported", /encryption method: 3/);
});

test("decodeHeader: 64-bit fields at or above 2^53 are refused", () => {
  const big = 1n << 53n;
  // In QEMU's words where QEMU refuses them too (iotest 080).
  for (const [message, over] of [
    ["^Invalid backing file offset: an offset beyond 2\\^53 \\(at 0x8\\)", { backingFileOffset: big }],
    ["size.*too large", { size: big }],
    ["^Active L1 table offset invalid: .*\\(at 0x28\\) is too large", { l1TableOffset: big }],
    ["^Reference count table offset invalid: .*\\(at 0x30\\) is too large", { refcountTableOffset: big }],
    ["^Snapshot table offset invalid: .*\\(at 0x40\\) is too large", { snapshotsOffset: big }],
  ] as const) {
    throwsQcow(() => decodeHeader(layHeader(over)), "corrupt", new RegExp(message));
  }
  throwsQcow(() => decodeHeader(layHeader({ size: 0xffff_ffff_ffff_ffffn })), "corrupt", /size/);
});

// ---------------------------------------------------------------------------------------------
// decodeExtensions, decodeBackingName, nameFeatures

const EMPTY_EXT: HeaderExtensions = { featureNames: [], unknown: [] };

test("decodeExtensions: none (end marker right after the header)", () => {
  const buf = layHeader();
  assert.deepEqual(decodeExtensions(buf, decodeHeader(buf)), EMPTY_EXT);
});

test("decodeExtensions: every known extension, padding to 8, then the end marker", () => {
  const buf = layHeader({ autoclear: AUTOCLEAR_BITMAPS, incompatible: INCOMPAT_DATA_FILE });
  let at = 112;
  at = putExt(buf, at, EXT_BACKING_FORMAT, "qcow2"); // 5 bytes, 3 of padding
  assert.equal(at, 128);
  buf.fill(0xff, 112 + 8 + 5, 128); // padding need not be zero: "qcow2" must still stop at 5 bytes
  const bitmaps = new Uint8Array(24);
  const bv = new DataView(bitmaps.buffer);
  bv.setUint32(0, 3);
  bv.setBigUint64(8, 0x88n);
  bv.setBigUint64(16, 0x1_0005_0000n);
  at = putExt(buf, at, EXT_BITMAPS, bitmaps);
  const crypto = new Uint8Array(16);
  new DataView(crypto.buffer).setBigUint64(0, 0x20000n);
  new DataView(crypto.buffer).setBigUint64(8, 0x1234n);
  at = putExt(buf, at, EXT_CRYPTO, crypto);
  at = putExt(buf, at, EXT_DATA_FILE, "disk.data"); // 9 bytes, 7 of padding
  at = putExt(buf, at, 0x12345678, Uint8Array.of(1, 2, 3));
  at = putExt(buf, at, 0x0000_0001, new Uint8Array(0));
  at = putExt(
    buf,
    at,
    EXT_FEATURE_TABLE,
    concat(
      featureEntry(0, 0, "dirty bit"),
      featureEntry(1, 0, "lazy refcounts"),
      featureEntry(2, 1, "raw external data"),
    ),
  );
  // End marker (zeros), then something that would be an extension if reading went on.
  putExt(buf, at + 8, 0x7777_7777, "not read");
  const ext = decodeExtensions(buf, decodeHeader(buf));
  assert.deepEqual(ext, {
    backingFormat: "qcow2",
    bitmaps: { nbBitmaps: 3, directorySize: 0x88, directoryOffset: 0x1_0005_0000 },
    crypto: { offset: 0x20000, length: 0x1234 },
    dataFile: "disk.data",
    featureNames: [
      { type: "incompatible", bit: 0, name: "dirty bit" },
      { type: "compatible", bit: 0, name: "lazy refcounts" },
      { type: "autoclear", bit: 1, name: "raw external data" },
    ],
    unknown: [
      { type: 0x12345678, data: Uint8Array.of(1, 2, 3) },
      { type: 1, data: new Uint8Array(0) },
    ],
  });
});

test("decodeExtensions: feature-name table entries", () => {
  const buf = layHeader();
  const full = new TextEncoder().encode(`${"x".repeat(40)}-46-ch`); // 46 bytes, no NUL
  assert.equal(full.length, 46);
  putExt(
    buf,
    112,
    EXT_FEATURE_TABLE,
    concat(
      featureEntry(0, 63, full),
      featureEntry(3, 5, "unknown type, skipped"),
      featureEntry(2, 0, "bitmaps"),
      featureEntry(0, 4, "extended L2 entries"),
    ),
  );
  const { featureNames } = decodeExtensions(buf, decodeHeader(buf));
  assert.deepEqual(featureNames, [
    { type: "incompatible", bit: 63, name: `${"x".repeat(40)}-46-ch` },
    { type: "autoclear", bit: 0, name: "bitmaps" },
    { type: "incompatible", bit: 4, name: "extended L2 entries" },
  ]);
});

test("decodeExtensions: bitmaps extension must be 24 bytes with a zero reserved field", () => {
  for (const len of [16, 23, 25, 32]) {
    const buf = layHeader();
    putExt(buf, 112, EXT_BITMAPS, new Uint8Array(len));
    throwsQcow(() => decodeExtensions(buf, decodeHeader(buf)), "corrupt", new RegExp(`Bitmaps.*length ${len}`));
  }
  const buf = layHeader();
  const data = new Uint8Array(24);
  data[7] = 1;
  putExt(buf, 112, EXT_BITMAPS, data);
  throwsQcow(() => decodeExtensions(buf, decodeHeader(buf)), "corrupt", /Bitmaps.*reserved/);
});

test("decodeExtensions: crypto extension must be 16 bytes", () => {
  const buf = layHeader({ cryptMethod: 2 });
  putExt(buf, 112, EXT_CRYPTO, new Uint8Array(8));
  throwsQcow(() => decodeExtensions(buf, decodeHeader(buf)), "corrupt", /encryption.*length 8/);
});

test("decodeExtensions: v2 extensions start at byte 72", () => {
  const buf = layHeader({ version: 2 });
  putExt(buf, 72, EXT_BACKING_FORMAT, "raw");
  assert.equal(decodeExtensions(buf, decodeHeader(buf)).backingFormat, "raw");
});

test("decodeExtensions: v3 extensions start at header_length", () => {
  const buf = layHeader({ headerLength: 136 });
  buf.fill(0x5a, 112, 136); // tail bytes, not an extension
  putExt(buf, 136, EXT_DATA_FILE, "d");
  const h = decodeHeader(buf);
  assert.equal(h.tail.length, 24);
  assert.equal(decodeExtensions(buf, h).dataFile, "d");
});

test("decodeExtensions: an extension running past the end of the first cluster", () => {
  // 512-byte clusters; the buffer holds more than the cluster, but the cluster is the limit.
  const buf = layHeader({
    clusterBits: 9,
    l1Size: 32768,
    l1TableOffset: 0x400,
    refcountTableOffset: 0x200,
    bufLen: 2048,
  });
  putExt(buf, 112, 0x1234_5678, new Uint8Array(512 - 112 - 8 + 1));
  throwsQcow(() => decodeExtensions(buf, decodeHeader(buf)), "corrupt", /0x12345678.*0x200/);
  // Exactly filling the cluster is fine.
  const fits = layHeader({
    clusterBits: 9,
    l1Size: 32768,
    l1TableOffset: 0x400,
    refcountTableOffset: 0x200,
    bufLen: 2048,
  });
  putExt(fits, 112, 0x1234_5678, new Uint8Array(512 - 112 - 8).fill(7));
  const ext = decodeExtensions(fits, decodeHeader(fits));
  assert.equal(ext.unknown[0].data.length, 392);
  assert.ok(ext.unknown[0].data.every((b) => b === 7));
});

test("decodeExtensions: a length field near 2^32 is an error, not a wrap-around", () => {
  const buf = layHeader();
  new DataView(buf.buffer).setUint32(112, 0x1234_5678);
  new DataView(buf.buffer).setUint32(116, 0xffff_fff8);
  throwsQcow(() => decodeExtensions(buf, decodeHeader(buf)), "corrupt", /too large/);
});

test("decodeExtensions: the same extension twice is an error", () => {
  const buf = layHeader();
  const at = putExt(buf, 112, EXT_BACKING_FORMAT, "raw");
  putExt(buf, at, EXT_BACKING_FORMAT, "qcow2");
  throwsQcow(() => decodeExtensions(buf, decodeHeader(buf)), "corrupt", /0xe2792aca.*twice/);
  const buf2 = layHeader();
  putExt(buf2, putExt(buf2, 112, 0x4242, "a"), 0x4242, "b");
  throwsQcow(() => decodeExtensions(buf2, decodeHeader(buf2)), "corrupt", /0x4242.*twice/);
});

test("decodeExtensions: reading stops at backing_file_offset", () => {
  // Extensions fill 112..0x80 with no end marker; the backing name starts right there.
  const buf = layHeader({ backingFileOffset: 0x80, backingFileSize: 8 });
  const at = putExt(buf, 112, EXT_BACKING_FORMAT, "qcow2");
  assert.equal(at, 0x80);
  buf.set(new TextEncoder().encode("base.img"), 0x80);
  const h = decodeHeader(buf);
  assert.deepEqual(decodeExtensions(buf, h), { backingFormat: "qcow2", featureNames: [], unknown: [] });
  assert.equal(decodeBackingName(buf, h), "base.img");
  // An extension may not run into the backing file name.
  const bad = layHeader({ backingFileOffset: 0x80, backingFileSize: 8 });
  putExt(bad, 112, EXT_BACKING_FORMAT, "qcow2-x-y");
  throwsQcow(
    () => decodeExtensions(bad, decodeHeader(bad)),
    "corrupt",
    /^Header extension too large: .*running past 0x80/,
  );
});

test("decodeBackingName: none, and a name that is not NUL-terminated", () => {
  const none = layHeader();
  assert.equal(decodeBackingName(none, decodeHeader(none)), undefined);
  const buf = layHeader({ backingFileOffset: 0x1000, backingFileSize: 13 });
  buf.set(new TextEncoder().encode("/images/a.qcow2-and-more"), 0x1000);
  assert.equal(decodeBackingName(buf, decodeHeader(buf)), "/images/a.qco");
  const utf8 = layHeader({ backingFileOffset: 0x200, backingFileSize: 10 });
  utf8.set(new TextEncoder().encode("bäse.ïmg"), 0x200);
  assert.equal(decodeBackingName(utf8, decodeHeader(utf8)), "bäse.ïmg");
});

test("nameFeatures: named bits in table order, then the unnamed ones as one hex mask (as QEMU)", () => {
  const table = [
    { type: "incompatible" as const, bit: 0, name: "dirty bit" },
    { type: "compatible" as const, bit: 5, name: "a compatible one" },
    { type: "incompatible" as const, bit: 62, name: "far out" },
  ];
  assert.equal(nameFeatures(0n, "incompatible", table), "");
  assert.equal(nameFeatures(1n, "incompatible", table), "dirty bit");
  assert.equal(
    nameFeatures((1n << 5n) | (1n << 62n) | 1n | (1n << 63n), "incompatible", table),
    "dirty bit, far out, Unknown incompatible feature: 8000000000000020",
  );
  assert.equal(nameFeatures(1n << 5n, "compatible", table), "a compatible one");
  assert.equal(nameFeatures(1n, "autoclear", []), "Unknown autoclear feature: 1");
});

// ---------------------------------------------------------------------------------------------
// encodeHeader round trips

function baseHeader(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: 16,
    size: 10 * 1024 * 1024 * 1024,
    cryptMethod: 0,
    l1Size: 20,
    l1TableOffset: 0x30000,
    refcountTableOffset: 0x10000,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 112,
    compressionType: 0,
    tail: new Uint8Array(0),
    ...over,
  };
}

test("encodeHeader: v3 bytes at the spec's offsets", () => {
  const buf = encodeHeader(
    baseHeader({
      incompatibleFeatures: INCOMPAT_COMPRESSION,
      compressionType: 1,
      refcountOrder: 6,
      compatibleFeatures: 1n,
    }),
    EMPTY_EXT,
    undefined,
  );
  const dv = new DataView(buf.buffer);
  assert.equal(buf.length, 65536);
  assert.equal(dv.getUint32(0), 0x514649fb);
  assert.equal(dv.getUint32(4), 3);
  assert.equal(dv.getBigUint64(8), 0n);
  assert.equal(dv.getUint32(20), 16);
  assert.equal(dv.getBigUint64(24), 10n << 30n);
  assert.equal(dv.getUint32(36), 20);
  assert.equal(dv.getBigUint64(40), 0x30000n);
  assert.equal(dv.getBigUint64(48), 0x10000n);
  assert.equal(dv.getUint32(56), 1);
  assert.equal(dv.getBigUint64(72), INCOMPAT_COMPRESSION);
  assert.equal(dv.getBigUint64(80), 1n);
  assert.equal(dv.getUint32(96), 6);
  assert.equal(dv.getUint32(100), 112);
  assert.equal(buf[104], 1);
  // No extensions: the end marker at 112 and nothing else.
  assert.ok(buf.subarray(105).every((b) => b === 0));
});

test("encodeHeader: v2 writes 72 bytes of header and no v3 fields", () => {
  const h = baseHeader({ version: 2, headerLength: 72 });
  const buf = encodeHeader(h, { featureNames: QEMU_FEATURE_NAMES, unknown: [] }, undefined);
  assert.ok(
    buf.subarray(72).every((b) => b === 0),
    "v2 gets no feature table and no v3 fields",
  );
  assert.deepEqual(decodeHeader(buf), h);
  assert.deepEqual(decodeExtensions(buf, h), EMPTY_EXT);
});

test("encodeHeader: v2 round trip with backing name and backing format", () => {
  const h = baseHeader({
    version: 2,
    headerLength: 72,
    clusterBits: 12,
    size: 1 << 20,
    l1Size: 1,
    l1TableOffset: 0x3000,
    refcountTableOffset: 0x1000,
  });
  const ext: HeaderExtensions = { backingFormat: "raw", featureNames: [], unknown: [] };
  const buf = encodeHeader(h, ext, "../base.raw");
  assert.equal(buf.length, 4096);
  const got = decodeHeader(buf);
  // Backing name after the extensions and the end marker: 72 + 8+8 (format) + 8 (end).
  assert.equal(got.backingFileOffset, 96);
  assert.equal(got.backingFileSize, 11);
  assert.deepEqual(got, { ...h, backingFileOffset: 96, backingFileSize: 11 });
  assert.deepEqual(decodeExtensions(buf, got), ext);
  assert.equal(decodeBackingName(buf, got), "../base.raw");
});

test("encodeHeader: v3 round trip with every extension, unknown ones and tail bytes", () => {
  const tail = Uint8Array.from({ length: 16 }, (_, i) => 0xa0 + i);
  const h = baseHeader({
    incompatibleFeatures: INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2,
    compatibleFeatures: COMPAT_LAZY_REFCOUNTS,
    autoclearFeatures: AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW,
    compressionType: 1,
    refcountOrder: 0,
    l1Size: 40,
    headerLength: 128,
    tail,
    nbSnapshots: 2,
    snapshotsOffset: 0x70000,
  });
  const ext: HeaderExtensions = {
    backingFormat: "qcow2",
    dataFile: "/var/lib/images/disk.raw",
    crypto: { offset: 0x50000, length: 0x1f000 },
    bitmaps: { nbBitmaps: 2, directorySize: 72, directoryOffset: 0x60000 },
    featureNames: [...QEMU_FEATURE_NAMES, { type: "compatible", bit: 9, name: "y".repeat(46) }],
    unknown: [
      { type: 0xdead_beef, data: Uint8Array.of(9, 8, 7, 6, 5) },
      { type: 0x0000_0042, data: new Uint8Array(16).fill(0x42) },
    ],
  };
  const buf = encodeHeader(h, ext, "backing/bäse.qcow2");
  const got = decodeHeader(buf);
  assert.deepEqual({ ...got, backingFileOffset: 0, backingFileSize: 0 }, h);
  assert.equal(got.backingFileSize, new TextEncoder().encode("backing/bäse.qcow2").length);
  assert.deepEqual(decodeExtensions(buf, got), ext);
  assert.equal(decodeBackingName(buf, got), "backing/bäse.qcow2");
  // Extensions start at header_length, in QEMU's order: backing format, data file, crypto,
  // feature table, bitmaps, then the unknown ones.
  const dv = new DataView(buf.buffer);
  const types: number[] = [];
  for (let at = 128; dv.getUint32(at) !== 0; at += 8 + Math.ceil(dv.getUint32(at + 4) / 8) * 8)
    types.push(dv.getUint32(at));
  assert.deepEqual(types, [
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_CRYPTO,
    EXT_FEATURE_TABLE,
    EXT_BITMAPS,
    0xdead_beef,
    0x42,
  ]);
});

test("encodeHeader: a feature name longer than 46 bytes is cut to 46", () => {
  const buf = encodeHeader(
    baseHeader(),
    { featureNames: [{ type: "autoclear", bit: 3, name: "z".repeat(60) }], unknown: [] },
    undefined,
  );
  assert.deepEqual(decodeExtensions(buf, decodeHeader(buf)).featureNames, [
    { type: "autoclear", bit: 3, name: "z".repeat(46) },
  ]);
});

test("encodeHeader: extensions or a backing name that do not fit the first cluster", () => {
  const small = baseHeader({
    clusterBits: 9,
    l1Size: (2 ** 21 * 10) / 64,
    l1TableOffset: 0x600,
    refcountTableOffset: 0x200,
  });
  throwsQcow(
    () => encodeHeader(small, { featureNames: [], unknown: [{ type: 5, data: new Uint8Array(400) }] }, undefined),
    "corrupt",
    /fit/,
  );
  // 112 + 8 (end) + 392 = 512: a 392-byte name just fits, 393 does not.
  const fits = encodeHeader(small, EMPTY_EXT, "n".repeat(392));
  assert.equal(decodeBackingName(fits, decodeHeader(fits)), "n".repeat(392));
  throwsQcow(() => encodeHeader(small, EMPTY_EXT, "n".repeat(393)), "corrupt", /fit/);
  throwsQcow(() => encodeHeader(baseHeader(), EMPTY_EXT, "n".repeat(1024)), "corrupt", /too long/);
});
