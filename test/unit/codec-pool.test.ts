/**
 * CompressionPool (convert -c): clusters compressed on worker threads come back intact, one
 * result per cluster, undefined where a cluster does not shrink or is not whole; buffers travel
 * to the workers and back and are reused, so results stay valid until released even with many
 * chunks in flight.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeZlib, nodeZstd } from "../../src/codec/node.js";
import { CompressionPool } from "../../src/codec/pool.js";
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
  test(`CompressionPool (${type}): each cluster compresses to what decompresses back to it`, async () => {
    const pool = new CompressionPool(type, 2);
    const codec = type === "zlib" ? nodeZlib : nodeZstd;
    try {
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
    } finally {
      await pool.close();
    }
  });
}
