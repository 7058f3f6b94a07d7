/**
 * createOverlay / openOverlay: a writable qcow2 overlay in memory over a read-only image; writes
 * land in the overlay only, reads fall through, and the header names the backing file.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { checkQcow2 } from "../../src/image/check.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { createOverlay, openOverlay } from "../../src/ops/overlay.js";
import { BASE_SEED, Prng } from "../prng.js";
import { buildImage, MapOpener, noise, pattern, readAll } from "./build-image.js";

const CS = 65536;

function baseImage() {
  return buildImage({
    size: 40 * CS + 3 * 512,
    clusters: [
      { guestCluster: 0, kind: "data", data: noise(CS, 1) },
      { guestCluster: 3, kind: "compressed", data: pattern(CS, 2) },
      { guestCluster: 7, kind: "data", data: noise(CS, 3) },
      { guestCluster: 8, kind: "zero" },
      { guestCluster: 39, kind: "data", data: noise(CS, 4) },
    ],
  });
}

test("overlay: writes go to the overlay only; reads fall through to the backing image", async () => {
  const base = baseImage();
  const backing = await Qcow2Image.open(
    new MemoryStorage(base.bytes, { readOnly: true, name: "http://example.com/images/base.qcow2" }),
    { codecs: nodeCodecs },
  );
  const store = new MemoryStorage(undefined, { name: "overlay.qcow2" });
  const overlay = await createOverlay(backing, store, { codecs: nodeCodecs });
  assert.equal(overlay.size, backing.size);
  assert.equal(overlay.backingName, "http://example.com/images/base.qcow2");
  assert.equal(overlay.extensions.backingFormat, "qcow2");
  assert.equal(overlay.readOnly, false);

  const expected = base.expected();
  assert.deepEqual(await readAll(overlay), expected);
  const rng = new Prng(BASE_SEED);
  for (let i = 0; i < 30; i++) {
    const len = 1 + rng.int(3 * CS);
    const at = rng.int(expected.length - len);
    const data = rng.bytes(len);
    await overlay.write(data, at);
    expected.set(data, at);
  }
  await overlay.writeZeroes(5 * CS, 2 * CS);
  expected.fill(0, 5 * CS, 7 * CS);
  assert.deepEqual(await readAll(overlay), expected, `seed ${BASE_SEED}`);
  await overlay.close();
  assert.deepEqual(base.bytes, base.storage().bytes(), "the backing image's bytes are untouched");

  const bytes = store.bytes();
  const check = await checkQcow2(new MemoryStorage(bytes, { readOnly: true }));
  assert.equal(check.corruptions + check.leaks + check.checkErrors, 0);

  // The overlay opens by itself: its header names the backing file and format.
  const opener = new MapOpener(
    new Map([
      ["overlay.qcow2", bytes],
      ["http://example.com/images/base.qcow2", base.bytes],
    ]),
  );
  const reopened = await openImage("overlay.qcow2", { opener, codecs: nodeCodecs });
  assert.deepEqual(await readAll(reopened), expected);
  assert.deepEqual(opener.opened, ["overlay.qcow2", "http://example.com/images/base.qcow2"]);
  await reopened.close();

  // openOverlay reopens it over a backing image the caller opened, and keeps writing.
  const again = await openOverlay(
    new MemoryStorage(bytes, { name: "overlay.qcow2" }),
    await Qcow2Image.open(new MemoryStorage(base.bytes, { readOnly: true }), { codecs: nodeCodecs }),
    { codecs: nodeCodecs },
  );
  await again.write(new Uint8Array(512).fill(9), 0);
  expected.fill(9, 0, 512);
  assert.deepEqual(await readAll(again), expected);
  await again.close();
});

test("overlay: a raw backing image of odd size, creation options, and refusals", async () => {
  const raw = noise(1000, 7);
  const backing = await RawImage.open(new MemoryStorage(raw, { readOnly: true }), "disk.raw");
  const store = new MemoryStorage();
  const overlay = await createOverlay(backing, store, { create: { clusterSize: 4096, version: 2 } });
  assert.equal(overlay.size, 1024, "rounded up to whole sectors, as qemu-img create does");
  assert.equal(overlay.clusterSize, 4096);
  assert.equal(overlay.header.version, 2);
  assert.equal(overlay.backingName, "disk.raw");
  assert.equal(overlay.extensions.backingFormat, "raw");
  const all = await readAll(overlay);
  assert.deepEqual(all.subarray(0, 1000), raw);
  assert.deepEqual(all.subarray(1000), new Uint8Array(24));
  await overlay.write(new Uint8Array(74).fill(1), 950);
  const after = await readAll(overlay);
  assert.deepEqual(after.subarray(950, 1024), new Uint8Array(74).fill(1));
  await overlay.close();

  const isQcowError = (code: string, pattern: RegExp) => (e: unknown) =>
    e instanceof QcowError && e.code === code && pattern.test(e.message);
  const b2 = await RawImage.open(new MemoryStorage(raw, { readOnly: true }), "disk.raw");
  await assert.rejects(
    createOverlay(b2, new MemoryStorage(undefined, { readOnly: true, name: "ro" })),
    isQcowError("read-only", /^ro is read-only: an overlay must be writable$/),
  );
  await assert.rejects(
    openOverlay(new MemoryStorage(baseImage().bytes, { name: "plain.qcow2" }), b2),
    isQcowError("invalid-argument", /^plain\.qcow2 has no backing file: it is not an overlay$/),
  );
  await b2.close();
});
