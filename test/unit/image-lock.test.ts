import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "node:test";
import { Mutex, RangeLocks, Turns } from "../../src/image/lock.js";
import { BASE_SEED, Prng } from "../prng.js";

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

test("Turns: done in a random order, some twice, a turn is let through exactly when all before it are done", async () => {
  const rng = new Prng(BASE_SEED);
  const n = 64;
  const t = new Turns();
  const turns = Array.from({ length: n }, () => t.take());
  const order = [...turns];
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const done = new Set<number>();
  const passed = new Set<number>();
  for (const turn of turns) void t.wait(turn).then(() => passed.add(turn));
  for (const turn of order) {
    t.done(turn);
    if (rng.chance(0.3)) t.done(turn); // a second done changes nothing
    done.add(turn);
    await tick();
    let lowest = 0;
    while (done.has(lowest)) lowest++;
    const expected = turns.filter((x) => x <= lowest);
    assert.deepEqual(
      [...passed].sort((a, b) => a - b),
      expected,
      `seed ${BASE_SEED}: after done(${turn}), turns up to ${lowest} pass`,
    );
  }
  await t.wait(t.take()); // all done: the next turn passes at once
});

test("Turns: a long-lived Turns leaves no garbage in V8's old generation (in a child process)", () => {
  // A Set there had each table it grew or shrank into allocated there too: 200k turns done out
  // of order left ~1.8 MiB of old-generation garbage, ~3 MiB under fio's random writes.
  const lock = new URL("../../src/image/lock.js", import.meta.url).href;
  const code = `import v8 from "node:v8";
    const m = await import(${JSON.stringify(lock)});
    const old = () => v8.getHeapSpaceStatistics().find((s) => s.space_name === "old_space").space_used_size;
    const t = new m.Turns();
    gc(); gc(); // t is in the old generation now
    const before = old();
    for (let i = 0; i < 100000; i++) { const a = t.take(), b = t.take(); t.done(b); t.done(a); }
    console.log(old() - before);`;
  const r = spawnSync(process.execPath, ["--expose-gc", "--input-type=module", "-e", code], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  assert.ok(Number(r.stdout) < 256 * 1024, `old generation grew by ${r.stdout.trim()} bytes`);
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
