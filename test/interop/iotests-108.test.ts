/**
 * qemu-iotests 108 (repairing images whose refcount structures cannot be used): the same
 * damage, the same findings and repair report as qemu-img, and the data intact after it.
 *
 * The refcount blocks "beyond the image end" (108's third group) are damage case `rbout` of
 * check.test.ts, where qcowkit deliberately rebuilds instead of growing the file as QEMU does;
 * not repeated here. Not reproduced: the rebuild on a block device through QMP (QEMU runtime).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import { assertSameCheck, makeImage, peek, poke, qemuCheckCode } from "./iotests-util.js";
import { qemuIoOk, requireTool, useTempDir } from "./util.js";

const tmp = useTempDir("iotests-108");

describe("qemu-iotests 108: repairing broken refcount structures", () => {
  before(() => {
    requireTool("qemu-img");
    requireTool("qemu-io");
  });

  test("an image without any refcount table: refused on open, rebuilt by check -r all", async () => {
    const dir = await tmp.caseDir("no-reftable");
    const src = path.join(dir, "src.qcow2");
    await makeImage(src);
    await qemuIoOk(src, ["write -P 42 0 64k"]);
    await poke(src, 0x30, "0000000000000000");
    await poke(src, 0x38, "00000000");
    await assertSameCheck(src, path.join(dir, "ro"), [], { code: 2 });
    const r = await assertSameCheck(src, path.join(dir, "rw"), ["-r", "all"], { code: 0 });
    const fixed = path.join(r.kdir, "img.qcow2");
    assert.equal(await qemuCheckCode(fixed), 0);
    await qemuIoOk(fixed, ["read -P 42 0 64k"]);
  });

  test("an unreferenced data cluster in the area of a new refcount block", async () => {
    const dir = await tmp.caseDir("new-refblock-area");
    const src = path.join(dir, "src.qcow2");
    await makeImage(src, "64M", "cluster_size=512");
    await qemuIoOk(src, ["write 0 0x1b200"]);
    assert.equal((await fs.stat(src)).size, 0x20000, "fixture: the first refcount block's area is full");
    await poke(src, 0x1ccc8, "8000000000020000");
    await fs.truncate(src, 0x20200);
    await qemuIoOk(src, ["write -P 42 128k 512"], { format: "raw" });
    await qemuIoOk(src, ["read -P 42 0x1b200 512"]);
    const r = await assertSameCheck(src, dir, ["-r", "all"], { code: 0 });
    assert.match(r.k.stderr, /^ERROR cluster 256 refcount=0 reference=1$/m);
    // The new refcount block must not land on the unreferenced data cluster.
    await qemuIoOk(path.join(r.kdir, "img.qcow2"), ["read -P 42 0x1b200 512"]);
  });

  test("the rebuilt refcount structure does not grow the image file", async () => {
    const dir = await tmp.caseDir("no-growth");
    const src = path.join(dir, "src.qcow2");
    await makeImage(src, "1M", "cluster_size=512");
    await qemuIoOk(src, ["write 0 64k"]);
    await fs.truncate(src, (await fs.stat(src)).size + 256 * 1024);
    const rb = await peek(src, await peek(src, 48, 8), 8);
    await poke(src, rb, "0000"); // the header cluster's refcount: 0
    const size = (await fs.stat(src)).size;
    const r = await assertSameCheck(src, dir, ["-r", "all"], { code: 0 });
    assert.equal((await fs.stat(path.join(r.kdir, "img.qcow2"))).size, size, "image size changed");
  });
});
