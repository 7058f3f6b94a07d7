/**
 * amendImage on images built in memory: each amendment keeps the guest data (active layer and
 * snapshots) byte for byte, leaves refcounts exactly equal to the references (no leak, nothing
 * too low), and passes `qemu-img check`. The refcount width goes through every value with data
 * and snapshots present. A crash at any flush of an amendment leaves an image that is clean but
 * for leaks and reads as before.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { type AmendOptions, amendImage } from "../../src/image/amend.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { Refcounts } from "../../src/image/refcount.js";
import { countReferences } from "../../src/image/repair.js";
import { MemoryStorage } from "../../src/io/memory.js";
import type { Storage } from "../../src/io/storage.js";
import { BASE_SEED, Prng } from "../prng.js";
import {
  type BuiltImage,
  buildImage,
  type ImageSpec,
  noise,
  pattern,
  qemuImg,
  readAll,
  withTempDir,
} from "./build-image.js";
import { CrashStorage } from "./crash-storage.js";

const CS = 512;
const SIZE = 160 * CS;
const BACKING = noise(SIZE, 99);

/** Data, zero clusters with and without a host cluster, compressed data, two snapshots. */
function spec(version: 2 | 3, refcountOrder = 4, backing = false): ImageSpec {
  const zero = version === 3;
  return {
    size: SIZE,
    version,
    clusterBits: 9,
    refcountOrder,
    backingFile: backing ? "backing.raw" : undefined,
    backingFormat: backing ? "raw" : undefined,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: zero ? "zero" : "data", data: pattern(CS, 2) },
      { guestCluster: 2, kind: zero ? "zero-alloc" : "data", data: pattern(CS, 3) },
      { guestCluster: 3, kind: "compressed", data: pattern(CS, 4) },
      { guestCluster: 64, kind: "data", data: noise(CS, 5) },
      { guestCluster: 65, kind: zero ? "zero" : "data", data: pattern(CS, 6) },
      { guestCluster: 130, kind: "data", data: noise(CS, 7) },
    ],
    snapshots: [
      {
        id: "1",
        name: "own",
        clusters: [
          { guestCluster: 0, kind: "data", data: pattern(CS, 11) },
          { guestCluster: 5, kind: zero ? "zero" : "data", data: pattern(CS, 12) },
          { guestCluster: 66, kind: zero ? "zero-alloc" : "data", data: pattern(CS, 13) },
        ],
      },
      { id: "2", name: "shared", shareActive: true },
    ],
  };
}

async function open(bytes: Uint8Array, readOnly: boolean, snapshot?: string): Promise<Qcow2Image> {
  return openStorage(new MemoryStorage(bytes, { name: "a.qcow2" }), readOnly, snapshot);
}

async function openStorage(storage: Storage, readOnly: boolean, snapshot?: string): Promise<Qcow2Image> {
  const { backingName } = await Qcow2Image.readHeader(storage);
  const backing =
    backingName !== undefined
      ? await RawImage.open(new MemoryStorage(BACKING, { name: "backing.raw", readOnly: true }), "backing.raw")
      : undefined;
  return Qcow2Image.open(storage, { readOnly, codecs: nodeCodecs, backing, snapshot, filename: "a.qcow2" });
}

/** Amends a copy of `bytes`; returns the new bytes. */
async function amended(bytes: Uint8Array, o: AmendOptions): Promise<Uint8Array> {
  const storage = new MemoryStorage(bytes, { name: "a.qcow2" });
  await amendImage(await openStorage(storage, false), o);
  return storage.bytes();
}

/** The guest contents of the active layer and of each snapshot. */
async function contents(bytes: Uint8Array): Promise<Uint8Array[]> {
  const img = await open(bytes, true);
  const out = [await readAll(img)];
  const ids = img.snapshots.map((s) => s.id);
  await img.close();
  for (const id of ids) {
    const s = await open(bytes, true, id);
    out.push(await readAll(s));
    await s.close();
  }
  return out;
}

function expectedContents(b: BuiltImage, backed: boolean): Uint8Array[] {
  const backing = backed ? BACKING : undefined;
  return [b.expected(backing), b.expectedSnapshot(0, backing), b.expectedSnapshot(1, backing)];
}

/** Every cluster's refcount equals the references counted from every structure. */
async function assertRefcountsExact(bytes: Uint8Array): Promise<void> {
  const img = await open(bytes, true);
  const rc = await Refcounts.open(img.storage, img.header);
  const refs = await countReferences(img, rc);
  const end = Math.max(refs.counts.length, Math.ceil(rc.structureEnd() / img.clusterSize));
  for (let c = 0; c < end; c++) {
    const want = c < refs.counts.length ? refs.counts[c] : 0;
    assert.equal(await rc.get(c), want, `refcount of cluster ${c} (offset 0x${(c * img.clusterSize).toString(16)})`);
  }
  await img.close();
}

async function assertQemuCheckClean(bytes: Uint8Array, backed: boolean, leaksAllowed = false): Promise<void> {
  await withTempDir((dir) => {
    writeFileSync(join(dir, "a.qcow2"), bytes);
    if (backed) writeFileSync(join(dir, "backing.raw"), BACKING);
    const r = qemuImg(["check", "a.qcow2"], dir);
    if (leaksAllowed) assert.ok(r.code === 0 || r.code === 3, `qemu-img check: exit ${r.code}\n${r.stdout}${r.stderr}`);
    else assert.equal(r.code, 0, `qemu-img check: ${r.stdout}${r.stderr}`);
  });
}

async function header(bytes: Uint8Array): Promise<Qcow2Image["header"]> {
  return (await Qcow2Image.readHeader(new MemoryStorage(bytes))).header;
}

/**
 * Each layer reads `expected`, and zeros past it (an image grown by amend reads longer). Reports
 * the first differing offset instead of a diff of whole disks.
 */
function assertSameGuest(actual: Uint8Array[], expected: Uint8Array[], what = ""): void {
  assert.equal(actual.length, expected.length, `${what}: number of layers`);
  actual.forEach((a, i) => {
    const e = expected[i];
    assert.ok(a.length >= e.length, `${what}: layer ${i} reads ${a.length} bytes, expected ${e.length}`);
    let at = -1;
    for (let j = 0; j < a.length && at < 0; j++) if (a[j] !== (j < e.length ? e[j] : 0)) at = j;
    assert.equal(at, -1, `${what}: layer ${i} differs at offset ${at}`);
  });
}

async function assertGood(bytes: Uint8Array, expected: Uint8Array[], backed: boolean): Promise<void> {
  assertSameGuest(await contents(bytes), expected);
  await assertRefcountsExact(bytes);
  await assertQemuCheckClean(bytes, backed);
}

describe("amend: compat", () => {
  for (const backed of [false, true]) {
    test(`v3 -> v2 -> v3 with zero clusters and snapshots${backed ? ", over a backing file" : ""}`, async () => {
      const b = buildImage(spec(3, 4, backed));
      const expected = expectedContents(b, backed);
      const v2 = await amended(b.bytes, { version: 2 });
      const h2 = await header(v2);
      assert.equal(h2.version, 2);
      assert.equal(h2.headerLength, 72);
      await assertGood(v2, expected, backed);
      // No zero flag is left anywhere (v2 has none): reading as v2 would refuse bit 0.
      const v3 = await amended(v2, { version: 3 });
      const h3 = await header(v3);
      assert.equal(h3.version, 3);
      assert.equal(h3.headerLength, 112);
      await assertGood(v3, expected, backed);
    });
  }

  test("v2 -> v3 rewrites a snapshot table without extra data", async () => {
    const b = buildImage(spec(2));
    const expected = expectedContents(b, false);
    const before = await open(b.bytes, true);
    assert.ok(before.snapshots.every((s) => s.extra.length === 0));
    await before.close();
    const v3 = await amended(b.bytes, { version: 3 });
    const img = await open(v3, true);
    assert.equal(img.header.version, 3);
    assert.ok(img.snapshots.every((s) => s.extra.length >= 16 && s.diskSize === SIZE));
    // 512-byte clusters: no feature-name table, as QEMU writes none with clusters up to 4 KiB.
    assert.deepEqual(img.extensions.featureNames, []);
    await img.close();
    await assertGood(v3, expected, false);
  });

  test("v2 -> v3 with 8 KiB clusters writes QEMU's feature-name table", async () => {
    const b = buildImage({ size: SIZE, version: 2, clusterBits: 13, clusters: [] });
    const img = await open(await amended(b.bytes, { version: 3 }), true);
    assert.deepEqual(
      img.extensions.featureNames.map((f) => f.name),
      [
        "dirty bit",
        "corrupt bit",
        "external data file",
        "compression type",
        "extended L2 entries",
        "lazy refcounts",
        "bitmaps",
        "raw external data",
      ],
    );
    await img.close();
  });

  test("downgrade refusals leave the image as it was", async () => {
    const cases: [ImageSpec, AmendOptions, RegExp][] = [
      [spec(3, 3), { version: 2 }, /^compat=0\.10 requires refcount_bits=16$/],
      [
        { ...spec(3), extendedL2: true, clusterBits: 14, snapshots: [], clusters: [] },
        { version: 2 },
        /^Cannot downgrade an image with incompatible features 0x10 set$/,
      ],
      [
        { ...spec(3), snapshots: [{ id: "1", name: "s", size: SIZE / 2, clusters: [] }] },
        { version: 2 },
        /^Internal snapshots prevent downgrade of image$/,
      ],
      [
        spec(3),
        { version: 2, refcountBits: 8 },
        /^Refcount widths other than 16 bits require compatibility level 1\.1/,
      ],
      [spec(3), { version: 2, lazyRefcounts: true }, /^Lazy refcounts only supported with compatibility level 1\.1/],
      [
        spec(3),
        { refcountBits: 1 },
        /^Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x[0-9a-f]+ has a refcount of 2$/,
      ],
      [spec(3), { refcountBits: 12 }, /^Refcount width must be a power of two and may not exceed 64 bits$/],
      [spec(3), { dataFile: "x" }, /^data-file can only be set for images that use an external data file$/],
      [spec(3), { dataFileRaw: true }, /^data-file-raw cannot be set on existing images$/],
      [spec(3), { encryption: true }, /^Can't amend encryption options - encryption not present$/],
    ];
    for (const [s, o, message] of cases) {
      const b = buildImage(s);
      const storage = new MemoryStorage(b.bytes, { name: "a.qcow2" });
      await assert.rejects(amendImage(await openStorage(storage, false), o), (e: unknown) => {
        assert.ok(e instanceof QcowError, String(e));
        assert.match(e.message, message);
        return true;
      });
      assert.ok(Buffer.from(storage.bytes()).equals(b.bytes), `image changed by a refused ${JSON.stringify(o)}`);
    }
  });

  test("the backing file cannot change (after the other changes are made, as QEMU does)", async () => {
    const b = buildImage(spec(3, 4, true));
    const storage = new MemoryStorage(b.bytes, { name: "a.qcow2" });
    await assert.rejects(
      amendImage(await openStorage(storage, false), { refcountBits: 8, backingFile: "other.raw" }),
      /^QcowError: Cannot amend the backing file\nYou can use 'qemu-img rebase' instead\.$/,
    );
    assert.equal((await header(storage.bytes())).refcountOrder, 3);
    await assertGood(storage.bytes(), expectedContents(b, true), true);
    // The current name and format are accepted.
    const same = await amended(b.bytes, { backingFile: "backing.raw", backingFormat: "raw" });
    await assertGood(same, expectedContents(b, true), true);
  });
});

describe("amend: lazy refcounts", () => {
  test("on and off (v3)", async () => {
    const b = buildImage(spec(3));
    const on = await amended(b.bytes, { lazyRefcounts: true });
    const img = await open(on, true);
    assert.equal(img.lazyRefcounts, true);
    await img.close();
    await assertGood(on, expectedContents(b, false), false);
    const off = await amended(on, { lazyRefcounts: false });
    const img2 = await open(off, true);
    assert.equal(img2.lazyRefcounts, false);
    await img2.close();
    await assertGood(off, expectedContents(b, false), false);
  });

  test("off on a dirty image repairs it first", async () => {
    const b = buildImage(spec(3));
    const bytes = b.bytes.slice();
    const dv = new DataView(bytes.buffer);
    dv.setBigUint64(72, 1n); // dirty
    dv.setBigUint64(80, 1n); // lazy refcounts
    // Refcounts a crash with lazy refcounts might leave: too low for a data cluster.
    const off = await amended(bytes, { lazyRefcounts: false });
    const h = await header(off);
    assert.equal(h.incompatibleFeatures, 0n);
    assert.equal(h.compatibleFeatures, 0n);
    await assertGood(off, expectedContents(b, false), false);
  });
});

describe("amend: refcount width", () => {
  // Without the shared snapshot every refcount is 1, so even 1-bit refcounts can hold them.
  const noShared = (order: number): ImageSpec => ({
    ...spec(3, order),
    snapshots: [spec(3).snapshots?.[0] ?? { id: "1", name: "own" }],
  });
  for (let from = 0; from <= 6; from++) {
    test(`from ${2 ** from} bits to every width`, async () => {
      const b = buildImage(noShared(from));
      const expected = [b.expected(), b.expectedSnapshot(0)];
      for (let to = 0; to <= 6; to++) {
        if (to === from) continue;
        const out = await amended(b.bytes, { refcountBits: 2 ** to });
        assert.equal((await header(out)).refcountOrder, to);
        assertSameGuest(await contents(out), expected, `${2 ** from} -> ${2 ** to} bits`);
        await assertRefcountsExact(out);
        if (to === 0 || to === 6 || from === 0) await assertQemuCheckClean(out, false);
      }
    });
  }

  test("with shared clusters (refcount 2), through every width that holds 2", async () => {
    const b = buildImage(spec(3, 4));
    const expected = expectedContents(b, false);
    let bytes = b.bytes;
    for (const bits of [2, 4, 8, 32, 64, 16]) {
      bytes = await amended(bytes, { refcountBits: bits });
      assert.equal(2 ** (await header(bytes)).refcountOrder, bits);
      await assertGood(bytes, expected, false);
    }
  });

  test("an image large enough for several new refcount blocks and a multi-cluster table", async () => {
    // 512-byte clusters: a 64-bit refcount block covers 64 clusters.
    const clusters = [];
    for (let gc = 0; gc < 900; gc += 3)
      clusters.push({ guestCluster: gc, kind: "data" as const, data: pattern(CS, gc) });
    const b = buildImage({ size: 1024 * CS, clusterBits: 9, clusters });
    const to64 = await amended(b.bytes, { refcountBits: 64 });
    const h = await header(to64);
    assert.ok(h.refcountTableClusters > 1, `refcount table of ${h.refcountTableClusters} clusters`);
    await assertGood(to64, [b.expected()], false);
    const back = await amended(to64, { refcountBits: 1 });
    await assertGood(back, [b.expected()], false);
  });
});

describe("amend: size", () => {
  test("grows, with a larger L1 table, and the new space is writable", async () => {
    const b = buildImage(spec(3));
    const size = 200 * 64 * CS; // 200 L1 entries: four clusters of L1 table
    const out = await amended(b.bytes, { size });
    const h = await header(out);
    assert.equal(h.size, size);
    assert.equal(h.l1Size, 200);
    assertSameGuest(await contents(out), expectedContents(b, false));
    await assertRefcountsExact(out);
    await assertQemuCheckClean(out, false);
    const storage = new MemoryStorage(out, { name: "a.qcow2" });
    const img = await openStorage(storage, false);
    await img.write(pattern(3 * CS, 9), size - 3 * CS);
    await img.close();
    const after = await open(storage.bytes(), true);
    const tail = new Uint8Array(3 * CS);
    await after.read(tail, size - 3 * CS);
    assert.deepEqual(tail, pattern(3 * CS, 9));
    await after.close();
    await assertRefcountsExact(storage.bytes());
  });

  test("refusals", async () => {
    const cases: [ImageSpec, AmendOptions, RegExp][] = [
      [spec(3), { size: SIZE + 100 }, /^The new size must be a multiple of 512$/],
      [spec(2), { size: 2 * SIZE }, /^Can't resize a v2 image which has snapshots$/],
    ];
    for (const [s, o, message] of cases) {
      const b = buildImage(s);
      const storage = new MemoryStorage(b.bytes, { name: "a.qcow2" });
      await assert.rejects(amendImage(await openStorage(storage, false), o), (e: unknown) => {
        assert.ok(e instanceof QcowError, String(e));
        assert.match(e.message, message);
        return true;
      });
      assert.ok(Buffer.from(storage.bytes()).equals(b.bytes), `image changed by a refused ${JSON.stringify(o)}`);
    }
  });
});

describe("amend: crash safety", () => {
  const workloads: [string, ImageSpec, AmendOptions, boolean][] = [
    ["refcount width 16 -> 64", spec(3, 4), { refcountBits: 64 }, false],
    ["refcount width 16 -> 2", spec(3, 4), { refcountBits: 2 }, false],
    ["downgrade with zero clusters over a backing file", spec(3, 4, true), { version: 2 }, true],
    ["downgrade with zero clusters", spec(3, 4), { version: 2 }, false],
    ["upgrade rewriting the snapshot table", spec(2), { version: 3 }, false],
    ["upgrade and refcount width together", spec(2), { version: 3, refcountBits: 8 }, false],
    ["growth of the L1 table", spec(3), { size: 200 * 64 * CS }, false],
  ];
  for (const [name, s, o, backed] of workloads) {
    test(name, async () => {
      const b = buildImage(s);
      const expected = expectedContents(b, backed);
      const storage = new CrashStorage(new MemoryStorage(b.bytes, { name: "a.qcow2" }));
      await amendImage(await openStorage(storage, false), o);
      const flushes = storage.flushPositions();
      assert.ok(flushes.length >= 3, `only ${flushes.length} flushes`);
      const rng = new Prng(BASE_SEED ^ name.length);
      let checked = 0;
      // A crash after each flush: everything before it, plus any subset of the writes after it.
      for (const k of [-1, ...flushes]) {
        const w = storage.windowAfter(k);
        const subsets = [w.ops, [], w.ops.filter(() => rng.chance(0.5))];
        for (const persisted of subsets) {
          const crashed = storage.crashImage(w.start, persisted);
          assertSameGuest(await contents(crashed), expected, `crash after flush at log ${k}`);
          const img = await open(crashed, true);
          const rc = await Refcounts.open(img.storage, img.header);
          const refs = await countReferences(img, rc);
          for (let c = 0; c < refs.counts.length; c++) {
            assert.ok((await rc.get(c)) >= refs.counts[c], `crash after log ${k}: refcount of cluster ${c} too low`);
          }
          await img.close();
          if (checked++ % 3 === 0) await assertQemuCheckClean(crashed, backed, true);
        }
      }
      // The final state is the amended image, exact.
      await assertGood(storage.crashImage(storage.log.length, []), expected, backed);
    });
  }
});
