/**
 * Block status (depth, present, zero, data, offset) of every cluster kind, through backing
 * chains, merged as `qemu-img map` merges it (ops/map.ts mapExtents) — by hand, and against
 * `qemu-img map --output=json` on the same bytes.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import type { BlockDevice, Extent } from "../../src/image/block-device.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { mapExtents } from "../../src/ops/map.js";
import { buildImage, MapOpener, noise, pattern, qemuImg, withTempDir, writeFiles } from "./build-image.js";

interface Row {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

function row(e: Extent): Row {
  const r: Row = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data };
  if (e.offset !== undefined) r.offset = e.offset;
  return r;
}

async function collect(it: AsyncIterable<Extent>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

async function mapped(dev: BlockDevice): Promise<Row[]> {
  return (await collect(mapExtents(dev))).map(row);
}

/** Extents must tile the range they were asked for, in order, with no gaps. */
function assertTiles(extents: Extent[], start: number, length: number): void {
  let at = start;
  for (const e of extents) {
    assert.equal(e.start, at, `extent at ${e.start} should start at ${at}`);
    assert.ok(e.length > 0, "empty extent");
    at += e.length;
  }
  assert.equal(at, start + length);
}

const CS = 512;

test("block status: every cluster kind in one image, merged as qemu-img map merges", async () => {
  const img = buildImage({
    size: 80 * CS,
    clusterBits: 9,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "data", data: pattern(CS, 2) },
      { guestCluster: 2, kind: "compressed", data: pattern(CS, 3) },
      { guestCluster: 3, kind: "compressed", data: pattern(CS, 4) },
      { guestCluster: 4, kind: "zero" },
      { guestCluster: 5, kind: "zero-alloc" },
      { guestCluster: 6, kind: "zero-alloc" },
      // Across the first L2 table's end (64 entries of 512-byte clusters).
      { guestCluster: 63, kind: "data", data: pattern(CS, 5) },
      { guestCluster: 64, kind: "data", data: pattern(CS, 6) },
    ],
  });
  const h = (gc: number): number => img.active.hostOffsets.get(gc) as number;
  assert.equal(h(1), h(0) + CS, "builder allocates neighbours contiguously");
  assert.equal(h(6), h(5) + CS);
  const q = await Qcow2Image.open(img.storage("t.qcow2"), { codecs: nodeCodecs });
  const raw = await collect(q.blockStatus(0, q.size));
  assertTiles(raw, 0, q.size);
  assert.ok(raw.every((e) => e.depth === 0));
  assert.ok(raw.filter((e) => e.compressed).every((e) => e.start >= 2 * CS && e.start + e.length <= 4 * CS));
  assert.deepEqual(
    raw.filter((e) => e.compressed).reduce((n, e) => n + e.length, 0),
    2 * CS,
    "compressed clusters are flagged",
  );
  const rows = await mapped(q);
  const d63 = h(63);
  const expected: Row[] = [
    { start: 0, length: 2 * CS, depth: 0, present: true, zero: false, data: true, offset: h(0) },
    { start: 2 * CS, length: 2 * CS, depth: 0, present: true, zero: false, data: true },
    { start: 4 * CS, length: CS, depth: 0, present: true, zero: true, data: false },
    { start: 5 * CS, length: 2 * CS, depth: 0, present: true, zero: true, data: false, offset: h(5) },
    { start: 7 * CS, length: 56 * CS, depth: 0, present: false, zero: true, data: false },
  ];
  if (h(64) === d63 + CS) {
    expected.push({ start: 63 * CS, length: 2 * CS, depth: 0, present: true, zero: false, data: true, offset: d63 });
  } else {
    expected.push({ start: 63 * CS, length: CS, depth: 0, present: true, zero: false, data: true, offset: d63 });
    expected.push({ start: 64 * CS, length: CS, depth: 0, present: true, zero: false, data: true, offset: h(64) });
  }
  expected.push({ start: 65 * CS, length: 15 * CS, depth: 0, present: false, zero: true, data: false });
  assert.deepEqual(rows, expected);
});

test("block status: a sub-range starts and ends where asked", async () => {
  const img = buildImage({
    size: 16 * CS,
    clusterBits: 9,
    clusters: [{ guestCluster: 2, kind: "data", data: pattern(CS, 1) }],
  });
  const q = await Qcow2Image.open(img.storage());
  const host = img.active.hostOffsets.get(2) as number;
  const rows = (await collect(q.blockStatus(2 * CS + 100, 1000))).map(row);
  assert.deepEqual(rows, [
    { start: 2 * CS + 100, length: CS - 100, depth: 0, present: true, zero: false, data: true, offset: host + 100 },
    { start: 3 * CS, length: 1000 - (CS - 100), depth: 0, present: false, zero: true, data: false },
  ]);
  // Past the end of the disk, nothing.
  assert.deepEqual(await collect(q.blockStatus(16 * CS, 100)), []);
});

test("block status: extended L2 subclusters", async () => {
  const cs = 16384;
  const sc = cs / 32;
  const img = buildImage({
    size: 4 * cs,
    clusterBits: 14,
    extendedL2: true,
    clusters: [
      { guestCluster: 0, kind: "subclusters", alloc: 0x0000_000f, zero: 0x0000_00f0, data: pattern(cs, 1) },
      { guestCluster: 1, kind: "subclusters", alloc: 0, zero: 0xffff_0000 },
    ],
  });
  const host = img.active.hostOffsets.get(0) as number;
  const q = await Qcow2Image.open(img.storage());
  assert.deepEqual(await mapped(q), [
    { start: 0, length: 4 * sc, depth: 0, present: true, zero: false, data: true, offset: host },
    { start: 4 * sc, length: 4 * sc, depth: 0, present: true, zero: true, data: false, offset: host + 4 * sc },
    // Unallocated subclusters of an allocated cluster keep their host offset, like QEMU's.
    { start: 8 * sc, length: 24 * sc, depth: 0, present: false, zero: true, data: false, offset: host + 8 * sc },
    { start: cs, length: 16 * sc, depth: 0, present: false, zero: true, data: false },
    { start: cs + 16 * sc, length: 16 * sc, depth: 0, present: true, zero: true, data: false },
    { start: 2 * cs, length: 2 * cs, depth: 0, present: false, zero: true, data: false },
  ]);
});

test("block status: depth through a chain, and zeros past a short backing file", async () => {
  const cs = 4096;
  const raw = noise(3 * cs, 1); // the raw base covers 3 of the 8 clusters
  const mid = buildImage({
    size: 6 * cs,
    clusterBits: 12,
    backingFile: "base.raw",
    backingFormat: "raw",
    clusters: [{ guestCluster: 1, kind: "data", data: pattern(cs, 2) }],
  });
  const top = buildImage({
    size: 8 * cs,
    clusterBits: 12,
    backingFile: "mid.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 0, kind: "zero" },
      { guestCluster: 4, kind: "data", data: pattern(cs, 3) },
    ],
  });
  const opener = new MapOpener(
    new Map([
      ["base.raw", raw],
      ["mid.qcow2", mid.bytes],
      ["top.qcow2", top.bytes],
    ]),
  );
  const img = await openImage("top.qcow2", { opener, codecs: nodeCodecs });
  const m1 = mid.active.hostOffsets.get(1) as number;
  const t4 = top.active.hostOffsets.get(4) as number;
  assert.deepEqual(await mapped(img), [
    { start: 0, length: cs, depth: 0, present: true, zero: true, data: false },
    { start: cs, length: cs, depth: 1, present: true, zero: false, data: true, offset: m1 },
    { start: 2 * cs, length: cs, depth: 2, present: true, zero: false, data: true, offset: 2 * cs },
    // Past the raw base's end, inside mid: mid reads zeros there.
    { start: 3 * cs, length: cs, depth: 1, present: false, zero: true, data: false },
    { start: 4 * cs, length: cs, depth: 0, present: true, zero: false, data: true, offset: t4 },
    { start: 5 * cs, length: cs, depth: 1, present: false, zero: true, data: false },
    // Past mid's end: zeros at the top.
    { start: 6 * cs, length: 2 * cs, depth: 0, present: false, zero: true, data: false },
  ]);
});

/** qemu-img map --output=json, as rows. */
function qemuMap(dir: string, file: string): Row[] {
  const r = qemuImg(["map", "--output=json", file], dir);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as (Row & { filename?: string })[]).map((e) => {
    const out: Row = {
      start: e.start,
      length: e.length,
      depth: e.depth,
      present: e.present,
      zero: e.zero,
      data: e.data,
    };
    if (e.offset !== undefined) out.offset = e.offset;
    return out;
  });
}

test("block status: mapExtents equals qemu-img map --output=json on the same images", async () => {
  const cs = 16384;
  const raw = noise(5 * cs, 7);
  const mid = buildImage({
    size: 10 * cs,
    clusterBits: 14,
    backingFile: "base.raw",
    backingFormat: "raw",
    clusters: [
      { guestCluster: 1, kind: "data", data: pattern(cs, 1) },
      { guestCluster: 2, kind: "compressed", data: pattern(cs, 2) },
      { guestCluster: 3, kind: "zero" },
      { guestCluster: 6, kind: "zero-alloc" },
      { guestCluster: 7, kind: "data", data: pattern(cs, 3) },
    ],
  });
  const top = buildImage({
    size: 12 * cs,
    clusterBits: 14,
    extendedL2: true,
    backingFile: "mid.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 0, kind: "subclusters", alloc: 0x0000_ff00, zero: 0x00ff_0000, data: pattern(cs, 4) },
      { guestCluster: 4, kind: "subclusters", alloc: 0, zero: 0x0f0f_0f0f },
      { guestCluster: 7, kind: "compressed", data: pattern(cs, 5) },
      { guestCluster: 8, kind: "zero" },
      { guestCluster: 10, kind: "data", data: pattern(cs, 6) },
    ],
  });
  const files = { "base.raw": raw, "mid.qcow2": mid.bytes, "top.qcow2": top.bytes };
  const opener = new MapOpener(new Map(Object.entries(files)));
  await withTempDir(async (dir) => {
    writeFiles(dir, files);
    for (const name of ["mid.qcow2", "top.qcow2"]) {
      const img = await openImage(name, { opener, codecs: nodeCodecs });
      assert.deepEqual(await mapped(img), qemuMap(dir, name), name);
    }
  });
});
