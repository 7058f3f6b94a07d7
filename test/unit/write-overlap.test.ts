/**
 * Metadata overlap protection (QEMU's qcow2_pre_write_overlap_check): on an image whose
 * refcounts wrongly call a table free, a write that would be given that cluster is refused and
 * the image marked corrupt; the table is not overwritten.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { view } from "../../src/format/bytes.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { buildImage, pattern } from "./build-image.js";

const CS = 4096;

for (const [kind, find] of [
  [
    "active L2 table",
    (b: Uint8Array) => Number(view(b).getBigUint64(Number(view(b).getBigUint64(40))) & 0xffffffffffffen),
  ],
  ["active L1 table", (b: Uint8Array) => Number(view(b).getBigUint64(40))],
] as const) {
  test(`a write given the cluster of the ${kind} is refused and the image marked corrupt`, async () => {
    const built = buildImage({
      size: 1024 * 1024,
      clusterBits: 12,
      clusters: [{ guestCluster: 0, kind: "data", data: pattern(CS, 1) }],
    });
    const bytes = built.bytes.slice();
    const target = find(bytes);
    // Refcount of the target cluster (16-bit, first refcount block) set to 0: "free".
    const rb = Number(view(bytes).getBigUint64(Number(view(bytes).getBigUint64(48))));
    view(bytes).setUint16(rb + 2 * (target / CS), 0);
    const storage = new MemoryStorage(bytes);
    const tableBefore = storage.bytes().slice(target, target + CS);
    const img = await Qcow2Image.open(storage, { readOnly: false });
    await assert.rejects(img.write(new Uint8Array(CS).fill(9), 200 * CS), (e: unknown) => {
      assert.match(String(e), new RegExp(`Preventing invalid write on metadata \\(overlaps with ${kind}\\)`));
      return true;
    });
    await assert.rejects(img.write(new Uint8Array(CS), 0), /corrupt/);
    await img.close();
    const after = storage.bytes();
    assert.deepEqual(after.slice(target, target + CS), tableBefore, `${kind} was overwritten`);
    assert.equal(view(after).getBigUint64(72) & 2n, 2n, "corrupt bit");
  });
}

// qemu-iotests 060: an L2 entry (with COPIED) pointing at metadata makes a write to that guest
// cluster an in-place write onto the metadata; QEMU refuses it and marks the image corrupt.
for (const [kind, find] of [
  ["active L1 table", (b: Uint8Array) => Number(view(b).getBigUint64(40))],
  ["refcount block", (b: Uint8Array) => Number(view(b).getBigUint64(Number(view(b).getBigUint64(48))))],
  ["refcount table", (b: Uint8Array) => Number(view(b).getBigUint64(48))],
] as const) {
  test(`a write into an owned cluster that is the ${kind} is refused and the image marked corrupt`, async () => {
    const built = buildImage({
      size: 1024 * 1024,
      clusterBits: 12,
      clusters: [{ guestCluster: 0, kind: "data", data: pattern(CS, 1) }],
    });
    const bytes = built.bytes.slice();
    const target = find(bytes);
    const l2 = Number(view(bytes).getBigUint64(Number(view(bytes).getBigUint64(40))) & 0xffffffffffffen);
    // Guest cluster 1 now "owns" the metadata cluster.
    view(bytes).setBigUint64(l2 + 8, (1n << 63n) | BigInt(target));
    const storage = new MemoryStorage(bytes);
    const before = storage.bytes().slice(target, target + CS);
    const img = await Qcow2Image.open(storage, { readOnly: false });
    await assert.rejects(img.write(new Uint8Array(512).fill(9), CS + 512), (e: unknown) => {
      assert.match(String(e), new RegExp(`Preventing invalid write on metadata \\(overlaps with ${kind}\\)`));
      return true;
    });
    await assert.rejects(img.write(new Uint8Array(CS), 0), /corrupt/);
    await img.close();
    const after = storage.bytes();
    assert.deepEqual(after.slice(target, target + CS), before, `${kind} was overwritten`);
    assert.equal(view(after).getBigUint64(72) & 2n, 2n, "corrupt bit");
  });
}

// The lookup table of metadata clusters is rebuilt when the layout changes: an L2 table
// allocated after the first check (here into a cluster a damaged L2 entry also points at) is
// protected from the next in-place write.
test("a table allocated after the first overlap check is protected from later in-place writes", async () => {
  const built = buildImage({
    size: 4 * 1024 * 1024,
    clusterBits: 12,
    clusters: [{ guestCluster: 0, kind: "data", data: pattern(CS, 1) }],
  });
  const bytes = built.bytes.slice();
  // The first cluster past the file (refcount 0): where the write below puts its new L2 table,
  // before its data, as QEMU does (asserted below).
  const free = bytes.length;
  const l2 = Number(view(bytes).getBigUint64(Number(view(bytes).getBigUint64(40))) & 0xffffffffffffen);
  // Guest cluster 1 "owns" that free cluster (COPIED set, refcount 0: the damage).
  view(bytes).setBigUint64(l2 + 8, (1n << 63n) | BigInt(free));
  const storage = new MemoryStorage(bytes);
  const img = await Qcow2Image.open(storage, { readOnly: false });
  // An in-place write builds the table; then a write past the first L2 table's 2 MiB allocates
  // a new L2 table, which lands in the free cluster.
  await img.write(new Uint8Array(CS).fill(3), CS);
  await img.write(new Uint8Array(CS).fill(4), 2 * 1024 * 1024);
  await img.flush();
  const l1 = Number(view(storage.bytes()).getBigUint64(40));
  const entry = view(storage.bytes()).getBigUint64(l1 + 8) & 0xffffffffffffen;
  assert.equal(Number(entry), free, "the new L2 table is in the free cluster");
  const table = storage.bytes().slice(free, free + CS);
  await assert.rejects(img.write(new Uint8Array(CS).fill(9), CS), /overlaps with active L2 table/);
  await img.close();
  assert.deepEqual(storage.bytes().slice(free, free + CS), table, "the L2 table was overwritten");
});
