/**
 * Images QEMU writes, one layout per test: qcowkit's info, map and convert -O raw must give what
 * qemu-img gives on the same file (design invariant 2).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertAllMatch,
  assertCleanExit,
  assertSameAsQemu,
  assertSameFile,
  qcowkit,
  qemuImgOk,
  qemuIo,
  qemuIoOk,
  seededBytes,
  sizes,
  useTempDir,
  writeSparseRaw,
} from "./util.js";

const { KiB, MiB } = sizes;

describe("qcow2 layouts written by QEMU", () => {
  const tmp = useTempDir("layouts");

  const caseDir = tmp.caseDir;

  async function create(dir: string, name: string, size: string, options: string[] = []): Promise<string> {
    const img = path.join(dir, name);
    const o = options.length > 0 ? ["-o", options.join(",")] : [];
    await qemuImgOk(["create", "-q", "-f", "qcow2", ...o, img, size]);
    return img;
  }

  /** Writes that straddle cluster boundaries, partial clusters, zeros and a discard. */
  const oddWrites = (cluster: number): string[] => [
    `write -P 0xab ${cluster - 100} 300`,
    `write -P 0x5c ${3 * cluster + 7} ${2 * cluster + 1001}`,
    `write -P 0x11 ${8 * cluster} ${4 * cluster}`,
    `write -z ${9 * cluster} ${cluster}`,
    `write -z ${10 * cluster + 512} 512`,
    `discard ${11 * cluster} ${cluster}`,
    `write -P 0xfe ${20 * cluster - 1} 1`,
  ];

  test("v2 image (compat=0.10)", async (t) => {
    const dir = await caseDir("v2");
    const img = await create(dir, "v2.qcow2", "4M", ["compat=0.10"]);
    await qemuIoOk(img, [...oddWrites(64 * KiB).slice(0, 3), "write -z 1M 64k", "write -P 0x77 4190208 4096"]);
    await qemuIoOk(img, ["discard 192k 64k", "write -z 64k 64k"]);
    await assertAllMatch(t, img, { dir });
  });

  test("v3 image (compat=1.1)", async (t) => {
    const dir = await caseDir("v3");
    const img = await create(dir, "v3.qcow2", "4M", ["compat=1.1"]);
    await qemuIoOk(img, [...oddWrites(64 * KiB).slice(0, 3), "write -z 1M 64k", "write -P 0x77 4190208 4096"]);
    await qemuIoOk(img, ["discard 192k 64k", "write -z 64k 64k"]);
    await assertAllMatch(t, img, { dir, format: "qcow2" });
  });

  for (const cluster of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
    test(`cluster_size=${cluster}`, async (t) => {
      const dir = await caseDir(`cluster-${cluster}`);
      const size = Math.max(8 * MiB, 24 * cluster);
      const img = await create(dir, "c.qcow2", String(size), [`cluster_size=${cluster}`]);
      await qemuIoOk(img, oddWrites(cluster));
      // The last byte of the image, and a write that crosses an L2 table boundary.
      const l2Span = (cluster / 8) * cluster;
      const crossing = l2Span < size ? l2Span - 1000 : size - 5000;
      await qemuIoOk(img, [`write -P 0x42 ${size - 1} 1`, `write -P 0x43 ${crossing} 2000`]);
      await assertAllMatch(t, img, { dir });
    });
  }

  test("guest runs split where host clusters stop being contiguous (writes out of guest order)", async (t) => {
    const dir = await caseDir("host-order");
    const img = await create(dir, "h.qcow2", "8M", ["cluster_size=4096"]);
    // Host order: [0, 64k), [128k, 192k), [64k, 128k), then 1 MiB from 2M and 1 MiB from 1M; a
    // zero cluster in the middle of a run, and a run across two L2 tables (2 MiB each).
    await qemuIoOk(img, [
      "write -P 1 0 64k",
      "write -P 2 128k 64k",
      "write -P 3 64k 64k",
      "write -P 4 2M 1M",
      "write -P 5 1M 1M",
      "write -z 32k 4k",
      "write -P 7 4100k 2M",
    ]);
    await assertAllMatch(t, img, { dir });
  });

  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    test(`refcount_bits=${bits}`, async (t) => {
      const dir = await caseDir(`refcount-${bits}`);
      const img = await create(dir, "r.qcow2", "4M", [`refcount_bits=${bits}`, "cluster_size=4096"]);
      await qemuIoOk(img, oddWrites(4 * KiB));
      if (bits > 1) {
        // Shared clusters (refcount 2) and copy-on-write after an internal snapshot.
        await qemuImgOk(["snapshot", "-c", "snap", img]);
        await qemuIoOk(img, ["write -P 0x99 4000 9000", "write -P 0x98 2M 12k"]);
      }
      await assertAllMatch(t, img, { dir });
    });
  }

  test("seeded random data at unaligned offsets (raw file + qemu-img convert, qemu-io write -s)", async (t) => {
    const dir = await caseDir("random");
    const raw = path.join(dir, "src.raw");
    await writeSparseRaw(raw, 6 * MiB, [
      [0, seededBytes(1, 1000)],
      [65535, seededBytes(2, 70001)],
      [MiB + 3, seededBytes(3, 300 * KiB)],
      [5 * MiB + 12345, seededBytes(4, 100 * KiB)],
      [6 * MiB - 7, seededBytes(5, 7)],
    ]);
    const img = path.join(dir, "random.qcow2");
    await qemuImgOk(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=16k", raw, img]);
    const pattern = path.join(dir, "pattern.bin");
    await fs.writeFile(pattern, seededBytes(6, 12345));
    await qemuIoOk(img, [`write -s ${pattern} 3000001 12345`, `write -s ${pattern} 65000 12345`]);
    await assertAllMatch(t, img, { dir });
  });

  test("zero clusters: unallocated, preallocated (write -z over data), unmapped (write -z -u), partial", async (t) => {
    const dir = await caseDir("zero");
    const img = await create(dir, "zero.qcow2", "4M");
    await qemuIoOk(img, [
      "write -P 0xaa 0 1M",
      "write -z 64k 64k", // over data: zero flag, host offset kept
      "write -z -u 256k 128k", // over data, unmap allowed: zero flag, cluster freed
      "write -z 500k 10k", // partial cluster over data: zeros written
      "write -z 2M 128k", // unallocated: zero flag, no offset
      "write -z 3145800 1000", // partial cluster, unallocated
      "write -P 0xbb 2162688 4096", // data into a zero cluster
    ]);
    await assertAllMatch(t, img, { dir });
  });

  test("discards: whole clusters, unaligned ranges, to the end of the image", async (t) => {
    const dir = await caseDir("discard");
    const img = await create(dir, "discard.qcow2", "4M");
    await qemuIoOk(img, [
      "write -P 0x21 0 3M",
      "discard 64k 64k",
      "discard 1049576 200k",
      "discard 2M 2M",
      "write -P 0x22 2200000 5000",
    ]);
    await assertAllMatch(t, img, { dir });
  });

  /** Raw source half incompressible, half compressible, with holes; then qemu-img convert -c. */
  async function compressedImage(dir: string, options: string[]): Promise<string> {
    const raw = path.join(dir, "src.raw");
    const lowEntropy = seededBytes(11, 1536 * KiB).map((b) => 0x41 + (b & 3));
    await writeSparseRaw(raw, 8 * MiB, [
      [0, seededBytes(10, 700 * KiB)],
      [MiB + 100, lowEntropy],
      [5 * MiB, Buffer.alloc(300 * KiB, 0x61)],
      [7 * MiB + 999, seededBytes(12, 5000)],
    ]);
    const img = path.join(dir, "compressed.qcow2");
    await qemuImgOk(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", options.join(","), raw, img]);
    return img;
  }

  test("compressed clusters, zlib, with partial overwrites and qemu-io write -c", async (t) => {
    const dir = await caseDir("compressed-zlib");
    const img = await compressedImage(dir, ["compression_type=zlib"]);
    await qemuIoOk(img, ["write -P 0x55 1200000 3000", "write -c -P 0x66 6M 128k", "write -z 5M 64k"]);
    await assertAllMatch(t, img, { dir, mapHumanQemuCode: 1 });
  });

  test("compressed clusters, zstd", async (t) => {
    const dir = await caseDir("compressed-zstd");
    const img = await compressedImage(dir, ["compression_type=zstd"]);
    await qemuIoOk(img, ["write -P 0x55 1200000 3000", "write -c -P 0x66 6M 128k"]);
    await assertAllMatch(t, img, { dir, mapHumanQemuCode: 1 });
  });

  test("compressed clusters, 512 B clusters", async (t) => {
    const dir = await caseDir("compressed-512");
    const img = await compressedImage(dir, ["cluster_size=512"]);
    await assertAllMatch(t, img, { dir, mapHumanQemuCode: 1 });
  });

  test("compressed clusters, 2 MiB clusters, zstd", async (t) => {
    const dir = await caseDir("compressed-2m");
    const img = await compressedImage(dir, ["cluster_size=2M", "compression_type=zstd"]);
    await assertAllMatch(t, img, { dir, mapHumanQemuCode: 1 });
  });

  test("extended_l2=on: subcluster writes, zero and discarded subclusters", async (t) => {
    const dir = await caseDir("extended-l2");
    const img = await create(dir, "ext.qcow2", "4M", ["extended_l2=on", "cluster_size=64k"]);
    await qemuIoOk(img, [
      "write -P 0x31 0 4k",
      "write -P 0x32 12k 4k",
      "write -P 0x33 70000 1000", // unaligned inside subcluster 0 of cluster 1
      "write -P 0x34 1M 64k",
      `write -z ${MiB + 8 * KiB} 8k`,
      "write -z 2M 4k",
      `write -z -u ${MiB + 32 * KiB} 4k`,
      `discard ${MiB + 48 * KiB} 4k`,
      `write -P 0x35 ${3 * MiB + 60 * KiB} 8k`, // crosses a cluster boundary
    ]);
    await assertAllMatch(t, img, { dir });
  });

  for (const mode of ["metadata", "falloc", "full"]) {
    test(`preallocation=${mode}`, async (t) => {
      const dir = await caseDir(`prealloc-${mode}`);
      const img = await create(dir, "p.qcow2", "4M", [`preallocation=${mode}`]);
      await qemuIoOk(img, ["write -P 0x71 100000 200000", "write -z 2M 64k", "discard 3M 64k"]);
      await assertAllMatch(t, img, { dir });
    });
  }

  test("lazy_refcounts=on left dirty by a crash (qemu-io abort)", async (t) => {
    const dir = await caseDir("dirty");
    const img = await create(dir, "dirty.qcow2", "4M", ["lazy_refcounts=on"]);
    await qemuIoOk(img, ["write -P 0x12 0 64k"]);
    // qemu-io's `abort` command calls abort(3): the process dies with the dirty bit set.
    const r = await qemuIo(
      [
        "-f",
        "qcow2",
        "-c",
        "write -P 0x13 1M 128k",
        "-c",
        "write -P 0x14 3000 5000",
        "-c",
        "flush",
        "-c",
        "abort",
        img,
      ],
      { cwd: dir },
    );
    assert.equal(r.signal, "SIGABRT", `fixture: qemu-io abort should die of SIGABRT: ${r.code} ${r.stderr}`);
    await fs.rm(path.join(dir, "core"), { force: true });
    const info = JSON.parse((await qemuImgOk(["info", "--output", "json", img])).stdout) as Record<string, unknown>;
    assert.equal(info["dirty-flag"], true, "fixture: qemu-img info should report dirty-flag true");
    await assertAllMatch(t, img, { dir });
  });

  test("persistent bitmaps (qemu-img bitmap --add, enabled, disabled, granularity)", async (t) => {
    const dir = await caseDir("bitmaps");
    const img = await create(dir, "bitmaps.qcow2", "4M");
    await qemuImgOk(["bitmap", "--add", img, "b0"]);
    await qemuImgOk(["bitmap", "--add", "-g", "4096", img, "b-4k"]);
    await qemuImgOk(["bitmap", "--add", "--disable", img, "b-off"]);
    await qemuIoOk(img, ["write -P 0x44 100k 300k", "write -z 2M 64k"]);
    await assertAllMatch(t, img, { dir });
  });

  test("persistent bitmap left in use by a crash", async (t) => {
    const dir = await caseDir("bitmaps-in-use");
    const img = await create(dir, "inuse.qcow2", "4M");
    await qemuImgOk(["bitmap", "--add", img, "b0"]);
    const r = await qemuIo(["-f", "qcow2", "-c", "write -P 0x45 0 64k", "-c", "flush", "-c", "abort", img], {
      cwd: dir,
    });
    assert.equal(r.signal, "SIGABRT", `fixture: qemu-io abort should die of SIGABRT: ${r.code} ${r.stderr}`);
    await assertAllMatch(t, img, { dir });
  });

  for (const rawData of ["on", "off"]) {
    test(`external data file, data_file_raw=${rawData}`, async (t) => {
      const dir = await caseDir(`data-file-${rawData}`);
      // QEMU 7.2 opens a relative data file name relative to the working directory, not to the
      // image; run everything from the image's directory so that both readings agree. With
      // data_file_raw=off the name is absolute and the commands run from elsewhere.
      const dataFile = rawData === "on" ? "data.bin" : path.join(dir, "data.bin");
      const cwd = rawData === "on" ? dir : "/";
      const img = rawData === "on" ? "ext.qcow2" : path.join(dir, "ext.qcow2");
      await qemuImgOk(
        ["create", "-q", "-f", "qcow2", "-o", `data_file=${dataFile},data_file_raw=${rawData}`, img, "4M"],
        { cwd },
      );
      await qemuIoOk(img, ["write -P 0x61 0 100k", "write -P 0x62 1234567 4321", "write -z 3M 64k"], { cwd });
      await assertAllMatch(t, img, { dir, cwd });
    });
  }

  test("image grown by qemu-img resize (L1 table grows), then written past the old end", async (t) => {
    const dir = await caseDir("resize");
    // 512 B clusters: an L2 table maps 32 KiB, so growing 1 MiB to 64 MiB grows the L1 table
    // from 32 entries to 2048 (several clusters, moved elsewhere in the file).
    const img = await create(dir, "grow.qcow2", "1M", ["cluster_size=512"]);
    await qemuIoOk(img, ["write -P 0x81 0 1M"]);
    await qemuImgOk(["resize", "-q", img, "64M"]);
    await qemuIoOk(img, [`write -P 0x82 ${64 * MiB - 4096} 4096`, "write -P 0x83 1000000 100000"]);
    await qemuImgOk(["resize", "-q", "--preallocation=metadata", img, "+3M"]);
    await qemuIoOk(img, [`write -P 0x84 ${65 * MiB} 5000`]);
    await assertAllMatch(t, img, { dir });
  });

  test("raw image (-f raw and probed)", async (t) => {
    const dir = await caseDir("raw");
    const raw = path.join(dir, "disk.raw");
    await writeSparseRaw(raw, 3 * MiB, [
      [4096, seededBytes(20, 10000)],
      [2 * MiB, seededBytes(21, 64 * KiB)],
    ]);
    await assertAllMatch(t, raw, { dir, format: "raw" });
  });

  test("qemu-img's option spellings: --output=json, --output human, -Oraw, options after the file name", async () => {
    const dir = await caseDir("spellings");
    const img = await create(dir, "s.qcow2", "2M");
    await qemuIoOk(img, ["write -P 0xa5 1000 70000"]);
    for (const args of [
      ["info", "--output=json", img],
      ["info", "--output", "human", img],
      ["info", img, "--output=json"],
      ["info", "-fqcow2", "--output=json", img],
      ["map", "--output=json", img],
      ["map", img, "-f", "qcow2", "--output", "json"],
    ]) {
      const json = args.some((a) => a.includes("json"));
      await assertSameAsQemu(args, { json });
    }
    const expected = path.join(dir, "expected.raw");
    const actual = path.join(dir, "actual.raw");
    await qemuImgOk(["convert", "-Oraw", img, expected]);
    const k = await qcowkit(["convert", img, "-Oraw", actual]);
    assertCleanExit(k, 0, `qcowkit convert ${img} -Oraw ${actual}`);
    await assertSameFile(expected, actual, "raw output, against qemu-img's");
  });

  test("convert -p prints qemu-img's progress and writes the same bytes", async () => {
    const dir = await caseDir("progress");
    const img = await create(dir, "p.qcow2", "4M");
    await qemuIoOk(img, ["write -P 0x91 0 1M", "write -P 0x92 3M 64k"]);
    const expected = path.join(dir, "expected.raw");
    const actual = path.join(dir, "actual.raw");
    const q = await qemuImgOk(["convert", "-p", "-O", "raw", img, expected]);
    const k = await qcowkit(["convert", "-p", "-O", "raw", img, actual]);
    assertCleanExit(k, 0, `qcowkit convert -p -O raw ${img} ${actual}`);
    await assertSameFile(expected, actual, "raw output, against qemu-img's");
    // Intermediate steps depend on timing; the first and last lines do not.
    assert.ok(q.stdout.startsWith("    (0.00/100%)\r") && q.stdout.endsWith("    (100.00/100%)\r\n"), q.stdout);
    assert.ok(
      k.stdout.startsWith("    (0.00/100%)\r"),
      `progress should start with "    (0.00/100%)\\r": ${JSON.stringify(k.stdout)}`,
    );
    assert.ok(
      k.stdout.endsWith("    (100.00/100%)\r\n"),
      `progress should end with "    (100.00/100%)\\r\\n": ${JSON.stringify(k.stdout)}`,
    );
  });
});
