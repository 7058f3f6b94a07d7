/**
 * `qcowkit bitmap` against `qemu-img bitmap` (7.2): the same commands on two copies of an image
 * must give the same exit codes and messages, the same bitmaps in `qemu-img info`, and, after
 * the same writes (qcowkit's on one copy, qemu-io's on the other), the same dirty bits as QEMU
 * reads them (qemu-nbd -B, nbdinfo --map). `qemu-img check` stays clean after every step.
 */
import assert from "node:assert/strict";
import { copyFile, readFile, writeFile } from "node:fs/promises";
import { before, describe, test } from "node:test";
import { openImageFile } from "../../src/node.js";
import {
  assertNoStackTrace,
  assertSameAsQemu,
  dirtyMap,
  patchFile,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  type RunResult,
  readHeaderExtensions,
  requireTool,
  useTempDir,
} from "./util.js";

const tmp = useTempDir("bitmap-cmd");
const EXT_BITMAPS = 0x23852875;

before(() => {
  for (const tool of ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) requireTool(tool);
});

interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

async function infoOf(file: string): Promise<{ format: string; bitmaps: BitmapInfo[] }> {
  const info = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout);
  return { format: info.format, bitmaps: info["format-specific"]?.data?.bitmaps ?? [] };
}

async function bitmapsOf(file: string): Promise<BitmapInfo[]> {
  return (await infoOf(file)).bitmaps;
}

/** `qemu-img check` finds nothing: no corruption, no leak. */
async function assertClean(file: string, what: string): Promise<void> {
  const r = await qemuImg(["check", "--output=json", file]);
  assert.equal(r.code, 0, `${what}: qemu-img check exit ${r.code}\n${r.stdout}${r.stderr}`);
  const c = JSON.parse(r.stdout);
  assert.equal(c.corruptions ?? 0, 0, `${what}: corruptions`);
  assert.equal(c.leaks ?? 0, 0, `${what}: leaks`);
}

/**
 * Messages with the program name and QEMU's block node name ('#block123', which qcowkit names
 * by the file instead) taken out.
 */
function normalize(stderr: string, files: string[]): string {
  let s = stderr.replace(/^(qemu-img|qcowkit): /gm, "").replace(/#block\d+/g, "NODE");
  for (const f of files) s = s.split(f).join("NODE");
  return s;
}

/**
 * Runs `bitmap ARGS` with qemu-img on `theirs` and with qcowkit on `ours` (FILE in args is
 * written "%"): same exit code and message, same bitmaps afterwards, and ours is clean.
 */
async function sameStep(ours: string, theirs: string, args: string[], files: string[] = []): Promise<RunResult> {
  const q = await qemuImg(["bitmap", ...args.map((a) => (a === "%" ? theirs : a))]);
  const k = await qcowkit(["bitmap", ...args.map((a) => (a === "%" ? ours : a))]);
  const what = `bitmap ${args.join(" ")}`;
  assertNoStackTrace(k.stderr, what);
  assert.equal(
    k.code,
    q.code,
    `${what}: exit ${k.code}, qemu-img ${q.code}\n  qcowkit: ${k.stderr}  qemu-img: ${q.stderr}`,
  );
  assert.equal(
    normalize(k.stderr, [ours, ...files]),
    normalize(q.stderr, [theirs, ...files]),
    `${what}: message differs from qemu-img's`,
  );
  const info = await infoOf(ours);
  assert.deepEqual(info.bitmaps, await bitmapsOf(theirs), `${what}: bitmaps differ from qemu-img's`);
  if (info.format === "qcow2") await assertClean(ours, what);
  return k;
}

/** Same writes: through the qcowkit library on `ours`, through qemu-io on `theirs`. */
async function sameWrites(ours: string, theirs: string, writes: [number, number][], seed: number): Promise<void> {
  const img = await openImageFile(ours, { readOnly: false });
  try {
    for (const [offset, length] of writes) await img.write(new Uint8Array(length).fill(seed), offset);
  } finally {
    await img.close();
  }
  await qemuIoOk(
    theirs,
    writes.map(([o, l]) => `write -P ${seed} ${o} ${l}`),
  );
}

async function assertSameDirty(ours: string, theirs: string, names: string[], what: string): Promise<void> {
  for (const name of names) {
    const [a, b] = [await dirtyMap(ours, name), await dirtyMap(theirs, name)];
    assert.equal(a, b, `${what}: dirty bits of ${name} differ from QEMU's`);
  }
}

/** Sets a directory entry's flags on disk (to make a bitmap "in-use", as a crash leaves it). */
async function setFlags(file: string, name: string, flags: number): Promise<void> {
  const ext = (await readHeaderExtensions(file)).find((e) => e.type === EXT_BITMAPS);
  assert.ok(ext, `${file} has no bitmaps extension`);
  const bytes = await readFile(file);
  const dirSize = Number(bytes.readBigUInt64BE(ext.dataOffset + 8));
  const dirOffset = Number(bytes.readBigUInt64BE(ext.dataOffset + 16));
  for (let at = dirOffset; at < dirOffset + dirSize; ) {
    const nameLen = bytes.readUInt16BE(at + 18);
    const extra = bytes.readUInt32BE(at + 20);
    if (bytes.subarray(at + 24 + extra, at + 24 + extra + nameLen).toString() === name) {
      const f = Buffer.alloc(4);
      f.writeUInt32BE(flags);
      await patchFile(file, at + 12, f);
      return;
    }
    at += Math.ceil((24 + extra + nameLen) / 8) * 8;
  }
  assert.fail(`no bitmap ${name} in ${file}`);
}

const LAYOUTS: { name: string; options: string; size: string }[] = [
  { name: "64k clusters", options: "cluster_size=64k", size: "64M" },
  { name: "512-byte clusters, refcount_bits=1", options: "cluster_size=512,refcount_bits=1", size: "16M" },
  {
    name: "4k clusters, refcount_bits=64, lazy_refcounts",
    options: "cluster_size=4k,refcount_bits=64,lazy_refcounts=on",
    size: "32M",
  },
  { name: "2M clusters", options: "cluster_size=2M", size: "256M" },
  { name: "extended L2, zstd", options: "cluster_size=128k,extended_l2=on,compression_type=zstd", size: "64M" },
];

describe("every action on every layout, as qemu-img does it", () => {
  for (const layout of LAYOUTS) {
    test(layout.name, async () => {
      const dir = await tmp.caseDir(layout.name.replace(/[^a-z0-9]+/gi, "-"));
      const ours = `${dir}/ours.qcow2`;
      const theirs = `${dir}/theirs.qcow2`;
      await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", layout.options, theirs, layout.size]);
      await qemuIoOk(theirs, ["write -P 3 0 1M", "write -P 4 5M 300k"]);
      await copyFile(theirs, ours);
      const steps: string[][] = [
        ["--add", "%", "a"],
        ["--add", "-g", "4k", "%", "b"],
        ["--add", "--disable", "%", "c"],
        ["--add", "-g", "512", "%", "d"],
        ["--add", "--granularity", "1M", "%", "e"],
        ["--add", "%", "a"],
      ];
      for (const s of steps) await sameStep(ours, theirs, s);
      await sameWrites(
        ours,
        theirs,
        [
          [1 << 20, 70000],
          [(7 << 20) + 512, 1024],
          [(9 << 20) - 100, 4096],
        ],
        7,
      );
      await assertSameDirty(ours, theirs, ["a", "b", "c", "d", "e"], "after writes");
      const more: string[][] = [
        ["--disable", "%", "a"],
        ["--enable", "%", "c"],
        ["--merge", "b", "%", "c"],
        ["--merge", "e", "%", "d"],
        ["--merge", "d", "%", "e"],
        ["--clear", "%", "b"],
        ["--add", "--remove", "%", "f"],
        ["--add", "-g", "8k", "--disable", "--add", "%", "g"],
        ["--remove", "%", "b"],
      ];
      for (const s of more) await sameStep(ours, theirs, s);
      await sameWrites(ours, theirs, [[3 << 20, 200000]], 9);
      await assertSameDirty(ours, theirs, ["a", "c", "d", "e", "g"], "after merge, clear and more writes");
      await assertSameAsQemu(["info", "--output=json", ours], { json: true });
      for (const name of ["a", "c", "d", "e", "g"]) await sameStep(ours, theirs, ["--remove", "%", name]);
      assert.deepEqual(await bitmapsOf(ours), [], "no bitmaps are left");
      await sameStep(ours, theirs, ["--add", "%", "again"]);
      await sameWrites(ours, theirs, [[0, 4096]], 1);
      await assertSameDirty(ours, theirs, ["again"], "a bitmap added after the extension was dropped");
      const cmp = await qemuImg(["compare", ours, theirs]);
      assert.equal(cmp.code, 0, `guest data: ${cmp.stdout}`);
    });
  }
});

test("a bitmap added through qcowkit records qcowkit's and QEMU's writes as QEMU's own would", async () => {
  const dir = await tmp.caseDir("dirty");
  const ours = `${dir}/ours.qcow2`;
  const theirs = `${dir}/theirs.qcow2`;
  await qemuImgOk(["create", "-q", "-f", "qcow2", theirs, "64M"]);
  await qemuIoOk(theirs, ["write -P 1 0 2M"]);
  await copyFile(theirs, ours);
  for (const args of [["--add"], ["--add", "-g", "4k"], ["--add", "-g", "1M"], ["--add", "--disable"]]) {
    const name = args.join("").replace(/-/g, "") || "x";
    await sameStep(ours, theirs, [...args, "%", name]);
  }
  const names = ["add", "addg4k", "addg1M", "adddisable"];
  // Writes, zero writes and discards through qcowkit, the same through qemu-io.
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
  await assertClean(ours, "after qcowkit's writes");
  await assertSameDirty(ours, theirs, names, "qcowkit's writes");
  // QEMU's writes on top of what qcowkit stored.
  for (const f of [ours, theirs]) await qemuIoOk(f, ["write -P 5 33M 8k"]);
  await assertSameDirty(ours, theirs, names, "QEMU's writes after qcowkit's");
  // The library's addBitmap in a session that then writes: the new bitmap records them.
  const { addBitmap } = await import("../../src/index.js");
  const img2 = await openImageFile(ours, { readOnly: false });
  if (img2.format !== "qcow2") assert.fail("qcow2 expected");
  await addBitmap(img2, "late", { granularity: 16384 });
  await img2.write(new Uint8Array(3000).fill(2), (50 << 20) + 1000);
  await img2.close();
  await qemuImgOk(["bitmap", "--add", "-g", "16k", theirs, "late"]);
  await qemuIoOk(theirs, [`write -P 2 ${(50 << 20) + 1000} 3000`]);
  await assertClean(ours, "after addBitmap and writes in one session");
  await assertSameDirty(ours, theirs, [...names, "late"], "a bitmap added in the writing session");
});

test("--merge from another image (-b, -F), with different cluster sizes and granularities", async () => {
  const dir = await tmp.caseDir("merge-b");
  const src = `${dir}/src.qcow2`;
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", src, "64M"]);
  await qemuImgOk(["bitmap", "--add", "-g", "4k", src, "s"]);
  await qemuIoOk(src, ["write -P 1 100k 5k", "write -P 2 10M 1M", "write -P 3 63M 4k"]);
  const ours = `${dir}/ours.qcow2`;
  const theirs = `${dir}/theirs.qcow2`;
  await qemuImgOk(["create", "-q", "-f", "qcow2", theirs, "64M"]);
  await qemuImgOk(["bitmap", "--add", theirs, "t"]);
  await qemuImgOk(["bitmap", "--add", "-g", "512", theirs, "fine"]);
  await qemuIoOk(theirs, ["write -P 4 30M 64k"]);
  await copyFile(theirs, ours);
  await sameStep(ours, theirs, ["--merge", "s", "-b", src, "-F", "qcow2", "%", "t"], [src]);
  await sameStep(ours, theirs, ["--merge", "s", "-b", src, "%", "fine"], [src]);
  await sameStep(ours, theirs, ["--merge", "t", "--merge", "fine", "%", "fine"]);
  await assertSameDirty(ours, theirs, ["t", "fine"], "merged");
});

describe("refusals: the same messages and exit codes as qemu-img", () => {
  let fixtures: Record<string, string> = {};
  before(async () => {
    const dir = await tmp.caseDir("refusals-fixtures");
    const a = `${dir}/a.qcow2`;
    await qemuImgOk(["create", "-q", "-f", "qcow2", a, "64M"]);
    for (const n of ["ok", "u", "dis"]) await qemuImgOk(["bitmap", "--add", a, n]);
    await qemuImgOk(["bitmap", "--disable", a, "dis"]);
    await setFlags(a, "u", 3); // in-use, auto: what a crash leaves
    const small = `${dir}/small.qcow2`;
    await qemuImgOk(["create", "-q", "-f", "qcow2", small, "32M"]);
    await qemuImgOk(["bitmap", "--add", small, "y"]);
    const v2 = `${dir}/v2.qcow2`;
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M"]);
    const big = `${dir}/big.qcow2`;
    await qemuImgOk(["create", "-q", "-f", "qcow2", big, "4T"]);
    const raw = `${dir}/raw.img`;
    await writeFile(raw, Buffer.alloc(1 << 20));
    fixtures = { a, small, v2, big, raw };
  });

  const long = "n".repeat(1024);
  const cases: { name: string; image: string; args: string[] }[] = [
    { name: "no action", image: "a", args: ["%", "x"] },
    { name: "no bitmap name", image: "a", args: ["--add", "%"] },
    { name: "too many names", image: "a", args: ["--add", "%", "x", "y"] },
    { name: "-g without --add", image: "a", args: ["--clear", "-g", "64k", "%", "ok"] },
    { name: "-F without -b", image: "a", args: ["--add", "-F", "qcow2", "%", "x"] },
    { name: "-b without --merge", image: "a", args: ["--add", "-b", "%", "%", "x"] },
    { name: "existing name", image: "a", args: ["--add", "%", "ok"] },
    { name: "empty name", image: "a", args: ["--add", "%", ""] },
    { name: "name too long", image: "a", args: ["--add", "%", long] },
    { name: "granularity not a power of two", image: "a", args: ["--add", "-g", "3000", "%", "x"] },
    { name: "granularity too small", image: "a", args: ["--add", "-g", "256", "%", "x"] },
    { name: "granularity of 4G (32 bits in QEMU)", image: "a", args: ["--add", "-g", "4G", "%", "x"] },
    { name: "granularity of 4G + 512 (32 bits in QEMU)", image: "a", args: ["--add", "-g", "4294967808", "%", "x"] },
    { name: "granularity 2G", image: "a", args: ["--add", "-g", "2G", "%", "x"] },
    { name: "bitmap too large", image: "big", args: ["--add", "-g", "512", "%", "x"] },
    { name: "v2 image", image: "v2", args: ["--add", "%", "x"] },
    { name: "v2 image, remove", image: "v2", args: ["--remove", "%", "x"] },
    { name: "raw image", image: "raw", args: ["--add", "-f", "raw", "%", "x"] },
    { name: "raw image, clear", image: "raw", args: ["--clear", "-f", "raw", "%", "x"] },
    { name: "remove a missing bitmap", image: "a", args: ["--remove", "%", "nope"] },
    { name: "clear a missing bitmap", image: "a", args: ["--clear", "%", "nope"] },
    { name: "enable a missing bitmap", image: "a", args: ["--enable", "%", "nope"] },
    { name: "disable a missing bitmap", image: "a", args: ["--disable", "%", "nope"] },
    { name: "merge from a missing bitmap", image: "a", args: ["--merge", "nope", "%", "ok"] },
    { name: "merge into a missing bitmap", image: "a", args: ["--merge", "ok", "%", "nope"] },
    { name: "clear an in-use bitmap", image: "a", args: ["--clear", "%", "u"] },
    { name: "enable an in-use bitmap", image: "a", args: ["--enable", "%", "u"] },
    { name: "disable an in-use bitmap", image: "a", args: ["--disable", "%", "u"] },
    { name: "merge from an in-use bitmap", image: "a", args: ["--merge", "u", "%", "ok"] },
    { name: "merge into an in-use bitmap", image: "a", args: ["--merge", "ok", "%", "u"] },
    { name: "merge a missing bitmap into an in-use one", image: "a", args: ["--merge", "nope", "%", "u"] },
    { name: "add an in-use name", image: "a", args: ["--add", "%", "u"] },
    { name: "remove an in-use bitmap (allowed)", image: "a", args: ["--remove", "%", "u"] },
    { name: "merge between different sizes", image: "a", args: ["--merge", "y", "-b", "SMALL", "%", "ok"] },
    { name: "merge from a raw file", image: "a", args: ["--merge", "y", "-b", "RAW", "-F", "raw", "%", "ok"] },
    { name: "second action fails, the first stays", image: "a", args: ["--add", "--add", "%", "twice"] },
    { name: "disable before add", image: "a", args: ["--disable", "--add", "%", "late"] },
    {
      name: "clear, enable and disable a disabled bitmap",
      image: "a",
      args: ["--clear", "--enable", "--disable", "%", "dis"],
    },
  ];
  for (const c of cases) {
    test(c.name, async () => {
      const dir = await tmp.caseDir(`refusal-${c.name.replace(/[^a-z0-9]+/gi, "-")}`);
      const ours = `${dir}/ours`;
      const theirs = `${dir}/theirs`;
      await copyFile(fixtures[c.image], ours);
      await copyFile(fixtures[c.image], theirs);
      const args = c.args.map((a) => (a === "SMALL" ? fixtures.small : a === "RAW" ? fixtures.raw : a));
      const r = await sameStep(ours, theirs, args, [fixtures.small, fixtures.raw]);
      assert.ok(r.code !== 0 || !/refus|fails/.test(c.name), "a refusal exits non-zero");
    });
  }
});

test("bitmaps of an image written by a program without bitmap support are ignored, as by QEMU", async () => {
  const dir = await tmp.caseDir("stale");
  const theirs = `${dir}/theirs.qcow2`;
  const ours = `${dir}/ours.qcow2`;
  await qemuImgOk(["create", "-q", "-f", "qcow2", theirs, "64M"]);
  await qemuImgOk(["bitmap", "--add", theirs, "old"]);
  await qemuIoOk(theirs, ["write -P 1 0 1M"]);
  await patchFile(theirs, 88, Buffer.alloc(8)); // autoclear_features: a program without bitmap support wrote it
  await copyFile(theirs, ours);
  await assertSameAsQemu(["info", "--output=json", ours], { json: true });
  const q = await qemuImg(["bitmap", "--add", theirs, "new"]);
  const k = await qcowkit(["bitmap", "--add", ours, "new"]);
  assert.equal(k.code, q.code, `exit: qcowkit ${k.code} (${k.stderr}), qemu-img ${q.code}`);
  assert.deepEqual(await bitmapsOf(ours), await bitmapsOf(theirs));
  // The old directory, table and data are leaked in both, and nothing is corrupt.
  const leaks = async (f: string): Promise<unknown> => {
    const c = JSON.parse((await qemuImg(["check", "--output=json", f])).stdout);
    return [c.corruptions ?? 0, c.leaks ?? 0];
  };
  assert.deepEqual(await leaks(ours), await leaks(theirs));
  await sameWrites(ours, theirs, [[5 << 20, 1000]], 3);
  await assertSameDirty(ours, theirs, ["new"], "a new bitmap after stale ones");
});
