/**
 * ClusterCompressor (convert -c): compressed clusters come back intact, one result per cluster,
 * undefined where a cluster does not shrink or is not whole; result buffers are reused, so
 * results stay valid until released even with many chunks in flight.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { constants, deflateRawSync } from "node:zlib";
import { ClusterCompressor } from "../../src/codec/compressor.js";
import { nativeZlib, nodeZlib, nodeZstd } from "../../src/codec/node.js";
import { noise, pattern } from "./build-image.js";

const CS = 65536;

/** A chunk: compressible clusters, one of noise (does not shrink), and maybe a partial tail. */
function chunk(seed: number, clusters: number, tail = 0): Uint8Array {
  const b = new Uint8Array(clusters * CS + tail);
  for (let i = 0; i < clusters; i++) b.set(i === 1 ? noise(CS, seed + i) : pattern(CS, seed + i), i * CS);
  if (tail > 0) b.set(pattern(tail, seed + 99), clusters * CS);
  return b;
}

for (const type of ["zlib", "zstd"] as const) {
  test(`ClusterCompressor (${type}): each cluster compresses to what decompresses back to it`, async () => {
    const pool = new ClusterCompressor(type, 2);
    const codec = type === "zlib" ? nodeZlib : nodeZstd;
    {
      const check = async (input: Uint8Array, got: (Uint8Array | undefined)[]) => {
        const whole = Math.floor(input.length / CS);
        assert.equal(got.length, Math.ceil(input.length / CS));
        for (let i = 0; i < got.length; i++) {
          const packed = got[i];
          if (i === 1 || i >= whole) {
            assert.equal(packed, undefined, `cluster ${i}: noise or partial, stored as it is`);
            continue;
          }
          assert.ok(packed && packed.length < CS, `cluster ${i} shrinks`);
          const out = new Uint8Array(CS);
          await codec.decompress(packed, out);
          assert.deepEqual(out, input.subarray(i * CS, (i + 1) * CS), `cluster ${i}`);
        }
      };
      // Many chunks in flight at once; each result checked before its buffers are released.
      const inputs = Array.from({ length: 12 }, (_, k) => chunk(k * 10, 8, k === 11 ? 1000 : 0));
      const results = await Promise.all(inputs.map((c) => pool.compress(c, CS)));
      for (let k = 0; k < inputs.length; k++) await check(inputs[k], results[k].clusters);
      for (const r of results) r.release();
      // Then one after another, reusing the released buffers: earlier results are not disturbed
      // until released.
      let held = await pool.compress(inputs[0], CS);
      for (let k = 1; k < inputs.length; k++) {
        const next = await pool.compress(inputs[k], CS);
        await check(inputs[k - 1], held.clusters);
        held.release();
        held = next;
      }
      await check(inputs[inputs.length - 1], held.clusters);
      held.release();
      // The caller's chunk is left as it was.
      assert.deepEqual(inputs[3], chunk(30, 8));
    }
  });
}

test("ClusterCompressor (zlib): chunks deflate on the thread pool, at most `threads` at once, as Node's zlib does", async () => {
  const native = nativeZlib();
  assert.ok(native, "the addon's zlib (build/Release/qcowkit_zlib.node) is built by npm install");
  const pool = new ClusterCompressor("zlib", 2);
  assert.equal(pool.threads, 2);
  assert.equal(new ClusterCompressor("zstd", 2).threads, 1, "zstd compresses on the calling thread");
  const original = native.deflateClusters;
  let inFlight = 0;
  let most = 0;
  native.deflateClusters = async (...args) => {
    most = Math.max(most, ++inFlight);
    try {
      return await original(...args);
    } finally {
      inFlight--;
    }
  };
  try {
    const inputs = Array.from({ length: 8 }, (_, k) => chunk(k * 7, 4));
    const results = await Promise.all(inputs.map((c) => pool.compress(c, CS)));
    assert.equal(most, 2, "two chunks on the pool at once, the others wait");
    for (let k = 0; k < inputs.length; k++) {
      for (let i = 0; i < 4; i++) {
        const cluster = inputs[k].subarray(i * CS, (i + 1) * CS);
        const expected = i === 1 ? undefined : deflateRawSync(cluster, { windowBits: 12, memLevel: 9, level: 6 });
        assert.deepEqual(results[k].clusters[i], expected && new Uint8Array(expected), `chunk ${k} cluster ${i}`);
      }
    }
  } finally {
    native.deflateClusters = original;
  }
});

test("nodeZlib (the addon's inflate): a cluster from a stream followed by other bytes, or cut short; errors for what is not deflate or too short", async () => {
  assert.ok(nativeZlib(), "the addon's zlib is built by npm install");
  const cluster = pattern(CS, 5);
  const stream = deflateRawSync(cluster, { windowBits: 12, memLevel: 9 });
  const out = new Uint8Array(CS);
  // QEMU hands over whole sectors: the stream, then whatever shares its last sector.
  await nodeZlib.decompress(new Uint8Array([...stream, ...noise(700, 3)]), out);
  assert.deepEqual(out, cluster);
  // A stream without its final block (Z_SYNC_FLUSH) still fills the cluster.
  const unfinished = deflateRawSync(cluster, { windowBits: 12, memLevel: 9, finishFlush: constants.Z_SYNC_FLUSH });
  out.fill(0);
  await nodeZlib.decompress(unfinished, out);
  assert.deepEqual(out, cluster);
  // BFINAL set, block type 3: reserved, never valid.
  await assert.rejects(nodeZlib.decompress(new Uint8Array([0x07, 0, 0, 0]), new Uint8Array(CS)), /does not inflate/);
  await assert.rejects(
    nodeZlib.decompress(deflateRawSync(cluster.subarray(0, 1000)), new Uint8Array(CS)),
    /inflates to 1000 bytes, expected 65536/,
  );
});
