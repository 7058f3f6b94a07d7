/**
 * imageInfo gives what qemu-img info --output=json gives for the same images (all but
 * actual-size, which in-memory storage does not have).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { openImage } from "../../src/image/open.js";
import { imageInfo } from "../../src/ops/info.js";
import { type BuiltImage, buildImage, MapOpener, pattern, qemuImg, withTempDir, writeFiles } from "./build-image.js";

function withFeatureBits(img: BuiltImage, incompatible: bigint, compatible = 0n): Uint8Array {
  const bytes = img.bytes.slice();
  const dv = new DataView(bytes.buffer);
  dv.setBigUint64(72, dv.getBigUint64(72) | incompatible);
  dv.setBigUint64(80, dv.getBigUint64(80) | compatible);
  return bytes;
}

/** JSON-equal form, without keys whose value is undefined. */
function plain(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v));
}

test("info: imageInfo matches qemu-img info --output=json", async () => {
  const base = buildImage({ size: 3 * 65536, version: 2, clusterBits: 12 });
  const top = buildImage({
    size: 5 * 65536,
    backingFile: "base.qcow2",
    backingFormat: "qcow2",
    clusters: [{ guestCluster: 0, kind: "data", data: pattern(65536, 1) }],
    snapshots: [
      {
        id: "1",
        name: "first",
        shareActive: true,
        dateSec: 1_600_000_000,
        dateNsec: 123,
        vmClockNsec: 3_723_456_789_012,
      },
      { id: "7", name: "second", clusters: [], size: 65536 },
    ],
  });
  const ext = buildImage({ size: 1 << 20, clusterBits: 17, extendedL2: true, refcountOrder: 6 });
  const small = buildImage({ size: 1024, clusterBits: 9, refcountOrder: 0 });
  const files: Record<string, Uint8Array> = {
    "base.qcow2": base.bytes,
    "top.qcow2": top.bytes,
    "ext.qcow2": ext.bytes,
    "small.qcow2": small.bytes,
    "dirty.qcow2": withFeatureBits(ext, 1n, 1n), // dirty, with lazy refcounts
    "corrupt.qcow2": withFeatureBits(small, 2n),
    "plain.raw": pattern(70000, 3),
  };
  const opener = new MapOpener(new Map(Object.entries(files)));
  const wrong: string[] = [];
  await withTempDir(async (dir) => {
    writeFiles(dir, files);
    for (const name of Object.keys(files)) {
      const r = qemuImg(["info", "--output=json", name], dir);
      assert.equal(r.code, 0, `${name}: ${r.stderr}`);
      const theirs = JSON.parse(r.stdout) as Record<string, unknown>;
      delete theirs["actual-size"];
      const ours = plain(await imageInfo(await openImage(name, { opener, codecs: nodeCodecs }))) as Record<
        string,
        unknown
      >;
      delete ours["actual-size"];
      try {
        assert.deepEqual(ours, theirs);
      } catch (e) {
        wrong.push(`${name}: ${(e as Error).message}`);
      }
    }
  });
  assert.deepEqual(wrong, []);
});

test("info: a virtual size that is not a multiple of 512 is rounded down, as QEMU does", async () => {
  // QEMU keeps the disk size in 512-byte sectors (bs->total_sectors = size / 512): qemu-img info
  // on an image whose header says 1000 bytes reports "virtual-size": 512, and reads 512 bytes.
  const img = buildImage({
    size: 1000,
    clusterBits: 9,
    clusters: [{ guestCluster: 0, kind: "data", data: pattern(512, 1) }],
  });
  await withTempDir(async (dir) => {
    writeFiles(dir, { "odd.qcow2": img.bytes });
    const r = qemuImg(["info", "--output=json", "odd.qcow2"], dir);
    assert.equal((JSON.parse(r.stdout) as { "virtual-size": number })["virtual-size"], 512);
  });
  const opened = await openImage("odd.qcow2", { opener: new MapOpener(new Map([["odd.qcow2", img.bytes]])) });
  assert.equal(opened.size, 512);
  assert.equal((await imageInfo(opened))["virtual-size"], 512);
});
