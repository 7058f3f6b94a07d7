/** Big-endian field helpers shared by the format codecs. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { QcowError } from "../../src/errors.js";
import { getU64, setU64, view } from "../../src/format/bytes.js";

test("view: respects the byte offset of a subarray", () => {
  const buf = Uint8Array.of(0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78);
  assert.equal(view(buf.subarray(4)).getUint32(0), 0x1234_5678);
  assert.equal(view(buf.subarray(4, 6)).byteLength, 2);
});

test("getU64: big-endian, exact up to 2^53 - 1", () => {
  const dv = view(
    Uint8Array.of(0x00, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02),
  );
  assert.equal(getU64(dv, 0, "f"), Number.MAX_SAFE_INTEGER);
  assert.equal(getU64(dv, 8, "f"), 0x1_0000_0002);
});

test("getU64: 2^53 and above are refused, naming the field and its offset", () => {
  for (const v of [2n ** 53n, 2n ** 63n, 2n ** 64n - 1n]) {
    const buf = new Uint8Array(16);
    new DataView(buf.buffer).setBigUint64(8, v);
    assert.throws(
      () => getU64(view(buf), 8, "header field size"),
      (e: unknown) =>
        e instanceof QcowError &&
        e.code === "corrupt" &&
        e.message === `header field size at 0x8 is too large (0x${v.toString(16)})`,
    );
  }
});

test("setU64: writes both halves big-endian", () => {
  const buf = new Uint8Array(8);
  setU64(view(buf), 0, 0x1f_1234_5678_9abc);
  assert.deepEqual(Array.from(buf), [0x00, 0x1f, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
  for (const v of [0, 1, 0xffff_ffff, 0x1_0000_0000, Number.MAX_SAFE_INTEGER]) {
    setU64(view(buf), 0, v);
    assert.equal(new DataView(buf.buffer).getBigUint64(0), BigInt(v));
  }
});
