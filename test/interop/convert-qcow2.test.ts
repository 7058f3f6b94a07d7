/**
 * `qcowkit convert -O qcow2` against `qemu-img convert -O qcow2`: from the same raw source, the
 * two output files must be the same, byte for byte. qemu-img lays a new image out in guest
 * order with each L2 table just before the first data it maps; so must qcowkit (the host
 * layout shows in `qemu-img map` and in check's fragmentation figure).
 *
 * With small clusters the image outgrows its first refcount blocks: each new one must sit where
 * QEMU puts it (after the allocation that reached its range). Only a refcount table that must
 * grow is laid out differently (not reached here: 64 KiB clusters grow it past 16 TiB).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertCleanExit,
  assertSameFile,
  qcowkit,
  qemuImg,
  qemuImgOk,
  seededBytes,
  sizes,
  useTempDir,
  writeSparseRaw,
} from "./util.js";

const { KiB, MiB } = sizes;

/** A raw disk with holes, data runs across L2-table spans, and all-zero blocks inside data. */
async function makeSource(file: string, size: number): Promise<void> {
  const zeroInData = seededBytes(3, 300 * KiB);
  zeroInData.fill(0, 64 * KiB, 192 * KiB);
  await writeSparseRaw(file, size, [
    [0, seededBytes(1, 70 * KiB)],
    [512 * KiB - 4096, seededBytes(2, 9000)],
    [MiB + 100, zeroInData],
    [2 * MiB - 512, seededBytes(4, 3 * MiB)],
    [size - 5000, seededBytes(5, 5000)],
  ]);
}

const CASES: { name: string; options: string[] }[] = [
  { name: "default options (64 KiB clusters)", options: [] },
  { name: "4 KiB clusters (an L2 table maps 2 MiB)", options: ["-o", "cluster_size=4k"] },
  { name: "2 KiB clusters (a refcount block covers 2 MiB)", options: ["-o", "cluster_size=2k"] },
  { name: "512-byte clusters (a refcount block covers 128 KiB)", options: ["-o", "cluster_size=512"] },
  {
    name: "8 KiB clusters, zstd, 64-bit refcounts",
    options: ["-o", "cluster_size=8k,compression_type=zstd,refcount_bits=64"],
  },
  { name: "lazy refcounts, 16 KiB clusters", options: ["-o", "cluster_size=16k,lazy_refcounts=on"] },
  { name: "compat=0.10", options: ["-o", "compat=0.10,cluster_size=16k"] },
];

describe("convert -O qcow2 writes the file qemu-img writes", () => {
  const tmp = useTempDir("convert-qcow2");
  for (const c of CASES) {
    test(c.name, async () => {
      const dir = tmp.file(c.name.replace(/[^a-z0-9]+/gi, "-"));
      await fs.mkdir(dir);
      const src = path.join(dir, "src.raw");
      await makeSource(src, 9 * MiB);
      const expected = path.join(dir, "qemu.qcow2");
      const actual = path.join(dir, "qcowkit.qcow2");
      await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", ...c.options, src, expected]);
      const r = await qcowkit(["convert", "-f", "raw", "-O", "qcow2", ...c.options, src, actual]);
      assertCleanExit(r, 0, `qcowkit convert ${c.options.join(" ")}`);
      const [qm, km] = await Promise.all([qemuImg(["map", expected]), qemuImg(["map", actual])]);
      assert.equal(km.stdout.replaceAll("qcowkit.qcow2", "X"), qm.stdout.replaceAll("qemu.qcow2", "X"), "qemu-img map");
      const [qc, kc] = await Promise.all([qemuImg(["check", expected]), qemuImg(["check", actual])]);
      assert.equal(kc.code, 0, `qemu-img check: ${kc.stdout}${kc.stderr}`);
      assert.equal(kc.stdout, qc.stdout, "qemu-img check (allocation and fragmentation figures)");
      await assertSameFile(expected, actual, "qemu-img's output");
    });
  }
});
