/**
 * The read path of Qcow2Image over hand-built images: every cluster kind, requests across
 * cluster and L2-table boundaries, unaligned requests, v2 and v3, 512-byte and 2 MiB clusters,
 * extended L2 subclusters and compressed clusters.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { SubclusterType } from "../../src/format/tables.js";
import { type BlockDevice, readSparse, readSparseByStatus } from "../../src/image/block-device.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { MemoryStorage } from "../../src/io/memory.js";
import {
  type BuiltImage,
  buildImage,
  type ClusterSpec,
  csize,
  type ImageSpec,
  noise,
  pattern,
  readAll,
  rng,
  TracingStorage,
} from "./build-image.js";

async function open(img: BuiltImage, backing?: Qcow2Image | RawImage): Promise<Qcow2Image> {
  return Qcow2Image.open(img.storage("test.qcow2"), { codecs: nodeCodecs, backing });
}

/** Every kind of cluster, on both sides of L2-table boundaries when clusters are small. */
function everyKind(clusterBits: number, version: 2 | 3 = 3, l2 = 2 ** clusterBits / 8): ImageSpec {
  const cs = 2 ** clusterBits;
  const clusters: ClusterSpec[] = [
    { guestCluster: 0, kind: "data", data: pattern(cs, 1) },
    { guestCluster: 1, kind: "data", data: noise(cs, 2) },
    { guestCluster: 2, kind: "compressed", data: pattern(cs, 3) },
    { guestCluster: 3, kind: "compressed", data: pattern(cs, 4) },
    { guestCluster: l2 - 1, kind: "data", data: pattern(cs, 5) },
    { guestCluster: l2, kind: "data", data: pattern(cs, 6) },
    { guestCluster: 2 * l2 - 1, kind: "compressed", data: pattern(cs, 7) },
    { guestCluster: 2 * l2, kind: "compressed", data: pattern(cs, 8) },
  ];
  if (version === 3) {
    clusters.push(
      { guestCluster: 5, kind: "zero" },
      // The host cluster holds non-zero bytes that must not be read.
      { guestCluster: 6, kind: "zero-alloc", data: pattern(cs, 9) },
      { guestCluster: l2 + 1, kind: "zero" },
      { guestCluster: 2 * l2 + 1, kind: "zero-alloc", data: pattern(cs, 10) },
    );
  }
  // The disk ends in the middle of a cluster (of more than 512 bytes), past the last L2 table boundary.
  return { size: (2 * l2 + 3) * cs - 512, version, clusterBits, clusters };
}

/** Reads [offset, offset+length) and compares it with the expected guest bytes. */
async function assertRange(q: Qcow2Image, expected: Uint8Array, offset: number, length: number): Promise<void> {
  const dst = new Uint8Array(length).fill(0xee);
  await q.read(dst, offset);
  const want = expected.subarray(offset, offset + length);
  if (!Buffer.from(dst).equals(Buffer.from(want))) {
    const i = dst.findIndex((b, k) => b !== want[k]);
    assert.fail(
      `read of ${length} bytes at ${offset}: first difference at guest offset ${offset + i} (got ${dst[i]}, want ${want[i]})`,
    );
  }
}

const layouts: { name: string; spec: ImageSpec }[] = [
  { name: "v3, 512-byte clusters", spec: everyKind(9) },
  { name: "v2, 512-byte clusters", spec: everyKind(9, 2) },
  { name: "v3, 64 KiB clusters", spec: everyKind(16, 3, 16) },
  { name: "v2, 64 KiB clusters", spec: everyKind(16, 2, 16) },
  { name: "v3, 2 MiB clusters", spec: everyKind(21, 3, 8) },
];

for (const { name, spec } of layouts) {
  test(`read: whole disk, boundaries and random unaligned requests (${name})`, async () => {
    const img = buildImage(spec);
    const q = await open(img);
    const want = img.expected();
    assert.equal(q.size, spec.size);
    assert.deepEqual(await readAll(q), want);

    const cs = img.clusterSize;
    const tableSpan = cs * img.l2Entries;
    // Requests that straddle every cluster boundary and every L2-table boundary.
    for (let b = cs; b < spec.size; b += cs) {
      const len = Math.min(3, spec.size - b + 1);
      await assertRange(q, want, b - 1, len);
    }
    for (let b = tableSpan; b < spec.size; b += tableSpan) {
      await assertRange(q, want, b - cs - 7, Math.min(2 * cs + 14, spec.size - (b - cs - 7)));
    }
    // The last byte of the disk, and a request ending exactly there.
    await assertRange(q, want, spec.size - 1, 1);
    await assertRange(q, want, spec.size - cs - 3, cs + 3);
    const r = rng(spec.size);
    for (let i = 0; i < 150; i++) {
      const offset = r(spec.size);
      const length = 1 + r(Math.min(spec.size - offset, 3 * cs));
      await assertRange(q, want, offset, length);
    }
  });
}

test("read: an empty read and requests past the end of the disk", async () => {
  const img = buildImage({ size: 4096, clusterBits: 9 });
  const q = await open(img);
  await q.read(new Uint8Array(0), 4096);
  for (const [offset, length] of [
    [4096, 1],
    [4000, 97],
    [-1, 1],
  ]) {
    await assert.rejects(q.read(new Uint8Array(length), offset), (e: unknown) => {
      assert.ok(e instanceof QcowError);
      assert.equal(e.code, "invalid-argument");
      return true;
    });
  }
});

test("read: a disk with no L2 tables reads as zeros", async () => {
  const img = buildImage({ size: 3 * 1024 * 1024 + 512, clusterBits: 12 });
  const q = await open(img);
  assert.deepEqual(await readAll(q), new Uint8Array(3 * 1024 * 1024 + 512));
});

test("read: contiguous host clusters are read with one storage request", async () => {
  const cs = 4096;
  const img = buildImage({
    size: 64 * cs,
    clusterBits: 12,
    clusters: [0, 1, 2, 3].map((gc) => ({ guestCluster: gc, kind: "data" as const, data: pattern(cs, gc) })),
  });
  const host = img.active.hostOffsets;
  assert.deepEqual(
    [1, 2, 3].map((gc) => (host.get(gc) as number) - (host.get(gc - 1) as number)),
    [cs, cs, cs],
  );
  const storage = new TracingStorage(img.bytes, { name: "t.qcow2" });
  const q = await Qcow2Image.open(storage, { codecs: nodeCodecs });
  storage.reads = [];
  const dst = new Uint8Array(4 * cs - 200);
  await q.read(dst, 100);
  assert.deepEqual(dst, img.expected().subarray(100, 4 * cs - 100));
  const dataReads = storage.reads.filter((r) => r.offset >= (host.get(0) as number));
  assert.deepEqual(dataReads, [{ offset: (host.get(0) as number) + 100, length: 4 * cs - 200 }]);
});

test("read: zero-alloc clusters never read their host cluster", async () => {
  const cs = 65536;
  const img = buildImage({ size: 4 * cs, clusters: [{ guestCluster: 1, kind: "zero-alloc", data: pattern(cs, 3) }] });
  const storage = new TracingStorage(img.bytes, { name: "t.qcow2" });
  const q = await Qcow2Image.open(storage);
  storage.reads = [];
  const dst = new Uint8Array(cs).fill(0xaa);
  await q.read(dst, cs);
  assert.deepEqual(dst, new Uint8Array(cs));
  const host = img.active.hostOffsets.get(1) as number;
  assert.ok(!storage.reads.some((r) => r.offset < host + cs && r.offset + r.length > host), "host cluster was read");
});

// ---------------------------------------------------------------------------------------------
// Compressed clusters

test("compressed: a part of one compressed cluster, from its middle", async () => {
  const cs = 65536;
  const img = buildImage({ size: 3 * cs, clusters: [{ guestCluster: 1, kind: "compressed", data: noise(cs / 2, 5) }] });
  const q = await open(img);
  const want = img.expected();
  await assertRange(q, want, cs + 12345, 777);
  await assertRange(q, want, cs + cs / 2 - 10, 20); // where the data turns to zero padding
  await assertRange(q, want, 2 * cs - 1, 2); // its last byte and the next cluster
  await assertRange(q, want, cs - 1, 2);
});

test("compressed: two adjacent compressed clusters sharing a sector read apart", async () => {
  const cs = 512;
  const img = buildImage({
    size: 8 * cs,
    clusterBits: 9,
    clusters: [
      { guestCluster: 2, kind: "compressed", data: pattern(cs, 1) },
      { guestCluster: 3, kind: "compressed", data: pattern(cs, 2) },
      { guestCluster: 4, kind: "compressed", data: pattern(cs, 3) },
    ],
  });
  const [a, b, c] = [2, 3, 4].map((gc) => img.active.compressed.get(gc) as { offset: number; size: number });
  assert.equal(b.offset, a.offset + a.size);
  assert.equal(Math.floor(b.offset / 512), Math.floor((a.offset + a.size - 1) / 512), "the first two share a sector");
  assert.equal(c.offset, b.offset + b.size);
  // The descriptor makes the reader read to the end of the sector: into the next cluster's bytes.
  assert.ok(a.offset + csize(a.offset, a.size) > b.offset);
  const q = await open(img);
  const want = img.expected();
  assert.deepEqual(await readAll(q), want);
  await assertRange(q, want, 3 * cs - 5, 10);
  await assertRange(q, want, 3 * cs, cs);
  await assertRange(q, want, 4 * cs + 100, 50);
});

test("compressed: the last compressed cluster of the file reads though its last sector is short", async () => {
  const cs = 4096;
  const img = buildImage({
    size: 2 * cs,
    clusterBits: 12,
    clusters: [{ guestCluster: 1, kind: "compressed", data: noise(cs, 1) }],
  });
  // Cut the file right after the compressed bytes (reads need no refcounts): the descriptor
  // still names whole sectors, and the reader must cope with the short last one.
  const z = img.active.compressed.get(1) as { offset: number; size: number };
  assert.notEqual((z.offset + z.size) % 512, 0);
  const q = await Qcow2Image.open(new MemoryStorage(img.bytes.slice(0, z.offset + z.size)), { codecs: nodeCodecs });
  assert.deepEqual(await readAll(q), img.expected());
});

test("compressed: without a zlib codec the read fails with a clear error", async () => {
  const cs = 65536;
  const img = buildImage({ size: 2 * cs, clusters: [{ guestCluster: 0, kind: "compressed", data: pattern(cs, 1) }] });
  const q = await Qcow2Image.open(img.storage(), {});
  await assert.rejects(q.read(new Uint8Array(10), 0), (e: unknown) => {
    assert.ok(e instanceof QcowError);
    assert.equal(e.code, "unsupported");
    assert.match(e.message, /zlib/);
    return true;
  });
  // Other clusters still read.
  assert.deepEqual(
    await (async () => {
      const d = new Uint8Array(10);
      await q.read(d, cs);
      return d;
    })(),
    new Uint8Array(10),
  );
});

test("compressed: bytes that do not inflate are reported as corrupt", async () => {
  const cs = 65536;
  const img = buildImage({ size: 2 * cs, clusters: [{ guestCluster: 0, kind: "compressed", data: pattern(cs, 1) }] });
  const z = img.active.compressed.get(0) as { offset: number; size: number };
  const bytes = img.bytes.slice();
  bytes.fill(0xff, z.offset, z.offset + z.size);
  const q = await Qcow2Image.open(new MemoryStorage(bytes), { codecs: nodeCodecs });
  await assert.rejects(q.read(new Uint8Array(10), 0), (e: unknown) => {
    assert.ok(e instanceof QcowError);
    assert.equal(e.code, "corrupt");
    return true;
  });
});

// ---------------------------------------------------------------------------------------------
// Extended L2 entries

const SC = 16384 / 32; // subcluster size with 16 KiB clusters

function extendedSpec(): ImageSpec {
  const cs = 16384;
  return {
    size: 12 * cs,
    clusterBits: 14,
    extendedL2: true,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(cs, 1) },
      // Allocated, zero and unallocated subclusters interleaved; the host cluster holds
      // non-zero bytes under the zero and unallocated ones, which must not show.
      { guestCluster: 1, kind: "subclusters", alloc: 0x0000_00ff, zero: 0x00ff_0000, data: noise(cs, 2) },
      { guestCluster: 2, kind: "subclusters", alloc: 0x5555_5555, zero: 0xaaaa_0000, data: pattern(cs, 3) },
      // No host cluster: zero and unallocated subclusters only.
      { guestCluster: 3, kind: "subclusters", alloc: 0, zero: 0xf0f0_f0f0 },
      // A host cluster with nothing allocated in it (QEMU: "unallocated, allocated").
      { guestCluster: 4, kind: "subclusters", alloc: 0, zero: 0, host: true, data: pattern(cs, 4) },
      { guestCluster: 5, kind: "zero" },
      { guestCluster: 6, kind: "zero-alloc", data: pattern(cs, 5) },
      { guestCluster: 7, kind: "compressed", data: pattern(cs, 6) },
      { guestCluster: 8, kind: "subclusters", alloc: 0x8000_0001, zero: 0, data: pattern(cs, 7) },
    ],
  };
}

test("extended L2: allocated, zero and unallocated subclusters over a backing image", async () => {
  const spec = extendedSpec();
  const img = buildImage(spec);
  const backingBytes = noise(spec.size, 99);
  const backing = await RawImage.open(new MemoryStorage(backingBytes, { name: "base.raw" }));
  const q = await open(img, backing);
  assert.equal(q.extendedL2, true);
  assert.equal(q.subclusterSize, SC);
  const want = img.expected(backingBytes);
  assert.deepEqual(await readAll(q), want);
  // Spot checks that do not depend on the builder's model.
  const cs = 16384;
  const at = async (offset: number, n: number): Promise<Uint8Array> => {
    const d = new Uint8Array(n);
    await q.read(d, offset);
    return d;
  };
  assert.deepEqual(
    await at(cs + 8 * SC - 4, 4),
    img.bytes.subarray(
      (img.active.hostOffsets.get(1) as number) + 8 * SC - 4,
      (img.active.hostOffsets.get(1) as number) + 8 * SC,
    ),
  );
  assert.deepEqual(await at(cs + 16 * SC, SC), new Uint8Array(SC), "zero subcluster");
  assert.deepEqual(
    await at(cs + 24 * SC, SC),
    backingBytes.subarray(cs + 24 * SC, cs + 25 * SC),
    "unallocated subcluster",
  );
  assert.deepEqual(
    await at(4 * cs, cs),
    backingBytes.subarray(4 * cs, 5 * cs),
    "allocated cluster, no allocated subcluster",
  );
  // Requests across subcluster edges, unaligned.
  const r = rng(7);
  for (let i = 0; i < 300; i++) {
    const offset = r(spec.size);
    const length = 1 + r(Math.min(spec.size - offset, 3 * SC));
    await assertRange(q, want, offset, length);
  }
});

test("extended L2: unallocated subclusters without a backing file read as zeros", async () => {
  const img = buildImage(extendedSpec());
  const q = await open(img);
  const want = img.expected();
  assert.deepEqual(await readAll(q), want);
  const d = new Uint8Array(SC);
  await q.read(d, 16384 + 30 * SC);
  assert.deepEqual(d, new Uint8Array(SC));
});

test("extended L2: mapping walks subclusters as runs", async () => {
  const img = buildImage(extendedSpec());
  const q = await open(img);
  const cs = 16384;
  const host1 = img.active.hostOffsets.get(1) as number;
  const run = await q.mapping(cs, cs);
  assert.deepEqual(
    { type: run.type, length: run.length, hostOffset: run.hostOffset },
    { type: SubclusterType.Normal, length: 8 * SC, hostOffset: host1 },
  );
  const unallocated = await q.mapping(cs + 8 * SC, cs);
  assert.deepEqual(
    { type: unallocated.type, length: unallocated.length, hostOffset: unallocated.hostOffset },
    { type: SubclusterType.UnallocatedAlloc, length: 8 * SC, hostOffset: host1 + 8 * SC },
  );
  const zero = await q.mapping(cs + 16 * SC, 4 * SC);
  assert.deepEqual({ type: zero.type, length: zero.length }, { type: SubclusterType.ZeroAlloc, length: 4 * SC });
  const plain = await q.mapping(3 * cs, cs);
  assert.deepEqual(
    { type: plain.type, length: plain.length },
    { type: SubclusterType.UnallocatedPlain, length: 4 * SC },
  );
  const plainZero = await q.mapping(3 * cs + 4 * SC, cs);
  assert.deepEqual(
    { type: plainZero.type, length: plainZero.length },
    { type: SubclusterType.ZeroPlain, length: 4 * SC },
  );
});

test("read: concurrent reads load each L2 table once and all see the right bytes", async () => {
  const cs = 512;
  const img = buildImage(everyKind(9));
  const storage = new TracingStorage(img.bytes, { name: "t.qcow2" });
  const q = await Qcow2Image.open(storage, { codecs: nodeCodecs });
  storage.reads = [];
  const want = img.expected();
  const r = rng(11);
  const jobs = Array.from({ length: 64 }, () => {
    const offset = r(want.length - 2 * cs);
    return assertRange(q, want, offset, 1 + r(2 * cs));
  });
  await Promise.all(jobs);
  const l2Offsets = [...img.active.l2Offsets.values()];
  for (const l2 of l2Offsets) {
    const loads = storage.reads.filter((x) => x.offset === l2 && x.length === cs).length;
    assert.ok(loads <= 1, `L2 table at ${l2} read ${loads} times`);
  }
});

test("read: a compressed cluster whose bytes lie past the end of the file is corrupt, not a crash", async () => {
  const cs = 65536;
  const img = buildImage({ size: 2 * cs, clusters: [{ guestCluster: 0, kind: "compressed", data: pattern(cs, 1) }] });
  const z = img.active.compressed.get(0) as { offset: number; size: number };
  const q = await Qcow2Image.open(new MemoryStorage(img.bytes.slice(0, z.offset)), { codecs: nodeCodecs });
  await assert.rejects(q.read(new Uint8Array(10), 0), (e: unknown) => e instanceof QcowError && e.code === "corrupt");
});

/**
 * readSparse against its definition: the holes are exactly the runs that block status calls zero
 * and not data (readSparseByStatus), and the rest of the buffer is what read() gives; bytes of
 * holes are left untouched.
 */
async function assertSparse(dev: BlockDevice, expected: Uint8Array, offset: number, length: number): Promise<void> {
  const what = `readSparse of ${length} bytes at ${offset}`;
  const dst = new Uint8Array(length).fill(0xee);
  const holes = await readSparse(dev, dst, offset);
  const byStatus = new Uint8Array(length).fill(0xee);
  assert.deepEqual(holes, await readSparseByStatus(dev, byStatus, offset), `${what}: holes as block status has them`);
  assert.deepEqual(dst, byStatus, `${what}: bytes as block status and read give them`);
  const inHole = new Uint8Array(length);
  let last = -1;
  for (let i = 0; i < holes.length; i += 2) {
    const [start, n] = [holes[i], holes[i + 1]];
    assert.ok(n > 0 && start > last && start >= offset && start + n <= offset + length, `${what}: hole ${start}+${n}`);
    last = start + n;
    inHole.fill(1, start - offset, start - offset + n);
  }
  for (let i = 0; i < length; i++) {
    const want = inHole[i] ? 0xee : expected[offset + i];
    if (dst[i] !== want) assert.fail(`${what}: byte at ${offset + i} is ${dst[i]}, want ${want}`);
    if (inHole[i]) assert.equal(expected[offset + i], 0, `${what}: hole at ${offset + i} must read as zero`);
  }
}

for (const { name, spec } of layouts) {
  test(`readSparse: holes and data as block status and read give them (${name})`, async () => {
    const img = buildImage(spec);
    const q = await open(img);
    const want = img.expected();
    await assertSparse(q, want, 0, spec.size);
    const r = rng(spec.size + 1);
    for (let i = 0; i < 100; i++) {
      const offset = r(spec.size);
      await assertSparse(q, want, offset, 1 + r(Math.min(spec.size - offset, 4 * img.clusterSize)));
    }
  });
}

test("readSparse: a qcow2 backing chain, its zero clusters and the part past the backing file's end", async () => {
  const cs = 4096;
  const base = buildImage({
    size: 10 * cs,
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(cs, 1) },
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 3, kind: "compressed", data: pattern(cs, 2) },
      { guestCluster: 5, kind: "zero-alloc", data: pattern(cs, 3) },
      { guestCluster: 9, kind: "data", data: noise(cs, 4) },
    ],
  });
  const top = buildImage({
    size: 16 * cs,
    clusterBits: 12,
    clusters: [
      { guestCluster: 1, kind: "data", data: noise(cs, 5) },
      { guestCluster: 2, kind: "zero" },
      { guestCluster: 4, kind: "data", data: pattern(cs, 6) },
      { guestCluster: 12, kind: "data", data: pattern(cs, 7) },
      { guestCluster: 14, kind: "zero" },
    ],
  });
  const backing = await Qcow2Image.open(base.storage("base.qcow2"), { codecs: nodeCodecs });
  const q = await open(top, backing);
  const want = top.expected(base.expected());
  await assertSparse(q, want, 0, q.size);
  // Reads that start and end inside holes of either layer and across the backing file's end.
  for (let a = 0; a < q.size; a += cs / 2) {
    for (const n of [1, cs / 2 + 3, 3 * cs + 5]) await assertSparse(q, want, a, Math.min(n, q.size - a));
  }
  // The whole disk: the top's zero cluster 2; the base's zero-alloc cluster 5 and its unallocated
  // 6..8 as one hole; 10..11 and 13..15 past the base's end (14 a zero cluster of the top).
  const holes = await q.readSparse(new Uint8Array(16 * cs), 0);
  assert.deepEqual(holes, [2 * cs, cs, 5 * cs, 4 * cs, 10 * cs, 2 * cs, 13 * cs, 3 * cs]);
});

test("readSparse: a raw device takes block status and reads (no readSparse of its own)", async () => {
  const bytes = noise(8192, 3);
  const raw = await RawImage.open(new MemoryStorage(bytes, { name: "x.raw" }));
  const dst = new Uint8Array(1000);
  assert.deepEqual(await readSparse(raw, dst, 100), []);
  assert.deepEqual(dst, bytes.subarray(100, 1100));
});

test("readSparse: extended L2 subclusters, alone and over a backing file with holes", async () => {
  const spec = extendedSpec();
  const img = buildImage(spec);
  const alone = await open(img);
  const wantAlone = img.expected();
  // A backing file half as long, with a hole in its middle (MemoryStorage reports none, so a
  // qcow2 backing file with zero clusters stands in for one).
  const cs = 16384;
  const base = buildImage({
    size: 6 * cs,
    clusterBits: 14,
    clusters: [
      { guestCluster: 0, kind: "data", data: noise(cs, 11) },
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 4, kind: "data", data: noise(cs, 12) },
    ],
  });
  const backing = await Qcow2Image.open(base.storage("base.qcow2"), { codecs: nodeCodecs });
  const over = await open(buildImage(spec), backing);
  const wantOver = img.expected(base.expected());
  const r = rng(11);
  for (const [q, want] of [
    [alone, wantAlone],
    [over, wantOver],
  ] as const) {
    await assertSparse(q, want, 0, spec.size);
    for (let i = 0; i < 200; i++) {
      const offset = r(spec.size);
      await assertSparse(q, want, offset, 1 + r(Math.min(spec.size - offset, 3 * cs)));
    }
  }
});
