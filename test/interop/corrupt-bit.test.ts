/**
 * An inconsistency found while writing sets the corrupt bit (as QEMU's
 * qcow2_signal_corruption does) and refuses further writes; QEMU then sees `corrupt: true`.
 */
import assert from "node:assert/strict";
import { open } from "node:fs/promises";
import { before, test } from "node:test";
import { QcowError } from "../../src/errors.js";
import { openImageFile } from "../../src/node.js";
import { qemuImgOk, qemuIoOk, requireTool, useTempDir } from "./util.js";

const tmp = useTempDir("corrupt-bit");
before(() => requireTool("qemu-img"));

test("a write that meets an L2 entry with reserved bits marks the image corrupt", async () => {
  const file = tmp.file("img.qcow2");
  await qemuImgOk(["create", "-q", "-f", "qcow2", file, "4M"]);
  await qemuIoOk(file, ["write -P 1 0 128k"]);
  // The L2 table is the cluster after the L1 table; set reserved bit 1 in its second entry.
  const info = JSON.parse((await qemuImgOk(["map", "--output=json", file])).stdout);
  assert.equal(info[0].offset, 0x50000, "layout assumed by the test: data right after the L2 table at 0x40000");
  const fh = await open(file, "r+");
  const entry = Buffer.alloc(8);
  await fh.read(entry, 0, 8, 0x40000 + 8);
  entry[7] |= 0x02;
  await fh.write(entry, 0, 8, 0x40000 + 8);
  await fh.close();

  const img = await openImageFile(file, { readOnly: false });
  await assert.rejects(img.write(new Uint8Array(512).fill(2), 65536 + 512), (e: unknown) => {
    assert.ok(e instanceof QcowError && e.code === "corrupt" && /reserved bits/.test(e.message), String(e));
    return true;
  });
  await assert.rejects(img.write(new Uint8Array(512), 2 << 20), /corrupt; further writes refused/);
  await img.close();

  const data = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout)["format-specific"].data;
  assert.equal(data.corrupt, true);
  await assert.rejects(openImageFile(file, { readOnly: false }), /corrupt; cannot be opened read\/write/);
  // Still readable, as QEMU allows.
  const ro = await openImageFile(file);
  const buf = new Uint8Array(512);
  await ro.read(buf, 0);
  assert.equal(buf[0], 1);
  await ro.close();
});
