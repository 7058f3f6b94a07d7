/** TableCache: the LRU metadata cache with a byte budget, shared loads and uncached failures. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { TableCache } from "../../src/image/cache.js";

const bytes = (n: number, tag = 0): Uint8Array => new Uint8Array(n).fill(tag);

/** A load that counts its calls and resolves when told to. */
function deferredLoad<V>(): { load: () => Promise<V>; calls: number; resolve(v: V): void; reject(e: unknown): void } {
  let resolve!: (v: V) => void;
  let reject!: (e: unknown) => void;
  const state = {
    calls: 0,
    load: () => {
      state.calls++;
      return new Promise<V>((res, rej) => {
        resolve = res;
        reject = rej;
      });
    },
    resolve: (v: V) => resolve(v),
    reject: (e: unknown) => reject(e),
  };
  return state;
}

test("TableCache: a hit does not load again", async () => {
  const c = new TableCache<Uint8Array>(1000);
  let loads = 0;
  const load = async () => {
    loads++;
    return bytes(10, 7);
  };
  const a = await c.get(1, load);
  const b = await c.get(1, load);
  assert.equal(loads, 1);
  assert.equal(a, b);
  assert.equal(c.peek(1), a);
});

test("TableCache: evicts the least recently used entries once over the byte budget", async () => {
  const c = new TableCache<Uint8Array>(300);
  for (const k of [1, 2, 3]) await c.get(k, async () => bytes(100, k));
  await c.get(1, async () => assert.fail("1 is cached")); // 1 becomes the most recent
  await c.get(4, async () => bytes(100, 4)); // 400 > 300: 2 (least recent) goes
  assert.equal(c.peek(2), undefined);
  assert.ok(c.peek(1) && c.peek(3) && c.peek(4));
  await c.get(5, async () => bytes(250, 5)); // 550: 3, 1 and 4 go, in that order, until within budget
  assert.deepEqual(
    [1, 3, 4, 5].map((k) => c.peek(k) !== undefined),
    [false, false, false, true],
  );
});

test("TableCache: eviction counts bytes, not entries", async () => {
  const c = new TableCache<Uint8Array>(1000);
  for (let k = 0; k < 100; k++) c.put(k, bytes(10));
  assert.ok(
    [...Array(100).keys()].every((k) => c.peek(k) !== undefined),
    "100 x 10 bytes fit in 1000",
  );
  c.put(100, bytes(30));
  assert.deepEqual(
    [0, 1, 2, 3].map((k) => c.peek(k) !== undefined),
    [false, false, false, true],
  );
});

test("TableCache: one entry larger than the budget is still kept (the last one)", async () => {
  const c = new TableCache<Uint8Array>(100);
  c.put(1, bytes(50));
  c.put(2, bytes(500));
  assert.equal(c.peek(1), undefined);
  assert.ok(c.peek(2));
});

test("TableCache: replacing an entry accounts its new size", async () => {
  const c = new TableCache<Uint8Array>(300);
  c.put(1, bytes(250));
  c.put(1, bytes(50)); // now 50 bytes in all
  c.put(2, bytes(250)); // 300: both fit
  assert.ok(c.peek(1) && c.peek(2));
  c.delete(2);
  c.put(3, bytes(250)); // 300 again after the delete gave 250 back
  assert.ok(c.peek(1) && c.peek(3));
  c.clear();
  assert.equal(c.peek(1), undefined);
  c.put(4, bytes(300));
  assert.ok(c.peek(4));
});

test("TableCache: concurrent gets of one key share one load", async () => {
  const c = new TableCache<Uint8Array>(1000);
  const d = deferredLoad<Uint8Array>();
  const p1 = c.get(9, d.load);
  const p2 = c.get(9, d.load);
  const p3 = c.get(9, () => assert.fail("a second load started"));
  await Promise.resolve();
  const v = bytes(8, 9);
  d.resolve(v);
  assert.deepEqual(await Promise.all([p1, p2, p3]), [v, v, v]);
  assert.equal(d.calls, 1);
  assert.equal(c.peek(9), v);
});

test("TableCache: a failed load reaches every waiter and is not cached", async () => {
  const c = new TableCache<Uint8Array>(1000);
  const d = deferredLoad<Uint8Array>();
  const p1 = c.get(5, d.load);
  const p2 = c.get(5, d.load);
  d.reject(new Error("EIO"));
  await assert.rejects(p1, /EIO/);
  await assert.rejects(p2, /EIO/);
  assert.equal(c.peek(5), undefined);
  // The next get loads again, and succeeds.
  const v = await c.get(5, async () => bytes(4, 5));
  assert.deepEqual(v, bytes(4, 5));
  assert.equal(c.peek(5), v);
});

test("TableCache: loads of different keys run independently", async () => {
  const c = new TableCache<Uint8Array>(1000);
  const a = deferredLoad<Uint8Array>();
  const b = deferredLoad<Uint8Array>();
  const pa = c.get(1, a.load);
  const pb = c.get(2, b.load);
  b.resolve(bytes(1, 2));
  assert.deepEqual(await pb, bytes(1, 2));
  assert.equal(c.peek(1), undefined, "1 is still loading");
  a.resolve(bytes(1, 1));
  assert.deepEqual(await pa, bytes(1, 1));
});

test("TableCache: use marks an entry most recent as get does, also after the newest was deleted or replaced", async () => {
  const c = new TableCache<Uint8Array>(300);
  const load = (tag: number) => async () => bytes(100, tag);
  await c.get(1, load(1));
  await c.get(2, load(2));
  await c.get(3, load(3));
  assert.equal(c.use(9), undefined, "a miss loads nothing");
  assert.equal(c.peek(9), undefined);
  // 1 is used, so 2 is the least recent and goes first.
  assert.deepEqual(c.use(1), bytes(100, 1));
  c.put(4, bytes(100, 4));
  assert.equal(c.peek(2), undefined);
  assert.ok(c.peek(1) && c.peek(3) && c.peek(4));
  // The newest (4) deleted: using 3 must still move it past 1.
  c.delete(4);
  assert.ok(c.use(3));
  c.put(5, bytes(100, 5));
  c.put(6, bytes(100, 6));
  assert.equal(c.peek(1), undefined, "1 was the least recent");
  assert.ok(c.peek(3) && c.peek(5) && c.peek(6));
  // Using the newest again changes nothing; using 5 then makes 3 the least recent.
  assert.ok(c.use(6));
  assert.ok(c.use(5));
  c.put(7, bytes(100, 7));
  assert.equal(c.peek(3), undefined);
  assert.ok(c.peek(5) && c.peek(6) && c.peek(7));
  // A put makes its key the newest: using the one used before it moves that one again.
  c.clear();
  c.put(1, bytes(100, 1));
  c.put(2, bytes(100, 2));
  assert.ok(c.use(1)); // 2, 1
  c.put(3, bytes(100, 3)); // 2, 1, 3
  assert.ok(c.use(1)); // 2, 3, 1
  c.put(4, bytes(100, 4)); // 2 goes
  c.put(5, bytes(100, 5)); // then 3
  assert.deepEqual(
    [1, 2, 3, 4, 5].map((k) => c.peek(k) !== undefined),
    [true, false, false, true, true],
  );
  // After clear, nothing is remembered as newest.
  c.clear();
  c.put(1, bytes(100, 1));
  c.put(2, bytes(100, 2));
  assert.ok(c.use(1));
  c.put(3, bytes(100, 3));
  c.put(4, bytes(100, 4));
  assert.equal(c.peek(2), undefined);
  assert.ok(c.peek(1));
});
