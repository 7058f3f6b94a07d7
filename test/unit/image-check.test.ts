/**
 * The consistency check and its repairs (src/image/check.ts) on images built in memory and then
 * damaged byte by byte: what is found, what is repaired, that a repaired image checks clean and
 * still holds its data, and that a crash in the middle of a repair leaves nothing worse.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { view } from "../../src/format/bytes.js";
import { type CheckResult, checkQcow2, FIX_ERRORS, FIX_LEAKS } from "../../src/image/check.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { type BuiltImage, buildImage, type ClusterSpec, pattern } from "./build-image.js";
import { CrashStorage } from "./crash-storage.js";

const CS = 4096;
const ALL = FIX_LEAKS | FIX_ERRORS;

function sample(opts: { refcountOrder?: number; version?: 2 | 3; snapshot?: boolean } = {}): BuiltImage {
  const clusters: ClusterSpec[] = [];
  for (let g = 0; g < 24; g++) clusters.push({ guestCluster: g * 3, kind: "data", data: pattern(CS, g + 1) });
  clusters.push({ guestCluster: 100, kind: "compressed", data: pattern(CS, 99) });
  return buildImage({
    size: 4 * 1024 * 1024,
    clusterBits: 12,
    version: opts.version,
    refcountOrder: opts.refcountOrder,
    clusters,
    snapshots: opts.snapshot ? [{ id: "1", name: "s", shareActive: true }] : undefined,
  });
}

async function check(s: MemoryStorage, fix = 0): Promise<{ r: CheckResult; lines: string[] }> {
  const lines: string[] = [];
  const r = await checkQcow2(s, { fix, log: (l) => lines.push(l) });
  return { r, lines };
}

/** The guest bytes of the active layer, through the read engine. */
async function contents(s: MemoryStorage): Promise<Uint8Array> {
  const img = await Qcow2Image.open(new MemoryStorage(s.bytes()), { codecs: nodeCodecs });
  const out = new Uint8Array(img.size);
  await img.read(out, 0);
  await img.close();
  return out;
}

/** Entries as exact 64-bit values (flags included). */
const u64 = (b: Uint8Array, at: number): bigint => view(b).getBigUint64(at);
function poke(s: MemoryStorage, at: number, value: bigint | number): Promise<void> {
  const b = new Uint8Array(8);
  view(b).setBigUint64(0, BigInt(value));
  return s.write(b, at);
}
async function bytesOf(s: MemoryStorage): Promise<Uint8Array> {
  return s.bytes();
}
const OFFSET = (e: bigint): number => Number(e & 0x00ff_ffff_ffff_fe00n);
const COPIED = 1n << 63n;

async function layout(s: MemoryStorage): Promise<{ l1: number; l2: number; e0: bigint; rt: number; rb0: number }> {
  const b = await bytesOf(s);
  const l1 = Number(u64(b, 40));
  const rt = Number(u64(b, 48));
  const l2 = OFFSET(u64(b, l1));
  return { l1, l2, e0: u64(b, l2), rt, rb0: Number(u64(b, rt)) };
}

test("a built image checks clean, with QEMU's allocation figures", async () => {
  for (const opts of [{}, { version: 2 as const }, { refcountOrder: 0 }, { refcountOrder: 6 }, { snapshot: true }]) {
    const img = sample(opts);
    const { r, lines } = await check(img.storage());
    assert.deepEqual(lines, [], JSON.stringify(opts));
    assert.equal(r.corruptions + r.leaks + r.checkErrors, 0);
    assert.equal(r.totalClusters, 1024);
    assert.equal(r.allocatedClusters, 25);
    assert.equal(r.compressedClusters, 1);
    // Every data cluster after the first follows a gap of two guest clusters, but they are
    // contiguous on the host: only the compressed one counts as fragmented.
    assert.equal(r.fragmentedClusters, 1);
    assert.equal(r.imageEndOffset, Math.ceil(img.bytes.length / CS) * CS);
  }
});

test("leaked clusters are found, and -r leaks frees them", async () => {
  const img = sample();
  const s = img.storage();
  const before = await contents(s);
  const size = await s.size();
  const n = size / CS;
  await s.write(new Uint8Array(2 * CS), size); // two clusters nobody references
  const { rb0 } = await layout(s);
  const rc = new Uint8Array([0, 1, 0, 1]); // 16-bit refcount 1 for clusters n and n+1
  await s.write(rc, rb0 + 2 * n);
  let { r, lines } = await check(s);
  assert.equal(r.leaks, 2);
  assert.equal(r.corruptions, 0);
  assert.deepEqual(lines, [
    `Leaked cluster ${n} refcount=1 reference=0`,
    `Leaked cluster ${n + 1} refcount=1 reference=0`,
  ]);
  ({ r, lines } = await check(s, FIX_LEAKS));
  assert.equal(r.leaksFixed, 2);
  assert.equal(r.leaks, 0);
  // As QEMU: the leaks are listed, then each is repaired.
  assert.deepEqual(lines.slice(2), [
    `Repairing cluster ${n} refcount=1 reference=0`,
    `Repairing cluster ${n + 1} refcount=1 reference=0`,
  ]);
  ({ r } = await check(s));
  assert.equal(r.leaks + r.corruptions, 0);
  assert.deepEqual(await contents(s), before);
});

test("refcounts that differ at a block's first, a middle and its last cluster are each found (16-bit refcounts, compared in bulk)", async () => {
  const img = sample();
  const s = img.storage();
  const n = (await s.size()) / CS;
  const { rb0, e0 } = await layout(s);
  const data = OFFSET(e0) / CS; // the first data cluster, referenced once
  const set = (cluster: number, refcount: number) =>
    s.write(new Uint8Array([refcount >> 8, refcount & 255]), rb0 + 2 * cluster);
  await set(0, 2);
  await set(data, 0);
  await set(n - 1, 3);
  const { r, lines } = await check(s);
  assert.deepEqual(lines, [
    "Leaked cluster 0 refcount=2 reference=1",
    `ERROR cluster ${data} refcount=0 reference=1`,
    `Leaked cluster ${n - 1} refcount=3 reference=1`,
    // The COPIED check then reads the refcount on disk, as QEMU's.
    `ERROR OFLAG_COPIED data cluster: l2_entry=${(COPIED | BigInt(data * CS)).toString(16)} refcount=0`,
  ]);
  assert.equal(r.leaks, 2);
  assert.equal(r.corruptions, 2);
});

test("clusters past the last one in use, without refcounts, are not in the image end offset", async () => {
  for (const refcountOrder of [4, 0, 6]) {
    const img = sample({ refcountOrder });
    const s = img.storage();
    const end = await s.size();
    await s.write(new Uint8Array(3 * CS), end); // zeros nobody references, refcount 0: not leaks
    const { r, lines } = await check(s);
    assert.deepEqual(lines, [], `refcount order ${refcountOrder}`);
    assert.equal(r.imageEndOffset, Math.ceil(end / CS) * CS, `refcount order ${refcountOrder}`);
  }
});

test("a refcount too low: -r leaks cannot fix it, -r all can", async () => {
  const img = sample();
  const s = img.storage();
  const before = await contents(s);
  const { e0 } = await layout(s);
  const data = OFFSET(e0) / CS;
  // Two L2 entries sharing one cluster: references 2, refcount 1.
  const { l2 } = await layout(s);
  await poke(s, l2 + 3 * 8, e0);
  let { r, lines } = await check(s);
  assert.ok(lines.includes(`ERROR cluster ${data} refcount=1 reference=2`), lines.join("\n"));
  assert.equal(r.corruptions, 1);
  assert.equal(r.leaks, 1); // the cluster the second entry pointed at
  ({ r } = await check(s, FIX_LEAKS));
  assert.equal(r.corruptions, 1);
  ({ r, lines } = await check(s, ALL));
  assert.ok(lines.includes(`Repairing cluster ${data} refcount=1 reference=2`));
  assert.ok(lines.some((l) => l.startsWith("Repairing OFLAG_COPIED data cluster")));
  assert.equal(r.corruptions, 0);
  ({ r } = await check(s));
  assert.equal(r.corruptions + r.leaks, 0);
  // Guest cluster 3 now shows cluster 0's data; everything else is as before.
  const now = await contents(s);
  assert.deepEqual(now.subarray(3 * CS, 4 * CS), before.subarray(0, CS));
  assert.deepEqual(now.subarray(4 * CS), before.subarray(4 * CS));
});

test("an emptied refcount table is rebuilt in free space, with the data intact", async () => {
  for (const refcountOrder of [0, 4, 6]) {
    const img = sample({ refcountOrder, snapshot: refcountOrder !== 0 });
    const s = img.storage();
    const before = await contents(s);
    const { rt } = await layout(s);
    await s.write(new Uint8Array(CS), rt);
    let { r, lines } = await check(s);
    assert.ok(r.corruptions > 20, String(r.corruptions));
    assert.ok(lines.every((l) => /^ERROR (cluster|OFLAG_COPIED)/.test(l)));
    const size = await s.size();
    ({ r, lines } = await check(s, ALL));
    assert.ok(lines.includes("Rebuilding refcount structure"));
    assert.equal(r.corruptions, 0);
    assert.ok(r.corruptionsFixed > 20);
    // The old refcount block is free now, so the new one takes its place: no growth beyond a
    // cluster for the new table.
    assert.ok((await s.size()) <= size + CS, `${await s.size()} > ${size + CS}`);
    ({ r, lines } = await check(s));
    assert.deepEqual(lines, []);
    assert.equal(r.corruptions + r.leaks + r.checkErrors, 0);
    assert.deepEqual(await contents(s), before);
  }
});

test("wrong COPIED flags: reported, and repaired by -r leaks when the refcounts are right", async () => {
  const s = sample().storage();
  const { l1, l2, e0 } = await layout(s);
  await poke(s, l2, e0 - COPIED);
  const l1e = u64(await bytesOf(s), l1);
  await poke(s, l1, l1e - COPIED);
  let { r, lines } = await check(s);
  assert.equal(r.corruptions, 2);
  assert.deepEqual(lines, [
    `ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=${(l1e - COPIED).toString(16)} refcount=1`,
    `ERROR OFLAG_COPIED data cluster: l2_entry=${(e0 - COPIED).toString(16)} refcount=1`,
  ]);
  ({ r } = await check(s, FIX_LEAKS));
  assert.equal(r.corruptionsFixed, 2);
  ({ r } = await check(s));
  assert.equal(r.corruptions, 0);
  const b = await bytesOf(s);
  assert.equal(u64(b, l2), e0);
  assert.equal(u64(b, l1), l1e);
});

test("reserved bits, unaligned and out-of-file entries are corruptions, not crashes", async () => {
  const cases: [string, (s: MemoryStorage) => Promise<void>, RegExp][] = [
    [
      "L2 reserved",
      async (s) => {
        const { l2, e0 } = await layout(s);
        await poke(s, l2, e0 | (1n << 58n));
      },
      /^ERROR found l2 entry with reserved bits set: 84/,
    ],
    [
      "L1 reserved",
      async (s) => {
        const { l1 } = await layout(s);
        await poke(s, l1, u64(await bytesOf(s), l1) | (1n << 60n));
      },
      /^ERROR found L1 entry with reserved bits set: 90/,
    ],
    [
      "unaligned data",
      async (s) => {
        const { l2, e0 } = await layout(s);
        await poke(s, l2, e0 + 512n);
      },
      /^ERROR offset=[0-9a-f]+: Data cluster is not properly aligned; L2 entry corrupted\.$/,
    ],
    [
      "data beyond the file",
      async (s) => {
        const { l2 } = await layout(s);
        await poke(s, l2, (1n << 40n) | COPIED);
      },
      /^ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x10000000000 size 0x1000$/,
    ],
    [
      "unaligned refcount block",
      async (s) => {
        const { rt, rb0 } = await layout(s);
        await poke(s, rt, rb0 + 512);
      },
      /^ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted$/,
    ],
  ];
  for (const [name, damage, first] of cases) {
    const s = sample().storage();
    await damage(s);
    const { r, lines } = await check(s);
    assert.match(lines[0], first, name);
    assert.ok(r.corruptions > 0, name);
  }
});

test("an unaligned refcount block makes refcounts unreadable (check errors); -r all rebuilds", async () => {
  const s = sample().storage();
  const before = await contents(s);
  const { rt, rb0 } = await layout(s);
  await poke(s, rt, rb0 + 512);
  let { r, lines } = await check(s);
  assert.ok(r.checkErrors > 0);
  assert.ok(lines.some((l) => /^Can't get refcount for cluster 0: Input\/output error$/.test(l)));
  ({ r } = await check(s, ALL));
  ({ r, lines } = await check(s));
  assert.deepEqual(lines, []);
  assert.equal(r.corruptions + r.leaks + r.checkErrors, 0);
  assert.deepEqual(await contents(s), before);
});

test("-r all clears the dirty and corrupt bits once the image is whole; unknown autoclear bits go", async () => {
  const s = sample().storage();
  const b = new Uint8Array(8);
  view(b).setBigUint64(0, 3n); // dirty | corrupt
  await s.write(b, 72);
  view(b).setBigUint64(0, 1n << 40n);
  await s.write(b, 88);
  await check(s, ALL);
  const h = await bytesOf(s);
  assert.equal(view(h).getBigUint64(72), 0n);
  assert.equal(view(h).getBigUint64(88), 0n);
});

test("a repair that would write over other metadata stops and marks the image corrupt", async () => {
  const s = sample().storage();
  const { l1 } = await layout(s);
  await poke(s, l1, BigInt(l1) | COPIED); // L1 entry 0 points at the L1 table itself
  const lines: string[] = [];
  await assert.rejects(checkQcow2(s, { fix: ALL, log: (l) => lines.push(l) }), /Input\/output error/);
  assert.ok(
    lines.some((l) => /overlaps with active L2 table/.test(l)),
    lines.join("\n"),
  );
  assert.equal(view(await bytesOf(s)).getBigUint64(72) & 2n, 2n);
});

test("a crash at any point of a refcount rebuild leaves an image that a new repair makes whole", async () => {
  const img = sample({ snapshot: true });
  const base = img.storage();
  const before = await contents(base);
  const { rt } = await layout(base);
  await base.write(new Uint8Array(CS), rt);
  const crash = new CrashStorage(base);
  await checkQcow2(crash, { fix: ALL });
  const flushes = crash.flushPositions();
  assert.ok(flushes.length >= 3);
  let states = 0;
  for (const f of [-1, ...flushes]) {
    const { ops } = crash.windowAfter(f);
    // Everything up to the flush, and then none, each one, or all of the writes after it.
    const subsets: number[][] = [[], ops, ...ops.map((o) => [o])];
    for (const persisted of subsets) {
      const s = new MemoryStorage(crash.crashImage(f + 1, persisted));
      const first = await check(s);
      assert.equal(first.r.checkErrors, 0);
      await check(s, ALL);
      const { r } = await check(s);
      assert.equal(r.corruptions + r.leaks + r.checkErrors, 0, `flush ${f}, ${persisted.length} writes`);
      assert.deepEqual(await contents(s), before);
      states++;
    }
  }
  assert.ok(states > 6);
});

test("an image whose refcount table size is 0 opens for check, refuses writes, and -r all rebuilds it", async () => {
  const s = sample().storage();
  const before = await contents(s);
  const b = new Uint8Array(4);
  await s.write(b, 56); // refcount_table_clusters = 0
  await assert.rejects(Qcow2Image.open(new MemoryStorage(s.bytes()), { readOnly: false }), /reference count table/);
  let { r } = await check(s);
  assert.ok(r.corruptions > 20);
  await check(s, ALL);
  ({ r } = await check(s));
  assert.equal(r.corruptions + r.leaks + r.checkErrors, 0);
  assert.deepEqual(await contents(s), before);
  const img = await Qcow2Image.open(new MemoryStorage(s.bytes()), { readOnly: false, codecs: nodeCodecs });
  await img.write(new Uint8Array(4096).fill(7), 0);
  await img.close();
});

test("an entry alone in an otherwise empty part of an L2 table is still checked", async () => {
  // The walks step over runs of 64 empty entries at once; entries at the edges of such runs and
  // at the end of the table must still be seen (the sample's table uses entries 0-100 of 512).
  for (const index of [192, 255, 256, 511]) {
    const s = sample().storage();
    const { l2 } = await layout(s);
    await poke(s, l2 + index * 8, 1n << 58n);
    const { r, lines } = await check(s);
    assert.deepEqual(lines, ["ERROR found l2 entry with reserved bits set: 400000000000000"], `entry ${index}`);
    assert.equal(r.corruptions, 1, `entry ${index}`);
  }
  // A data cluster there: its refcount and COPIED flag are checked too.
  const s = sample().storage();
  const { l2, e0 } = await layout(s);
  await poke(s, l2 + 320 * 8, e0 & ~COPIED);
  const { lines } = await check(s);
  assert.ok(
    lines.some((l) => /^ERROR cluster \d+ refcount=1 reference=2$/.test(l)),
    lines.join("\n"),
  );
});
