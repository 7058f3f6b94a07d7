/**
 * Pins the format codecs to what QEMU really writes: images made by qemu-img, decoded here.
 * qemu-img is required; without it these tests fail (they never skip).
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { inflateRawSync } from "node:zlib";
import { decodeBitmapDirectory, decodeBitmapTableEntry, encodeBitmapDirectory } from "../../src/format/bitmap.js";
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  decodeBackingName,
  decodeExtensions,
  decodeHeader,
  encodeHeader,
  type HeaderExtensions,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  type Qcow2Header,
  QEMU_FEATURE_NAMES,
} from "../../src/format/header.js";
import { decodeSnapshotTable, encodeSnapshotTable } from "../../src/format/snapshot.js";
import {
  ClusterType,
  decodeL1Entry,
  decodeL2Entry,
  decodeRefcountTableEntry,
  getRefcount,
  type L2Geometry,
} from "../../src/format/tables.js";

const dir = mkdtempSync(join(tmpdir(), "qcowkit-format-qemu-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function qemuImg(...args: string[]): void {
  const r = spawnSync("qemu-img", args, { cwd: dir, encoding: "utf8" });
  if (r.error && (r.error as NodeJS.ErrnoException).code === "ENOENT") {
    assert.fail("qemu-img not found: install it with apt-get install -y qemu-utils");
  }
  if (r.error) throw r.error;
  assert.equal(r.status, 0, `qemu-img ${args.join(" ")} failed: ${r.stderr}`);
}

/** Reads a whole image into a plain Uint8Array (not a Buffer, whose slice() does not copy). */
function readImage(name: string): Uint8Array {
  return new Uint8Array(readFileSync(join(dir, name)));
}

interface Opened {
  file: Uint8Array;
  h: Qcow2Header;
  ext: HeaderExtensions;
  backingName: string | undefined;
}

function open(name: string): Opened {
  const file = readImage(name);
  const h = decodeHeader(file);
  const first = file.subarray(0, 2 ** h.clusterBits);
  return { file, h, ext: decodeExtensions(first, h), backingName: decodeBackingName(first, h) };
}

/** Every entry qemu-img put in the feature-name table agrees with ours; the basic ones are there. */
function assertQemuFeatureTable(ext: HeaderExtensions): void {
  const names = ext.featureNames.map((f) => f.name);
  for (const want of ["dirty bit", "corrupt bit", "lazy refcounts"])
    assert.ok(names.includes(want), `feature table lacks "${want}": ${names}`);
  for (const f of ext.featureNames) {
    const ours = QEMU_FEATURE_NAMES.find((q) => q.type === f.type && q.bit === f.bit);
    assert.equal(ours?.name, f.name, `${f.type} bit ${f.bit}`);
  }
}

/** Re-encoding the decoded first cluster gives QEMU's bytes back exactly. */
function assertHeaderReencodes(o: Opened): void {
  const again = encodeHeader(o.h, o.ext, o.backingName);
  assert.deepEqual(again, o.file.subarray(0, again.length));
}

/**
 * Refcounts of a freshly created image: every cluster the file reaches into is metadata with
 * refcount 1, the first cluster past the end has refcount 0.
 */
function assertFreshRefcounts(o: Opened): void {
  const clusterSize = 2 ** o.h.clusterBits;
  const dv = new DataView(o.file.buffer);
  const blockOffset = decodeRefcountTableEntry(
    dv.getUint32(o.h.refcountTableOffset),
    dv.getUint32(o.h.refcountTableOffset + 4),
    clusterSize,
    0,
  );
  assert.ok(blockOffset > 0, "refcount block 0 allocated");
  const block = new DataView(o.file.buffer, blockOffset, clusterSize);
  // QEMU does not pad the last cluster (the L1 table) to its full size.
  const clusters = Math.ceil(o.file.length / clusterSize);
  assert.ok(clusters >= 4, `file of ${o.file.length} bytes: header, refcount table and block, L1 table`);
  for (let i = 0; i < clusters; i++)
    assert.equal(getRefcount(block, i, o.h.refcountOrder), 1, `refcount of cluster ${i}`);
  assert.equal(getRefcount(block, clusters, o.h.refcountOrder), 0, `refcount of cluster ${clusters}`);
}

test("qemu-img: v2 image (compat=0.10)", () => {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1G");
  const o = open("v2.qcow2");
  assert.equal(o.h.version, 2);
  assert.equal(o.h.headerLength, 72);
  assert.equal(o.h.clusterBits, 16);
  assert.equal(o.h.size, 2 ** 30);
  assert.equal(o.h.refcountOrder, 4);
  assert.equal(o.h.l1Size, 2);
  assert.equal(o.h.incompatibleFeatures, 0n);
  assert.equal(o.h.nbSnapshots, 0);
  assert.equal(o.backingName, undefined);
  assert.deepEqual(o.ext, { featureNames: [], unknown: [] });
  assertHeaderReencodes(o);
  assertFreshRefcounts(o);
});

test("qemu-img: v3 image with a backing file and backing format", () => {
  qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "3M");
  qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "overlay.qcow2");
  const o = open("overlay.qcow2");
  assert.equal(o.h.version, 3);
  assert.equal(o.h.size, 3 * 1024 * 1024);
  assert.equal(o.h.refcountOrder, 4);
  assert.equal(o.h.compressionType, 0);
  assert.equal(o.h.incompatibleFeatures, 0n);
  assert.equal(o.h.compatibleFeatures, 0n);
  assert.equal(o.backingName, "base.qcow2");
  assert.equal(o.h.backingFileSize, 10);
  assert.equal(o.ext.backingFormat, "qcow2");
  assert.equal(o.ext.dataFile, undefined);
  assert.deepEqual(o.ext.unknown, []);
  assertQemuFeatureTable(o.ext);
  assertHeaderReencodes(o);
  assertFreshRefcounts(o);
});

test("qemu-img: extended_l2=on", () => {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k", "extl2.qcow2", "100M");
  const o = open("extl2.qcow2");
  assert.equal(o.h.incompatibleFeatures, INCOMPAT_EXTL2);
  assert.equal(o.h.clusterBits, 14);
  // 1024 extended entries per 16 KiB L2 table: 100 MiB needs ceil(6400 / 1024) = 7 L1 entries.
  assert.equal(o.h.l1Size, 7);
  assertQemuFeatureTable(o.ext);
  assertHeaderReencodes(o);
});

test("qemu-img: compression_type=zstd", () => {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "zstd.qcow2", "1M");
  const o = open("zstd.qcow2");
  assert.equal(o.h.incompatibleFeatures, INCOMPAT_COMPRESSION);
  assert.equal(o.h.compressionType, COMPRESSION_ZSTD);
  assert.equal(o.h.headerLength, 112);
  assertHeaderReencodes(o);
});

test("qemu-img: refcount_bits=1 and refcount_bits=64", () => {
  for (const [bits, order] of [
    [1, 0],
    [2, 1],
    [4, 2],
    [8, 3],
    [32, 5],
    [64, 6],
  ]) {
    const name = `refcount${bits}.qcow2`;
    qemuImg("create", "-q", "-f", "qcow2", "-o", `refcount_bits=${bits}`, name, "1M");
    const o = open(name);
    assert.equal(o.h.refcountOrder, order, name);
    assertHeaderReencodes(o);
    assertFreshRefcounts(o);
  }
});

test("qemu-img: lazy_refcounts=on", () => {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy.qcow2", "1M");
  const o = open("lazy.qcow2");
  assert.equal(o.h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS);
  assert.equal(o.h.incompatibleFeatures, 0n);
  assertQemuFeatureTable(o.ext);
  assertHeaderReencodes(o);
});

test("qemu-img: the smallest and largest cluster sizes", () => {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "c512.qcow2", "64M");
  const small = open("c512.qcow2");
  assert.equal(small.h.clusterBits, 9);
  // 64 entries per 512-byte L2 table: 64 MiB needs 131072 / 64 = 2048 L1 entries.
  assert.equal(small.h.l1Size, 2048);
  assertHeaderReencodes(small);
  assertFreshRefcounts(small);
  qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2m.qcow2", "64M");
  const big = open("c2m.qcow2");
  assert.equal(big.h.clusterBits, 21);
  assert.equal(big.h.l1Size, 1);
  assertHeaderReencodes(big);
  assertFreshRefcounts(big);
});

test("qemu-img: external data file", () => {
  qemuImg("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "ext-data.qcow2", "1M");
  const o = open("ext-data.qcow2");
  assert.equal(o.h.incompatibleFeatures, INCOMPAT_DATA_FILE);
  assert.equal(o.h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  assert.equal(o.ext.dataFile, "data.raw");
  assertQemuFeatureTable(o.ext);
  assertHeaderReencodes(o);
});

test("qemu-img: internal snapshots", () => {
  qemuImg("create", "-q", "-f", "qcow2", "snap.qcow2", "5M");
  qemuImg("snapshot", "-c", "first", "snap.qcow2");
  qemuImg("snapshot", "-c", "second snapshot", "snap.qcow2");
  const o = open("snap.qcow2");
  assert.equal(o.h.nbSnapshots, 2);
  const at = o.h.snapshotsOffset;
  const snaps = decodeSnapshotTable(o.file.subarray(at), o.h.nbSnapshots, at);
  assert.deepEqual(
    snaps.map((s) => [s.id, s.name, s.l1Size, s.diskSize, s.vmStateSize]),
    [
      ["1", "first", o.h.l1Size, 5 * 1024 * 1024, 0],
      ["2", "second snapshot", o.h.l1Size, 5 * 1024 * 1024, 0],
    ],
  );
  for (const s of snaps) {
    assert.ok(s.extra.length >= 16, "v3 snapshots carry at least 16 bytes of extra data");
    assert.equal(s.l1TableOffset % 65536, 0);
    assert.ok(s.l1TableOffset > 0);
    assert.ok(Math.abs(s.dateSec - Date.now() / 1000) < 3600, `date ${s.dateSec}`);
    assert.ok(s.dateNsec < 1e9);
  }
  // Re-encoding gives QEMU's table byte for byte.
  const again = encodeSnapshotTable(snaps, 5 * 1024 * 1024);
  assert.deepEqual(again, o.file.subarray(at, at + again.length));
});

test("qemu-img: persistent bitmaps", () => {
  qemuImg("create", "-q", "-f", "qcow2", "bitmaps.qcow2", "1M");
  qemuImg("bitmap", "--add", "-g", "65536", "bitmaps.qcow2", "bm0");
  qemuImg("bitmap", "--add", "-g", "131072", "bitmaps.qcow2", "bm1");
  qemuImg("bitmap", "--disable", "bitmaps.qcow2", "bm1");
  const o = open("bitmaps.qcow2");
  assert.equal(o.h.autoclearFeatures, AUTOCLEAR_BITMAPS);
  assert.ok(o.ext.bitmaps, "bitmaps extension present");
  assert.equal(o.ext.bitmaps.nbBitmaps, 2);
  assertHeaderReencodes(o);
  const { directoryOffset, directorySize } = o.ext.bitmaps;
  const dirBytes = o.file.subarray(directoryOffset, directoryOffset + directorySize);
  const dir = decodeBitmapDirectory(dirBytes, 2, directoryOffset);
  assert.deepEqual(
    dir.map((b) => [b.name, b.flags, b.type, b.granularityBits, b.tableSize, b.extra.length]),
    [
      ["bm0", 2, 1, 16, 1, 0],
      ["bm1", 0, 1, 17, 1, 0],
    ],
  );
  assert.deepEqual(encodeBitmapDirectory(dir), dirBytes);
  for (const b of dir) {
    const dv = new DataView(o.file.buffer, b.tableOffset, 8);
    // Nothing was written: the bitmap's only cluster reads as all zeros.
    assert.deepEqual(decodeBitmapTableEntry(dv.getUint32(0), dv.getUint32(4), 65536), { offset: 0, allOnes: false });
  }
});

test("qemu-img: compressed clusters decode to the source data, every cluster size", () => {
  for (const clusterBits of [9, 12, 16, 21]) {
    const clusterSize = 2 ** clusterBits;
    const clusters = 8;
    const raw = new Uint8Array(clusterSize * clusters);
    for (let c = 0; c < clusters; c++) {
      const text = new TextEncoder().encode(`cluster ${c} of ${clusterSize} bytes; `.repeat(1 + c));
      for (let i = 0; i < clusterSize; i++) raw[c * clusterSize + i] = text[(i * (c + 1)) % text.length];
    }
    // Cluster 5 is incompressible noise (stored as a normal cluster); cluster 6 is all zeros.
    let seed = 12345;
    for (let i = 0; i < clusterSize; i++) {
      seed = (seed * 1103515245 + 12345) >>> 0;
      raw[5 * clusterSize + i] = seed >>> 24;
    }
    raw.fill(0, 6 * clusterSize, 7 * clusterSize);
    const rawName = `src-${clusterBits}.raw`;
    const name = `compressed-${clusterBits}.qcow2`;
    writeFileSync(join(dir, rawName), raw);
    qemuImg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", `cluster_size=${clusterSize}`, rawName, name);
    const o = open(name);
    assert.equal(o.h.clusterBits, clusterBits);
    const g: L2Geometry = { clusterBits, extendedL2: false, externalData: false, version: 3 };
    const dv = new DataView(o.file.buffer);
    const l2Entries = clusterSize / 8;
    const types: ClusterType[] = [];
    for (let c = 0; c < clusters; c++) {
      const l1Index = Math.floor(c / l2Entries);
      const l1At = o.h.l1TableOffset + l1Index * 8;
      const { l2Offset } = decodeL1Entry(dv.getUint32(l1At), dv.getUint32(l1At + 4), clusterSize, l1Index);
      const l2At = l2Offset + (c % l2Entries) * 8;
      const e = decodeL2Entry(dv.getUint32(l2At), dv.getUint32(l2At + 4), 0, 0, g, () => `cluster ${c}`);
      types.push(e.type);
      const want = raw.subarray(c * clusterSize, (c + 1) * clusterSize);
      if (e.type === ClusterType.Compressed) {
        assert.ok(e.hostOffset + e.compressedSize <= o.file.length, `cluster ${c}: compressed data inside the file`);
        const got = inflateRawSync(o.file.subarray(e.hostOffset, e.hostOffset + e.compressedSize));
        assert.equal(got.length, clusterSize, `cluster ${c}`);
        assert.ok(
          Buffer.from(want).equals(got),
          `cluster_bits ${clusterBits}, cluster ${c}: decompressed data differs`,
        );
      } else if (e.type === ClusterType.Normal) {
        assert.deepEqual(o.file.subarray(e.hostOffset, e.hostOffset + clusterSize), want, `cluster ${c}`);
      }
    }
    assert.deepEqual(
      types,
      [0, 1, 2, 3, 4, 5, 6, 7].map((c) =>
        c === 5 ? ClusterType.Normal : c === 6 ? ClusterType.Unallocated : ClusterType.Compressed,
      ),
      `cluster_bits ${clusterBits}`,
    );
  }
});
