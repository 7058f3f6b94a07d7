/**
 * mapExtents merges neighbouring extents exactly when qemu-img map's entry_mergeable would:
 * same zero/data/depth/present flags, both with or both without a host offset, and host
 * offsets (in the same file) that continue each other.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import type { BlockDevice, Extent } from "../../src/image/block-device.js";
import { mapExtents } from "../../src/ops/map.js";

/** A device that reports the given extents (and records what it was asked). */
function device(extents: Omit<Extent, "start">[]): BlockDevice & { asked: [number, number][] } {
  let at = 0;
  const full: Extent[] = extents.map((e) => {
    const x = { ...e, start: at };
    at += e.length;
    return x;
  });
  const asked: [number, number][] = [];
  return {
    size: at,
    readOnly: true,
    asked,
    async read() {},
    async write() {},
    async writeZeroes() {},
    async discard() {},
    async flush() {},
    async close() {},
    async *blockStatus(offset: number, length: number) {
      asked.push([offset, length]);
      for (const e of full) if (e.start < offset + length && e.start + e.length > offset) yield e;
    },
  };
}

async function merged(dev: BlockDevice): Promise<[number, number][]> {
  const out: [number, number][] = [];
  for await (const e of mapExtents(dev)) out.push([e.start, e.length]);
  return out;
}

const data = (length: number, offset?: number, extra: Partial<Extent> = {}): Omit<Extent, "start"> => ({
  length,
  present: true,
  zero: false,
  data: true,
  depth: 0,
  ...(offset === undefined ? {} : { offset, file: "a" }),
  ...extra,
});

test("map: contiguous host offsets merge, a jump does not", async () => {
  assert.deepEqual(await merged(device([data(100, 1000), data(50, 1100), data(10, 1150)])), [[0, 160]]);
  assert.deepEqual(await merged(device([data(100, 1000), data(50, 1200)])), [
    [0, 100],
    [100, 50],
  ]);
  // Going backwards on the host is a jump too.
  assert.deepEqual(await merged(device([data(100, 1000), data(100, 900)])).then((r) => r.length), 2);
});

test("map: extents without an offset merge with each other, not with ones that have one", async () => {
  assert.deepEqual(await merged(device([data(10), data(20)])), [[0, 30]]);
  assert.deepEqual(await merged(device([data(10), data(20, 5000)])), [
    [0, 10],
    [10, 20],
  ]);
});

test("map: any difference in zero, data, depth or present keeps extents apart", async () => {
  for (const diff of [{ zero: true }, { data: false }, { depth: 1 }, { present: false }] as Partial<Extent>[]) {
    assert.equal((await merged(device([data(10), data(10, undefined, diff)]))).length, 2, JSON.stringify(diff));
  }
});

test("map: contiguous offsets in different files do not merge", async () => {
  assert.equal((await merged(device([data(10, 0), data(10, 10, { file: "b" })]))).length, 2);
});

test("map: a sub-range is passed through", async () => {
  const dev = device([data(100, 0), data(100, 100)]);
  const out: Extent[] = [];
  for await (const e of mapExtents(dev, 50, 100)) out.push(e);
  assert.deepEqual(dev.asked, [[50, 100]]);
  assert.equal(out.length, 1);
});

test("map: merging does not alter the device's own extent objects", async () => {
  const dev = device([data(10, 0), data(10, 10)]);
  const before: Extent[] = [];
  for await (const e of dev.blockStatus(0, 20)) before.push({ ...e });
  for await (const _ of mapExtents(dev));
  const after: Extent[] = [];
  for await (const e of dev.blockStatus(0, 20)) after.push(e);
  assert.deepEqual(after, before);
});
