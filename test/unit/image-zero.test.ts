/** isZero: bulk zero detection, on subarrays at every alignment; Node's memcmp path and the portable loop. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { entriesInUse, isZeroPortable, isZero as nodeIsZero, sameBytes, zeroEntriesEnd } from "../../src/image/zero.js";

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

test("entriesInUse: the entries up to the last one with a byte set, for tables of every size", () => {
  for (const unit of [1, 2, 8]) {
    for (const entries of [0, 1, 3, 511, 512, 513, 8192, 8195]) {
      const table = new Uint8Array(entries * unit);
      assert.equal(entriesInUse(table, unit), 0, `empty, ${entries} x ${unit}`);
      for (const e of [0, 1, entries >> 1, 511, 512, 4095, entries - 1]) {
        if (e < 0 || e >= entries) continue;
        for (const byte of [0, unit - 1]) {
          table.fill(0);
          table[e * unit + byte] = 1;
          if (e > 2) table[unit] = 9; // an earlier entry in use does not change the answer
          assert.equal(entriesInUse(table, unit), e + 1, `entry ${e} byte ${byte}, ${entries} x ${unit}`);
        }
      }
    }
  }
});

test("sameBytes: equal and unequal contents, lengths and subarrays", () => {
  const a = new Uint8Array(70_000).map((_, i) => i * 7);
  const b = a.slice();
  assert.equal(sameBytes(a, b), true);
  assert.equal(sameBytes(a.subarray(5, 900), b.subarray(5, 900)), true);
  assert.equal(sameBytes(a.subarray(0, 10), b.subarray(0, 11)), false);
  b[69_999] ^= 1;
  assert.equal(sameBytes(a, b), false);
  assert.equal(sameBytes(a.subarray(0, 69_999), b.subarray(0, 69_999)), true);
  assert.equal(sameBytes(new Uint8Array(0), new Uint8Array(0)), true);
});

test("zeroEntriesEnd: the first entry with a byte set, from any start, in runs shorter and longer than its blocks", () => {
  for (const unit of [8, 16]) {
    const entries = 8192;
    const table = new Uint8Array(entries * unit + 8).subarray(8); // a view that does not start its buffer
    const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
    assert.equal(zeroEntriesEnd(dv, 0, entries, unit), entries, `empty, ${unit}`);
    assert.equal(zeroEntriesEnd(dv, 100, 4000, unit), 4000, `empty to end, ${unit}`);
    for (const e of [0, 1, 63, 64, 65, 127, 128, 129, 4095, 8191]) {
      for (const byte of [0, 3, unit - 1]) {
        table.fill(0);
        table[e * unit + byte] = 0x40;
        for (const from of [0, 1, 63, 64, 70]) {
          const want = from <= e ? e : entries;
          assert.equal(zeroEntriesEnd(dv, from, entries, unit), want, `entry ${e} byte ${byte} from ${from}, ${unit}`);
        }
        assert.equal(zeroEntriesEnd(dv, 0, e, unit), e, `stops at end ${e}, ${unit}`);
      }
    }
  }
});
