/**
 * The inspector's allocation map, computed in Node on images in memory: cell geometry, the
 * bytes of each class per cell, layers of a backing chain, and a 4 TiB sparse image mapped in a
 * few steps rather than one per cluster.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { Qcow2Image } from "../../src/image/qcow2.js";
import {
  allocationMap,
  COMPRESSED,
  cellColour,
  cellSummary,
  DATA,
  mapGeometry,
  NO_DEPTH,
  PALETTE,
  UNALLOCATED,
  ZERO,
} from "../../src/inspector/alloc-map.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { writeEmptyQcow2 } from "../../src/ops/create.js";
import { createOverlay } from "../../src/ops/overlay.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 1024 * 1024 * MiB;

async function newImage(size: number): Promise<Qcow2Image> {
  const storage = new MemoryStorage();
  await writeEmptyQcow2(storage, { size, clusterSize: 64 * KiB });
  return Qcow2Image.open(storage, { readOnly: false });
}

test("geometry: power-of-two cells no smaller than a cluster, at most 65536 of them", () => {
  assert.deepEqual(mapGeometry(64 * MiB, 64 * KiB), { cellBytes: 64 * KiB, cells: 1024, cols: 64, rows: 16 });
  assert.deepEqual(mapGeometry(4 * TiB, 64 * KiB), { cellBytes: 64 * MiB, cells: 65536, cols: 256, rows: 256 });
  // A size that is no multiple of anything: the last cell is short, and counted.
  const g = mapGeometry(10 * MiB + 512, 2 * MiB);
  assert.deepEqual(g, { cellBytes: 2 * MiB, cells: 6, cols: 4, rows: 2 });
  assert.deepEqual(mapGeometry(512, 512), { cellBytes: 512, cells: 1, cols: 1, rows: 1 });
});

test("bytes per class and the shallowest layer, through a backing chain", async () => {
  const base = await newImage(8 * MiB);
  await base.write(new Uint8Array(MiB).fill(1), 0);
  await base.write(new Uint8Array(64 * KiB).fill(2), 5 * MiB);
  const top = await createOverlay(base, new MemoryStorage());
  await top.write(new Uint8Array(64 * KiB).fill(3), 2 * MiB);
  await top.writeZeroes(3 * MiB, 128 * KiB);
  await top.write(new Uint8Array(4 * KiB).fill(4), 5 * MiB); // over the backing cluster
  const map = await allocationMap(top, mapGeometry(top.size, 64 * KiB));
  const cell = (offset: number) => cellSummary(map, offset / (64 * KiB));
  assert.deepEqual(cell(0), { cls: DATA, depth: 1, full: true });
  assert.deepEqual(cell(2 * MiB), { cls: DATA, depth: 0, full: true });
  assert.deepEqual(cell(3 * MiB + 64 * KiB), { cls: ZERO, depth: 0, full: true });
  assert.deepEqual(cell(5 * MiB), { cls: DATA, depth: 0, full: true }); // copied on write: all top
  assert.deepEqual(cell(7 * MiB), { cls: UNALLOCATED, depth: NO_DEPTH, full: true });
  assert.equal(map.maxDepth, 1);
  // Every byte of every cell is counted once.
  for (let c = 0; c < map.cells; c++) {
    const sum = map.bytes[c * 4] + map.bytes[c * 4 + 1] + map.bytes[c * 4 + 2] + map.bytes[c * 4 + 3];
    assert.equal(sum, 64 * KiB);
  }
  await top.close();
});

test("compressed clusters are their own class", async () => {
  const img = await newImage(4 * MiB);
  const { nodeCodecs } = await import("../../src/codec/node.js");
  const c = await Qcow2Image.open(img.storage, { readOnly: false, codecs: nodeCodecs });
  await img.close();
  await c.writeCompressed(1, new Uint8Array(64 * KiB).fill(7));
  const map = await allocationMap(c, mapGeometry(c.size, 256 * KiB));
  assert.deepEqual(cellSummary(map, 0), { cls: COMPRESSED, depth: 0, full: false });
  assert.equal(map.bytes[COMPRESSED], 64 * KiB);
  await c.close();
});

test("a 4 TiB sparse image: one step per L2 table's range, never per cluster; each write seen", async () => {
  const img = await newImage(4 * TiB);
  await img.write(new Uint8Array(64 * KiB).fill(1), 0);
  await img.write(new Uint8Array(100_000).fill(2), TiB + 12345);
  await img.write(new Uint8Array(MiB).fill(9), 2 * TiB);
  await img.writeZeroes(2 * TiB, MiB);
  await img.write(new Uint8Array(4096).fill(3), 4 * TiB - 4096);
  const t0 = performance.now();
  const map = await allocationMap(img, mapGeometry(img.size, img.clusterSize));
  const ms = performance.now() - t0;
  // 8192 L1 entries of 512 MiB each (64 KiB clusters), against 2^26 clusters.
  assert.ok(map.extents < 8192 + 50, `${map.extents} extents`);
  assert.ok(ms < 5000, `mapping took ${ms} ms`);
  const at = (offset: number) => cellSummary(map, Math.floor(offset / map.cellBytes));
  assert.deepEqual(at(0), { cls: DATA, depth: 0, full: false });
  assert.deepEqual(at(TiB + 12345), { cls: DATA, depth: 0, full: false });
  assert.deepEqual(at(2 * TiB), { cls: ZERO, depth: 0, full: false });
  assert.deepEqual(at(4 * TiB - 1), { cls: DATA, depth: 0, full: false });
  assert.deepEqual(at(3 * TiB), { cls: UNALLOCATED, depth: NO_DEPTH, full: true });
  await img.close();
});

test("colours: one per class and layer, deeper layers share the last, partial cells paler", () => {
  assert.deepEqual(cellColour(DATA, 0, true), PALETTE[DATA][0]);
  assert.deepEqual(cellColour(DATA, 9, true), PALETTE[DATA][PALETTE[DATA].length - 1]);
  const pale = cellColour(ZERO, 0, false);
  const full = cellColour(ZERO, 0, true);
  for (let i = 0; i < 3; i++) assert.ok(pale[i] > full[i]);
  const all = new Set<string>();
  for (const cls of [UNALLOCATED, ZERO, DATA, COMPRESSED] as const) {
    for (let d = 0; d < PALETTE[cls].length; d++) all.add(cellColour(cls, d, true).join());
  }
  assert.equal(all.size, 1 + 2 + 4 + 2, "two classes or layers share a colour");
});
