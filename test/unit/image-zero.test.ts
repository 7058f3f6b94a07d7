/** isZero: bulk zero detection, on subarrays at every alignment; Node's memcmp path and the portable loop. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { isZeroPortable, isZero as nodeIsZero } from "../../src/image/zero.js";

for (const [name, isZero] of [
  ["isZero", nodeIsZero],
  ["isZeroPortable", isZeroPortable],
] as const) {
  test(`${name}: empty and all-zero buffers`, () => {
    assert.equal(isZero(new Uint8Array(0)), true);
    assert.equal(isZero(new Uint8Array(1)), true);
    assert.equal(isZero(new Uint8Array(1024 * 1024)), true);
  });

  test(`${name}: a non-zero byte anywhere, in subarrays at every offset and length`, () => {
    const backing = new Uint8Array(64);
    for (let start = 0; start < 9; start++) {
      for (let length = 0; length <= 40; length++) {
        const sub = backing.subarray(start, start + length);
        assert.equal(isZero(sub), true, `zeros at ${start}+${length}`);
        for (let i = 0; i < length; i++) {
          backing[start + i] = 0x80;
          assert.equal(isZero(sub), false, `byte ${i} of ${start}+${length}`);
          backing[start + i] = 0;
        }
      }
    }
  });

  test(`${name}: non-zero bytes just outside the subarray are not seen`, () => {
    const backing = new Uint8Array(32).fill(0xff);
    backing.fill(0, 3, 26);
    for (let start = 3; start < 26; start++) {
      for (let end = start; end <= 26; end++)
        assert.equal(isZero(backing.subarray(start, end)), true, `${start}..${end}`);
    }
    assert.equal(isZero(backing.subarray(2, 26)), false);
    assert.equal(isZero(backing.subarray(3, 27)), false);
  });

  test(`${name}: a subarray of a buffer whose own offset is unaligned`, () => {
    const base = new Uint8Array(new ArrayBuffer(4096), 1, 4000);
    assert.equal(isZero(base.subarray(2, 3999)), true);
    base[3998] = 1;
    assert.equal(isZero(base.subarray(2, 3999)), false);
    assert.equal(isZero(base.subarray(2, 3998)), true);
  });

  test(`${name}: buffers longer than the 64 KiB block of zeros compared against`, () => {
    const big = new Uint8Array(200 * 1024 + 3);
    assert.equal(isZero(big), true);
    for (const at of [65535, 65536, 131072 + 5, big.length - 1]) {
      big[at] = 7;
      assert.equal(isZero(big), false, `byte ${at}`);
      assert.equal(isZero(big.subarray(at + 1)), true, `after byte ${at}`);
      big[at] = 0;
    }
  });
}
