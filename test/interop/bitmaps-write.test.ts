/**
 * Writes through qcowkit keep enabled persistent bitmaps in step: the bitmap QEMU reads back
 * (exported by qemu-nbd, listed by nbdinfo) equals the one QEMU itself keeps for the same writes.
 */
import assert from "node:assert/strict";
import { copyFile } from "node:fs/promises";
import { before, test } from "node:test";
import { openImageFile } from "../../src/node.js";
import { dirtyMap, qemuImgOk, qemuIoOk, requireTool, useTempDir } from "./util.js";

const tmp = useTempDir("bitmaps-write");

before(() => {
  for (const tool of ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) requireTool(tool);
});

test("an enabled bitmap records qcowkit's writes, zero writes and discards as QEMU's would", async () => {
  const base = tmp.file("base.qcow2");
  await qemuImgOk(["create", "-q", "-f", "qcow2", base, "64M"]);
  await qemuIoOk(base, ["write -P 1 0 1M"]);
  await qemuImgOk(["bitmap", "--add", base, "on"]);
  await qemuImgOk(["bitmap", "--add", "--disable", base, "off"]);
  await qemuImgOk(["bitmap", "--add", "-g", "4096", base, "fine"]);
  const ours = tmp.file("ours.qcow2");
  const theirs = tmp.file("theirs.qcow2");
  await copyFile(base, ours);
  await copyFile(base, theirs);

  const img = await openImageFile(ours, { readOnly: false });
  await img.write(new Uint8Array(70000).fill(7), 5 << 20);
  await img.writeZeroes(9 << 20, 1 << 20);
  await img.discard(20 << 20, 2 << 20);
  await img.write(new Uint8Array(100).fill(9), (40 << 20) + 12345);
  await img.close();
  await qemuIoOk(theirs, [
    "write -P 7 5M 70000",
    "write -z 9M 1M",
    "discard 20M 2M",
    `write -P 9 ${(40 << 20) + 12345} 100`,
  ]);

  const check = await qemuImgOk(["check", "--output=json", ours]);
  const result = JSON.parse(check.stdout);
  assert.equal(result.corruptions ?? 0, 0);
  assert.equal(result.leaks ?? 0, 0);
  for (const name of ["on", "off", "fine"]) {
    assert.equal(await dirtyMap(ours, name), await dirtyMap(theirs, name), `bitmap ${name}`);
  }
  const info = JSON.parse((await qemuImgOk(["info", "--output=json", ours])).stdout);
  const flags = info["format-specific"].data.bitmaps.map((b: { flags: string[] }) => b.flags.join(","));
  assert.deepEqual(flags, ["auto", "", "auto"], "no bitmap is left in use after a clean close");
});
