/**
 * Backing chains opened through openImage with a StorageOpener over in-memory files: reads
 * through qcow2 and raw backing files, backing files shorter than the overlay, loops, the
 * depth limit and missing files.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { MAX_BACKING_DEPTH, openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { buildImage, MapOpener, noise, pattern, readAll, rng } from "./build-image.js";

const CS = 4096;

function qcowError(code: string, message: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof QcowError, `expected a QcowError, got ${String(e)}`);
    assert.equal(e.code, code, `code of "${e.message}"`);
    assert.match(e.message, message);
    return true;
  };
}

test("backing: qcow2 over qcow2 over raw, each layer showing through where the one above is unallocated", async () => {
  const raw = noise(16 * CS, 1);
  const mid = buildImage({
    size: 16 * CS,
    clusterBits: 12,
    backingFile: "base.raw",
    backingFormat: "raw",
    clusters: [
      { guestCluster: 1, kind: "data", data: pattern(CS, 2) },
      { guestCluster: 2, kind: "zero" },
      { guestCluster: 3, kind: "compressed", data: pattern(CS, 3) },
    ],
  });
  const top = buildImage({
    size: 16 * CS,
    clusterBits: 12,
    backingFile: "mid.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 2, kind: "data", data: pattern(CS, 4) },
      { guestCluster: 5, kind: "zero" },
      { guestCluster: 6, kind: "zero-alloc", data: pattern(CS, 5) },
    ],
  });
  const opener = new MapOpener(
    new Map([
      ["base.raw", raw],
      ["mid.qcow2", mid.bytes],
      ["top.qcow2", top.bytes],
    ]),
  );
  const img = await openImage("top.qcow2", { opener, codecs: nodeCodecs });
  assert.ok(img instanceof Qcow2Image);
  assert.deepEqual(opener.opened, ["top.qcow2", "mid.qcow2", "base.raw"]);
  assert.ok(img.backing instanceof Qcow2Image);
  assert.ok(img.backing.backing instanceof RawImage);
  const want = top.expected(mid.expected(raw));
  assert.deepEqual(await readAll(img), want);
  // Spot checks independent of the builder's model.
  const at = async (offset: number, n: number): Promise<Uint8Array> => {
    const d = new Uint8Array(n);
    await img.read(d, offset);
    return d;
  };
  assert.deepEqual(await at(0, 100), raw.subarray(0, 100), "from the raw base");
  assert.deepEqual(await at(CS, 100), pattern(CS, 2).subarray(0, 100), "from mid");
  assert.deepEqual(await at(2 * CS, 100), pattern(CS, 4).subarray(0, 100), "top over mid's zero cluster");
  assert.deepEqual(await at(3 * CS + 10, 100), pattern(CS, 3).subarray(10, 110), "mid's compressed cluster");
  assert.deepEqual(await at(5 * CS, CS), new Uint8Array(CS), "top's zero cluster hides the base");
  const r = rng(3);
  for (let i = 0; i < 100; i++) {
    const offset = r(16 * CS);
    const length = 1 + r(Math.min(16 * CS - offset, 3 * CS));
    const d = await at(offset, length);
    assert.deepEqual(d, want.subarray(offset, offset + length), `read of ${length} at ${offset}`);
  }
  await img.close();
  assert.ok(
    opener.storages.every((s) => s.closed),
    "closing the top closes the chain",
  );
});

test("backing: a backing file shorter than the overlay reads as zeros past its end", async () => {
  // 2.5 clusters of qcow2 backing, not cluster aligned, under a 6-cluster overlay.
  const baseSize = 2 * CS + 1536;
  const base = buildImage({
    size: baseSize,
    clusterBits: 12,
    clusters: [0, 1, 2].map((gc) => ({ guestCluster: gc, kind: "data" as const, data: noise(CS, gc + 1) })),
  });
  // The base's host cluster holds bytes past its virtual end that must not show.
  const top = buildImage({ size: 6 * CS, clusterBits: 12, backingFile: "base.qcow2", backingFormat: "qcow2" });
  const opener = new MapOpener(
    new Map([
      ["base.qcow2", base.bytes],
      ["top.qcow2", top.bytes],
    ]),
  );
  const img = await openImage("top.qcow2", { opener, codecs: nodeCodecs });
  const got = await readAll(img);
  const want = new Uint8Array(6 * CS);
  want.set(base.expected());
  assert.deepEqual(got, want);
  // A request that straddles the base's end.
  const d = new Uint8Array(1000).fill(0xee);
  await img.read(d, baseSize - 500);
  assert.deepEqual(d.subarray(0, 500), want.subarray(baseSize - 500, baseSize));
  assert.deepEqual(d.subarray(500), new Uint8Array(500));
});

test("backing: a raw backing file shorter than the overlay, and a probed format", async () => {
  const raw = noise(3 * CS + 700, 9);
  for (const backingFormat of ["raw", undefined]) {
    const top = buildImage({
      size: 8 * CS,
      clusterBits: 12,
      backingFile: "base.img",
      backingFormat,
      clusters: [{ guestCluster: 1, kind: "data", data: pattern(CS, 1) }],
    });
    const opener = new MapOpener(
      new Map([
        ["base.img", raw],
        ["top.qcow2", top.bytes],
      ]),
    );
    const img = await openImage("top.qcow2", { opener, codecs: nodeCodecs });
    assert.ok(img instanceof Qcow2Image && img.backing instanceof RawImage);
    assert.deepEqual(await readAll(img), top.expected(raw), `backing format ${backingFormat}`);
  }
});

test("backing: extended L2 subclusters show the backing file through", async () => {
  const cs = 16384;
  const sc = cs / 32;
  const raw = noise(4 * cs, 4);
  const top = buildImage({
    size: 4 * cs,
    clusterBits: 14,
    extendedL2: true,
    backingFile: "base.raw",
    backingFormat: "raw",
    clusters: [{ guestCluster: 1, kind: "subclusters", alloc: 0x0000_000f, zero: 0x0000_0f00, data: pattern(cs, 1) }],
  });
  const opener = new MapOpener(
    new Map([
      ["base.raw", raw],
      ["top.qcow2", top.bytes],
    ]),
  );
  const img = await openImage("top.qcow2", { opener, codecs: nodeCodecs });
  const got = await readAll(img);
  assert.deepEqual(got, top.expected(raw));
  assert.deepEqual(got.subarray(cs + 4 * sc, cs + 8 * sc), raw.subarray(cs + 4 * sc, cs + 8 * sc));
  assert.deepEqual(got.subarray(cs + 8 * sc, cs + 12 * sc), new Uint8Array(4 * sc));
});

test("backing: noBacking leaves the backing file unopened and unallocated clusters zero", async () => {
  const top = buildImage({ size: 4 * CS, clusterBits: 12, backingFile: "base.raw", backingFormat: "raw" });
  const opener = new MapOpener(new Map([["top.qcow2", top.bytes]]));
  const img = await openImage("top.qcow2", { opener, noBacking: true });
  assert.deepEqual(opener.opened, ["top.qcow2"]);
  assert.deepEqual(await readAll(img), new Uint8Array(4 * CS));
});

test("backing: a missing backing file is named in the error, and nothing stays open", async () => {
  const top = buildImage({ size: 4 * CS, clusterBits: 12, backingFile: "gone.qcow2", backingFormat: "qcow2" });
  const opener = new MapOpener(new Map([["top.qcow2", top.bytes]]));
  await assert.rejects(
    openImage("top.qcow2", { opener }),
    qcowError(
      "io",
      /^Could not open 'top\.qcow2': Could not open backing file: Could not open 'gone\.qcow2': No such file or directory$/,
    ),
  );
  assert.ok(opener.storages.every((s) => s.closed));
});

test("backing: an unknown backing format is refused", async () => {
  const top = buildImage({ size: 4 * CS, clusterBits: 12, backingFile: "base.vmdk", backingFormat: "vmdk" });
  const opener = new MapOpener(
    new Map([
      ["top.qcow2", top.bytes],
      ["base.vmdk", new Uint8Array(512)],
    ]),
  );
  await assert.rejects(
    openImage("top.qcow2", { opener }),
    (e: unknown) => e instanceof QcowError && /vmdk/.test(e.message),
  );
  assert.ok(opener.storages.every((s) => s.closed));
});

test("backing: a loop a -> b -> a is refused with a clear error", async () => {
  const a = buildImage({ size: 4 * CS, clusterBits: 12, backingFile: "b.qcow2", backingFormat: "qcow2" });
  const b = buildImage({ size: 4 * CS, clusterBits: 12, backingFile: "a.qcow2", backingFormat: "qcow2" });
  const opener = new MapOpener(
    new Map([
      ["a.qcow2", a.bytes],
      ["b.qcow2", b.bytes],
    ]),
  );
  await assert.rejects(
    openImage("a.qcow2", { opener }),
    qcowError("invalid-argument", /^Backing file 'a\.qcow2' creates an infinite loop$/),
  );
  assert.ok(
    opener.storages.every((s) => s.closed),
    "every storage opened is closed again",
  );
});

test("backing: an image that is its own backing file is refused", async () => {
  const a = buildImage({ size: 4 * CS, clusterBits: 12, backingFile: "a.qcow2" });
  const opener = new MapOpener(new Map([["a.qcow2", a.bytes]]));
  await assert.rejects(
    openImage("a.qcow2", { opener }),
    qcowError("invalid-argument", /'a\.qcow2' creates an infinite loop/),
  );
});

/** A chain of `n` qcow2 images: img0 (top) -> img1 -> ... -> img{n-1}, whose data is in the last. */
function chain(n: number): MapOpener {
  const files = new Map<string, Uint8Array>();
  for (let i = 0; i < n; i++) {
    const last = i === n - 1;
    const img = buildImage({
      size: 2 * CS,
      clusterBits: 12,
      backingFile: last ? undefined : `img${i + 1}.qcow2`,
      backingFormat: last ? undefined : "qcow2",
      clusters: last ? [{ guestCluster: 1, kind: "data", data: pattern(CS, 1) }] : [],
    });
    files.set(`img${i}.qcow2`, img.bytes);
  }
  return new MapOpener(files);
}

test("backing: a deep chain within the limit opens and reads from its bottom", async () => {
  const opener = chain(MAX_BACKING_DEPTH);
  const img = await openImage("img0.qcow2", { opener });
  const d = new Uint8Array(CS);
  await img.read(d, CS);
  assert.deepEqual(d, pattern(CS, 1));
  let depth = 0;
  for await (const e of img.blockStatus(CS, CS)) depth = e.depth;
  assert.equal(depth, MAX_BACKING_DEPTH - 1);
  await img.close();
});

test("backing: a chain deeper than the limit fails fast with an error naming the limit", async () => {
  const opener = chain(MAX_BACKING_DEPTH + 20);
  const started = Date.now();
  await assert.rejects(openImage("img0.qcow2", { opener }), (e: unknown) => {
    assert.ok(e instanceof QcowError);
    assert.equal(e.code, "invalid-argument");
    assert.match(e.message, new RegExp(`deeper than ${MAX_BACKING_DEPTH} images`));
    // Said once, like the loop error: not wrapped in one "Could not open backing file: " per level.
    const wrappers = e.message.split("Could not open backing file: ").length - 1;
    assert.ok(wrappers <= 1, `message wrapped ${wrappers} times (${e.message.length} characters)`);
    return true;
  });
  assert.ok(Date.now() - started < 5000);
  assert.ok(opener.opened.length <= MAX_BACKING_DEPTH + 2, `opened ${opener.opened.length} files`);
  assert.ok(
    opener.storages.every((s) => s.closed),
    "every storage opened is closed again",
  );
});
