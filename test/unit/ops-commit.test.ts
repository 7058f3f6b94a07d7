/**
 * commit on images in memory: the base ends up holding what the top showed (data, zeros over
 * base data, compressed clusters, partial subclusters of the layers above), the top is emptied
 * unless dropped, a base further down gets every layer above it, a shorter base is grown; the
 * results pass qemu-img check and compare.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { backingChain, commit, findBackingImage } from "../../src/ops/commit.js";
import { buildImage, MapOpener, noise, pattern, qemuImg, readAll, withTempDir, writeFiles } from "./build-image.js";
import { CrashStorage } from "./crash-storage.js";

const CS = 4096;
const SIZE = 64 * CS;

function chain(topSize = SIZE, baseSize = SIZE) {
  const base = buildImage({
    size: baseSize,
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "data", data: pattern(CS, 2) },
      { guestCluster: 8, kind: "compressed", data: pattern(CS, 3) },
      { guestCluster: 30, kind: "data", data: noise(CS, 4) },
    ],
  });
  const mid = buildImage({
    size: SIZE,
    clusterBits: 12,
    backingFile: "base.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 2, kind: "data", data: pattern(CS, 5) },
      { guestCluster: 30, kind: "zero" },
      { guestCluster: 9, kind: "compressed", data: pattern(CS, 6) },
    ],
  });
  const top = buildImage({
    size: topSize,
    clusterBits: 12,
    backingFile: "mid.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 2, kind: "data", data: noise(CS, 7) },
      { guestCluster: 10, kind: "data", data: pattern(CS, 8) },
      { guestCluster: topSize / CS - 1, kind: "data", data: pattern(CS, 9) },
    ],
  });
  const opener = new MapOpener(
    new Map([
      ["base.qcow2", base.bytes],
      ["mid.qcow2", mid.bytes],
      ["top.qcow2", top.bytes],
    ]),
  );
  const expected = top.expected(mid.expected(base.expected()));
  return { opener, expected, midExpected: mid.expected(base.expected()) };
}

async function open(opener: MapOpener, name: string, readOnly = false): Promise<Qcow2Image> {
  const img = await openImage(name, { opener, codecs: nodeCodecs, readOnly });
  assert.ok(img instanceof Qcow2Image);
  return img;
}

/** Writes the files a storage ended with and runs qemu-img check on `names`. */
async function assertQemuClean(files: Record<string, Uint8Array>, names: string[]): Promise<void> {
  await withTempDir((dir) => {
    writeFiles(dir, files);
    for (const n of names) {
      const r = qemuImg(["check", join(dir, n)]);
      assert.equal(r.code, 0, `qemu-img check ${n}: ${r.stdout}${r.stderr}`);
    }
  });
}

test("commit: the backing file receives the top's data and zeros, the top is emptied", async () => {
  const { opener, expected, midExpected } = chain();
  const top = await open(opener, "top.qcow2");
  const mid = await open(opener, "mid.qcow2");
  assert.equal(await findBackingImage(top, "mid.qcow2", opener), 1);
  await commit(top, mid, 1);
  assert.deepEqual(await readAll(mid), expected, "the base now shows the top's contents");
  for await (const e of top.blockStatus(0, top.size)) {
    assert.ok(!(e.present && e.depth === 0), `top still allocates ${e.start}+${e.length}`);
  }
  await top.close();
  await mid.close();
  const topBytes = opener.storages[0].bytes();
  const midBytes = opener.storages[3].bytes();
  assert.equal(opener.opened[3], "mid.qcow2");
  // Reopened from its bytes, the emptied top reads what it read before.
  const after = new MapOpener(
    new Map([
      ["top.qcow2", topBytes],
      ["mid.qcow2", midBytes],
      ["base.qcow2", opener.files.get("base.qcow2") as Uint8Array],
    ]),
  );
  assert.deepEqual(await readAll(await open(after, "top.qcow2", true)), expected);
  assert.notDeepEqual(midExpected, expected, "the fixture changes something");
  assert.ok(topBytes.length <= 8 * CS, `emptied top is ${topBytes.length} bytes`);
  await assertQemuClean(
    { "top.qcow2": topBytes, "mid.qcow2": midBytes, "base.qcow2": after.files.get("base.qcow2") as Uint8Array },
    ["top.qcow2", "mid.qcow2"],
  );
});

test("commit -d: the top keeps its clusters", async () => {
  const { opener, expected } = chain();
  const top = await open(opener, "top.qcow2");
  const mid = await open(opener, "mid.qcow2");
  const before = opener.storages[0].bytes();
  await commit(top, mid, 1, { drop: true });
  await top.close();
  await mid.close();
  assert.deepEqual(opener.storages[0].bytes(), before, "top unchanged");
  const base = await open(
    new MapOpener(new Map([...opener.files, ["mid.qcow2", opener.storages[3].bytes()]])),
    "mid.qcow2",
  );
  assert.deepEqual(await readAll(base), expected);
});

test("commit -b BASE: every layer above the base is written into it; the layers above stay", async () => {
  const { opener, expected } = chain();
  const top = await open(opener, "top.qcow2");
  assert.equal(await findBackingImage(top, "base.qcow2", opener), 2);
  assert.equal(await findBackingImage(top, "top.qcow2", opener), undefined);
  assert.equal(await findBackingImage(top, "other.qcow2", opener), undefined);
  assert.equal(backingChain(top).length, 3);
  const base = await open(opener, "base.qcow2");
  const progress: number[] = [];
  await commit(top, base, 2, { drop: true, onProgress: (f) => progress.push(f) });
  assert.equal(progress.at(-1), 1);
  assert.deepEqual(await readAll(base), expected);
  await base.close();
  await top.close();
  const baseBytes = opener.storages[opener.opened.lastIndexOf("base.qcow2")].bytes();
  await assertQemuClean({ "base.qcow2": baseBytes }, ["base.qcow2"]);
});

for (const [what, topSize] of [
  ["within its L1 table", SIZE],
  ["moving its L1 table", 3 * 256 * CS], // 3 MiB: two L2 tables' worth of 4 KiB clusters
] as const) {
  test(`commit: a base shorter than the top grows to the top's size (${what})`, async () => {
    const { opener, expected } = chain(topSize, 32 * CS);
    const top = await open(opener, "top.qcow2");
    const base = await open(opener, "base.qcow2");
    assert.equal(base.size, 32 * CS);
    await commit(top, base, 2, { drop: true });
    assert.equal(base.size, topSize);
    assert.deepEqual(await readAll(base), expected);
    await base.close();
    await top.close();
    const bytes = opener.storages[opener.opened.lastIndexOf("base.qcow2")].bytes();
    const reopened = await Qcow2Image.open(new MemoryStorage(bytes), { readOnly: true, codecs: nodeCodecs });
    assert.equal(reopened.size, topSize, "the new size is in the header");
    assert.deepEqual(await readAll(reopened), expected);
    await assertQemuClean({ "base.qcow2": bytes }, ["base.qcow2"]);
  });
}

test("commit: refuses a layer that is not below the top, and a read-only base", async () => {
  const { opener } = chain();
  const top = await open(opener, "top.qcow2");
  const mid = await open(opener, "mid.qcow2", true);
  await assert.rejects(commit(top, mid, 0), /not a backing layer/);
  await assert.rejects(commit(top, mid, 3), /not a backing layer/);
  await assert.rejects(commit(top, mid, 1), /read-only/);
});

test("commit: a crash while the top is emptied leaves it reading the same, with no corruption", async () => {
  const { opener, expected } = chain();
  // First the commit into mid, then the emptying of the top recorded on a crash storage.
  const top = await open(opener, "top.qcow2");
  const mid = await open(opener, "mid.qcow2");
  await commit(top, mid, 1, { drop: true });
  await mid.close();
  const midBytes = opener.storages[3].bytes();
  const files = new Map([...opener.files, ["mid.qcow2", midBytes]]);
  const storage = new CrashStorage(new MemoryStorage(opener.files.get("top.qcow2"), { name: "top.qcow2" }));
  const img = await Qcow2Image.open(storage, {
    readOnly: false,
    codecs: nodeCodecs,
    backing: await open(new MapOpener(files), "mid.qcow2", true),
  });
  await img.writer?.makeEmpty();
  const flushes = [-1, ...storage.flushPositions()];
  let states = 0;
  await withTempDir(async (dir) => {
    writeFiles(dir, { "mid.qcow2": midBytes, "base.qcow2": files.get("base.qcow2") as Uint8Array });
    for (const f of flushes) {
      const win = storage.windowAfter(f).ops;
      const subsets = [win, [], win.filter((_, i) => i % 2 === 0), win.filter((_, i) => i % 2 === 1)];
      for (const subset of subsets) {
        const bytes = storage.crashImage(f + 1, subset);
        const what = `crash after flush ${f} with writes ${subset.join(",")} of ${win.join(",")}`;
        const state = await open(new MapOpener(new Map([...files, ["top.qcow2", bytes]])), "top.qcow2", true);
        assert.deepEqual(await readAll(state), expected, `${what}: guest contents changed`);
        writeFiles(dir, { "top.qcow2": bytes });
        const r = qemuImg(["check", "--output=json", join(dir, "top.qcow2")]);
        const report = JSON.parse(r.stdout) as { corruptions?: number; "check-errors"?: number };
        assert.equal((report.corruptions ?? 0) + (report["check-errors"] ?? 0), 0, `${what}: ${r.stdout}`);
        states++;
      }
    }
  });
  assert.ok(states > 8, `${states} crash states`);
});

test("commit: a crash while a base grows past its L1 table leaves the old or the new size, intact", async () => {
  const base = buildImage({
    size: 32 * CS,
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 31, kind: "compressed", data: pattern(CS, 2) },
    ],
  });
  const storage = new CrashStorage(new MemoryStorage(base.bytes, { name: "base.qcow2" }));
  const img = await Qcow2Image.open(storage, { readOnly: false, codecs: nodeCodecs });
  const newSize = 3 * 512 * CS; // three L2 tables' worth: the one-entry L1 table must move
  await img.resize(newSize, {});
  assert.equal(img.header.l1Size, 3);
  const before = base.expected();
  const sizesSeen = new Set<number>();
  await withTempDir(async (dir) => {
    for (const f of [-1, ...storage.flushPositions()]) {
      const win = storage.windowAfter(f).ops;
      for (const subset of [win, [], win.slice(0, 1), win.slice(1)]) {
        const bytes = storage.crashImage(f + 1, subset);
        const state = await Qcow2Image.open(new MemoryStorage(bytes), { codecs: nodeCodecs });
        sizesSeen.add(state.size);
        assert.ok(state.size === 32 * CS || state.size === newSize, `size ${state.size}`);
        const contents = await readAll(state);
        assert.deepEqual(contents.subarray(0, before.length), before);
        assert.ok(contents.subarray(before.length).every((b) => b === 0));
        writeFiles(dir, { "b.qcow2": bytes });
        const r = qemuImg(["check", "--output=json", join(dir, "b.qcow2")]);
        const report = JSON.parse(r.stdout) as { corruptions?: number; "check-errors"?: number };
        assert.equal((report.corruptions ?? 0) + (report["check-errors"] ?? 0), 0, r.stdout);
      }
    }
  });
  assert.equal(sizesSeen.size, 2);
});
