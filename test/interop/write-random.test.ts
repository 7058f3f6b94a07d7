/**
 * Randomized differential test of the write path against a plain byte array and against QEMU.
 *
 * For every layout (v2 and v3; 512, 4k, 64k and 2M clusters; refcount_bits 1, 16 and 64;
 * extended L2 on and off; with and without a qcow2 backing file holding random data) an image is
 * made with writeEmptyQcow2, opened read-write, and a few hundred random requests are applied
 * (writes of every length and alignment, zero writes with and without unmap, discards, flushes,
 * close and reopen), mirrored on a reference array. Afterwards the image must read as the
 * reference through qcowkit, through `qemu-img convert -O raw` and `qemu-img compare`, and
 * `qemu-img check` must find no errors and no leaks (DESIGN.md, invariant 1).
 *
 * The reference model follows QEMU 7.2: zero writes read zeros; a discard makes whole clusters
 * read as zeros, except on a v2 image with a backing file, which has no zero flag, so QEMU does
 * not discard there at all (qcow2.c, qcow2_co_pdiscard; qcow2-cluster.c, discard_in_l2_slice).
 * Parts of a discarded range smaller than the discard granularity may keep their data or not:
 * the model accepts either and takes what the image reads.
 *
 * Runs are seeded: a failure names the seed; QCOWKIT_SEED=<seed> repeats the run.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import type { Qcow2Image } from "../../src/image/qcow2.js";
import { FileStorage, openImageFile } from "../../src/node.js";
import { type Qcow2CreateOptions, writeEmptyQcow2 } from "../../src/ops/create.js";
import { BASE_SEED, Prng } from "../prng.js";
import { qcowkit, qemuImg, qemuImgOk, qemuIo, sizes, useTempDir, writeSparseRaw } from "./util.js";

const { KiB, MiB } = sizes;

/** Data for a write: mostly random, sometimes a compressible pattern, sometimes all zeros. */
function payload(r: Prng, n: number): Uint8Array {
  const k = r.int(10);
  if (k === 0) return new Uint8Array(n);
  if (k === 1) {
    const b = new Uint8Array(n);
    const v = 1 + r.int(255);
    for (let i = 0; i < n; i++) b[i] = (v + (i >> 9)) & 0xff || 1;
    return b;
  }
  return r.bytes(n);
}

function firstDiff(expected: Uint8Array, actual: Uint8Array): string | undefined {
  if (expected.length !== actual.length) return `length ${actual.length}, expected ${expected.length}`;
  if (
    Buffer.compare(
      Buffer.from(expected.buffer, expected.byteOffset, expected.length),
      Buffer.from(actual.buffer, actual.byteOffset, actual.length),
    ) === 0
  ) {
    return undefined;
  }
  let i = 0;
  while (expected[i] === actual[i]) i++;
  let j = i;
  while (j < expected.length && expected[j] !== actual[j]) j++;
  const hex = (b: Uint8Array) => Buffer.from(b.subarray(i, Math.min(i + 16, b.length))).toString("hex");
  return `first difference at guest offset ${i} (0x${i.toString(16)}), ${j - i} bytes differ from there; expected ${hex(expected)}…, got ${hex(actual)}…`;
}

interface CheckReport {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
  [k: string]: unknown;
}

/** `qemu-img check --output=json`; fails unless there are no errors, corruptions or leaks. */
async function assertQemuCheckClean(file: string, what: string): Promise<void> {
  // From the image's directory: QEMU 7.2 opens a relative external data file name from there.
  const r = await qemuImg(["check", "--output=json", file], { cwd: path.dirname(file) });
  let report: CheckReport;
  try {
    report = JSON.parse(r.stdout) as CheckReport;
  } catch {
    assert.fail(`${what}: qemu-img check gave no JSON (exit ${r.code}): ${r.stdout}${r.stderr}`);
  }
  const bad = (report["check-errors"] ?? 0) + (report.corruptions ?? 0) + (report.leaks ?? 0);
  assert.ok(
    bad === 0 && r.code === 0,
    `${what}: qemu-img check (exit ${r.code}): ${JSON.stringify(report)}\n${r.stderr}`,
  );
}

/** The image must hold `expected`: qemu-img check, compare and convert, and qcowkit's own read. */
async function assertImageHolds(file: string, expected: Uint8Array, dir: string, what: string): Promise<void> {
  await assertQemuCheckClean(file, what);
  const ref = path.join(dir, "expected.raw");
  const out = path.join(dir, "converted.raw");
  await fs.writeFile(ref, expected);
  const cmp = await qemuImg(["compare", "-f", "qcow2", "-F", "raw", file, ref], { cwd: dir });
  assert.equal(cmp.code, 0, `${what}: qemu-img compare against the reference: ${cmp.stdout}${cmp.stderr}`);
  assert.equal(cmp.stdout, "Images are identical.\n", `${what}: qemu-img compare`);
  await qemuImgOk(["convert", "-O", "raw", file, out], { cwd: dir });
  const converted = new Uint8Array(await fs.readFile(out));
  const d1 = firstDiff(expected, converted);
  assert.equal(d1, undefined, `${what}: qemu-img convert -O raw differs from the reference: ${d1}`);
  const img = await openImageFile(file, { readOnly: true });
  try {
    const got = new Uint8Array(img.size);
    await img.read(got, 0);
    const d2 = firstDiff(expected, got);
    assert.equal(d2, undefined, `${what}: qcowkit reads differ from the reference: ${d2}`);
  } finally {
    await img.close();
  }
  await Promise.all([fs.rm(ref, { force: true }), fs.rm(out, { force: true })]);
}

interface Layout {
  size: number;
  clusterSize: number;
  /** Subcluster size (the cluster size without extended L2). */
  subclusterSize: number;
  version: number;
  /** The guest contents of the backing file, zero-padded (all zeros without one). */
  backing: Uint8Array | undefined;
}

/**
 * A random request range: unaligned and sub-cluster, sector- and subcluster-aligned, whole
 * clusters, ranges across a cluster boundary, ranges over a few clusters, and long ranges over
 * many (up to 5 MiB).
 */
function pickRange(r: Prng, l: Layout): [number, number] {
  const cs = l.clusterSize;
  const sc = l.subclusterSize;
  const clusters = Math.ceil(l.size / cs);
  const base = r.int(clusters) * cs;
  let off: number;
  let len: number;
  switch (r.int(8)) {
    case 0:
      off = base + r.int(cs);
      len = 1 + r.int(Math.min(cs, 3000));
      break;
    case 1:
      off = base + 512 * r.int(cs / 512);
      len = 512 * (1 + r.int(Math.min(16, (2 * cs) / 512)));
      break;
    case 2:
      off = base + sc * r.int(cs / sc);
      len = sc * (1 + r.int(3));
      break;
    case 3:
      off = base;
      len = cs * (1 + r.int(3));
      break;
    case 4:
      off = base + cs - 1 - r.int(Math.min(cs, 2048));
      len = 2 + r.int(Math.min(2 * cs, 10000));
      break;
    case 5:
      off = r.int(l.size);
      len = 1 + r.int(Math.min(l.size / 4, 3 * cs));
      break;
    case 6:
      // Long: many clusters, across L2 tables and refcount blocks, allocated at once.
      off = r.chance(0.5) ? base : r.int(l.size);
      len = 1 + r.int(150 * cs);
      break;
    default:
      // The last cluster, which may be partial.
      off = Math.max(0, l.size - 1 - r.int(Math.min(l.size, 2 * cs)));
      len = l.size - off;
  }
  off = Math.min(off, l.size - 1);
  len = Math.max(1, Math.min(len, l.size - off, 5 * MiB));
  return [off, len];
}

interface Workload {
  r: Prng;
  layout: Layout;
  /** The reference: what the guest must read. */
  expected: Uint8Array;
  open(): Promise<Qcow2Image>;
  ops: number;
  /** Bias request ranges towards these guest ranges (e.g. compressed or shared clusters). */
  hot?: [number, number][];
  log: string[];
}

/** Applies `w.ops` random requests to the image and the reference; returns the open image. */
async function runWorkload(w: Workload, start: Qcow2Image): Promise<Qcow2Image> {
  const { r, layout: l, expected } = w;
  let img = start;
  const discardValue = (p: number): number => (l.version < 3 && l.backing ? expected[p] : 0);
  for (let i = 0; i < w.ops; i++) {
    let [off, len] = pickRange(r, l);
    if (w.hot && w.hot.length > 0 && r.chance(0.5)) {
      const [hs, he] = w.hot[r.int(w.hot.length)];
      off = hs + r.int(he - hs);
      len = Math.max(1, Math.min(len, l.size - off));
    }
    const k = r.int(100);
    if (k < 52) {
      const data = payload(r, len);
      w.log.push(`write ${off} ${len}`);
      await img.write(data, off);
      expected.set(data, off);
    } else if (k < 67) {
      const unmap = r.chance(0.5);
      w.log.push(`writeZeroes ${off} ${len}${unmap ? " unmap" : ""}`);
      await img.writeZeroes(off, len, { unmap });
      expected.fill(0, off, off + len);
    } else if (k < 82) {
      w.log.push(`discard ${off} ${len}`);
      await img.discard(off, len);
      const got = new Uint8Array(len);
      await img.read(got, off);
      const cs = l.clusterSize;
      const wholeFrom = Math.ceil(off / cs) * cs;
      const wholeTo = off + len === l.size ? l.size : Math.floor((off + len) / cs) * cs;
      for (let p = off; p < off + len; p++) {
        const v = got[p - off];
        const dv = discardValue(p);
        if (p >= wholeFrom && p < wholeTo) {
          if (v !== dv) {
            assert.fail(`discard ${off} ${len}: byte ${p} of a whole discarded cluster reads ${v}, expected ${dv}`);
          }
        } else if (v !== dv && v !== expected[p]) {
          assert.fail(`discard ${off} ${len}: byte ${p} reads ${v}, neither its old value ${expected[p]} nor ${dv}`);
        }
      }
      expected.set(got, off);
    } else if (k < 90) {
      w.log.push("flush");
      await img.flush();
    } else if (k < 93) {
      w.log.push("close + reopen");
      await img.close();
      img = await w.open();
    } else {
      w.log.push(`read ${off} ${len}`);
      const got = new Uint8Array(len);
      await img.read(got, off);
      const d = firstDiff(expected.subarray(off, off + len), got);
      assert.equal(d, undefined, `read ${off} ${len} after ${i} requests: ${d}`);
    }
  }
  return img;
}

/** Adds the seed and the last requests to a failure. */
async function withSeed(seed: number, log: string[], fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const tail = log.slice(-12).join("; ");
    const note = `[seed ${seed}: rerun with QCOWKIT_SEED=${BASE_SEED}; ${log.length} requests, last: ${tail}]`;
    if (e instanceof Error) {
      e.message = `${e.message}\n${note}`;
      throw e;
    }
    throw new Error(`${String(e)}\n${note}`);
  }
}

interface Case {
  version: 2 | 3;
  clusterSize: number;
  refcountBits: number;
  extendedL2: boolean;
  backing: boolean;
  /** Made with `qcowkit create -f qcow2 -o OPTIONS` (with these options) instead of writeEmptyQcow2. */
  cli?: string;
  /** The image has an external data file data.raw that must hold the guest data (data_file_raw). */
  rawDataFile?: boolean;
}

function cases(): Case[] {
  const out: Case[] = [];
  for (const clusterSize of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
    for (const backing of [false, true]) {
      out.push({ version: 2, clusterSize, refcountBits: 16, extendedL2: false, backing });
      for (const refcountBits of [1, 16, 64]) {
        for (const extendedL2 of clusterSize >= 16 * KiB ? [false, true] : [false]) {
          out.push({ version: 3, clusterSize, refcountBits, extendedL2, backing });
        }
      }
    }
  }
  // Images made by `qcowkit create` with the options that change how writes are stored.
  const v3 = { version: 3 as const, refcountBits: 16, extendedL2: false, backing: false };
  out.push({ ...v3, clusterSize: 64 * KiB, cli: "lazy_refcounts=on" });
  out.push({ ...v3, clusterSize: 64 * KiB, cli: "data_file=data.raw" });
  out.push({ ...v3, clusterSize: 64 * KiB, cli: "data_file=data.raw,data_file_raw=on", rawDataFile: true });
  out.push({ ...v3, clusterSize: 4 * KiB, cli: "preallocation=metadata,cluster_size=4k" });
  out.push({ ...v3, clusterSize: 64 * KiB, cli: "preallocation=full,compression_type=zstd" });
  out.push({
    ...v3,
    clusterSize: 64 * KiB,
    extendedL2: true,
    backing: true,
    cli: "extended_l2=on,preallocation=metadata",
  });
  out.push({
    version: 2,
    refcountBits: 16,
    extendedL2: false,
    backing: false,
    clusterSize: 64 * KiB,
    cli: "compat=0.10,preallocation=metadata",
  });
  return out;
}

function caseName(c: Case): string {
  const cs =
    c.clusterSize >= MiB
      ? `${c.clusterSize / MiB}M`
      : c.clusterSize >= KiB
        ? `${c.clusterSize / KiB}k`
        : `${c.clusterSize}`;
  return `v${c.version} cluster_size=${cs} refcount_bits=${c.refcountBits}${c.extendedL2 ? " extended_l2" : ""}${c.backing ? " over a backing file" : ""}${c.cli ? ` (qcowkit create -o ${c.cli})` : ""}`;
}

/** A qcow2 backing file with random data in random places, made by qemu-img from a raw file. */
async function makeBacking(r: Prng, dir: string, size: number): Promise<Uint8Array> {
  const raw = path.join(dir, "backing.raw");
  const data = new Uint8Array(size);
  const chunks: [number, Uint8Array][] = [];
  let covered = 0;
  while (covered < size / 2) {
    const len = Math.min(512 * (1 + r.int(Math.max(1, size / 512 / 8))), size);
    const off = 512 * r.int((size - len) / 512 + 1);
    const bytes = r.bytes(len);
    chunks.push([off, bytes]);
    data.set(bytes, off);
    covered += len;
  }
  await writeSparseRaw(raw, size, chunks);
  const backingCluster = [4 * KiB, 64 * KiB][r.int(2)];
  await qemuImgOk([
    "convert",
    "-f",
    "raw",
    "-O",
    "qcow2",
    "-o",
    `cluster_size=${backingCluster}`,
    raw,
    path.join(dir, "backing.qcow2"),
  ]);
  await fs.rm(raw);
  return data;
}

describe("random writes, zero writes and discards on images qcowkit creates", () => {
  const tmp = useTempDir("write-random");
  let index = 0;
  for (const c of cases()) {
    const caseIndex = index++;
    test(caseName(c), async () => {
      const seed = (BASE_SEED + Math.imul(caseIndex + 1, 0x9e3779b1)) >>> 0;
      const r = new Prng(seed);
      const log: string[] = [];
      await withSeed(seed, log, async () => {
        const dir = tmp.file(`case-${caseIndex}`);
        await fs.mkdir(dir);
        const cs = c.clusterSize;
        const clusters = cs >= 2 * MiB ? 8 : cs >= 64 * KiB ? 40 : cs >= 4 * KiB ? 300 : 1500;
        // Sometimes a partial last cluster (sizes stay whole sectors, as QEMU rounds them).
        const size = clusters * cs + (r.chance(0.5) ? 512 * r.int(cs / 512) : 0);
        let backing: Uint8Array | undefined;
        if (c.backing) {
          // A backing file as large as the image, or smaller (reads past its end are zeros).
          const bsize = r.chance(0.5) ? size : Math.max(512, Math.floor((size * 3) / 4 / 512) * 512);
          const b = await makeBacking(r, dir, bsize);
          backing = new Uint8Array(size);
          backing.set(b.subarray(0, size));
        }
        const file = path.join(dir, "image.qcow2");
        const opts: Qcow2CreateOptions = {
          size,
          version: c.version,
          clusterSize: cs,
          refcountBits: c.refcountBits,
          extendedL2: c.extendedL2,
        };
        if (c.backing) {
          opts.backingFile = "backing.qcow2";
          opts.backingFormat = "qcow2";
        }
        if (c.cli !== undefined) {
          const backingArgs = c.backing ? ["-b", "backing.qcow2", "-F", "qcow2"] : [];
          const r = await qcowkit(
            ["create", "-q", "-f", "qcow2", "-o", c.cli, ...backingArgs, "image.qcow2", String(size)],
            {
              cwd: dir,
            },
          );
          assert.equal(r.code, 0, `qcowkit create -o ${c.cli}: ${r.stderr}`);
        } else {
          const storage = await FileStorage.open(file, { readOnly: false, create: true });
          try {
            await writeEmptyQcow2(storage, opts);
          } finally {
            await storage.close();
          }
        }
        await assertQemuCheckClean(file, "the new image");
        const expected = backing ? backing.slice() : new Uint8Array(size);
        const open = async () => (await openImageFile(file, { readOnly: false })) as Qcow2Image;
        const layout: Layout = {
          size,
          clusterSize: cs,
          subclusterSize: c.extendedL2 ? cs / 32 : cs,
          version: c.version,
          backing,
        };
        const ops = cs >= 2 * MiB ? 80 : 200;
        const img = await runWorkload({ r, layout, expected, open, ops, log }, await open());
        await img.close();
        await assertImageHolds(file, expected, dir, caseName(c));
        if (c.rawDataFile) {
          // data_file_raw: the data file is itself a raw image of the guest disk (QEMU sizes it
          // to whole clusters: what lies past the disk's end does not count).
          const raw = new Uint8Array(await fs.readFile(path.join(dir, "data.raw")));
          assert.ok(raw.length >= size, `data.raw is ${raw.length} bytes, shorter than the disk (${size})`);
          const d = firstDiff(expected, raw.subarray(0, size));
          assert.equal(d, undefined, `data.raw (data_file_raw=on) does not hold the guest data: ${d}`);
        }
      });
    });
  }
});

interface QemuCase {
  name: string;
  /** qemu-img -o options of the image qcowkit then writes. */
  options: string;
  size: number;
  backing?: boolean;
  version: 2 | 3;
  clusterSize: number;
  extendedL2?: boolean;
}

const QEMU_CASES: QemuCase[] = [
  { name: "v3, 64k clusters", options: "cluster_size=64k", size: 8 * MiB, version: 3, clusterSize: 64 * KiB },
  {
    name: "v2 (compat=0.10), 4k clusters",
    options: "compat=0.10,cluster_size=4k",
    size: 3 * MiB,
    version: 2,
    clusterSize: 4 * KiB,
  },
  {
    name: "v3, 4k clusters, zstd, refcount_bits=64",
    options: "cluster_size=4k,compression_type=zstd,refcount_bits=64",
    size: 3 * MiB,
    version: 3,
    clusterSize: 4 * KiB,
  },
  { name: "v3, 512-byte clusters", options: "cluster_size=512", size: 512 * KiB, version: 3, clusterSize: 512 },
  {
    name: "v3, 64k clusters, extended_l2, over a backing file",
    options: "cluster_size=64k,extended_l2=on",
    size: 8 * MiB,
    backing: true,
    version: 3,
    clusterSize: 64 * KiB,
    extendedL2: true,
  },
  {
    name: "v2, 64k clusters, over a backing file",
    options: "compat=0.10",
    size: 8 * MiB,
    backing: true,
    version: 2,
    clusterSize: 64 * KiB,
  },
];

/** Random qemu-io requests (sector-aligned); the written ranges go to `hot`. */
function qemuIoRequests(r: Prng, size: number, n: number, hot: [number, number][], v3: boolean): string[] {
  const cmds: string[] = [];
  for (let i = 0; i < n; i++) {
    const len = 512 * (1 + r.int(Math.min(size / 512 / 8, 400)));
    const off = 512 * r.int((size - len) / 512 + 1);
    const k = r.int(10);
    if (k === 0) cmds.push(`write -z ${off} ${len}`);
    else if (k === 1 && v3) cmds.push(`discard ${off} ${len}`);
    else cmds.push(`write -P 0x${(1 + r.int(255)).toString(16)} ${off} ${len}`);
    hot.push([off, off + len]);
  }
  return cmds;
}

async function qemuIoRun(dir: string, image: string, cmds: string[]): Promise<void> {
  const args = ["-f", "qcow2"];
  for (const c of cmds) args.push("-c", c);
  args.push(image);
  const r = await qemuIo(args, { cwd: dir });
  if (r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr)) {
    throw new Error(`fixture: qemu-io ${args.join(" ")}: ${r.stdout}${r.stderr}`);
  }
}

describe("random writes on images QEMU wrote: compressed clusters and internal snapshots", () => {
  const tmp = useTempDir("write-qemu");
  let index = 0;
  for (const c of QEMU_CASES) {
    const caseIndex = index++;
    test(c.name, async () => {
      const seed = (BASE_SEED ^ Math.imul(caseIndex + 101, 0x85ebca6b)) >>> 0;
      const r = new Prng(seed);
      const log: string[] = [];
      await withSeed(seed, log, async () => {
        const dir = tmp.file(`case-${caseIndex}`);
        await fs.mkdir(dir);
        const hot: [number, number][] = [];
        const v3 = c.version === 3;
        let backing: Uint8Array | undefined;
        const backingArgs: string[] = [];
        if (c.backing) {
          backing = await makeBacking(r, dir, c.size);
          backingArgs.push("-b", "backing.qcow2", "-F", "qcow2");
        }
        // QEMU writes first: data, zero writes and discards, then everything compressed.
        await qemuImgOk(
          ["create", "-q", "-f", "qcow2", "-o", c.options, ...backingArgs, "source.qcow2", String(c.size)],
          { cwd: dir },
        );
        await qemuIoRun(dir, "source.qcow2", qemuIoRequests(r, c.size, 25, hot, v3));
        const convertBacking = c.backing ? ["-B", "backing.qcow2", "-F", "qcow2"] : [];
        await qemuImgOk(
          ["convert", "-c", "-O", "qcow2", "-o", c.options, ...convertBacking, "source.qcow2", "image.qcow2"],
          { cwd: dir },
        );
        // Uncompressed clusters next to compressed ones, then two snapshots with writes between.
        await qemuIoRun(dir, "image.qcow2", qemuIoRequests(r, c.size, 8, hot, v3));
        await qemuImgOk(["snapshot", "-c", "first", "image.qcow2"], { cwd: dir });
        await qemuIoRun(dir, "image.qcow2", qemuIoRequests(r, c.size, 8, hot, v3));
        await qemuImgOk(["snapshot", "-c", "second", "image.qcow2"], { cwd: dir });
        await qemuIoRun(dir, "image.qcow2", qemuIoRequests(r, c.size, 4, hot, v3));
        const file = path.join(dir, "image.qcow2");
        const readRaw = async (extra: string[], name: string): Promise<Uint8Array> => {
          const out = path.join(dir, name);
          await qemuImgOk(["convert", "-O", "raw", ...extra, file, out]);
          const b = new Uint8Array(await fs.readFile(out));
          await fs.rm(out);
          return b;
        };
        const snapshots = new Map<string, Uint8Array>();
        for (const name of ["first", "second"])
          snapshots.set(name, await readRaw(["-l", `snapshot.name=${name}`], `${name}.raw`));
        const expected = await readRaw([], "start.raw");
        await assertQemuCheckClean(file, "the image QEMU wrote");
        const open = async () => (await openImageFile(file, { readOnly: false })) as Qcow2Image;
        const first = await open();
        const before = new Uint8Array(first.size);
        await first.read(before, 0);
        assert.equal(firstDiff(expected, before), undefined, "qcowkit reads the image QEMU wrote as qemu-img does");
        const layout: Layout = {
          size: c.size,
          clusterSize: c.clusterSize,
          subclusterSize: c.extendedL2 ? c.clusterSize / 32 : c.clusterSize,
          version: c.version,
          backing,
        };
        const img = await runWorkload({ r, layout, expected, open, ops: 250, hot, log }, first);
        await img.close();
        await assertImageHolds(file, expected, dir, c.name);
        for (const [name, bytes] of snapshots) {
          const now = await readRaw(["-l", `snapshot.name=${name}`], `${name}-after.raw`);
          const d = firstDiff(bytes, now);
          assert.equal(d, undefined, `snapshot '${name}' changed by qcowkit's writes to the active layer: ${d}`);
        }
      });
    });
  }
});
