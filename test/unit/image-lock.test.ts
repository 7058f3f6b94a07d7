import assert from "node:assert/strict";
import { test } from "node:test";
import { Mutex, RangeLocks, Turns } from "../../src/image/lock.js";

const tick = () => new Promise<void>((r) => setImmediate(r));

test("Turns: a turn waits for every earlier turn, done in any order; several waiters share a turn", async () => {
  const t = new Turns();
  const [a, b, c] = [t.take(), t.take(), t.take()];
  const order: string[] = [];
  const waitB1 = t.wait(b).then(() => order.push("b1"));
  const waitB2 = t.wait(b).then(() => order.push("b2"));
  const waitC = t.wait(c).then(() => order.push("c"));
  await t.wait(a); // the first turn never waits
  t.done(c); // done out of order: c still waits for b
  await tick();
  assert.deepEqual(order, []);
  t.done(a);
  await Promise.all([waitB1, waitB2]);
  assert.deepEqual(order.sort(), ["b1", "b2"]);
  t.done(b);
  await waitC;
  assert.deepEqual(order, ["b1", "b2", "c"]);
});

test("RangeLocks: overlapping ranges run one after the other, disjoint ones together", async () => {
  const locks = new RangeLocks();
  const events: string[] = [];
  let releaseA!: () => void;
  const a = locks.run(0, 4, async () => {
    events.push("a+");
    await new Promise<void>((r) => (releaseA = r));
    events.push("a-");
  });
  await tick();
  const b = locks.run(3, 5, async () => events.push("b"));
  const c = locks.run(4, 8, async () => events.push("c"));
  await tick();
  assert.deepEqual(events, ["a+", "c"], "c does not overlap a; b waits");
  releaseA();
  await Promise.all([a, b, c]);
  assert.deepEqual(events, ["a+", "c", "a-", "b"]);
});

test("Mutex: one holder at a time, in arrival order", async () => {
  const m = new Mutex();
  const events: number[] = [];
  await Promise.all(
    [3, 1, 2].map((d, i) =>
      m.run(async () => {
        events.push(i);
        for (let k = 0; k < d; k++) await tick();
        events.push(i);
      }),
    ),
  );
  assert.deepEqual(events, [0, 0, 1, 1, 2, 2]);
});
