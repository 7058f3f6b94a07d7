/**
 * The browser codecs (fflate inflate, zstd through WebAssembly) read QEMU's compressed clusters —
 * with the unrelated bytes QEMU leaves after each stream — exactly as qemu-img converts them to
 * raw. Run here in Node; test/browser runs the same codecs inside Chromium.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import { browserCodecs } from "../../src/codec/browser.js";
import { nodeZstd } from "../../src/codec/node.js";
import { zstdFrameAt } from "../../src/codec/zstd-frame.js";
import { QcowError } from "../../src/errors.js";
import { openImageFile } from "../../src/node.js";
import { qemuImgOk, seededBytes, sizes, useTempDir, writeSparseRaw } from "./util.js";

const { KiB, MiB } = sizes;

describe("browser codecs on QEMU's compressed images", () => {
  const tmp = useTempDir("browser-codecs");

  for (const [type, clusterSize] of [
    ["zlib", 64 * KiB],
    ["zlib", 2 * MiB],
    ["zstd", 64 * KiB],
    ["zstd", 2 * MiB],
    ["zlib", 4 * KiB],
  ] as const) {
    test(`${type}, ${clusterSize / KiB}k clusters: every byte as qemu-img convert -O raw`, async () => {
      const dir = await tmp.caseDir(`${type}-${clusterSize}`);
      const raw = path.join(dir, "src.raw");
      // Text-like data (compressible), random data (stored uncompressed), zeros and holes.
      const text = Buffer.from("qcowkit in the browser reads compressed clusters. ".repeat(100_000));
      await writeSparseRaw(raw, 16 * MiB, [
        [0, text.subarray(0, 3 * MiB)],
        [5 * MiB + 4096, seededBytes(7, MiB)],
        [9 * MiB, text.subarray(100, 100 + 2 * MiB + 12345)],
      ]);
      const img = path.join(dir, "c.qcow2");
      await qemuImgOk([
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        `compression_type=${type},cluster_size=${clusterSize}`,
        raw,
        img,
      ]);
      const expected = path.join(dir, "expected.raw");
      await qemuImgOk(["convert", "-q", "-O", "raw", img, expected]);
      const image = await openImageFile(img, { codecs: browserCodecs() });
      try {
        const got = new Uint8Array(image.size);
        await image.read(got, 0);
        assert.ok(Buffer.from(got).equals(await readFile(expected)), "guest bytes differ from qemu-img's");
      } finally {
        await image.close();
      }
    });
  }

  test("zstd: frames followed by junk, several frames, skippable frames", async () => {
    const zstd = browserCodecs().zstd;
    assert.ok(zstd);
    const a = seededBytes(1, 3000);
    const b = Buffer.from("abc".repeat(2000));
    const fa = (await zstd.compress?.(Buffer.concat([a, a]))) as Uint8Array;
    const fb = (await zstd.compress?.(b)) as Uint8Array;
    assert.ok(fa && fb);
    assert.equal(zstdFrameAt(fa, 0).length, fa.length);
    assert.equal(zstdFrameAt(fa, 0).contentSize, 6000);
    const skippable = Buffer.from([0x5a, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
    const junk = seededBytes(3, 500);
    const src = Buffer.concat([fa, skippable, fb, junk]);
    const dst = new Uint8Array(12000);
    await zstd.decompress(src, dst);
    assert.ok(Buffer.from(dst).equals(Buffer.concat([a, a, b])));
    // The native codec agrees on the same bytes.
    const native = new Uint8Array(12000);
    await nodeZstd.decompress(src, native);
    assert.deepEqual(native, dst);
    // Too small a cluster for what a frame declares, or a frame cut short: corrupt, not a crash.
    await assert.rejects(
      zstd.decompress(src, new Uint8Array(5000)),
      (e) => e instanceof QcowError && e.code === "corrupt",
    );
    await assert.rejects(
      zstd.decompress(fa.subarray(0, fa.length - 5), new Uint8Array(6000)),
      (e) => e instanceof QcowError && /cut short/.test(e.message),
    );
    await assert.rejects(zstd.decompress(junk, new Uint8Array(100)), /No zstd frame/);
  });

  test("zlib: garbage is a corrupt error", async () => {
    const zlib = browserCodecs().zlib;
    assert.ok(zlib);
    await assert.rejects(
      zlib.decompress(seededBytes(9, 1000), new Uint8Array(65536)),
      (e) => e instanceof QcowError && e.code === "corrupt",
    );
  });
});
