/**
 * The test image builder itself: images it lays out must be ones QEMU calls clean
 * (`qemu-img check`) and reads as the builder says (`qemu-img convert -O raw`), or every engine
 * test built on it proves nothing.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { buildImage, type ImageSpec, noise, pattern, qemuImg, withTempDir, writeFiles } from "./build-image.js";

const SUB = (n: number): number => n; // subcluster bitmaps read better as plain numbers

/** A mix of every cluster kind, spread over several L2 tables when clusters are small. */
function mixed(spec: Partial<ImageSpec> & { clusterBits: number }, l2 = 2 ** spec.clusterBits / 8): ImageSpec {
  const cs = 2 ** spec.clusterBits;
  const v3 = (spec.version ?? 3) === 3;
  // With `l2` smaller than the real L2 table size, the clusters at l2-1 and l2 are just neighbours.
  const clusters: ImageSpec["clusters"] = [
    { guestCluster: 0, kind: "data", data: pattern(cs, 1) },
    { guestCluster: 1, kind: "compressed", data: pattern(cs, 2) },
    { guestCluster: 2, kind: "compressed", data: pattern(cs, 3) },
    { guestCluster: 4, kind: "data", data: noise(cs, 4) },
    { guestCluster: l2 - 1, kind: "data", data: pattern(cs, 5) },
    { guestCluster: l2, kind: "compressed", data: pattern(cs, 6) },
  ];
  if (v3) {
    clusters.push({ guestCluster: 5, kind: "zero" });
    clusters.push({ guestCluster: 6, kind: "zero-alloc", data: pattern(cs, 7) });
  }
  return { size: (l2 + 3) * cs, ...spec, clusters: [...clusters, ...(spec.clusters ?? [])] };
}

interface Case {
  name: string;
  spec: ImageSpec;
}

const cases: Case[] = [
  { name: "v3, 512-byte clusters, three L2 tables", spec: mixed({ clusterBits: 9 }) },
  { name: "v2, 512-byte clusters", spec: mixed({ clusterBits: 9, version: 2 }) },
  { name: "v3, 64 KiB clusters", spec: mixed({ clusterBits: 16 }) },
  { name: "v3, 2 MiB clusters", spec: mixed({ clusterBits: 21 }, 8) },
  ...[0, 1, 2, 3, 5, 6].map((order) => ({
    name: `refcount_order ${order}`,
    spec: {
      size: 1024 * 1024,
      clusterBits: 12,
      refcountOrder: order,
      clusters: [
        { guestCluster: 0, kind: "data" as const, data: pattern(4096, 1) },
        { guestCluster: 3, kind: "zero-alloc" as const },
        { guestCluster: 9, kind: "compressed" as const, data: pattern(4096, 2) },
      ],
    },
  })),
  {
    name: "extended L2, subcluster bitmaps",
    spec: {
      size: 16 * 16384,
      clusterBits: 14,
      extendedL2: true,
      clusters: [
        { guestCluster: 0, kind: "data", data: pattern(16384, 1) },
        {
          guestCluster: 1,
          kind: "subclusters",
          alloc: SUB(0x0000_00ff),
          zero: SUB(0xff00_0000),
          data: pattern(16384, 2),
        },
        { guestCluster: 2, kind: "subclusters", alloc: 0, zero: SUB(0x0f0f_0f0f) },
        { guestCluster: 3, kind: "subclusters", alloc: 0, zero: 0, host: true, data: pattern(16384, 3) },
        { guestCluster: 4, kind: "zero" },
        { guestCluster: 5, kind: "zero-alloc" },
        { guestCluster: 6, kind: "compressed", data: pattern(16384, 4) },
      ],
    },
  },
  {
    name: "snapshots: one with its own tables, one sharing the active layer's",
    spec: {
      size: 64 * 512,
      clusterBits: 9,
      clusters: [
        { guestCluster: 0, kind: "data", data: pattern(512, 1) },
        { guestCluster: 1, kind: "compressed", data: pattern(512, 2) },
        { guestCluster: 2, kind: "zero-alloc" },
      ],
      snapshots: [
        { id: "1", name: "own", size: 32 * 512, clusters: [{ guestCluster: 3, kind: "data", data: pattern(512, 9) }] },
        { id: "2", name: "shared", shareActive: true },
      ],
    },
  },
];

for (const c of cases) {
  test(`builder: qemu-img check is clean and convert reads the expected bytes (${c.name})`, async () => {
    const img = buildImage(c.spec);
    await withTempDir((dir) => {
      writeFiles(dir, { "t.qcow2": img.bytes });
      const check = qemuImg(["check", "-f", "qcow2", "t.qcow2"], dir);
      assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
      assert.match(check.stdout, /No errors were found on the image\./);
      const conv = qemuImg(["convert", "-f", "qcow2", "-O", "raw", "t.qcow2", "t.raw"], dir);
      assert.equal(conv.code, 0, conv.stderr);
      assert.deepEqual(readFileSync(join(dir, "t.raw")), Buffer.from(img.expected()));
      (c.spec.snapshots ?? []).forEach((s, i) => {
        const out = `s${i}.raw`;
        const r = qemuImg(["convert", "-f", "qcow2", "-O", "raw", "-l", `snapshot.id=${s.id}`, "t.qcow2", out], dir);
        assert.equal(r.code, 0, r.stderr);
        assert.deepEqual(readFileSync(join(dir, out)), Buffer.from(img.expectedSnapshot(i)));
      });
    });
  });
}

test("builder: a backing chain (qcow2 over qcow2 over raw) checks clean and reads through", async () => {
  const cs = 16384;
  const raw = pattern(5 * cs + 100, 40); // shorter than the layers above it
  // 512-byte clusters leave no room for the feature-name table next to the backing file name.
  const mid = buildImage({
    size: 7 * cs,
    clusterBits: 9,
    backingFile: "base.raw",
    backingFormat: "raw",
    clusters: [{ guestCluster: 33, kind: "data", data: pattern(512, 41) }],
  });
  const top = buildImage({
    size: 8 * cs,
    clusterBits: 14,
    extendedL2: true,
    backingFile: "mid.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 0, kind: "subclusters", alloc: 0x0000_ffff, zero: 0, data: pattern(cs, 42) },
      { guestCluster: 2, kind: "zero" },
    ],
  });
  await withTempDir((dir) => {
    writeFiles(dir, { "base.raw": raw, "mid.qcow2": mid.bytes, "top.qcow2": top.bytes });
    for (const f of ["mid.qcow2", "top.qcow2"]) {
      const check = qemuImg(["check", "-f", "qcow2", f], dir);
      assert.equal(check.code, 0, `qemu-img check ${f}: ${check.stdout}${check.stderr}`);
    }
    const conv = qemuImg(["convert", "-f", "qcow2", "-O", "raw", "top.qcow2", "t.raw"], dir);
    assert.equal(conv.code, 0, conv.stderr);
    assert.deepEqual(readFileSync(join(dir, "t.raw")), Buffer.from(top.expected(mid.expected(raw))));
  });
});

test("builder: two compressed clusters are packed into one sector, as QEMU packs them", () => {
  const img = buildImage({
    size: 4 * 65536,
    clusters: [
      { guestCluster: 0, kind: "compressed", data: pattern(65536, 1) },
      { guestCluster: 1, kind: "compressed", data: pattern(65536, 2) },
    ],
  });
  const a = img.active.compressed.get(0);
  const b = img.active.compressed.get(1);
  assert.ok(a && b);
  assert.equal(b.offset, a.offset + a.size);
  assert.equal(Math.floor(b.offset / 512), Math.floor((a.offset + a.size - 1) / 512), "the two share a sector");
  assert.equal(img.refcounts[a.offset / 65536], 2, "both reference the host cluster they share");
});
