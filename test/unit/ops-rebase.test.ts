/**
 * rebase on images in memory: after a safe rebase the image reads exactly as before over its
 * new backing file (or none), only what differs was written, the header names the new file with
 * its other extensions kept; -u changes only the header; names that cannot be stored are refused
 * with the image untouched.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { findBackingImage } from "../../src/ops/commit.js";
import { rebase } from "../../src/ops/rebase.js";
import { buildImage, MapOpener, noise, pattern, qemuImg, readAll, withTempDir, writeFiles } from "./build-image.js";
import { CrashStorage, tornWrite } from "./crash-storage.js";

const CS = 4096;
const SIZE = 64 * CS;

function fixture() {
  const old = buildImage({
    size: SIZE,
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "data", data: pattern(CS, 2) },
      { guestCluster: 5, kind: "compressed", data: pattern(CS, 3) },
      { guestCluster: 6, kind: "data", data: noise(CS, 4) },
    ],
  });
  // The new base shares cluster 0, differs in cluster 1 by one sector, has data the old lacks.
  const c1 = pattern(CS, 2);
  c1[1000] ^= 0xff;
  const fresh = buildImage({
    size: 40 * CS, // shorter than the overlay: past its end it reads zeros
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "data", data: c1 },
      { guestCluster: 7, kind: "data", data: pattern(CS, 5) },
      { guestCluster: 6, kind: "data", data: noise(CS, 4) },
    ],
  });
  const top = buildImage({
    size: SIZE,
    clusterBits: 12,
    backingFile: "old.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 6, kind: "zero" },
      { guestCluster: 9, kind: "data", data: pattern(CS, 6) },
      { guestCluster: 63, kind: "data", data: pattern(CS, 7) },
    ],
  });
  const opener = new MapOpener(
    new Map([
      ["old.qcow2", old.bytes],
      ["new.qcow2", fresh.bytes],
      ["top.qcow2", top.bytes],
    ]),
  );
  return { opener, expected: top.expected(old.expected()), old };
}

async function open(opener: MapOpener, name: string, readOnly = false): Promise<Qcow2Image> {
  const img = await openImage(name, { opener, codecs: nodeCodecs, readOnly });
  assert.ok(img instanceof Qcow2Image);
  return img;
}

/** The top's bytes after the operation (the first storage opened for it). */
function topBytes(opener: MapOpener): Uint8Array {
  return opener.storages[opener.opened.indexOf("top.qcow2")].bytes();
}

test("rebase: the image reads the same over its new backing file; only differing sectors were copied", async () => {
  const { opener, expected } = fixture();
  const img = await open(opener, "top.qcow2");
  const fresh = await open(opener, "new.qcow2", true);
  await rebase(img, fresh, "new.qcow2", "qcow2");
  assert.equal(img.backingName, "new.qcow2");
  await img.close();
  const after = new MapOpener(new Map([...opener.files, ["top.qcow2", topBytes(opener)]]));
  const reopened = await open(after, "top.qcow2", true);
  assert.equal(reopened.backingName, "new.qcow2");
  assert.equal(reopened.extensions.backingFormat, "qcow2");
  assert.deepEqual(await readAll(reopened), expected);
  // Allocated in the top now: clusters 1 (one sector differs), 5 (compressed in the old base
  // only), 7 (data in the new base only), and the top's own 6, 9, 63. Not 0: it is the same.
  const own: number[] = [];
  for await (const e of reopened.blockStatus(0, SIZE)) {
    if (e.present && e.depth === 0) for (let c = e.start / CS; c < (e.start + e.length) / CS; c++) own.push(c);
  }
  assert.deepEqual(own, [1, 5, 6, 7, 9, 63]);
  await withTempDir((dir) => {
    writeFiles(dir, { "top.qcow2": topBytes(opener), "new.qcow2": opener.files.get("new.qcow2") as Uint8Array });
    const r = qemuImg(["check", join(dir, "top.qcow2")]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  });
});

test('rebase -b "": the image becomes standalone with the same contents', async () => {
  const { opener, expected } = fixture();
  const img = await open(opener, "top.qcow2");
  await rebase(img, undefined, undefined, undefined);
  await img.close();
  const bytes = topBytes(opener);
  const standalone = await Qcow2Image.open(new MemoryStorage(bytes), { codecs: nodeCodecs });
  assert.equal(standalone.backingName, undefined);
  assert.equal(standalone.extensions.backingFormat, undefined);
  assert.deepEqual(await readAll(standalone), expected);
});

test("rebase -u: only the header changes, extensions kept", async () => {
  const { opener } = fixture();
  const img = await Qcow2Image.open(new MemoryStorage(opener.files.get("top.qcow2")), { readOnly: false });
  const storage = img.storage as MemoryStorage;
  const before = storage.bytes();
  const features = img.extensions.featureNames.length;
  await rebase(img, undefined, "elsewhere/renamed.qcow2", "qcow2", { unsafe: true });
  await img.close();
  const after = storage.bytes();
  assert.deepEqual(after.subarray(CS), before.subarray(CS), "nothing past the header cluster changed");
  const reopened = await Qcow2Image.open(new MemoryStorage(after));
  assert.equal(reopened.backingName, "elsewhere/renamed.qcow2");
  assert.equal(reopened.extensions.featureNames.length, features);
});

test("rebase onto a layer of the chain compares only what the layers above it hold", async () => {
  const { opener, old } = fixture();
  // A middle layer between the top and old.qcow2.
  const mid = buildImage({
    size: SIZE,
    clusterBits: 12,
    backingFile: "old.qcow2",
    backingFormat: "qcow2",
    clusters: [{ guestCluster: 20, kind: "data", data: pattern(CS, 9) }],
  });
  opener.files.set("mid.qcow2", mid.bytes);
  const over = buildImage({
    size: SIZE,
    clusterBits: 12,
    backingFile: "mid.qcow2",
    backingFormat: "qcow2",
    clusters: [{ guestCluster: 9, kind: "data", data: pattern(CS, 6) }],
  });
  opener.files.set("over.qcow2", over.bytes);
  const img = await open(opener, "over.qcow2");
  const depth = await findBackingImage(img, "old.qcow2", opener);
  assert.equal(depth, 2);
  const chainOld = (img.backing as Qcow2Image).backing as Qcow2Image;
  await rebase(img, chainOld, "old.qcow2", "qcow2", { newBackingDepth: depth });
  await img.close();
  const bytes = opener.storages[opener.opened.indexOf("over.qcow2")].bytes();
  const reopened = await open(new MapOpener(new Map([...opener.files, ["over.qcow2", bytes]])), "over.qcow2", true);
  assert.deepEqual(await readAll(reopened), over.expected(mid.expected(old.expected())));
  const own: number[] = [];
  for await (const e of reopened.blockStatus(0, SIZE)) {
    if (e.present && e.depth === 0) for (let c = e.start / CS; c < (e.start + e.length) / CS; c++) own.push(c);
  }
  assert.deepEqual(own, [9, 20]);
});

test("rebase: names the header cannot hold are refused before anything is written", async () => {
  const { opener } = fixture();
  const img = await open(opener, "top.qcow2");
  const storage = opener.storages[0];
  const before = storage.bytes();
  const fresh = await open(opener, "new.qcow2", true);
  await assert.rejects(
    rebase(img, fresh, "a".repeat(1024), "qcow2"),
    (e: unknown) => e instanceof QcowError && /^Invalid argument/.test(e.message),
  );
  await img.close();
  assert.deepEqual(storage.bytes(), before);
  // 512-byte clusters: the header, its extensions and a long name do not fit in one.
  const small = buildImage({ size: 64 * 512, clusterBits: 9 });
  const s2 = new MemoryStorage(small.bytes);
  const img2 = await Qcow2Image.open(s2, { readOnly: false });
  await assert.rejects(
    rebase(img2, undefined, "b".repeat(600), "qcow2", { unsafe: true }),
    (e: unknown) => e instanceof QcowError && e.message === "No space left in the file header",
  );
  await rebase(img2, undefined, "b".repeat(300), "qcow2", { unsafe: true });
  await img2.close();
  assert.equal((await Qcow2Image.open(new MemoryStorage(s2.bytes()))).backingName, "b".repeat(300));
});

/** Every disk state a crash can leave (see crash-storage.ts): each window's subsets and tears. */
function crashStates(s: CrashStorage): { bytes: Uint8Array; what: string }[] {
  const out: { bytes: Uint8Array; what: string }[] = [];
  for (const f of [-1, ...s.flushPositions()]) {
    const win = s.windowAfter(f).ops;
    if (win.length > 10) throw new Error(`window of ${win.length} writes: too many to enumerate`);
    for (let mask = 0; mask < 1 << win.length; mask++) {
      const subset = win.filter((_, i) => mask & (1 << i));
      out.push({ bytes: s.crashImage(f + 1, subset), what: `after flush ${f}, writes ${subset.join(",")}` });
      for (const i of subset) {
        const op = s.log[i];
        if (op.kind !== "write") continue;
        for (let at = 512 - (op.offset % 512); at < op.data.length; at += 512) {
          for (const keepFirst of [true, false]) {
            const torn = subset.map((j) => (j === i ? tornWrite(op, at, keepFirst) : j));
            out.push({ bytes: s.crashImage(f + 1, torn), what: `after flush ${f}, ${i} torn at ${at}` });
          }
        }
      }
    }
  }
  return out;
}

test("rebase: a crash at any point leaves the image reading as before, over the backing file it names", async () => {
  const { opener, expected } = fixture();
  const storage = new CrashStorage(new MemoryStorage(opener.files.get("top.qcow2"), { name: "top.qcow2" }));
  const img = await Qcow2Image.open(storage, {
    readOnly: false,
    codecs: nodeCodecs,
    backing: await open(opener, "old.qcow2", true),
  });
  await rebase(img, await open(opener, "new.qcow2", true), "new.qcow2", "qcow2");
  const states = crashStates(storage);
  const names = new Set<string | undefined>();
  for (const { bytes, what } of states) {
    const files = new Map(opener.files);
    files.set("top.qcow2", bytes);
    const top = await open(new MapOpener(files), "top.qcow2", true);
    names.add(top.backingName);
    assert.deepEqual(await readAll(top), expected, `crash ${what}: guest contents changed`);
  }
  assert.deepEqual([...names].sort(), ["new.qcow2", "old.qcow2"], "both sides of the switch were tried");
});

test("rebase -u: a crash while renaming leaves the old or the new name, never a mix", async () => {
  const { opener } = fixture();
  for (const name of ["renamed/elsewhere.qcow2", "o.qcow2"]) {
    const storage = new CrashStorage(new MemoryStorage(opener.files.get("top.qcow2")));
    const img = await Qcow2Image.open(storage, { readOnly: false });
    await rebase(img, undefined, name, "qcow2", { unsafe: true });
    const seen = new Set<string | undefined>();
    for (const { bytes, what } of crashStates(storage)) {
      const h = await Qcow2Image.readHeader(new MemoryStorage(bytes));
      assert.ok(h.backingName === "old.qcow2" || h.backingName === name, `crash ${what}: name ${h.backingName}`);
      assert.equal(h.extensions.backingFormat, "qcow2");
      assert.equal(h.extensions.featureNames.length, img.extensions.featureNames.length);
      seen.add(h.backingName);
    }
    assert.equal(seen.size, 2);
  }
});
