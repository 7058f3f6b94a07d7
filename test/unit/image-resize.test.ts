/**
 * Resizing images in memory (src/image/resize.ts): growth across L1 table relocation (512-byte
 * clusters, so that the new table spans several refcount blocks), shrinking, preallocation,
 * backing files, snapshots, refusals — every result checked byte for byte and with refcounts
 * equal to the references counted (no leak, no corruption) — and crashes at every flush point.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { QcowError } from "../../src/errors.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { Refcounts } from "../../src/image/refcount.js";
import { countReferences } from "../../src/image/repair.js";
import { resizeImage } from "../../src/image/resize.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { type Qcow2CreateOptions, writeEmptyQcow2 } from "../../src/ops/create.js";
import { buildImage, noise, qemuImg } from "./build-image.js";
import { CrashStorage } from "./crash-storage.js";

const KiB = 1024;
const MiB = 1024 * KiB;

async function created(opts: Qcow2CreateOptions): Promise<MemoryStorage> {
  const s = new MemoryStorage(undefined, { name: "image.qcow2" });
  await writeEmptyQcow2(s, opts);
  return s;
}

function open(bytes: Uint8Array | MemoryStorage | CrashStorage, readOnly = false, backing?: Qcow2Image) {
  const storage = bytes instanceof Uint8Array ? new MemoryStorage(bytes, { name: "image.qcow2" }) : bytes;
  return Qcow2Image.open(storage, { readOnly, backing });
}

/**
 * Every cluster's refcount against the references counted in the image. Returns the clusters
 * whose refcount is lower (corruption) and higher (leaks).
 */
async function refcountDiff(bytes: Uint8Array): Promise<{ low: number[]; high: number[] }> {
  const img = await open(bytes, true);
  try {
    const refcounts = await Refcounts.open(img.storage, img.header);
    const refs = await countReferences(img, refcounts);
    const cs = img.clusterSize;
    const end = Math.max(refs.counts.length, Math.ceil(bytes.length / cs), Math.ceil(refcounts.structureEnd() / cs));
    const low: number[] = [];
    const high: number[] = [];
    for (let c = 0; c < end; c++) {
      const want = c < refs.counts.length ? refs.counts[c] : 0;
      const have = await refcounts.get(c);
      if (have < want) low.push(c);
      if (have > want) high.push(c);
    }
    return { low, high };
  } finally {
    await img.close();
  }
}

async function assertRefcountsExact(bytes: Uint8Array, what: string): Promise<void> {
  const d = await refcountDiff(bytes);
  assert.deepEqual(d.low, [], `${what}: clusters with a refcount below their references`);
  assert.deepEqual(d.high, [], `${what}: leaked clusters`);
}

/** `qemu-img check` on the bytes (with side files): its exit code (3: leaks only) and output. */
function qemuCheck(bytes: Uint8Array, files: Record<string, Uint8Array> = {}): { code: number; text: string } {
  const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
  try {
    for (const [n, b] of Object.entries(files)) writeFileSync(join(dir, n), b);
    writeFileSync(join(dir, "image.qcow2"), bytes);
    const r = qemuImg(["check", join(dir, "image.qcow2")]);
    return { code: r.code, text: r.stdout + r.stderr };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function assertClean(bytes: Uint8Array, what: string, files: Record<string, Uint8Array> = {}): void {
  const r = qemuCheck(bytes, files);
  assert.equal(r.code, 0, `${what}: qemu-img check: ${r.text}`);
}

async function readRange(img: Qcow2Image | RawImage, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  await img.read(b, offset);
  return b;
}

function isZero(b: Uint8Array): boolean {
  return b.every((x) => x === 0);
}

async function rejects(p: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof QcowError, `expected a QcowError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    return true;
  });
}

describe("resize: growing qcow2", () => {
  for (const refcountBits of [16, 64]) {
    test(`512-byte clusters, refcount_bits=${refcountBits}: the L1 table moves to clusters spanning several refcount blocks`, async () => {
      const s = await created({ size: 256 * KiB, clusterSize: 512, refcountBits });
      const img = await open(s);
      const data = noise(256 * KiB, 1);
      await img.write(data, 0);
      await img.flush();
      const before = { offset: img.header.l1TableOffset, size: img.header.l1Size };
      // 512 MiB: 16384 L1 entries, 256 clusters: more than one refcount block covers.
      const size = 512 * MiB;
      await img.resize(size);
      assert.equal(img.size, size);
      assert.equal(img.header.l1Size, 16384);
      assert.notEqual(img.header.l1TableOffset, before.offset);
      assert.ok(img.header.l1TableOffset % 512 === 0);
      assert.deepEqual(await readRange(img, 0, data.length), data, "data kept");
      assert.ok(isZero(await readRange(img, 256 * KiB, 64 * KiB)), "new area reads zeros");
      assert.ok(isZero(await readRange(img, size - 64 * KiB, 64 * KiB)), "new end reads zeros");
      const tail = noise(4096, 2);
      await img.write(tail, size - 4096);
      await img.close();
      const bytes = s.bytes();
      await assertRefcountsExact(bytes, "after growth");
      assertClean(bytes, "qemu-img check");
      const again = await open(bytes, true);
      assert.equal(again.size, size);
      assert.deepEqual(await readRange(again, 0, data.length), data);
      assert.deepEqual(await readRange(again, size - 4096, 4096), tail);
      await again.close();
    });
  }

  test("sizes that need no more L1 entries only change the header; not a multiple of a cluster", async () => {
    const s = await created({ size: 1 * MiB });
    const img = await open(s);
    await img.write(noise(1000, 3), 1 * MiB - 1000);
    const l1 = img.header.l1TableOffset;
    await img.resize(1 * MiB + 1536);
    assert.equal(img.header.l1TableOffset, l1);
    assert.equal(img.size, 1 * MiB + 1536);
    await img.write(noise(1536, 4), 1 * MiB);
    await img.close();
    const again = await open(s.bytes(), true);
    assert.equal(again.size, 1 * MiB + 1536);
    assert.equal(again.header.size, 1 * MiB + 1536);
    assert.deepEqual(await readRange(again, 1 * MiB - 1000, 1000), noise(1000, 3));
    assert.deepEqual(await readRange(again, 1 * MiB, 1536), noise(1536, 4));
    await again.close();
    await assertRefcountsExact(s.bytes(), "after a small growth");
  });

  for (const mode of ["metadata", "falloc", "full"] as const) {
    test(`preallocation=${mode}: every new cluster has a host cluster, reading zeros`, async () => {
      const s = await created({ size: 100 * KiB, clusterSize: 4 * KiB });
      const img = await open(s);
      await img.write(noise(100 * KiB, 5), 0);
      await img.resize(3 * MiB, { preallocation: mode });
      for await (const e of img.blockStatus(0, img.size)) {
        assert.equal(e.present, true, `${e.start}+${e.length} allocated`);
        assert.equal(e.depth, 0);
      }
      assert.ok(isZero(await readRange(img, 100 * KiB, 3 * MiB - 100 * KiB)));
      assert.deepEqual(await readRange(img, 0, 100 * KiB), noise(100 * KiB, 5));
      await img.close();
      assert.ok(s.bytes().length >= 3 * MiB, "the file holds the new clusters");
      await assertRefcountsExact(s.bytes(), mode);
      assertClean(s.bytes(), "qemu-img check");
    });
  }

  test("over a longer backing file the new area reads zeros, not the backing data (v3, extended L2)", async () => {
    for (const extendedL2 of [false, true]) {
      const base = buildImage({ size: 4 * MiB, clusters: [{ guestCluster: 20, kind: "data", data: noise(65536, 9) }] });
      const backing = await open(base.bytes, true);
      const s = await created({
        size: 1 * MiB,
        extendedL2,
        backingFile: "base.qcow2",
        backingFormat: "qcow2",
      });
      const img = await open(s, false, backing);
      await img.resize(3 * MiB);
      assert.ok(isZero(await readRange(img, 1 * MiB, 2 * MiB)), `extended_l2=${extendedL2}`);
      assert.deepEqual(await readRange(img, 0, 64 * KiB), await readRange(backing, 0, 64 * KiB));
      await img.close();
      await assertRefcountsExact(s.bytes(), "zeroed growth");
      assertClean(s.bytes(), "qemu-img check", { "base.qcow2": base.bytes });
    }
  });

  test("over a longer backing file, v2 refuses as QEMU does (no zero flag) and changes nothing", async () => {
    const base = buildImage({ size: 4 * MiB, version: 2 });
    const s = await created({ size: 1 * MiB, version: 2, backingFile: "base.qcow2", backingFormat: "qcow2" });
    const before = s.bytes();
    const img = await open(s, false, await open(base.bytes, true));
    await rejects(img.resize(2 * MiB), "unsupported", /^Failed to zero out new clusters: Operation not supported$/);
    assert.equal(img.size, 1 * MiB);
    // full preallocation writes zeros itself: allowed, as in QEMU.
    await img.resize(2 * MiB, { preallocation: "full" });
    assert.ok(isZero(await readRange(img, 1 * MiB, 1 * MiB)));
    await img.close();
    assert.ok(before.length <= s.bytes().length);
    await assertRefcountsExact(s.bytes(), "v2 full preallocation");
  });
});

describe("resize: shrinking qcow2", () => {
  test("clusters past the new end are discarded, L2 tables and refcount blocks freed, the file cut", async () => {
    const s = await created({ size: 4 * MiB, clusterSize: 512, refcountBits: 16 });
    const data = noise(4 * MiB, 11);
    const size = 1 * MiB + 1536 + 512; // not at an L2 table (32 KiB) or cluster boundary
    // What stays is written first: the file then ends where it ended after this session.
    let img = await open(s);
    await img.write(data.subarray(0, size), 0);
    await img.close();
    const firstEnd = await s.size();
    img = await open(s);
    await img.write(data.subarray(size), size);
    await img.flush();
    assert.ok((await s.size()) > 3 * MiB);
    await img.resize(size, { shrink: true });
    assert.equal(img.size, size);
    assert.deepEqual(await readRange(img, 0, size), data.subarray(0, size));
    await img.close();
    const bytes = s.bytes();
    assert.ok(bytes.length <= firstEnd, `file cut: ${bytes.length} bytes, ${firstEnd} before the second session`);
    await assertRefcountsExact(bytes, "after shrinking");
    assertClean(bytes, "qemu-img check");
    const again = await open(bytes);
    assert.equal(again.size, size);
    // Growing again shows zeros past the old end (whole clusters were discarded).
    await again.resize(4 * MiB);
    assert.ok(isZero(await readRange(again, size + 512, 4 * MiB - size - 512)));
    assert.deepEqual(await readRange(again, 0, size), data.subarray(0, size));
    await again.close();
    await assertRefcountsExact((again.storage as MemoryStorage).bytes(), "regrown");
  });

  test("a snapshot sharing the tables keeps its contents; refcounts stay exact", async () => {
    const cs = 4 * KiB;
    const clusters = [];
    for (let gc = 0; gc < 512; gc += 3) clusters.push({ guestCluster: gc, kind: "data" as const, data: noise(cs, gc) });
    const built = buildImage({
      size: 2 * MiB,
      clusterBits: 12,
      clusters,
      snapshots: [{ id: "1", name: "snap", shareActive: true }],
    });
    const s = built.storage("image.qcow2");
    const img = await open(s);
    await img.resize(300 * KiB, { shrink: true });
    await img.close();
    const bytes = s.bytes();
    await assertRefcountsExact(bytes, "shrunk with a snapshot");
    assertClean(bytes, "qemu-img check");
    const snap = await Qcow2Image.open(new MemoryStorage(bytes), { snapshot: "snap" });
    assert.equal(snap.size, 300 * KiB, "a snapshot is read at the image's current size");
    assert.deepEqual(await readRange(snap, 0, 300 * KiB), built.expectedSnapshot(0).subarray(0, 300 * KiB));
    await snap.close();
    const active = await open(bytes, true);
    assert.deepEqual(await readRange(active, 0, 300 * KiB), built.expected().subarray(0, 300 * KiB));
    await active.close();
  });

  test("refusals: QEMU's checks and messages; nothing changes", async () => {
    const s = await created({ size: 1 * MiB });
    const img = await open(s);
    await rejects(img.resize(1 * MiB + 100), "invalid-argument", /^The new size must be a multiple of 512$/);
    await rejects(img.resize(512 * KiB), "invalid-argument", /shrink/);
    await rejects(
      img.resize(512 * KiB, { shrink: true, preallocation: "full" }),
      "invalid-argument",
      /^Preallocation can't be used for shrinking an image$/,
    );
    await rejects(
      img.resize(2 * MiB, { preallocation: "sparse" as never }),
      "invalid-argument",
      /^Invalid preallocation mode 'sparse'$/,
    );
    // 64 KiB clusters: at most 2^22 L1 entries of 512 MiB each, 2 PiB.
    await rejects(img.resize(4 * 1024 ** 5), "unsupported", /^Failed to grow the L1 table: File too large$/);
    assert.equal(img.size, 1 * MiB);
    await img.close();
    const ro = await open(s.bytes(), true);
    await rejects(ro.resize(2 * MiB), "read-only", /read-only/);
    await ro.close();
    const v2 = buildImage({ size: 1 * MiB, version: 2, snapshots: [{ id: "1", name: "s", shareActive: true }] });
    const img2 = await open(v2.storage());
    await rejects(img2.resize(2 * MiB), "unsupported", /^Can't resize a v2 image which has snapshots$/);
    await img2.close();
  });
});

describe("resize: raw", () => {
  test("grow (off, full) and shrink truncate the storage; size rounded up to 512 as QEMU reads it", async () => {
    const s = new MemoryStorage(noise(1000, 1), { name: "disk.raw" });
    const img = await RawImage.open(s);
    assert.equal(img.size, 1024);
    await resizeImage(img, 1024 + 3000);
    assert.equal(await s.size(), 4024);
    assert.equal(img.size, 4096);
    await resizeImage(img, 8192, { preallocation: "full" });
    assert.equal(await s.size(), 8192);
    await rejects(resizeImage(img, 100), "invalid-argument", /shrink/);
    await rejects(
      resizeImage(img, 9000, { preallocation: "metadata" }),
      "unsupported",
      /^Unsupported preallocation mode: metadata$/,
    );
    await resizeImage(img, 100, { shrink: true });
    assert.equal(await s.size(), 100);
    assert.deepEqual(s.bytes(), noise(1000, 1).subarray(0, 100));
  });
});

describe("resize: crash at any flush point", () => {
  /**
   * Runs `resize` on a CrashStorage and, for every flush boundary, the disk with nothing, all,
   * and every other write of the window after it: qemu-img check finds no corruption, the size
   * is the old or the new one, and the guest data within both sizes is intact.
   */
  async function crashAt(
    setup: () => Promise<{ storage: MemoryStorage; data: Uint8Array }>,
    size: number,
    shrink: boolean,
  ): Promise<number> {
    const { storage, data } = await setup();
    const old = (await open(storage.bytes(), true)).size;
    const cs = new CrashStorage(storage);
    const img = await open(cs);
    await img.resize(size, { shrink });
    await img.close();
    const keep = Math.min(old, size);
    let points = 0;
    for (const f of [-1, ...cs.flushPositions()]) {
      const win = cs.windowAfter(f).ops;
      const subsets = [[], win, win.filter((_, i) => i % 2 === 0), win.filter((_, i) => i % 2 === 1)];
      for (const persisted of subsets) {
        const bytes = cs.crashImage(f + 1, persisted);
        const where = `crash after the flush at ${f} with writes ${persisted.join(",")} of ${win.join(",")}`;
        const d = await refcountDiff(bytes);
        assert.deepEqual(d.low, [], `${where}: refcounts below references`);
        const r = await open(bytes, true);
        assert.ok(r.size === old || r.size === size, `${where}: size ${r.size}`);
        assert.deepEqual(await readRange(r, 0, keep), data.subarray(0, keep), `${where}: data`);
        await r.close();
        points++;
      }
      // qemu-img agrees at each boundary with every write of the window.
      const chk = qemuCheck(cs.crashImage(f + 1, win));
      assert.ok(chk.code === 0 || chk.code === 3, `flush ${f}: qemu-img check (exit ${chk.code}): ${chk.text}`);
    }
    return points;
  }

  test("growth with an L1 table relocation (512-byte clusters)", async () => {
    const data = noise(128 * KiB, 21);
    const points = await crashAt(
      async () => {
        const storage = await created({ size: 128 * KiB, clusterSize: 512, refcountBits: 64 });
        const img = await open(storage);
        await img.write(data, 0);
        await img.close();
        return { storage, data };
      },
      64 * MiB,
      false,
    );
    assert.ok(points > 8, `${points} crash points`);
  });

  test("growth of an image with persistent bitmaps (tables moved, in_use meanwhile)", async () => {
    const data = noise(256 * KiB, 23);
    await crashAt(
      async () => {
        const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
        try {
          const file = join(dir, "image.qcow2");
          for (const args of [
            ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", file, "256k"],
            ["bitmap", "--add", "-g", "512", file, "fine"],
            ["bitmap", "--add", file, "coarse"],
          ]) {
            const r = qemuImg(args);
            assert.equal(r.code, 0, `fixture: qemu-img ${args.join(" ")}: ${r.stderr}`);
          }
          const storage = new MemoryStorage(new Uint8Array(readFileSync(file)), { name: "image.qcow2" });
          const img = await open(storage);
          await img.write(data, 0);
          await img.close();
          return { storage, data };
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      },
      200 * MiB,
      false,
    );
  });

  test("shrinking (512-byte clusters, tables and refcount blocks freed, file cut)", async () => {
    const data = noise(2 * MiB, 22);
    await crashAt(
      async () => {
        const storage = await created({ size: 2 * MiB, clusterSize: 512, refcountBits: 64 });
        const img = await open(storage);
        await img.write(data, 0);
        await img.close();
        return { storage, data };
      },
      96 * KiB + 512,
      true,
    );
  });
});
