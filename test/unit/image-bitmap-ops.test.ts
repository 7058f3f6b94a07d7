/**
 * bitmap-ops.ts on images in memory: every action, the directory read back, exact refcounts
 * (every cluster's refcount equals the references counted, so nothing leaks), QEMU's refusals,
 * and crashes at every flush point (the old directory or the new one, never corruption).
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { QcowError } from "../../src/errors.js";
import {
  type BitmapDirectoryEntry,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
} from "../../src/format/bitmap.js";
import { setU64, view } from "../../src/format/bytes.js";
import { AUTOCLEAR_BITMAPS, encodeHeader } from "../../src/format/header.js";
import {
  addBitmap,
  clearBitmap,
  defaultBitmapGranularity,
  mergeBitmap,
  removeBitmap,
  setBitmapEnabled,
} from "../../src/image/bitmap-ops.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { Refcounts } from "../../src/image/refcount.js";
import { countReferences } from "../../src/image/repair.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { readFull, type Storage } from "../../src/io/storage.js";
import { type Qcow2CreateOptions, writeEmptyQcow2 } from "../../src/ops/create.js";
import { BASE_SEED, Prng } from "../prng.js";
import { qemuImg, withTempDir } from "./build-image.js";
import { CrashStorage, type StorageOp, tornWrite } from "./crash-storage.js";

const KiB = 1024;
const MiB = 1024 * KiB;

async function fresh(o: Qcow2CreateOptions): Promise<{ mem: MemoryStorage; img: Qcow2Image }> {
  const mem = new MemoryStorage(undefined, { name: "image.qcow2" });
  await writeEmptyQcow2(mem, o);
  return { mem, img: await Qcow2Image.open(mem, { readOnly: false, filename: "image.qcow2" }) };
}

/** The image as a new reader sees it (a copy of the bytes). */
function reopen(bytes: Uint8Array, readOnly = true): Promise<Qcow2Image> {
  return Qcow2Image.open(new MemoryStorage(bytes, { name: "image.qcow2" }), { readOnly, filename: "image.qcow2" });
}

/** Every cluster's refcount equals the references to it: no leak, no refcount too low. */
async function assertRefcountsExact(bytes: Uint8Array, what: string): Promise<void> {
  const img = await reopen(bytes);
  const refcounts = await Refcounts.open(img.storage, img.header);
  const refs = await countReferences(img, refcounts);
  const end = Math.max(refs.counts.length, Math.ceil(bytes.length / img.clusterSize));
  for (let c = 0; c < end; c++) {
    const want = c < refs.counts.length ? refs.counts[c] : 0;
    assert.equal(
      await refcounts.get(c),
      want,
      `${what}: refcount of cluster ${c} (0x${(c * img.clusterSize).toString(16)})`,
    );
  }
}

/** A bitmap's dirty guest ranges, read from its table and data clusters (merged, clipped). */
async function dirtyRanges(img: Qcow2Image, name: string): Promise<[number, number][]> {
  const b = img.bitmaps.find((x) => x.name === name);
  assert.ok(b, `bitmap ${name} exists`);
  return bitmapRanges(img.storage, img.clusterSize, img.size, b);
}

async function bitmapRanges(
  s: Storage,
  cs: number,
  size: number,
  b: BitmapDirectoryEntry,
): Promise<[number, number][]> {
  const g = 2 ** b.granularityBits;
  const table = new Uint8Array(b.tableSize * 8);
  await readFull(s, table, b.tableOffset);
  const out: [number, number][] = [];
  const add = (i: number): void => {
    const from = i * g;
    if (from >= size) return;
    const to = Math.min(size, from + g);
    const last = out[out.length - 1];
    if (last && last[1] === from) last[1] = to;
    else out.push([from, to]);
  };
  const data = new Uint8Array(cs);
  for (let k = 0; k < b.tableSize; k++) {
    const e = decodeBitmapTableEntry(view(table).getUint32(k * 8), view(table).getUint32(k * 8 + 4), cs);
    if (e.offset === 0 && !e.allOnes) continue;
    if (e.allOnes) data.fill(0xff);
    else await readFull(s, data, e.offset);
    for (let j = 0; j < cs * 8; j++) if ((data[j >> 3] >> (j & 7)) & 1) add(k * cs * 8 + j);
  }
  return out;
}

/** The ranges `writes` dirty in a bitmap of granularity `g` (merged, clipped to `size`). */
function expected(writes: [number, number][], g: number, size: number): [number, number][] {
  const sorted = writes
    .map(([o, l]): [number, number] => [Math.floor(o / g) * g, Math.min(size, Math.ceil((o + l) / g) * g)])
    .sort((a, b) => a[0] - b[0]);
  const out: [number, number][] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push([...r]);
  }
  return out;
}

async function rejects(p: Promise<unknown>, code: string, message: string | RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof QcowError, `expected a QcowError, got ${String(e)}`);
    assert.equal(e.code, code, `code of "${e.message}"`);
    if (typeof message === "string") assert.equal(e.message, message);
    else assert.match(e.message, message);
    return true;
  });
}

async function write(img: Qcow2Image, writes: [number, number][]): Promise<void> {
  for (const [o, l] of writes) await img.write(new Uint8Array(l).fill(0x5a), o);
}

describe("add", () => {
  for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
    test(`an empty bitmap as QEMU stores it, ${cs}-byte clusters`, async () => {
      const size = 48 * MiB + 512;
      const { mem, img } = await fresh({ size, clusterSize: cs });
      await addBitmap(img, "a");
      await addBitmap(img, "b", { granularity: 512, disabled: true });
      await img.close();
      const back = await reopen(mem.bytes());
      const g = defaultBitmapGranularity(cs);
      assert.equal(g, Math.min(65536, Math.max(4096, cs)));
      assert.deepEqual(
        back.bitmaps.map((b) => [b.name, b.flags, 2 ** b.granularityBits, b.tableSize, b.type, b.extra.length]),
        [
          ["a", BME_FLAG_AUTO, g, Math.ceil(Math.ceil(size / g) / (cs * 8)), 1, 0],
          ["b", 0, 512, Math.ceil(Math.ceil(size / 512) / (cs * 8)), 1, 0],
        ],
      );
      assert.ok(back.header.autoclearFeatures & AUTOCLEAR_BITMAPS, "the bitmaps autoclear bit");
      assert.equal(back.extensions.bitmaps?.nbBitmaps, 2);
      const dir = new Uint8Array(back.extensions.bitmaps?.directorySize ?? 0);
      await readFull(back.storage, dir, back.extensions.bitmaps?.directoryOffset ?? 0);
      assert.deepEqual(dir, encodeBitmapDirectory(back.bitmaps), "the directory round-trips");
      for (const name of ["a", "b"]) assert.deepEqual(await dirtyRanges(back, name), []);
      await assertRefcountsExact(mem.bytes(), "after add");
    });
  }
});

test("writes after add (same session, and after reopening) mark the enabled bitmaps only", async () => {
  const size = 32 * MiB;
  const { mem, img } = await fresh({ size, clusterSize: 4 * KiB });
  await addBitmap(img, "coarse", { granularity: 1 * MiB });
  await addBitmap(img, "fine", { granularity: 512 });
  await addBitmap(img, "off", { disabled: true });
  const w1: [number, number][] = [
    [100, 3000],
    [5 * MiB - 1, 2],
    [size - 700, 700],
  ];
  await write(img, w1);
  await img.close();
  let back = await reopen(mem.bytes());
  assert.deepEqual(await dirtyRanges(back, "coarse"), expected(w1, MiB, size));
  assert.deepEqual(await dirtyRanges(back, "fine"), expected(w1, 512, size));
  assert.deepEqual(await dirtyRanges(back, "off"), []);
  assert.ok(
    back.bitmaps.every((b) => !(b.flags & BME_FLAG_IN_USE)),
    "no bitmap is left in use",
  );
  const img2 = await reopen(mem.bytes(), false);
  const w2: [number, number][] = [[20 * MiB + 4096, 8192]];
  await write(img2, w2);
  await img2.writeZeroes(25 * MiB, MiB);
  await img2.discard(26 * MiB, MiB);
  await img2.close();
  back = await reopen((img2.storage as MemoryStorage).bytes());
  const all: [number, number][] = [...w1, ...w2, [25 * MiB, MiB], [26 * MiB, MiB]];
  assert.deepEqual(await dirtyRanges(back, "fine"), expected(all, 512, size));
  await assertRefcountsExact((img2.storage as MemoryStorage).bytes(), "after writes");
});

test("enable and disable change the auto flag only; clear empties a bitmap and frees its data", async () => {
  const size = 16 * MiB;
  const { mem, img } = await fresh({ size, clusterSize: 512, refcountBits: 1 });
  await addBitmap(img, "a", { granularity: 4096 });
  await write(img, [
    [0, 10000],
    [8 * MiB, 512],
  ]);
  await setBitmapEnabled(img, "a", false);
  await write(img, [[12 * MiB, 512]]);
  assert.equal(img.bitmaps[0].flags, 0);
  await setBitmapEnabled(img, "a", true);
  assert.equal(img.bitmaps[0].flags, BME_FLAG_AUTO);
  await setBitmapEnabled(img, "a", true);
  await img.close();
  let back = await reopen(mem.bytes());
  assert.deepEqual(
    await dirtyRanges(back, "a"),
    expected(
      [
        [0, 10000],
        [8 * MiB, 512],
      ],
      4096,
      size,
    ),
    "writes while disabled are not recorded",
  );
  await assertRefcountsExact(mem.bytes(), "after enable/disable");
  const img2 = await reopen(mem.bytes(), false);
  const tableBefore = img2.bitmaps[0].tableOffset;
  await clearBitmap(img2, "a");
  await img2.close();
  const bytes = (img2.storage as MemoryStorage).bytes();
  back = await reopen(bytes);
  assert.deepEqual(await dirtyRanges(back, "a"), []);
  assert.notEqual(back.bitmaps[0].tableOffset, tableBefore, "a new table replaces the old one");
  await assertRefcountsExact(bytes, "after clear (the old table and data are freed)");
});

describe("merge", () => {
  const size = 40 * MiB;
  const writes: [number, number][] = [
    [0, 1],
    [3 * MiB + 100, 70000],
    [17 * MiB, 4 * MiB + 3],
    [size - 512, 512],
  ];
  const other: [number, number][] = [
    [1 * MiB, 4096],
    [30 * MiB + 5, 10],
  ];
  for (const [gs, gt] of [
    [65536, 65536],
    [512, 65536],
    [1 * MiB, 4096],
    [4096, 512],
  ]) {
    test(`granularity ${gs} into ${gt}`, async () => {
      const { mem, img } = await fresh({ size, clusterSize: 4 * KiB });
      await addBitmap(img, "src", { granularity: gs });
      await addBitmap(img, "dst", { granularity: gt, disabled: true });
      await write(img, writes);
      await setBitmapEnabled(img, "dst", true);
      await setBitmapEnabled(img, "src", false);
      await write(img, other);
      await mergeBitmap(img, "dst", "src");
      await img.close();
      const back = await reopen(mem.bytes());
      assert.deepEqual(await dirtyRanges(back, "src"), expected(writes, gs, size), "the source is unchanged");
      // The source's dirty ranges, rounded out to the target's granularity, plus the target's own.
      const src = await dirtyRanges(back, "src");
      assert.deepEqual(
        await dirtyRanges(back, "dst"),
        expected([...src.map(([a, b]): [number, number] => [a, b - a]), ...other], gt, size),
      );
      await assertRefcountsExact(mem.bytes(), "after merge");
    });
  }

  test("from another image with another cluster size, and from an all-ones table entry", async () => {
    const s = await fresh({ size, clusterSize: 512 });
    await addBitmap(s.img, "s", { granularity: 8192 });
    await write(s.img, writes);
    await s.img.close();
    // Make the source's second table entry "all ones" (as another producer may write it).
    const srcBytes = s.mem.bytes();
    const srcImg = await reopen(srcBytes);
    const entry = srcImg.bitmaps[0];
    const patched = srcBytes.slice();
    setU64(view(patched), entry.tableOffset + 8, 1);
    const source = await reopen(patched);
    const perCluster = 512 * 8 * 8192;
    const { mem, img } = await fresh({ size, clusterSize: 64 * KiB });
    await addBitmap(img, "t", { granularity: 65536 });
    await mergeBitmap(img, "t", "s", source);
    await img.close();
    const back = await reopen(mem.bytes());
    const want = expected(
      [...writes.filter(([o]) => o < perCluster || o >= 2 * perCluster), [perCluster, perCluster]],
      65536,
      size,
    );
    assert.deepEqual(await dirtyRanges(back, "t"), want);
    await assertRefcountsExact(mem.bytes(), "after merge from another image");
  });
});

test("remove frees everything; the last one takes the extension and the autoclear bit with it", async () => {
  const { mem, img } = await fresh({ size: 8 * MiB, clusterSize: 4 * KiB });
  const emptyBytes = mem.bytes();
  await addBitmap(img, "a");
  await addBitmap(img, "b", { granularity: 512 });
  await write(img, [[0, MiB]]);
  await removeBitmap(img, "a");
  assert.deepEqual(
    img.bitmaps.map((b) => b.name),
    ["b"],
  );
  await removeBitmap(img, "b");
  await img.close();
  const bytes = mem.bytes();
  const back = await reopen(bytes);
  assert.equal(back.bitmaps.length, 0);
  assert.equal(back.extensions.bitmaps, undefined);
  assert.equal(back.header.autoclearFeatures & AUTOCLEAR_BITMAPS, 0n);
  assert.deepEqual(bytes.subarray(0, 4096), emptyBytes.subarray(0, 4096), "the header is as before the first add");
  await assertRefcountsExact(bytes, "after removing every bitmap");
});

describe("refusals, with QEMU's messages", () => {
  test("names, granularity, existing and missing bitmaps, v2, read-only images", async () => {
    const { img } = await fresh({ size: 8 * MiB });
    await addBitmap(img, "a");
    await rejects(addBitmap(img, ""), "invalid-argument", "Bitmap name cannot be empty");
    await rejects(addBitmap(img, "a"), "invalid-argument", "Bitmap already exists: a");
    for (const g of [256, 3000, 2 ** 32, 0]) {
      await rejects(
        addBitmap(img, "g", { granularity: g }),
        "invalid-argument",
        "Granularity must be power of 2 and at least 512",
      );
    }
    const long = "é".repeat(512); // 1024 bytes
    await rejects(
      addBitmap(img, long),
      "invalid-argument",
      `Can't make bitmap '${long}' persistent in 'image.qcow2': Name length exceeds maximum (1023 characters)`,
    );
    await addBitmap(img, "n".repeat(1023));
    for (const op of [
      () => removeBitmap(img, "x"),
      () => clearBitmap(img, "x"),
      () => setBitmapEnabled(img, "x", true),
      () => mergeBitmap(img, "x", "a"),
      () => mergeBitmap(img, "a", "x"),
    ]) {
      await rejects(op(), "not-found", "Dirty bitmap 'x' not found");
    }
    await img.close();
    const v2 = await fresh({ size: 8 * MiB, version: 2 });
    await rejects(
      addBitmap(v2.img, "a"),
      "invalid-argument",
      "Can't make bitmap 'a' persistent in 'image.qcow2': Cannot store dirty bitmaps in qcow2 v2 files",
    );
    const big = await fresh({ size: 4 * 1024 * 1024 * MiB });
    await rejects(
      addBitmap(big.img, "a", { granularity: 512 }),
      "invalid-argument",
      "Can't make bitmap 'a' persistent in 'image.qcow2': Too much space will be occupied by the bitmap. Use larger granularity",
    );
    // qcowkit's own limit: a table must fit in one contiguous allocation (63 clusters here).
    const long512 = await fresh({ size: 16 * 1024 * MiB, clusterSize: 512, refcountBits: 64 });
    const before = long512.mem.bytes();
    await rejects(
      addBitmap(long512.img, "a", { granularity: 512 }),
      "unsupported",
      "A bitmap table of 128 clusters is more than qcowkit allocates contiguously (63); use a larger granularity",
    );
    assert.deepEqual(long512.mem.bytes(), before, "nothing written");
    await addBitmap(long512.img, "b", { granularity: 2048 });
    const empty = await fresh({ size: 0 });
    await rejects(addBitmap(empty.img, "a"), "invalid-argument", /The image is empty/);
    const ro = await reopen(big.mem.bytes());
    await rejects(addBitmap(ro, "a"), "read-only", /read-only/);
  });

  test("in-use bitmaps can only be removed; merges need equal sizes", async () => {
    const { mem, img } = await fresh({ size: 8 * MiB });
    await addBitmap(img, "u");
    await addBitmap(img, "ok");
    await img.close();
    // Mark "u" in use on disk, as a crash while it was being written leaves it.
    const bytes = mem.bytes();
    const probe = await reopen(bytes);
    const dirAt = probe.extensions.bitmaps?.directoryOffset ?? 0;
    view(bytes).setUint32(dirAt + 12, BME_FLAG_IN_USE | BME_FLAG_AUTO);
    const img2 = await reopen(bytes, false);
    const inconsistent =
      "Bitmap 'u' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk";
    for (const op of [
      () => clearBitmap(img2, "u"),
      () => setBitmapEnabled(img2, "u", false),
      () => mergeBitmap(img2, "ok", "u"),
      () => mergeBitmap(img2, "u", "ok"),
    ]) {
      await rejects(op(), "invalid-argument", inconsistent);
    }
    await rejects(mergeBitmap(img2, "u", "nope"), "not-found", "Dirty bitmap 'nope' not found");
    await rejects(addBitmap(img2, "u"), "invalid-argument", "Bitmap already exists: u");
    const small = await fresh({ size: 4 * MiB });
    await addBitmap(small.img, "s");
    await rejects(
      mergeBitmap(img2, "ok", "s", small.img),
      "invalid-argument",
      "Bitmaps are of different sizes (destination size is 8388608, source size is 4194304) and can't be merged",
    );
    await removeBitmap(img2, "u");
    await img2.close();
    const after = (img2.storage as MemoryStorage).bytes();
    assert.deepEqual(
      (await reopen(after)).bitmaps.map((b) => b.name),
      ["ok"],
    );
    await assertRefcountsExact(after, "after removing an in-use bitmap");
  });

  /** An image whose directory lists `entries` (all sharing one real table), for the limits. */
  async function withDirectory(names: string[]): Promise<Qcow2Image> {
    const { mem, img } = await fresh({ size: 8 * MiB });
    await addBitmap(img, "real");
    await img.close();
    const base = await reopen(mem.bytes());
    const real = base.bitmaps[0];
    const dir = encodeBitmapDirectory(names.map((name) => ({ ...real, name })));
    const cs = base.clusterSize;
    const at = Math.ceil((await mem.size()) / cs) * cs;
    await mem.write(dir, at);
    base.header.autoclearFeatures |= AUTOCLEAR_BITMAPS;
    await mem.write(
      encodeHeader(
        base.header,
        { ...base.extensions, bitmaps: { nbBitmaps: names.length, directorySize: dir.length, directoryOffset: at } },
        undefined,
      ),
      0,
    );
    return Qcow2Image.open(mem, { readOnly: false, filename: "image.qcow2" });
  }

  test("at most 65535 bitmaps", async () => {
    const img = await withDirectory(Array.from({ length: 65535 }, (_, i) => `b${i}`));
    const before = (img.storage as MemoryStorage).bytes();
    await rejects(
      addBitmap(img, "one-more"),
      "invalid-argument",
      "Can't make bitmap 'one-more' persistent in 'image.qcow2': Maximum number of persistent bitmaps is already reached",
    );
    assert.deepEqual((img.storage as MemoryStorage).bytes(), before, "nothing written");
  });

  test("a bitmap directory of at most 64 MiB - 64 KiB", async () => {
    // 64034 entries of 1048 bytes fit (67,107,632 bytes); one more would not.
    const names = Array.from({ length: 64034 }, (_, i) => `${i}`.padStart(1023, "x"));
    const img = await withDirectory(names);
    await rejects(
      addBitmap(img, "y".repeat(1023)),
      "invalid-argument",
      /persistent in 'image.qcow2': Not enough space in the bitmap directory$/,
    );
  });
});

test("bitmaps of an image written by a program without bitmap support are ignored, as QEMU does", async () => {
  const { mem, img } = await fresh({ size: 8 * MiB });
  await addBitmap(img, "old");
  await img.close();
  const bytes = mem.bytes();
  view(bytes).setUint32(92, 0); // autoclear bits (low half) cleared, as an old program does
  const stale = await reopen(bytes, false);
  assert.deepEqual(stale.bitmaps, []);
  await rejects(removeBitmap(stale, "old"), "not-found", "Dirty bitmap 'old' not found");
  await addBitmap(stale, "new");
  await stale.close();
  const back = await reopen((stale.storage as MemoryStorage).bytes());
  assert.deepEqual(
    back.bitmaps.map((b) => b.name),
    ["new"],
  );
});

/**
 * Crash at every flush point of a series of bitmap operations (and writes that the bitmaps
 * record): the crashed image opens, lists the directory of before or after the operation in
 * flight, has no refcount below its references, and `qemu-img check` finds no corruption.
 */
describe("crash at any point: the old directory or the new one, never corruption", () => {
  const cases: { name: string; create: Qcow2CreateOptions }[] = [
    {
      name: "512-byte clusters, refcount_bits=64 (new refcount blocks)",
      create: { size: 4 * MiB, clusterSize: 512, refcountBits: 64 },
    },
    { name: "64k clusters (the extension straddles a sector)", create: { size: 64 * MiB } },
  ];
  for (const [index, c] of cases.entries()) {
    test(c.name, async () => {
      const seed = (BASE_SEED + index * 7919) >>> 0;
      const r = new Prng(seed);
      const note = `[seed ${seed}: rerun with QCOWKIT_SEED=${BASE_SEED}]`;
      const mem = new MemoryStorage(undefined, { name: "image.qcow2" });
      await writeEmptyQcow2(mem, c.create);
      const s = new CrashStorage(mem);
      const img = await Qcow2Image.open(s, { readOnly: false, filename: "image.qcow2" });
      type State = { key: string; end: number };
      const keyOf = (list: BitmapDirectoryEntry[]): string =>
        list.map((b) => `${b.name}@${b.tableOffset}${b.flags & BME_FLAG_AUTO ? "+" : "-"}`).join(",");
      const states: State[] = [{ key: keyOf(img.bitmaps), end: s.log.length }];
      const step = async (f: () => Promise<void>): Promise<void> => {
        await f();
        states.push({ key: keyOf(img.bitmaps), end: s.log.length });
      };
      const size = img.size;
      const data = async (): Promise<void> => {
        for (let i = 0; i < 6; i++) await img.write(r.bytes(1 + r.int(20000)), r.int(size - 20000));
        await img.flush();
      };
      await step(() => addBitmap(img, "a"));
      await step(() => addBitmap(img, "b", { granularity: 512 }));
      await step(data);
      await step(() => mergeBitmap(img, "a", "b"));
      await step(() => clearBitmap(img, "b"));
      await step(data);
      await step(() => setBitmapEnabled(img, "a", false));
      await step(() => removeBitmap(img, "b"));
      await step(() => removeBitmap(img, "a"));
      await step(() => addBitmap(img, "c", { disabled: true }));
      await img.close();
      states.push({ key: keyOf(img.bitmaps), end: s.log.length });

      const flushes = [-1, ...s.flushPositions()];
      let checked = 0;
      await withTempDir(async (dir) => {
        const file = join(dir, "crash.qcow2");
        for (const f of flushes) {
          const win = s.windowAfter(f);
          const variants: { what: string; ops: (number | StorageOp)[] }[] = [
            { what: "nothing after the flush", ops: [] },
            { what: "every write after it", ops: win.ops },
            { what: "some writes after it", ops: win.ops.filter(() => r.chance(0.5)) },
          ];
          const torn: (number | StorageOp)[] = [];
          for (const i of win.ops) {
            const op = s.log[i];
            if (op.kind === "write" && op.data.length > 512 && r.chance(0.7)) {
              torn.push(tornWrite(op, 512 * (1 + r.int(op.data.length / 512 - 1)), r.chance(0.5)));
            } else if (r.chance(0.7)) torn.push(i);
          }
          variants.push({ what: "writes after it, some torn", ops: torn });
          // A header rewrite torn after its first sector (where the extension's fields begin
          // with 64k clusters), with everything else of the window written.
          for (const i of win.ops) {
            const op = s.log[i];
            if (op.kind !== "write" || op.offset !== 0) continue;
            for (const keepFirst of [true, false]) {
              variants.push({
                what: `the header write ${i} torn after 512 bytes (${keepFirst ? "first" : "second"} part)`,
                ops: win.ops.map((j) => (j === i ? tornWrite(op, 512, keepFirst) : j)),
              });
            }
          }
          // States the crash may show: from the last operation done by this flush to the last one
          // that had begun writing by the end of the window.
          const durable = f + 1;
          let lo = 0;
          let hi = 0;
          for (let j = 0; j < states.length; j++) {
            if (states[j].end <= durable) lo = j;
            if (j === 0 || states[j - 1].end < win.end) hi = j;
          }
          const allowed = states.slice(lo, hi + 1).map((x) => x.key);
          for (const v of variants) {
            const where = `${note} crash after log position ${f} of ${s.log.length} with ${v.what}`;
            const bytes = s.crashImage(durable, v.ops);
            const crashed = await reopen(bytes).catch((e: unknown) => assert.fail(`${where}: does not open: ${e}`));
            const key = keyOf(crashed.bitmaps);
            assert.ok(allowed.includes(key), `${where}: directory ${key}, expected one of ${allowed.join(" | ")}`);
            const refcounts = await Refcounts.open(crashed.storage, crashed.header);
            const refs = await countReferences(crashed, refcounts);
            for (let cl = 0; cl < refs.counts.length; cl++) {
              const have = await refcounts.get(cl);
              assert.ok(
                have >= refs.counts[cl],
                `${where}: cluster ${cl} has refcount ${have} < ${refs.counts[cl]} references`,
              );
            }
            // QEMU's opinion on a sample (every header rewrite, and some more).
            const headerWrite = win.ops.some(
              (i) => s.log[i].kind === "write" && (s.log[i] as { offset: number }).offset === 0,
            );
            if (headerWrite || r.chance(0.08)) {
              writeFileSync(file, bytes);
              const chk = qemuImg(["check", "--output=json", file]);
              const rep = JSON.parse(chk.stdout || "{}") as { corruptions?: number; "check-errors"?: number };
              assert.ok(
                (chk.code === 0 || chk.code === 3) && !rep.corruptions && !rep["check-errors"],
                `${where}: qemu-img check exit ${chk.code}: ${chk.stdout}${chk.stderr}`,
              );
              checked++;
            }
          }
        }
      });
      assert.ok(checked > 5, `qemu-img check ran on ${checked} crashed images`);
    });
  }
});
