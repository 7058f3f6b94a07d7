/**
 * Internal snapshots: the snapshot table in info, and convert -l snapshot.name=NAME / -s NAME must
 * read each snapshot's L1 table as qemu-img does.
 */
import * as path from "node:path";
import { describe, test } from "node:test";
import { assertAllMatch, qemuImgOk, qemuIoOk, useTempDir } from "./util.js";

describe("internal snapshots", () => {
  const tmp = useTempDir("snapshots");

  const caseDir = tmp.caseDir;

  /**
   * For each snapshot: -l snapshot.name=NAME, qemu-img's -l NAME shorthand, and -s NAME (which
   * qemu-img 7.2 no longer accepts: its output is compared with qemu-img's -l snapshot.name=NAME).
   */
  const variants = (...names: string[]) =>
    names.flatMap((n) => [
      { qemu: ["-l", `snapshot.name=${n}`] },
      { qemu: ["-l", n] },
      { qemu: ["-l", `snapshot.name=${n}`], qcowkit: ["-s", n] },
    ]);

  test("two snapshots, writes, zero writes and discards between and after them", async (t) => {
    const dir = await caseDir("two");
    const img = path.join(dir, "snap.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "4M"]);
    await qemuIoOk(img, ["write -P 0xa1 0 1M", "write -P 0xa2 3M 5000"]);
    await qemuImgOk(["snapshot", "-c", "first", img]);
    await qemuIoOk(img, ["write -P 0xb1 512k 1M", "write -z 3M 64k", "write -P 0xb2 2M 100"]);
    await qemuImgOk(["snapshot", "-c", "second", img]);
    await qemuIoOk(img, ["discard 0 256k", "write -P 0xc1 1000 10", "write -z 2M 64k"]);
    await assertAllMatch(t, img, { dir, convertVariants: variants("first", "second") });
  });

  test("snapshot of a smaller disk, image grown after it", async (t) => {
    const dir = await caseDir("resized");
    const img = path.join(dir, "grown.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "2M"]);
    await qemuIoOk(img, ["write -P 0xd1 0 2M"]);
    await qemuImgOk(["snapshot", "-c", "small", img]);
    await qemuImgOk(["resize", "-q", img, "6M"]);
    await qemuIoOk(img, ["write -P 0xd2 5M 64k", "write -P 0xd3 100 100"]);
    await assertAllMatch(t, img, { dir, convertVariants: variants("small") });
  });

  test("snapshots in a v2 image (compat=0.10) with 4k clusters", async (t) => {
    const dir = await caseDir("v2");
    const img = path.join(dir, "v2.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", img, "2M"]);
    await qemuIoOk(img, ["write -P 0xe1 0 100k"]);
    await qemuImgOk(["snapshot", "-c", "old", img]);
    await qemuIoOk(img, ["write -P 0xe2 50k 100k"]);
    await qemuImgOk(["snapshot", "-c", "new", img]);
    await qemuImgOk(["snapshot", "-d", "old", img]);
    await qemuImgOk(["snapshot", "-c", "old", img]);
    await qemuIoOk(img, ["write -P 0xe3 1M 4k"]);
    await assertAllMatch(t, img, { dir, convertVariants: variants("new", "old") });
  });

  test("snapshot over a backing file", async (t) => {
    const dir = await caseDir("backing");
    const base = path.join(dir, "base.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", base, "2M"]);
    await qemuIoOk(base, ["write -P 0xf0 0 2M"]);
    const top = path.join(dir, "top.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top], { cwd: dir });
    await qemuIoOk(top, ["write -P 0xf1 64k 64k"]);
    await qemuImgOk(["snapshot", "-c", "s", top]);
    await qemuIoOk(top, ["write -z 0 1M", "write -P 0xf2 1M 4k"]);
    await assertAllMatch(t, top, { dir, backingChain: true, convertVariants: variants("s") });
  });
});
