/**
 * I/O buffers start on a memory page where the native addon can tell where they lie (as QEMU's
 * qemu_blockalign buffers do: the kernel copies to and from them faster), and are plain buffers
 * where it cannot.
 */
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";
import { ioBuffer, setPageOffsetProbe } from "../../src/io/buffer.js";
import "../../src/io/file.js"; // installs the addon's probe

const addon = createRequire(import.meta.url)("../../../build/Release/qcowkit_seek.node") as {
  pageOffset(b: Uint8Array): number;
};

test("ioBuffer: large buffers start on a page, are zero-filled and exactly as long as asked", () => {
  for (const size of [4096, 65536, 2 * 1024 * 1024, 2 * 1024 * 1024 + 512, 123457]) {
    for (let i = 0; i < 3; i++) {
      const b = ioBuffer(size);
      assert.equal(b.length, size);
      assert.equal(addon.pageOffset(b), 0, `${size}: starts ${addon.pageOffset(b)} bytes into a page`);
      assert.ok(b.every((x) => x === 0));
      // Writing all of it stays inside its own bytes.
      b.fill(0xa5);
      assert.equal(b[size - 1], 0xa5);
    }
  }
});

test("ioBuffer: the addon's pageOffset tells where a view starts", () => {
  const b = ioBuffer(8192);
  assert.equal(addon.pageOffset(b.subarray(100)), 100);
  assert.equal(addon.pageOffset(b.subarray(4096)), 0);
  assert.throws(() => addon.pageOffset(new Uint16Array(4) as unknown as Uint8Array), /pageOffset\(Uint8Array\)/);
});

test("ioBuffer: without a probe (browsers), a plain buffer of the size", () => {
  setPageOffsetProbe(undefined);
  try {
    const b = ioBuffer(2 * 1024 * 1024);
    assert.equal(b.byteOffset, 0);
    assert.equal(b.buffer.byteLength, 2 * 1024 * 1024);
  } finally {
    setPageOffsetProbe(addon.pageOffset);
  }
  assert.equal(addon.pageOffset(ioBuffer(65536)), 0);
});

test("ioBuffer: small buffers are plain", () => {
  const b = ioBuffer(512);
  assert.equal(b.length, 512);
  assert.equal(b.byteOffset, 0);
});
