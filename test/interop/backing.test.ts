/**
 * Backing chains QEMU builds: reads fall through to the backing file, zero clusters and discards
 * in an overlay hide it, relative names resolve against the overlay's directory. info (with and
 * without --backing-chain), map and convert -O raw must match qemu-img's.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertAllMatch,
  EXT_BACKING_FORMAT,
  patchFile,
  qemuImgOk,
  qemuIoOk,
  readHeaderExtensions,
  seededBytes,
  sizes,
  useTempDir,
  writeSparseRaw,
} from "./util.js";

const { KiB, MiB } = sizes;

describe("backing chains", () => {
  const tmp = useTempDir("backing");

  const caseDir = tmp.caseDir;

  async function create(file: string, size: string | undefined, options: string[], cwd?: string): Promise<void> {
    const o = options.length > 0 ? ["-o", options.join(",")] : [];
    await qemuImgOk(["create", "-q", "-f", "qcow2", ...o, file, ...(size !== undefined ? [size] : [])], { cwd });
  }

  test("three-deep qcow2 chain with different data, cluster sizes and versions in each layer", async (t) => {
    const dir = await caseDir("three-deep");
    const base = path.join(dir, "base.qcow2");
    const mid = path.join(dir, "mid.qcow2");
    const top = path.join(dir, "top.qcow2");
    await create(base, "4M", ["compat=0.10", "cluster_size=512"]);
    await qemuIoOk(base, ["write -P 0x0b 0 4M"]);
    await create(mid, undefined, ["backing_file=base.qcow2", "backing_fmt=qcow2", "cluster_size=2M"], dir);
    await qemuIoOk(mid, ["write -P 0x1d 100000 50000", "write -z 1M 64k", "write -P 0x1e 3M 4096"]);
    await create(top, undefined, ["backing_file=mid.qcow2", "backing_fmt=qcow2"], dir);
    await qemuIoOk(top, [
      "write -P 0x70 120000 1000", // over mid's data
      "write -z 2M 128k", // zero cluster hiding base's data
      "discard 3M 64k", // discard with a backing file: reads zeros
      "write -P 0x71 4190000 4304", // the last bytes
      "write -z -u 65536 65536",
    ]);
    await assertAllMatch(t, top, { dir, backingChain: true });
  });

  test("relative backing names in subdirectories resolve against each overlay's directory", async (t) => {
    const dir = await caseDir("relative");
    await fs.mkdir(path.join(dir, "images/base"), { recursive: true });
    await fs.mkdir(path.join(dir, "images/layers"), { recursive: true });
    // images/base/base.qcow2 <- images/layers/mid.qcow2 ("../base/base.qcow2")
    //                        <- images/top.qcow2 ("layers/mid.qcow2")
    const imagesDir = path.join(dir, "images");
    await create("base/base.qcow2", "2M", [], imagesDir);
    await qemuIoOk(path.join(imagesDir, "base/base.qcow2"), ["write -P 0xb0 0 2M"]);
    await create("layers/mid.qcow2", undefined, ["backing_file=../base/base.qcow2", "backing_fmt=qcow2"], imagesDir);
    await qemuIoOk(path.join(imagesDir, "layers/mid.qcow2"), ["write -P 0xb1 64k 64k"]);
    await create("top.qcow2", undefined, ["backing_file=layers/mid.qcow2", "backing_fmt=qcow2"], imagesDir);
    await qemuIoOk(path.join(imagesDir, "top.qcow2"), ["write -P 0xb2 100000 100"]);
    // Run from the temp dir with a relative path ("images/top.qcow2"): neither the working directory
    // nor the top image's directory is where mid's backing file lives.
    await assertAllMatch(t, "images/top.qcow2", { dir, cwd: dir, backingChain: true });
  });

  test("raw backing file (-F raw)", async (t) => {
    const dir = await caseDir("raw-backing");
    const raw = path.join(dir, "base.raw");
    await writeSparseRaw(raw, 3 * MiB, [
      [0, seededBytes(30, 5000)],
      [MiB - 77, seededBytes(31, 200 * KiB)],
      [3 * MiB - 4096, seededBytes(32, 4096)],
    ]);
    const top = path.join(dir, "top.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top], { cwd: dir });
    await qemuIoOk(top, ["write -P 0xc1 1000 3000", "write -z 1M 64k", "discard 2M 64k"]);
    await assertAllMatch(t, top, { dir, backingChain: true });
  });

  test("backing file shorter than the overlay reads zeros past its end", async (t) => {
    const dir = await caseDir("short-backing");
    const base = path.join(dir, "base.qcow2");
    await create(base, "1M", []);
    await qemuIoOk(base, ["write -P 0xd0 0 1M"]);
    const top = path.join(dir, "top.qcow2");
    await create(top, "4M", ["backing_file=base.qcow2", "backing_fmt=qcow2"], dir);
    // A write that straddles the backing file's end: copy-on-write reads past it.
    await qemuIoOk(top, ["write -P 0xd1 1040000 20000", "write -P 0xd2 3M 100"]);
    await assertAllMatch(t, top, { dir, backingChain: true });
  });

  test("raw backing file whose size is not a multiple of 512", async (t) => {
    const dir = await caseDir("odd-raw-backing");
    const raw = path.join(dir, "odd.raw");
    await fs.writeFile(raw, seededBytes(33, 1_000_001));
    const top = path.join(dir, "top.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", top, "2M"], { cwd: dir });
    await qemuIoOk(top, ["write -P 0xd3 0 1000"]);
    await assertAllMatch(t, top, { dir, backingChain: true });
  });

  test("extended_l2=on overlay: subcluster writes, zero subclusters and discards over a backing file", async (t) => {
    const dir = await caseDir("extended-l2-backing");
    const base = path.join(dir, "base.qcow2");
    await create(base, "2M", []);
    await qemuIoOk(base, ["write -P 0xe0 0 2M"]);
    const top = path.join(dir, "top.qcow2");
    await create(top, undefined, ["backing_file=base.qcow2", "backing_fmt=qcow2", "extended_l2=on"], dir);
    await qemuIoOk(top, [
      "write -P 0xe1 4k 4k",
      "write -P 0xe2 20000 1000", // unaligned: copy-on-write within subclusters only
      "write -z 32k 8k", // zero subclusters hide the backing data
      "write -P 0xe3 1M 64k",
      `discard ${MiB + 16 * KiB} 4k`,
      `write -z -u ${MiB + 40 * KiB} 4k`,
      `write -P 0xe4 ${2 * MiB - 2048} 2048`,
    ]);
    await assertAllMatch(t, top, { dir, backingChain: true });
  });

  test("backing format not recorded (extension renamed to an unknown type): probed", async (t) => {
    const dir = await caseDir("probed-backing");
    const base = path.join(dir, "base.qcow2");
    await create(base, "1M", []);
    await qemuIoOk(base, ["write -P 0xf0 0 512k"]);
    const top = path.join(dir, "top.qcow2");
    await create(top, undefined, ["backing_file=base.qcow2", "backing_fmt=qcow2"], dir);
    await qemuIoOk(top, ["write -P 0xf1 256k 4k"]);
    // QEMU 7.2 refuses to write an image without a backing format, so rename the backing format
    // extension to a type nobody knows: the format must now be probed, and an unknown header
    // extension must be ignored.
    const ext = (await readHeaderExtensions(top)).find((e) => e.type === EXT_BACKING_FORMAT);
    if (ext === undefined) throw new Error("fixture: no backing format extension");
    const unknownType = Buffer.alloc(4);
    unknownType.writeUInt32BE(0x7a7a7a7a);
    await patchFile(top, ext.offset, unknownType);
    await assertAllMatch(t, top, { dir, backingChain: true });
  });
});
