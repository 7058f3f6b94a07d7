/**
 * Bad input to the engine: corrupt L1/L2 entries, unknown incompatible features, encryption,
 * and header fields that would make a careless reader allocate without bound. Each must give
 * a QcowError with the right code and a message that names the structure and where it is.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import type { Extent } from "../../src/image/block-device.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { type BuiltImage, buildImage, type ImageSpec, pattern, TracingStorage } from "./build-image.js";

const hex = (n: number): string => `0x${n.toString(16)}`;

function qcowError(code: string, message: RegExp | string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof QcowError, `expected a QcowError, got ${String(e)}`);
    assert.equal(e.code, code, `code of "${e.message}"`);
    if (typeof message === "string") assert.equal(e.message, message);
    else assert.match(e.message, message);
    return true;
  };
}

async function drain(it: AsyncIterable<Extent>): Promise<void> {
  for await (const _ of it);
}

/** An image with data in guest clusters 0..3 of its first L2 table. */
function built(spec: Partial<ImageSpec> = {}): BuiltImage {
  const cs = 2 ** (spec.clusterBits ?? 16);
  return buildImage({
    size: 16 * cs,
    clusters: [0, 1, 2, 3].map((gc) => ({ guestCluster: gc, kind: "data" as const, data: pattern(cs, gc) })),
    ...spec,
  });
}

/** Patches the 64-bit L2 entry of guest cluster `gc` (first half of it with extended L2). */
function patchL2(
  img: BuiltImage,
  gc: number,
  edit: (hi: number, lo: number) => [number, number],
  entryBytes = 8,
): { bytes: Uint8Array; l2: number } {
  const bytes = img.bytes.slice();
  const dv = new DataView(bytes.buffer);
  const l2 = img.active.l2Offsets.get(Math.floor(gc / img.l2Entries)) as number;
  const at = l2 + (gc % img.l2Entries) * entryBytes;
  const [hi, lo] = edit(dv.getUint32(at), dv.getUint32(at + 4));
  dv.setUint32(at, hi >>> 0);
  dv.setUint32(at + 4, lo >>> 0);
  return { bytes, l2 };
}

function withHeader(img: BuiltImage, edit: (dv: DataView) => void): Uint8Array {
  const bytes = img.bytes.slice();
  edit(new DataView(bytes.buffer));
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// L1 and L2 entries

test("corrupt L2 entry: reserved bits 1-8 set", async () => {
  const img = built();
  const { bytes, l2 } = patchL2(img, 3, (hi, lo) => [hi, lo | 0x2]);
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  const where = new RegExp(`L2 entry has reserved bits set: .*\\(L2 offset: ${hex(l2)}, L2 index: 0x3\\)`);
  await assert.rejects(q.read(new Uint8Array(10), 3 * 65536), qcowError("corrupt", where));
  await assert.rejects(drain(q.blockStatus(0, q.size)), qcowError("corrupt", where));
  // The other entries of that table still read.
  const d = new Uint8Array(65536);
  await q.read(d, 2 * 65536);
  assert.deepEqual(d, pattern(65536, 2));
});

test("corrupt L2 entry: reserved bits 56-61 set", async () => {
  const img = built();
  const { bytes, l2 } = patchL2(img, 1, (hi, lo) => [hi | 0x0100_0000, lo]);
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  await assert.rejects(
    q.read(new Uint8Array(1), 65536 + 5),
    qcowError("corrupt", new RegExp(`L2 offset: ${hex(l2)}, L2 index: 0x1\\b`)),
  );
});

test("corrupt L2 entry: a host offset that is not cluster aligned", async () => {
  const img = built();
  const host = img.active.hostOffsets.get(2) as number;
  const { bytes, l2 } = patchL2(img, 2, (hi, lo) => [hi, lo + 512]);
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  await assert.rejects(
    q.read(new Uint8Array(1), 2 * 65536),
    qcowError(
      "corrupt",
      `Cluster allocation offset ${hex(host + 512)} unaligned (L2 offset: ${hex(l2)}, L2 index: 0x2)`,
    ),
  );
});

test("corrupt L2 entry: reserved bits in a later L2 table name that table", async () => {
  const cs = 512;
  const img = buildImage({
    size: 200 * cs,
    clusterBits: 9,
    clusters: [{ guestCluster: 130, kind: "data", data: pattern(cs, 1) }],
  });
  const { bytes, l2 } = patchL2(img, 130, (hi, lo) => [hi, lo | 0x100]);
  assert.equal(img.l2Entries, 64);
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  await assert.rejects(
    q.read(new Uint8Array(cs), 130 * cs),
    qcowError("corrupt", new RegExp(`L2 offset: ${hex(l2)}, L2 index: 0x2\\)`)),
  );
});

test("corrupt L2 entry: a v3 zero flag is fine, and ignored with extended L2 (QEMU, iotest 271)", async () => {
  const plain = built();
  const { bytes } = patchL2(plain, 1, (hi, lo) => [hi, lo | 1]);
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  const d = new Uint8Array(65536).fill(1);
  await q.read(d, 65536);
  assert.deepEqual(d, new Uint8Array(65536), "zero flag on an allocated cluster reads zeros");

  const ext = buildImage({
    size: 4 * 16384,
    clusterBits: 14,
    extendedL2: true,
    clusters: [{ guestCluster: 1, kind: "data", data: pattern(16384, 1) }],
  });
  const patched = patchL2(ext, 1, (hi, lo) => [hi, lo | 1], 16);
  const qe = await Qcow2Image.open(new MemoryStorage(patched.bytes));
  const de = new Uint8Array(16384);
  await qe.read(de, 16384);
  assert.deepEqual(de, pattern(16384, 1), "the bitmap, not bit 0, says what reads as zeros");
});

test("corrupt extended L2 entry: subclusters both allocated and zero, or allocated without a host cluster", async () => {
  const cs = 16384;
  const img = buildImage({
    size: 4 * cs,
    clusterBits: 14,
    extendedL2: true,
    clusters: [
      { guestCluster: 1, kind: "subclusters", alloc: 0x0000_00ff, zero: 0, data: pattern(cs, 1) },
      { guestCluster: 2, kind: "zero" },
    ],
  });
  const bytes = img.bytes.slice();
  const dv = new DataView(bytes.buffer);
  const l2 = img.active.l2Offsets.get(0) as number;
  dv.setUint32(l2 + 16 + 8, 0x0000_0001); // zero bit of subcluster 0, which is also allocated
  dv.setUint32(l2 + 32 + 12, 0x0000_0001); // allocated subcluster in a cluster with no host offset
  dv.setUint32(l2 + 32 + 8, 0);
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  await assert.rejects(
    q.read(new Uint8Array(1), cs),
    qcowError("corrupt", new RegExp(`L2 offset: ${hex(l2)}, L2 index: 0x1\\)`)),
  );
  await assert.rejects(
    q.read(new Uint8Array(1), 2 * cs),
    qcowError("corrupt", new RegExp(`L2 offset: ${hex(l2)}, L2 index: 0x2\\)`)),
  );
});

test("corrupt L2 entry: a compressed cluster with the COPIED flag", async () => {
  const cs = 65536;
  const img = buildImage({ size: 2 * cs, clusters: [{ guestCluster: 1, kind: "compressed", data: pattern(cs, 1) }] });
  const { bytes, l2 } = patchL2(img, 1, (hi, lo) => [hi | 0x8000_0000, lo]);
  const q = await Qcow2Image.open(new MemoryStorage(bytes), { codecs: nodeCodecs });
  await assert.rejects(
    q.read(new Uint8Array(1), cs),
    qcowError("corrupt", new RegExp(`L2 offset: ${hex(l2)}, L2 index: 0x1\\)`)),
  );
});

test("corrupt L1 entry: an L2 table offset that is not cluster aligned is refused on open", async () => {
  const img = built();
  const bytes = img.bytes.slice();
  const dv = new DataView(bytes.buffer);
  const l2 = img.active.l2Offsets.get(0) as number;
  dv.setUint32(img.active.l1Offset + 4, (l2 + 512) >>> 0);
  await assert.rejects(
    Qcow2Image.open(new MemoryStorage(bytes)),
    qcowError("corrupt", `L2 table offset ${hex(l2 + 512)} unaligned (L1 index: 0)`),
  );
});

// ---------------------------------------------------------------------------------------------
// Feature bits and encryption

function withIncompatible(img: BuiltImage, bits: bigint): Uint8Array {
  return withHeader(img, (dv) => dv.setBigUint64(72, dv.getBigUint64(72) | bits));
}

test("unknown incompatible feature: refused, named from the image's feature-name table", async () => {
  const img = built({
    featureNames: [
      { type: "incompatible", bit: 0, name: "dirty bit" },
      { type: "incompatible", bit: 5, name: "frobnication" },
      { type: "compatible", bit: 5, name: "not this one" },
    ],
  });
  await assert.rejects(
    Qcow2Image.open(new MemoryStorage(withIncompatible(img, 1n << 5n))),
    qcowError("unsupported", "Unsupported qcow2 feature(s): frobnication"),
  );
});

test("unknown incompatible feature without a name: worded as qemu-img words it", async () => {
  // qemu-img 7.2 on the same header: "Unsupported qcow2 feature(s): Unknown incompatible
  // feature: 220" (bits 5 and 9), and with bit 5 named "frobnication":
  // "Unsupported qcow2 feature(s): frobnication, Unknown incompatible feature: 200".
  const img = built();
  await assert.rejects(
    Qcow2Image.open(new MemoryStorage(withIncompatible(img, (1n << 5n) | (1n << 9n)))),
    qcowError("unsupported", "Unsupported qcow2 feature(s): Unknown incompatible feature: 220"),
  );
  const named = built({ featureNames: [{ type: "incompatible", bit: 5, name: "frobnication" }] });
  await assert.rejects(
    Qcow2Image.open(new MemoryStorage(withIncompatible(named, (1n << 5n) | (1n << 9n)))),
    qcowError("unsupported", "Unsupported qcow2 feature(s): frobnication, Unknown incompatible feature: 200"),
  );
});

test("unknown compatible and autoclear features do not stop a read-only open", async () => {
  const img = built();
  const bytes = withHeader(img, (dv) => {
    dv.setBigUint64(80, 1n << 40n);
    dv.setBigUint64(88, 1n << 40n);
  });
  const q = await Qcow2Image.open(new MemoryStorage(bytes));
  const d = new Uint8Array(65536);
  await q.read(d, 0);
  assert.deepEqual(d, pattern(65536, 0));
});

test("encrypted images are refused: LUKS (crypt_method 2) and AES (1)", async () => {
  const img = built();
  for (const [method, name] of [
    [2, "LUKS"],
    [1, "AES"],
  ] as const) {
    const bytes = withHeader(img, (dv) => dv.setUint32(32, method));
    await assert.rejects(
      Qcow2Image.open(new MemoryStorage(bytes)),
      qcowError("unsupported", new RegExp(`Encrypted.*${name}`)),
    );
  }
});

// ---------------------------------------------------------------------------------------------
// Header fields that ask for huge allocations

/** Opens `bytes` and expects a quick failure whose reads stay small. */
async function assertFailsSmall(bytes: Uint8Array, code: string, message: RegExp, maxRead: number): Promise<void> {
  const storage = new TracingStorage(bytes, { name: "bad.qcow2" });
  const started = Date.now();
  await assert.rejects(Qcow2Image.open(storage), qcowError(code, message));
  assert.ok(Date.now() - started < 2000, "fails fast");
  const largest = Math.max(...storage.reads.map((r) => r.length));
  assert.ok(largest <= maxRead, `largest read buffer ${largest} bytes, expected at most ${maxRead}`);
}

test("huge nb_snapshots: beyond QEMU's limit is refused before reading anything", async () => {
  const img = built();
  const bytes = withHeader(img, (dv) => {
    dv.setUint32(60, 0xffff_ffff);
    dv.setUint32(68, img.refcountTableOffset);
  });
  await assertFailsSmall(bytes, "corrupt", /^Snapshot table too large: nb_snapshots 4294967295/, 65536);
});

/**
 * Opens `bytes` whose snapshot table runs past the end of the file: as in QEMU it reads as
 * zeros there (bare 40-byte entries), so the reads stay bounded by the file plus 40 bytes per
 * entry (and one entry of the largest size), and the open is quick.
 */
async function openPastEnd(bytes: Uint8Array, entries: number): Promise<Qcow2Image> {
  const storage = new TracingStorage(bytes, { name: "bad.qcow2" });
  const started = Date.now();
  const q = await Qcow2Image.open(storage);
  assert.ok(Date.now() - started < 2000, "opens fast");
  const largest = Math.max(...storage.reads.map((r) => r.length));
  const bound = bytes.length + entries * 40 + 40 + 1024 + 2 * 0xffff + 7;
  assert.ok(largest <= bound, `largest read buffer ${largest} bytes, expected at most ${bound}`);
  assert.equal(q.snapshots.length, entries);
  return q;
}

test("huge nb_snapshots within the limit: the table runs past the file, read as zeros (iotest 080)", async () => {
  const img = built();
  const bytes = withHeader(img, (dv) => {
    dv.setUint32(60, 65536);
    dv.setUint32(64, 0x10); // 1 TiB: all of the table past the end of the file
    dv.setUint32(68, 0);
  });
  const q = await openPastEnd(bytes, 65536);
  assert.ok(q.snapshots.every((s) => s.id === "" && s.l1Size === 0));
  await q.close();
});

test("a snapshot table that starts in the file and runs past its end", async () => {
  const img = built();
  const bytes = withHeader(img, (dv) => {
    dv.setUint32(60, 1000);
    dv.setUint32(68, img.refcountTableOffset);
  });
  await (await openPastEnd(bytes, 1000)).close();
});

test("huge l1_size: beyond QEMU's 32 MiB L1 limit is refused before reading it", async () => {
  const img = built();
  for (const l1Size of [0xffff_ffff, 0x1000_0000, 4 * 1024 * 1024 + 1]) {
    const bytes = withHeader(img, (dv) => dv.setUint32(36, l1Size));
    await assertFailsSmall(bytes, "corrupt", /Active L1 table too large/, 65536);
  }
});

test("huge refcount_table_clusters is refused", async () => {
  const img = built();
  const bytes = withHeader(img, (dv) => dv.setUint32(56, 0xffff_ffff));
  await assertFailsSmall(bytes, "corrupt", /Reference count table too large/, 65536);
});

test("not a qcow2 image, and a truncated header", async () => {
  await assert.rejects(
    Qcow2Image.open(new MemoryStorage(new Uint8Array(4096))),
    qcowError("corrupt", /not in qcow2 format/),
  );
  const img = built();
  await assert.rejects(Qcow2Image.open(new MemoryStorage(img.bytes.slice(0, 80))), qcowError("corrupt", /header/));
  await assert.rejects(
    Qcow2Image.open(new MemoryStorage(new Uint8Array(0))),
    qcowError("corrupt", /not in qcow2 format/),
  );
});
