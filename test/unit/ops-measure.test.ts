/**
 * measure: the figures of qemu-img 7.2 (the expected numbers below are its output) for empty
 * images of many sizes and options, for sources whose clusters are data, zero, compressed or
 * unallocated (counted per target cluster), and its refusals in its order.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { measure, qcow2PreallocSize } from "../../src/ops/measure.js";
import { buildImage, MapOpener, pattern } from "./build-image.js";

const G = 1024n ** 3n;
const CS = 4096;

test("measure --size: qemu-img's figures for qcow2 and raw targets", async () => {
  // [options, required, fully allocated] as qemu-img 7.2 prints them.
  const cases: [Parameters<typeof measure>[0], bigint, bigint][] = [
    [{ format: "qcow2", size: G }, 393216n, 1074135040n],
    [{ format: "qcow2", size: 0n }, 196608n, 196608n],
    [{ format: "qcow2", size: G, clusterSize: 512, refcountBits: 1 }, 17311232n, 1091053056n],
    [{ format: "qcow2", size: G, extendedL2: true }, 524288n, 1074266112n],
    [{ format: "qcow2", size: G, preallocation: "full" }, 1074135040n, 1074135040n],
    [{ format: "qcow2", size: G, preallocation: "falloc" }, 1074135040n, 1074135040n],
    [{ format: "qcow2", size: G, preallocation: "metadata" }, 393216n, 1074135040n],
    [{ format: "qcow2", size: G, compat: "0.10" }, 393216n, 1074135040n],
    [{ format: "qcow2", size: G, clusterSize: 16384, extendedL2: true }, 1245184n, 1074987008n],
    [{ format: "qcow2", size: G, clusterSize: 4096 }, 2637824n, 1076379648n],
    [{ format: "qcow2", size: 2n * 1024n ** 5n, clusterSize: 2 * 1024 * 1024 }, 10745806848n, 2251810559492096n],
    [{ format: "raw", size: G }, G, G],
    [{ format: "raw", size: 1000n }, 1024n, 1024n],
  ];
  for (const [opts, required, fully] of cases) {
    const info = await measure(opts);
    assert.equal(
      info.required,
      required,
      `required size for ${JSON.stringify(opts, (_, v) => (typeof v === "bigint" ? `${v}` : v))}`,
    );
    assert.equal(info.fullyAllocated, fully, "fully allocated size");
    assert.equal(info.bitmaps, undefined, "no bitmaps line without a source");
  }
});

test("measure: sizes past 2^53 are exact", async () => {
  const size = 2n ** 61n;
  const info = await measure({ format: "qcow2", size, clusterSize: 2 * 1024 * 1024 });
  assert.equal(info.fullyAllocated, qcow2PreallocSize(size, 2n * 1024n * 1024n, 4, false));
  assert.ok(info.fullyAllocated > size && info.fullyAllocated % 512n === 0n);
  await assert.rejects(
    measure({ format: "qcow2", size: size * 2n, clusterSize: 2 * 1024 * 1024 }),
    /image size is too large/,
  );
});

test("measure: refusals with qemu-img's messages, in its order", async () => {
  const cases: [Parameters<typeof measure>[0], RegExp][] = [
    [{ format: "qcow2", clusterSize: 1000 }, /^Cluster size must be a power of two between 512 and 2048k$/],
    [{ format: "qcow2", clusterSize: 4 * 1024 * 1024, compat: "9" }, /^Cluster size must be/],
    [
      { format: "qcow2", clusterSize: 4096, extendedL2: true },
      /^Extended L2 entries are only supported with cluster sizes of at least 16384 bytes$/,
    ],
    [{ format: "qcow2", compat: "v3", refcountBits: 3 }, /^Invalid compatibility level: 'v3'$/],
    [{ format: "qcow2", refcountBits: 3 }, /^Refcount width must be a power of two and may not exceed 64 bits$/],
    [{ format: "qcow2", refcountBits: 128 }, /^Refcount width must be/],
    [
      { format: "qcow2", compat: "0.10", refcountBits: 8 },
      /^Different refcount widths than 16 bits require compatibility level 1.1 or above \(use compat=1.1 or greater\)$/,
    ],
    [{ format: "qcow2", preallocation: "bad" }, /^invalid parameter value: bad$/],
    [{ format: "qcow2", size: 2n ** 62n }, /^The image size is too large \(try using a larger cluster size\)$/],
  ];
  for (const [opts, message] of cases) {
    await assert.rejects(measure(opts), (e: unknown) => e instanceof QcowError && message.test(e.message));
  }
});

function source() {
  return buildImage({
    size: 64 * CS,
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 3, kind: "zero-alloc", data: pattern(CS, 2) },
      { guestCluster: 17, kind: "data", data: new Uint8Array(CS) }, // allocated zeros still count
      { guestCluster: 20, kind: "compressed", data: pattern(CS, 3) },
      { guestCluster: 63, kind: "data", data: pattern(CS, 4) },
    ],
  });
}

test("measure FILE: data counts per target cluster, zero and unallocated clusters do not", async () => {
  const src = await Qcow2Image.open(source().storage("src.qcow2"), { codecs: nodeCodecs });
  const meta = (cs: bigint): bigint => qcow2PreallocSize(64n * 4096n, cs, 4, false) - 64n * 4096n;
  // 4 KiB target clusters: guest clusters 0, 17, 20 and 63.
  let info = await measure({ format: "qcow2", clusterSize: 4096 }, src);
  assert.equal(info.required, meta(4096n) + 4n * 4096n);
  // 16 KiB target clusters: 0-3 (data at 0), 16-19 (17), 20-23 (20), 60-63 (63).
  info = await measure({ format: "qcow2", clusterSize: 16384 }, src);
  assert.equal(info.required, meta(16384n) + 4n * 16384n);
  // 64 KiB: 0-15, 16-31, 48-63.
  info = await measure({ format: "qcow2" }, src);
  assert.equal(info.required, meta(65536n) + 3n * 65536n);
  assert.equal(info.fullyAllocated, qcow2PreallocSize(64n * 4096n, 65536n, 4, false));
  assert.equal(info.bitmaps, 0n, "a qcow2 v3 source has a bitmaps size, 0 without bitmaps");
  // With a backing file for the new image, every cluster counts.
  info = await measure({ format: "qcow2", backingFile: true }, src);
  assert.equal(info.required, info.fullyAllocated);
  // Raw: the virtual size, both figures.
  info = await measure({ format: "raw" }, src);
  assert.deepEqual(info, { required: 64n * 4096n, fullyAllocated: 64n * 4096n });
  // compat=0.10 targets have no bitmaps.
  info = await measure({ format: "qcow2", compat: "0.10" }, src);
  assert.equal(info.bitmaps, undefined);
});

test("measure FILE: data in the backing chain counts, a raw source's size is rounded to sectors", async () => {
  const base = buildImage({
    size: 64 * CS,
    clusterBits: 12,
    clusters: [{ guestCluster: 40, kind: "data", data: pattern(CS, 5) }],
  });
  const top = buildImage({
    size: 64 * CS,
    clusterBits: 12,
    backingFile: "base.qcow2",
    backingFormat: "qcow2",
    clusters: [
      { guestCluster: 2, kind: "data", data: pattern(CS, 6) },
      { guestCluster: 40, kind: "zero" }, // hides the base's data
      { guestCluster: 41, kind: "zero" },
    ],
  });
  const opener = new MapOpener(
    new Map([
      ["base.qcow2", base.bytes],
      ["top.qcow2", top.bytes],
    ]),
  );
  let img = await openImage("top.qcow2", { opener, codecs: nodeCodecs });
  const meta = qcow2PreallocSize(64n * 4096n, 4096n, 4, false) - 64n * 4096n;
  assert.equal((await measure({ format: "qcow2", clusterSize: 4096 }, img)).required, meta + 4096n);
  const top2 = buildImage({
    size: 64 * CS,
    clusterBits: 12,
    backingFile: "base.qcow2",
    backingFormat: "qcow2",
    clusters: [{ guestCluster: 2, kind: "data", data: pattern(CS, 6) }],
  });
  opener.files.set("top2.qcow2", top2.bytes);
  img = await openImage("top2.qcow2", { opener, codecs: nodeCodecs });
  assert.equal((await measure({ format: "qcow2", clusterSize: 4096 }, img)).required, meta + 2n * 4096n);

  const raw = await RawImage.open(new MemoryStorage(new Uint8Array(1000).fill(1)));
  const info = await measure({ format: "qcow2", clusterSize: 512 }, raw);
  assert.equal(info.required, qcow2PreallocSize(1024n, 512n, 4, false), "two data sectors");
  assert.equal(info.bitmaps, undefined, "a raw source has no bitmaps");
});
