/**
 * `qcowkit create` against `qemu-img create`, option by option: both run with the same arguments
 * in two directories, and the results must agree.
 *
 * For every accepted option set: the same exit status and "Formatting ..." line; `qemu-img check`
 * calls qcowkit's image clean; `qcowkit info --output=json` equals `qemu-img info --output=json`
 * on it; and `qemu-img info` / `qemu-img map` show the same image as qemu-img's own (virtual size,
 * cluster size, backing file, format-specific data; map extents, including what preallocation
 * allocated). External data files are made alike. The qcow2 file itself is qemu-img's, byte for
 * byte, except for the few option sets in OWN_LAYOUT.
 *
 * For every refused option set: exit 1, the same stdout, the same message after the program's
 * prefix ("qcowkit: FILE: MESSAGE" for "qemu-img: FILE: MESSAGE"), no stack trace, and the same
 * files left behind (qemu-img removes a qcow2 file it could not format, keeps a raw one).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertNoStackTrace,
  assertSameFile,
  qcowkit,
  qemuImg,
  qemuImgOk,
  type RunResult,
  seededBytes,
  sizes,
  useTempDir,
  writeSparseRaw,
} from "./util.js";

const { KiB, MiB } = sizes;

interface CreateCase {
  name: string;
  /** Arguments after `create`, the image being "img.qcow2" (or "img.raw"). */
  args: string[];
  /** Files to make in both directories first (e.g. a backing file). */
  setup?: (dir: string) => Promise<void>;
  /** Other files the command makes, to compare (e.g. an external data file). */
  alsoCreates?: string[];
  /** Files to make in both directories after creating (e.g. a backing file -u did not need). */
  after?: (dir: string) => Promise<void>;
}

/** Backing files: a qcow2 one of 3 MiB + 512 bytes with data, and a raw one of 5 MiB. */
async function backingFiles(dir: string): Promise<void> {
  const raw = path.join(dir, "base.raw");
  await writeSparseRaw(raw, 5 * MiB, [
    [0, seededBytes(1, 64 * KiB)],
    [2 * MiB, seededBytes(2, 100 * KiB)],
  ]);
  const src = path.join(dir, "src.raw");
  await writeSparseRaw(src, 3 * MiB + 512, [[MiB, seededBytes(3, 70 * KiB)]]);
  await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", src, path.join(dir, "base.qcow2")]);
  await fs.rm(src);
}

const qcow2 = (opts: string, size = "64M"): string[] => [
  "-f",
  "qcow2",
  ...(opts ? ["-o", opts] : []),
  "img.qcow2",
  ...(size ? [size] : []),
];

const QCOW2_CASES: CreateCase[] = [
  { name: "defaults", args: qcow2("") },
  { name: "compat=0.10", args: qcow2("compat=0.10") },
  { name: "compat=1.1", args: qcow2("compat=1.1") },
  { name: "compat=v2", args: qcow2("compat=v2") },
  ...[512, 1024, 4096, 16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB].map((cs) => ({
    name: `cluster_size=${cs}`,
    args: qcow2(`cluster_size=${cs}`),
  })),
  { name: "cluster_size=4k (suffix)", args: qcow2("cluster_size=4k") },
  { name: "compat=0.10, cluster_size=512", args: qcow2("compat=0.10,cluster_size=512") },
  ...[1, 2, 4, 8, 16, 32, 64].map((bits) => ({ name: `refcount_bits=${bits}`, args: qcow2(`refcount_bits=${bits}`) })),
  { name: "refcount_bits=1, cluster_size=512", args: qcow2("refcount_bits=1,cluster_size=512", "200M") },
  { name: "refcount_bits=64, cluster_size=512", args: qcow2("refcount_bits=64,cluster_size=512", "1G") },
  {
    name: "refcount_bits=64, preallocation=metadata",
    args: qcow2("refcount_bits=64,preallocation=metadata", "1G"),
  },
  {
    name: "refcount_bits=64, cluster_size=512, preallocation=metadata",
    args: qcow2("refcount_bits=64,cluster_size=512,preallocation=metadata", "1M"),
  },
  { name: "lazy_refcounts=on", args: qcow2("lazy_refcounts=on") },
  { name: "lazy_refcounts=off", args: qcow2("compat=1.1,lazy_refcounts=off") },
  { name: "compression_type=zlib", args: qcow2("compression_type=zlib") },
  { name: "compression_type=zstd", args: qcow2("compression_type=zstd") },
  { name: "extended_l2=on", args: qcow2("extended_l2=on") },
  { name: "extended_l2=on, cluster_size=16k", args: qcow2("extended_l2=on,cluster_size=16k") },
  { name: "extended_l2=on, cluster_size=2M", args: qcow2("extended_l2=on,cluster_size=2M", "1G") },
  { name: "extended_l2=off", args: qcow2("extended_l2=off") },
  ...["off", "metadata", "falloc", "full"].map((p) => ({
    name: `preallocation=${p}`,
    args: qcow2(`preallocation=${p}`, "3M"),
  })),
  { name: "preallocation=metadata, 4k clusters, 100M", args: qcow2("preallocation=metadata,cluster_size=4k", "100M") },
  { name: "preallocation=metadata, compat=0.10", args: qcow2("preallocation=metadata,compat=0.10", "5M") },
  { name: "preallocation=full, extended_l2", args: qcow2("preallocation=full,extended_l2=on", "2M") },
  { name: "preallocation=metadata, size not a cluster multiple", args: qcow2("preallocation=metadata", "1000k") },
  { name: "size 0", args: qcow2("", "0") },
  { name: "size 1000 (rounded up to a sector)", args: qcow2("", "1000") },
  { name: "size 1.5G", args: qcow2("", "1.5G") },
  { name: "size 4T", args: qcow2("", "4T") },
  { name: "size as -o size=", args: qcow2("size=10M", "") },
  {
    name: "-b qcow2 -F qcow2, size from the backing file",
    args: ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    setup: backingFiles,
  },
  {
    name: "-b raw -F raw, size from the backing file",
    args: ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "img.qcow2"],
    setup: backingFiles,
  },
  {
    name: "-b with a larger size",
    args: ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2", "10M"],
    setup: backingFiles,
  },
  {
    name: "-o backing_file=...,backing_fmt=...",
    args: qcow2("backing_file=base.qcow2,backing_fmt=qcow2", ""),
    setup: backingFiles,
  },
  {
    name: "backing file, compat=0.10",
    args: ["-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    setup: backingFiles,
  },
  {
    name: "backing file, cluster_size=512",
    args: ["-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    setup: backingFiles,
  },
  {
    name: "backing file, preallocation=metadata with extended_l2",
    args: [
      "-f",
      "qcow2",
      "-o",
      "extended_l2=on,preallocation=metadata",
      "-b",
      "base.qcow2",
      "-F",
      "qcow2",
      "img.qcow2",
    ],
    setup: backingFiles,
  },
  {
    name: "backing file, -u with a size (backing file not opened)",
    args: ["-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "img.qcow2", "8M"],
    after: async (dir) => {
      await qemuImgOk(["create", "-q", "-f", "qcow2", path.join(dir, "missing.qcow2"), "8M"]);
    },
  },
  { name: "data_file", args: qcow2("data_file=data.raw", "16M"), alsoCreates: ["data.raw"] },
  {
    name: "data_file with data_file_raw=on",
    args: qcow2("data_file=data.raw,data_file_raw=on", "16M"),
    alsoCreates: ["data.raw"],
  },
  {
    name: "data_file, data_file_raw=on, preallocation=full",
    args: qcow2("data_file=data.raw,data_file_raw=on,preallocation=full", "4M"),
    alsoCreates: ["data.raw"],
  },
  {
    name: "data_file with preallocation=metadata",
    args: qcow2("data_file=data.raw,preallocation=metadata", "4M"),
    alsoCreates: ["data.raw"],
  },
  {
    name: "every option at once",
    args: qcow2(
      "compat=1.1,cluster_size=128k,refcount_bits=32,lazy_refcounts=on,compression_type=zstd,extended_l2=on,preallocation=metadata",
      "300M",
    ),
  },
];

const raw = (opts: string, size: string): string[] => [
  "-f",
  "raw",
  ...(opts ? ["-o", opts] : []),
  "img.raw",
  ...(size ? [size] : []),
];

const RAW_CASES: CreateCase[] = [
  { name: "raw 0", args: raw("", "0") },
  { name: "raw 1000 (rounded up to a sector)", args: raw("", "1000") },
  { name: "raw 1M", args: raw("", "1M") },
  { name: "raw 1.5G", args: raw("", "1.5G") },
  { name: "raw without -f", args: ["img.raw", "2M"] },
  { name: "raw preallocation=off", args: raw("preallocation=off", "2M") },
  { name: "raw preallocation=falloc", args: raw("preallocation=falloc", "3M") },
  { name: "raw preallocation=full", args: raw("preallocation=full", "3M") },
  { name: "raw preallocation=full, 1000 bytes", args: raw("preallocation=full", "1000") },
];

interface ErrorCase {
  name: string;
  args: string[];
  setup?: (dir: string) => Promise<void>;
  /** The image file name in args (for the leftover check). */
  file?: string;
}

const ERROR_CASES: ErrorCase[] = [
  { name: "compat=0.10 with refcount_bits=8", args: qcow2("compat=0.10,refcount_bits=8") },
  { name: "compat=0.10 with lazy_refcounts", args: qcow2("compat=0.10,lazy_refcounts=on") },
  { name: "compat=0.10 with extended_l2", args: qcow2("compat=0.10,extended_l2=on") },
  { name: "extended_l2 with 8k clusters", args: qcow2("extended_l2=on,cluster_size=8k") },
  { name: "cluster_size=3000", args: qcow2("cluster_size=3000") },
  { name: "cluster_size=4M", args: qcow2("cluster_size=4M") },
  { name: "cluster_size=256", args: qcow2("cluster_size=256") },
  { name: "refcount_bits=3", args: qcow2("refcount_bits=3") },
  { name: "refcount_bits=128", args: qcow2("refcount_bits=128") },
  { name: "compat=0.10 with compression_type=zstd", args: qcow2("compat=0.10,compression_type=zstd") },
  { name: "compat=0.10 with data_file", args: qcow2("compat=0.10,data_file=data.raw") },
  { name: "data_file_raw without data_file", args: qcow2("data_file_raw=on") },
  {
    name: "backing file with preallocation, without extended_l2",
    args: ["-f", "qcow2", "-o", "preallocation=metadata", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    setup: backingFiles,
  },
  {
    name: "backing file with data_file_raw",
    args: ["-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    setup: backingFiles,
  },
  { name: "backing_fmt without backing_file", args: qcow2("backing_fmt=qcow2") },
  { name: "-b without -F", args: ["-f", "qcow2", "-b", "base.qcow2", "img.qcow2", "1M"], setup: backingFiles },
  {
    name: "-b with a missing backing file and no size",
    args: ["-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "img.qcow2"],
  },
  { name: "unknown option foo=bar", args: qcow2("foo=bar") },
  { name: "raw with a qcow2 option", args: raw("cluster_size=4k", "1M"), file: "img.raw" },
  { name: "missing size (qcow2)", args: qcow2("", "") },
  { name: "missing size (raw)", args: raw("", ""), file: "img.raw" },
  { name: "compat=0.9", args: qcow2("compat=0.9") },
  { name: "lazy_refcounts=maybe", args: qcow2("lazy_refcounts=maybe") },
  { name: "preallocation=sparse", args: qcow2("preallocation=sparse") },
  { name: "compression_type=lzo", args: qcow2("compression_type=lzo") },
  { name: "raw with preallocation=metadata", args: raw("preallocation=metadata", "1M"), file: "img.raw" },
  { name: "size too large for the L1 table", args: qcow2("cluster_size=512", "1P") },
];

/** The first stderr line without the program's prefix. */
function message(r: RunResult, prefix: string): string {
  const line = r.stderr.split("\n")[0];
  return line.startsWith(prefix) ? line.slice(prefix.length) : `(no "${prefix}" prefix) ${line}`;
}

/** qemu-img info JSON without what depends on where and how the file lies on disk. */
function comparableInfo(j: Record<string, unknown>): Record<string, unknown> {
  const { filename: _f, "actual-size": _a, ...rest } = j;
  return rest;
}

/**
 * `qemu-img map --output=json` extents without host offsets, neighbours that then agree merged.
 * Where data is allocated, "zero" says whether the file has a hole there, which depends on where
 * the clusters lie (and on what shares their file system block): it is left out too.
 */
function extents(json: string): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const e of JSON.parse(json) as Record<string, unknown>[]) {
    const { offset: _o, ...rest } = e;
    if (rest.data === true) delete rest.zero;
    const last = out[out.length - 1];
    const same = (a: Record<string, unknown>, b: Record<string, unknown>) =>
      ["depth", "present", "zero", "data"].every((k) => a[k] === b[k]);
    if (last && same(last, rest) && (last.start as number) + (last.length as number) === rest.start) {
      last.length = (last.length as number) + (rest.length as number);
    } else {
      out.push(rest);
    }
  }
  return out;
}

function imageName(args: string[]): string {
  return args.find((a) => a === "img.qcow2" || a === "img.raw") ?? "img.qcow2";
}

/**
 * Images whose file qcowkit lays out otherwise than qemu-img (same guest view, same check and
 * map results): metadata that outgrows one refcount block at creation (QEMU grows its refcount
 * table step by step, qcowkit sizes it at once), and preallocation, done in another order.
 */
const OWN_LAYOUT = new Set([
  "refcount_bits=64, cluster_size=512",
  "refcount_bits=64, preallocation=metadata",
  "refcount_bits=64, cluster_size=512, preallocation=metadata",
  "preallocation=falloc",
  "preallocation=full",
  "preallocation=full, extended_l2",
  "backing file, preallocation=metadata with extended_l2",
]);

describe("qcowkit create", () => {
  const tmp = useTempDir("create");
  let n = 0;

  /** Two fresh directories, q for qemu-img and k for qcowkit, set up alike. */
  async function dirs(setup?: (dir: string) => Promise<void>): Promise<{ q: string; k: string }> {
    const base = tmp.file(`case-${n++}`);
    const q = path.join(base, "q");
    const k = path.join(base, "k");
    await fs.mkdir(q, { recursive: true });
    await fs.mkdir(k, { recursive: true });
    // Each directory makes its own files (a copy would not keep a sparse file sparse).
    if (setup) await Promise.all([setup(q), setup(k)]);
    return { q, k };
  }

  async function runBoth(args: string[], d: { q: string; k: string }): Promise<{ qr: RunResult; kr: RunResult }> {
    const [qr, kr] = await Promise.all([
      qemuImg(["create", ...args], { cwd: d.q }),
      qcowkit(["create", ...args], { cwd: d.k, timeoutMs: 15_000 }),
    ]);
    assertNoStackTrace(kr.stderr, `qcowkit create ${args.join(" ")}`);
    return { qr, kr };
  }

  for (const c of [...QCOW2_CASES, ...RAW_CASES]) {
    test(c.name, async (t) => {
      const d = await dirs(c.setup);
      const { qr, kr } = await runBoth(c.args, d);
      assert.equal(qr.code, 0, `fixture: qemu-img create ${c.args.join(" ")}: ${qr.stderr}`);
      const file = imageName(c.args);
      const isQcow2 = file.endsWith(".qcow2");
      await t.test("exit status and Formatting line", () => {
        assert.equal(kr.code, 0, `qcowkit create ${c.args.join(" ")}: exit ${kr.code}\n${kr.stderr}`);
        assert.equal(kr.stdout, qr.stdout, "stdout (the Formatting line)");
      });
      if (kr.code !== 0) return;
      if (c.after) await Promise.all([c.after(d.q), c.after(d.k)]);
      const fmt = isQcow2 ? "qcow2" : "raw";
      // Everything the subtests look at, run side by side.
      const [check, infoK, infoQ, infoKit, mapK, mapQ] = await Promise.all([
        isQcow2 ? qemuImg(["check", "--output=json", file], { cwd: d.k }) : undefined,
        qemuImg(["info", "-f", fmt, "--output=json", file], { cwd: d.k }),
        qemuImg(["info", "-f", fmt, "--output=json", file], { cwd: d.q }),
        qcowkit(["info", "-f", fmt, "--output=json", file], { cwd: d.k }),
        isQcow2 ? qemuImg(["map", "-f", fmt, "--output=json", file], { cwd: d.k }) : undefined,
        isQcow2 ? qemuImg(["map", "-f", fmt, "--output=json", file], { cwd: d.q }) : undefined,
      ]);
      assert.equal(infoQ.code, 0, `fixture: qemu-img info of qemu-img's image: ${infoQ.stderr}`);
      if (check) {
        await t.test("qemu-img check", () => {
          const j = JSON.parse(check.stdout) as Record<string, number>;
          const bad = (j["check-errors"] ?? 0) + (j.corruptions ?? 0) + (j.leaks ?? 0);
          assert.ok(
            check.code === 0 && bad === 0,
            `qemu-img check (exit ${check.code}): ${check.stdout}${check.stderr}`,
          );
        });
      }
      await t.test("qcowkit info --output=json equals qemu-img's", () => {
        assertNoStackTrace(infoKit.stderr, "qcowkit info");
        assert.equal(infoKit.code, infoK.code, `qcowkit info exits ${infoKit.code}: ${infoKit.stderr}`);
        assert.deepEqual(JSON.parse(infoKit.stdout), JSON.parse(infoK.stdout));
      });
      await t.test("the same image as qemu-img create makes (info)", () => {
        assert.equal(infoK.code, 0, `qemu-img info: ${infoK.stderr}`);
        assert.deepEqual(
          comparableInfo(JSON.parse(infoK.stdout) as Record<string, unknown>),
          comparableInfo(JSON.parse(infoQ.stdout) as Record<string, unknown>),
        );
      });
      if (mapK && mapQ) {
        // What is allocated, zero or backed (preallocation, backing files), wherever it lies.
        await t.test("the same image as qemu-img create makes (map, offsets aside)", () => {
          assert.equal(mapK.code, 0, `qemu-img map: ${mapK.stderr}`);
          assert.deepEqual(extents(mapK.stdout), extents(mapQ.stdout));
        });
      }
      if (isQcow2 && !OWN_LAYOUT.has(c.name)) {
        await t.test("the file is qemu-img's, byte for byte", async () => {
          await assertSameFile(path.join(d.q, file), path.join(d.k, file), "qemu-img's file");
        });
      }
      // File sizes where data is (preallocated, a raw image, an external data file): the disk
      // the guest sees. Metadata-only qcow2 files are compared byte for byte above.
      const sized = [
        ...(isQcow2 && !/preallocation=(falloc|full)/.test(c.args.join(" ")) ? [] : [file]),
        ...(c.alsoCreates ?? []),
      ];
      await t.test("file sizes", async () => {
        for (const f of sized) {
          const [sk, sq] = await Promise.all([fs.stat(path.join(d.k, f)), fs.stat(path.join(d.q, f))]);
          assert.equal(sk.size, sq.size, `${f}: length ${sk.size}, qemu-img's ${sq.size}`);
        }
      });
      if (!isQcow2) {
        await t.test("reads as zeros", async () => {
          // The guest view, as qemu-img compares it with a zero image of the same size.
          const zero = path.join(d.k, "zero.qcow2");
          await qemuImgOk(["create", "-q", "-f", "qcow2", zero, String((await fs.stat(path.join(d.k, file))).size)]);
          const r = await qemuImg(["compare", "-f", "raw", "-F", "qcow2", path.join(d.k, file), zero]);
          assert.equal(r.code, 0, `qemu-img compare with zeros: ${r.stdout}${r.stderr}`);
        });
      }
    });
  }

  for (const c of ERROR_CASES) {
    test(`refused: ${c.name}`, async (t) => {
      const d = await dirs(c.setup);
      const { qr, kr } = await runBoth(c.args, d);
      assert.equal(qr.code, 1, `fixture: qemu-img create ${c.args.join(" ")} should fail: ${qr.stdout}${qr.stderr}`);
      const file = c.file ?? imageName(c.args);
      const what = `qcowkit create ${c.args.join(" ")}`;
      await t.test("exit status 1", () => {
        assert.equal(kr.code, 1, `${what}: exit ${kr.code}, qemu-img exits 1\n  stderr: ${kr.stderr}`);
      });
      await t.test("qemu-img's message", () => {
        assert.equal(message(kr, "qcowkit: "), message(qr, "qemu-img: "), `${what}: error message`);
      });
      await t.test("stdout (Formatting line or nothing)", () => {
        assert.equal(kr.stdout, qr.stdout, `${what}: stdout`);
      });
      await t.test("the same files left behind", () => {
        for (const f of [file, "data.raw"]) {
          const left = existsSync(path.join(d.q, f));
          assert.equal(
            existsSync(path.join(d.k, f)),
            left,
            `${what}: qemu-img leaves ${f} ${left ? "behind" : "absent"}`,
          );
        }
      });
    });
  }
});
