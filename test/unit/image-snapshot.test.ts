/**
 * Reading internal snapshots (docs/interop/qcow2.rst, "Snapshots"): by id and by name, with
 * their own tables or sharing the active layer's, over a backing file, and at the size
 * `qemu-img convert -l` reads them.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { buildImage, type ImageSpec, MapOpener, noise, pattern, readAll } from "./build-image.js";

const CS = 512;

function spec(): ImageSpec {
  return {
    size: 96 * CS,
    clusterBits: 9,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "compressed", data: pattern(CS, 2) },
      { guestCluster: 70, kind: "data", data: pattern(CS, 3) },
    ],
    snapshots: [
      {
        id: "1",
        name: "before",
        clusters: [
          { guestCluster: 0, kind: "data", data: pattern(CS, 11) },
          { guestCluster: 2, kind: "zero" },
          { guestCluster: 65, kind: "compressed", data: pattern(CS, 12) },
        ],
      },
      { id: "2", name: "shared", shareActive: true },
      // A snapshot whose name is another snapshot's id: ids are looked up first.
      { id: "3", name: "1", clusters: [{ guestCluster: 3, kind: "data", data: pattern(CS, 13) }] },
    ],
  };
}

async function openSnapshot(bytes: Uint8Array, snapshot: string, backing?: RawImage): Promise<Qcow2Image> {
  return Qcow2Image.open(new MemoryStorage(bytes, { name: "s.qcow2" }), { codecs: nodeCodecs, snapshot, backing });
}

test("snapshot: the table is decoded on open", async () => {
  const img = buildImage(spec());
  const q = await Qcow2Image.open(img.storage());
  assert.deepEqual(
    q.snapshots.map((s) => [s.id, s.name, s.l1TableOffset, s.l1Size]),
    img.snapshots.map((l, i) => [spec().snapshots?.[i].id, spec().snapshots?.[i].name, l.l1Offset, l.l1Size]),
  );
});

test("snapshot: read by id and by name", async () => {
  const img = buildImage(spec());
  const byId = await openSnapshot(img.bytes, "1");
  assert.deepEqual(await readAll(byId), img.expectedSnapshot(0));
  const byName = await openSnapshot(img.bytes, "before");
  assert.deepEqual(await readAll(byName), img.expectedSnapshot(0));
  assert.deepEqual(await readAll(await openSnapshot(img.bytes, "shared")), img.expected());
  assert.deepEqual(await readAll(await openSnapshot(img.bytes, "3")), img.expectedSnapshot(2));
  // The active layer is untouched by snapshots.
  assert.deepEqual(await readAll(await Qcow2Image.open(img.storage(), { codecs: nodeCodecs })), img.expected());
});

test("snapshot: an id is matched before a name", async () => {
  const img = buildImage(spec());
  // "1" is snapshot 1's id and snapshot 3's name.
  assert.deepEqual(await readAll(await openSnapshot(img.bytes, "1")), img.expectedSnapshot(0));
});

test("snapshot: an unknown snapshot is not found", async () => {
  const img = buildImage(spec());
  await assert.rejects(openSnapshot(img.bytes, "nope"), (e: unknown) => {
    assert.ok(e instanceof QcowError);
    assert.equal(e.code, "not-found");
    assert.match(e.message, /Can't find snapshot/);
    return true;
  });
});

test("snapshot: can only be opened read-only", async () => {
  const img = buildImage(spec());
  await assert.rejects(
    Qcow2Image.open(img.storage(), { snapshot: "1", readOnly: false }),
    (e: unknown) => e instanceof QcowError && e.code === "invalid-argument",
  );
});

test("snapshot: unallocated clusters of a snapshot read from the backing file", async () => {
  const base = noise(96 * CS, 5);
  const img = buildImage({ ...spec(), backingFile: "base.raw", backingFormat: "raw" });
  const backing = await RawImage.open(new MemoryStorage(base, { name: "base.raw" }));
  assert.deepEqual(await readAll(await openSnapshot(img.bytes, "before", backing)), img.expectedSnapshot(0, base));
  const opener = new MapOpener(
    new Map([
      ["base.raw", base],
      ["s.qcow2", img.bytes],
    ]),
  );
  const viaChain = await openImage("s.qcow2", { opener, snapshot: "before", codecs: nodeCodecs });
  assert.deepEqual(await readAll(viaChain), img.expectedSnapshot(0, base));
});

test("snapshot: a snapshot of a smaller disk reads at the current size, as qemu-img convert -l reads it", async () => {
  // The disk was 32 clusters when the snapshot was taken and grew to 96 since. QEMU reads the
  // snapshot's L1 table at the image's current size (qemu-img convert -l gives 96 clusters);
  // what lies past the snapshot's L1 table is unallocated (zeros, or the backing file).
  const s = spec();
  s.snapshots = [
    { id: "1", name: "small", size: 32 * CS, clusters: [{ guestCluster: 4, kind: "data", data: pattern(CS, 21) }] },
  ];
  const img = buildImage(s);
  const q = await openSnapshot(img.bytes, "small");
  assert.equal(q.size, 96 * CS);
  assert.deepEqual(await readAll(q), img.expectedSnapshot(0));
});

test("snapshot: a snapshot L1 table larger than QEMU allows is refused without reading it", async () => {
  const img = buildImage(spec());
  const bytes = img.bytes.slice();
  // l1_size of the first entry (offset 8 of the entry).
  new DataView(bytes.buffer).setUint32(img.snapshotsOffset + 8, 0x4000_0000);
  // The header still opens; only reading that snapshot fails.
  await Qcow2Image.open(new MemoryStorage(bytes));
  await assert.rejects(openSnapshot(bytes, "1"), (e: unknown) => {
    assert.ok(e instanceof QcowError);
    assert.equal(e.code, "invalid-argument");
    assert.match(e.message, /^Failed to load snapshot: Snapshot L1 table too large/);
    return true;
  });
});
