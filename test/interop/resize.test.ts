/**
 * `qcowkit resize` against `qemu-img resize`: each case builds the same image (with qemu-img and
 * qemu-io) in two directories and runs qemu-img in one and qcowkit in the other with the same
 * arguments. Both must exit alike with the same stdout and the same messages (after the program
 * name). When the resize succeeds, qcowkit's result must pass `qemu-img check` with no errors and
 * no leaks, show qemu-img's virtual size, read as qemu-img's own result reads (`qemu-img compare`)
 * and as a raw copy of the original cut or extended to the new size; `qcowkit info` must equal
 * `qemu-img info` on it. When it fails, qcowkit must have left the image as it was.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import { decodeBitmapTableEntry } from "../../src/format/bitmap.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import {
  assertInfoJsonMatches,
  assertNoStackTrace,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  sha256,
  sizes,
  useTempDir,
} from "./util.js";

const { KiB, MiB } = sizes;

interface ResizeCase {
  name: string;
  /** Makes the image (and its backing or data file) in a directory. */
  setup: (dir: string) => Promise<void>;
  /** Arguments after `resize`. */
  args: string[];
  /** The image the case resizes (default img.qcow2). */
  image?: string;
  /** Its format for compare (default qcow2). */
  format?: "qcow2" | "raw";
  /** qemu-img's exit status (default 0). */
  code?: number;
  /** Compare stderr exactly (default), or only its first word (messages of the argument parser). */
  stderr?: "exact" | "prefix";
  /** Other files that must end the same size as qemu-img leaves them (an external data file). */
  sameSize?: string[];
}

async function qcow2(dir: string, opts: string, size: string, writes: string[] = [], name = "img.qcow2") {
  await qemuImgOk(["create", "-q", "-f", "qcow2", ...(opts ? ["-o", opts] : []), name, size], { cwd: dir });
  if (writes.length > 0) await qemuIoOk(name, writes, { cwd: dir });
}

/** Data spread over the image: the first clusters, around 1 MiB, and near `end`. */
function spread(end: number): string[] {
  const middle = Math.floor(end / 2 / 512) * 512;
  return ["write -P 0x11 0 100k", `write -P 0x22 ${middle} 64k`, `write -P 0x33 ${end - 70 * KiB} 70k`];
}

const withBacking =
  (opts: string, backingSize: string, fmt: "qcow2" | "raw" = "qcow2") =>
  async (dir: string) => {
    if (fmt === "qcow2") await qcow2(dir, "", backingSize, [`write -P 0x44 0 ${backingSize}`], "base.qcow2");
    else {
      await qemuImgOk(["create", "-q", "-f", "raw", "base.raw", backingSize], { cwd: dir });
      await qemuIoOk("base.raw", [`write -P 0x55 0 ${backingSize}`], { cwd: dir, format: "raw" });
    }
    const b = fmt === "qcow2" ? "base.qcow2" : "base.raw";
    await qcow2(dir, `${opts ? `${opts},` : ""}backing_file=${b},backing_fmt=${fmt}`, "1M", ["write -P 0x66 0 200k"]);
  };

const CASES: ResizeCase[] = [
  // Growth
  {
    name: "v3, 64k clusters: 8M to 3G (L1 growth)",
    setup: (d) => qcow2(d, "", "8M", spread(8 * MiB)),
    args: ["img.qcow2", "3G"],
  },
  { name: "v2: +1G", setup: (d) => qcow2(d, "compat=0.10", "8M", spread(8 * MiB)), args: ["img.qcow2", "+1G"] },
  {
    name: "512-byte clusters: 2M to 1G (the new L1 table spans refcount blocks)",
    setup: (d) => qcow2(d, "cluster_size=512", "2M", spread(2 * MiB)),
    args: ["img.qcow2", "1G"],
  },
  {
    name: "512-byte clusters, refcount_bits=64, v3: 1M to 300M",
    setup: (d) => qcow2(d, "cluster_size=512,refcount_bits=64", "1M", spread(1 * MiB)),
    args: ["img.qcow2", "300M"],
  },
  {
    name: "2 MiB clusters: 10M to 5T",
    setup: (d) => qcow2(d, "cluster_size=2M", "10M", spread(10 * MiB)),
    args: ["img.qcow2", "5T"],
  },
  {
    name: "extended L2: +1536 bytes, then past a cluster",
    setup: (d) => qcow2(d, "extended_l2=on", "4M", spread(4 * MiB)),
    args: ["img.qcow2", "+1536"],
  },
  { name: "-q: nothing printed", setup: (d) => qcow2(d, "", "1M"), args: ["-q", "img.qcow2", "+64M"] },
  { name: "-f qcow2, the same size", setup: (d) => qcow2(d, "", "1M"), args: ["-f", "qcow2", "img.qcow2", "+0"] },
  ...(["metadata", "falloc", "full"] as const).flatMap((mode) => [
    {
      name: `--preallocation=${mode}`,
      setup: (d: string) => qcow2(d, "", "1M", spread(1 * MiB)),
      args: [`--preallocation=${mode}`, "img.qcow2", "20M"],
    },
    {
      name: `--preallocation=${mode}, 512-byte clusters, from a size within a cluster`,
      setup: (d: string) => qcow2(d, "cluster_size=512", "1000k", spread(1000 * KiB)),
      args: [`--preallocation=${mode}`, "img.qcow2", "+3M"],
    },
  ]),
  {
    name: "v3 with an internal snapshot",
    setup: async (d) => {
      await qcow2(d, "", "4M", spread(4 * MiB));
      await qemuImgOk(["snapshot", "-c", "s1", "img.qcow2"], { cwd: d });
    },
    args: ["img.qcow2", "1G"],
  },
  // Backing files: a longer one must not show through the new area.
  { name: "over a longer qcow2 backing file (v3)", setup: withBacking("", "4M"), args: ["img.qcow2", "6M"] },
  {
    name: "over a longer backing file, extended L2",
    setup: withBacking("extended_l2=on", "4M"),
    args: ["img.qcow2", "+1536"],
  },
  { name: "over a longer raw backing file", setup: withBacking("", "3M", "raw"), args: ["img.qcow2", "5M"] },
  { name: "over a shorter backing file", setup: withBacking("", "512k"), args: ["img.qcow2", "3M"] },
  {
    name: "over a longer backing file, v2: refused (no zero flag)",
    setup: withBacking("compat=0.10", "4M"),
    args: ["img.qcow2", "2M"],
    code: 1,
  },
  {
    name: "over a longer backing file, v2, --preallocation=full",
    setup: withBacking("compat=0.10", "4M"),
    args: ["--preallocation=full", "img.qcow2", "2M"],
  },
  {
    name: "over a longer backing file, --preallocation=metadata",
    setup: withBacking("", "4M"),
    args: ["--preallocation=metadata", "img.qcow2", "2M"],
  },
  // External data files follow the size.
  {
    name: "external data file: grow",
    setup: (d) => qcow2(d, "data_file=img.data", "1M", ["write -P 0x77 0 64k"]),
    args: ["img.qcow2", "3M"],
    sameSize: ["img.data"],
  },
  {
    name: "external data file: shrink",
    setup: (d) => qcow2(d, "data_file=img.data", "3M", ["write -P 0x77 0 2M"]),
    args: ["--shrink", "img.qcow2", "1M"],
    sameSize: ["img.data"],
  },
  {
    name: "raw external data file: grow (the new area is mapped too)",
    setup: (d) => qcow2(d, "data_file=img.data,data_file_raw=on", "1M", ["write -P 0x77 0 64k"]),
    args: ["img.qcow2", "3M"],
    sameSize: ["img.data"],
  },
  // Shrinking
  {
    name: "--shrink, 64k clusters: data past the new end is gone",
    setup: (d) => qcow2(d, "", "8M", spread(8 * MiB)),
    args: ["--shrink", "img.qcow2", "3M"],
  },
  {
    name: "--shrink to a size within a cluster",
    setup: (d) => qcow2(d, "", "8M", ["write -P 0x12 0 8M"]),
    args: ["--shrink", "img.qcow2", "1000k"],
  },
  {
    name: "--shrink by -SIZE, 512-byte clusters",
    setup: (d) => qcow2(d, "cluster_size=512", "6M", ["write -P 0x13 0 6M"]),
    args: ["--shrink", "img.qcow2", "-5000k"],
  },
  {
    name: "--shrink, v2",
    setup: (d) => qcow2(d, "compat=0.10", "6M", spread(6 * MiB)),
    args: ["--shrink", "img.qcow2", "1M"],
  },
  {
    name: "--shrink, extended L2",
    setup: (d) => qcow2(d, "extended_l2=on", "6M", spread(6 * MiB)),
    args: ["--shrink", "img.qcow2", "1234k"],
  },
  {
    name: "--shrink, v3 with an internal snapshot",
    setup: async (d) => {
      await qcow2(d, "", "6M", spread(6 * MiB));
      await qemuImgOk(["snapshot", "-c", "s1", "img.qcow2"], { cwd: d });
      await qemuIoOk("img.qcow2", ["write -P 0x14 5M 64k"], { cwd: d });
    },
    args: ["--shrink", "img.qcow2", "2M"],
  },
  {
    name: "--shrink after growing past a refcount table move (1-bit refcounts)",
    setup: async (d) => {
      await qcow2(d, "cluster_size=512,refcount_bits=1", "8M", ["write -P 0x15 0 8M"]);
    },
    args: ["--shrink", "img.qcow2", "512k"],
  },
  // Refusals
  { name: "shrinking without --shrink", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2", "512K"], code: 1 },
  { name: "-SIZE without --shrink", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2", "-512K"], code: 1 },
  { name: "not a multiple of 512", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2", "+1000"], code: 1 },
  {
    name: "v2 with snapshots",
    setup: async (d) => {
      await qcow2(d, "compat=0.10", "1M");
      await qemuImgOk(["snapshot", "-c", "s1", "img.qcow2"], { cwd: d });
    },
    args: ["img.qcow2", "2M"],
    code: 1,
  },
  { name: "hex size with a suffix (deprecated)", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2", "0x10M"] },
  ...[
    "abc",
    "",
    "1.5x",
    "00x10",
    "0x1.5k",
    "1.5e3k",
    "99999999999999999999",
    "17179869184E",
    "-1",
    "8E",
    "0",
    "-2M",
  ].map((size) => ({
    name: `size '${size}'`,
    setup: (d: string) => qcow2(d, "", "1M"),
    args: ["--shrink", "img.qcow2", size],
    code: 1,
  })),
  { name: "size too large for the L1 table", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2", "4E"], code: 1 },
  {
    name: "size past QEMU's maximum",
    setup: (d) => qcow2(d, "", "1M"),
    args: ["img.qcow2", "9223372036854775807"],
    code: 1,
  },
  {
    name: "preallocation when shrinking",
    setup: (d) => qcow2(d, "", "1M"),
    args: ["--shrink", "--preallocation=full", "img.qcow2", "512k"],
    code: 1,
  },
  {
    name: "preallocation, same size",
    setup: (d) => qcow2(d, "", "1M"),
    args: ["--preallocation=metadata", "img.qcow2", "1M"],
    code: 1,
  },
  {
    name: "bad preallocation mode",
    setup: (d) => qcow2(d, "", "1M"),
    args: ["--preallocation=x", "img.qcow2", "2M"],
    code: 1,
  },
  { name: "no size", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2"], code: 1 },
  { name: "two files", setup: (d) => qcow2(d, "", "1M"), args: ["img.qcow2", "img.qcow2", "2M"], code: 1 },
  {
    name: "-U (not a resize option)",
    setup: (d) => qcow2(d, "", "1M"),
    args: ["-U", "img.qcow2", "2M"],
    code: 1,
    stderr: "prefix",
  },
  // Raw
  ...[
    { name: "raw: grow (probed: qemu-img's warning)", args: ["img.raw", "+1536"] },
    { name: "raw: grow by one byte", args: ["-f", "raw", "img.raw", "+1"] },
    { name: "raw: shrink", args: ["-f", "raw", "--shrink", "img.raw", "1000"] },
    { name: "raw: --preallocation=full", args: ["-f", "raw", "--preallocation=full", "img.raw", "3M"] },
    { name: "raw: --preallocation=falloc", args: ["-f", "raw", "--preallocation=falloc", "img.raw", "3M"] },
    {
      name: "raw: --preallocation=metadata refused",
      args: ["-f", "raw", "--preallocation=metadata", "img.raw", "3M"],
      code: 1,
    },
    { name: "raw: shrink without --shrink", args: ["-f", "raw", "img.raw", "100k"], code: 1 },
  ].map(
    (c): ResizeCase => ({
      ...c,
      image: "img.raw",
      format: "raw",
      setup: async (d) => {
        await qemuImgOk(["create", "-q", "-f", "raw", "img.raw", "1M"], { cwd: d });
        await qemuIoOk("img.raw", ["write -P 0x21 4k 300k"], { cwd: d, format: "raw" });
      },
    }),
  ),
];

/** The program name in messages, so that qemu-img's and qcowkit's can be compared. */
function normalize(stderr: string): string {
  return stderr.replace(/\b(qemu-img|qcowkit)\b/g, "PROG");
}

async function virtualSize(dir: string, image: string, format: string): Promise<number> {
  const r = await qemuImgOk(["info", "-f", format, "--output=json", image], { cwd: dir });
  return (JSON.parse(r.stdout) as { "virtual-size": number })["virtual-size"];
}

describe("qcowkit resize against qemu-img resize", () => {
  const tmp = useTempDir("resize");
  let n = 0;
  for (const c of CASES) {
    const id = n++;
    test(c.name, async () => {
      const base = await tmp.caseDir(`c${id}`);
      const q = path.join(base, "q");
      const k = path.join(base, "k");
      await fs.mkdir(q);
      await fs.mkdir(k);
      await c.setup(q);
      await c.setup(k);
      const image = c.image ?? "img.qcow2";
      const format = c.format ?? "qcow2";
      const code = c.code ?? 0;
      // The guest contents before, as a raw reference.
      await qemuImgOk(["convert", "-f", format, "-O", "raw", image, "ref.raw"], { cwd: q });
      const before = await sha256(path.join(k, image));
      const qr = await qemuImg(["resize", ...c.args], { cwd: q });
      assert.equal(qr.code, code, `fixture: qemu-img resize ${c.args.join(" ")}: ${qr.stdout}${qr.stderr}`);
      const kr = await qcowkit(["resize", ...c.args], { cwd: k });
      const what = `qcowkit resize ${c.args.join(" ")}`;
      assertNoStackTrace(kr.stderr, what);
      assert.equal(kr.code, qr.code, `${what}: exit ${kr.code}, qemu-img ${qr.code}\n  stderr: ${kr.stderr}`);
      assert.equal(kr.stdout, qr.stdout, `${what}: stdout`);
      if ((c.stderr ?? "exact") === "exact") {
        assert.equal(normalize(kr.stderr), normalize(qr.stderr), `${what}: stderr`);
      } else {
        assert.match(kr.stderr, /^qcowkit: |^qemu-img: /, `${what}: stderr`);
      }
      if (code !== 0) {
        assert.equal(await sha256(path.join(k, image)), before, `${what}: a failed resize changed the image`);
        return;
      }
      const size = await virtualSize(k, image, format);
      assert.equal(size, await virtualSize(q, image, format), "virtual size");
      if (format === "qcow2") {
        const chk = await qemuImg(["check", image], { cwd: k });
        assert.equal(chk.code, 0, `qemu-img check after ${what}:\n${chk.stdout}${chk.stderr}`);
        await assertInfoJsonMatches(image, { cwd: k });
      }
      // Both results read as the original cut or extended to the new size (run where each image
      // is: QEMU takes an external data file's name from the working directory).
      const ref = path.join(q, "ref.raw");
      await fs.truncate(ref, size);
      for (const [who, dir] of [
        ["qcowkit's", k],
        ["qemu-img's", q],
      ]) {
        const cmp = await qemuImg(["compare", "-f", format, "-F", "raw", image, ref], { cwd: dir });
        assert.equal(
          cmp.code,
          0,
          `qemu-img compare of ${who} result with the raw reference: ${cmp.stdout}${cmp.stderr}`,
        );
      }
      for (const f of c.sameSize ?? []) {
        const [qs, ks] = await Promise.all([fs.stat(path.join(q, f)), fs.stat(path.join(k, f))]);
        assert.equal(ks.size, qs.size, `${f}: size`);
      }
    });
  }
});

/**
 * Every bitmap's table and data as the image holds them: for each bitmap its name, flags,
 * granularity and table length, and a digest of the data clusters' bytes in table order (zeros
 * for all-zero entries, 0xff for all-ones ones).
 */
async function bitmapContents(file: string): Promise<string[]> {
  const bytes = new Uint8Array(await fs.readFile(file));
  const img = await Qcow2Image.open(new MemoryStorage(bytes), { readOnly: true, metadataOnly: true });
  const cs = img.clusterSize;
  const out: string[] = [];
  for (const b of img.bitmaps) {
    const h = createHash("sha256");
    const dv = new DataView(bytes.buffer, bytes.byteOffset + b.tableOffset, b.tableSize * 8);
    for (let i = 0; i < b.tableSize; i++) {
      const e = decodeBitmapTableEntry(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), cs);
      h.update(
        e.offset !== 0 ? bytes.subarray(e.offset, e.offset + cs) : new Uint8Array(cs).fill(e.allOnes ? 0xff : 0),
      );
    }
    out.push(
      `${b.name} flags=${b.flags} granularity=${2 ** b.granularityBits} entries=${b.tableSize} ${h.digest("hex")}`,
    );
  }
  await img.close();
  return out;
}

describe("qcowkit resize: persistent bitmaps are resized with the disk, as QEMU does", () => {
  const tmp = useTempDir("resize-bitmaps");
  const setup = async (dir: string, opts: string): Promise<void> => {
    await qcow2(dir, opts, "8M");
    await qemuImgOk(["bitmap", "--add", "img.qcow2", "b0"], { cwd: dir });
    await qemuImgOk(["bitmap", "--add", "-g", "512", "img.qcow2", "fine"], { cwd: dir });
    await qemuImgOk(["bitmap", "--add", "--disable", "img.qcow2", "off"], { cwd: dir });
    // Written with the bitmaps enabled: qemu-io sets their bits.
    await qemuIoOk("img.qcow2", ["write -P 1 0 64k", "write -P 2 3M 100k", "write -P 3 7M 1M"], { cwd: dir });
  };
  for (const opts of ["", "cluster_size=512"]) {
    test(`grow then shrink${opts ? ` (${opts})` : ""}: the same bitmaps, bits and flags as qemu-img's`, async () => {
      const base = await tmp.caseDir(`bitmaps-${opts ? "512" : "64k"}`);
      const q = path.join(base, "q");
      const k = path.join(base, "k");
      await fs.mkdir(q);
      await fs.mkdir(k);
      await setup(q, opts);
      await setup(k, opts);
      for (const args of [
        ["img.qcow2", "300M"],
        ["--shrink", "img.qcow2", `${3 * MiB + 512}`],
      ]) {
        const what = `resize ${args.join(" ")}`;
        const qr = await qemuImgOk(["resize", ...args], { cwd: q });
        const kr = await qcowkit(["resize", ...args], { cwd: k });
        assert.equal(kr.code, 0, `qcowkit ${what}: ${kr.stderr}`);
        assert.equal(kr.stdout, qr.stdout);
        const chk = await qemuImg(["check", "img.qcow2"], { cwd: k });
        assert.equal(chk.code, 0, `qemu-img check after qcowkit ${what}:\n${chk.stdout}${chk.stderr}`);
        await assertInfoJsonMatches("img.qcow2", { cwd: k });
        const info = async (dir: string) => {
          const r = await qemuImgOk(["info", "--output=json", "img.qcow2"], { cwd: dir });
          const j = JSON.parse(r.stdout) as {
            "virtual-size": number;
            "format-specific": { data: { bitmaps: unknown } };
          };
          return { size: j["virtual-size"], bitmaps: j["format-specific"].data.bitmaps };
        };
        assert.deepEqual(await info(k), await info(q), `${what}: qemu-img info (size, bitmaps)`);
        assert.deepEqual(
          await bitmapContents(path.join(k, "img.qcow2")),
          await bitmapContents(path.join(q, "img.qcow2")),
          `${what}: bitmap tables and data`,
        );
      }
    });
  }

  test("an inconsistent (in_use) bitmap is refused as qemu-img refuses it; nothing changes", async () => {
    const dir = await tmp.caseDir("bitmaps-in-use");
    await qcow2(dir, "", "1M");
    await qemuImgOk(["bitmap", "--add", "img.qcow2", "b0"], { cwd: dir });
    const file = path.join(dir, "img.qcow2");
    const img = await Qcow2Image.open(new MemoryStorage(new Uint8Array(await fs.readFile(file))), { readOnly: true });
    const flagsAt = (img.extensions.bitmaps?.directoryOffset as number) + 12;
    await img.close();
    const bytes = await fs.readFile(file);
    bytes.writeUInt32BE(bytes.readUInt32BE(flagsAt) | 1, flagsAt);
    await fs.writeFile(file, bytes);
    await fs.copyFile(file, path.join(dir, "q.qcow2"));
    const before = await sha256(file);
    const qr = await qemuImg(["resize", "q.qcow2", "2M"], { cwd: dir });
    assert.equal(qr.code, 1, `fixture: ${qr.stderr}`);
    const kr = await qcowkit(["resize", "img.qcow2", "2M"], { cwd: dir });
    assertNoStackTrace(kr.stderr, "qcowkit resize");
    assert.equal(kr.code, 1);
    assert.equal(normalize(kr.stderr), normalize(qr.stderr));
    assert.equal(await sha256(file), before);
  });
});

describe("qcowkit resize: bounded work on a 4 TiB image", () => {
  const tmp = useTempDir("resize-big");
  test("grow a 4 TiB image to 8 TiB and shrink it to 1 GiB: quick, small file, check clean", async () => {
    const dir = await tmp.caseDir("big");
    await qcow2(dir, "", "4T", ["write -P 0x31 0 64k", "write -P 0x32 3T 64k", "write -P 0x33 4095G 64k"]);
    const grow = await qcowkit(["resize", "img.qcow2", "8T"], { cwd: dir, timeoutMs: 60_000 });
    assert.equal(grow.code, 0, grow.stderr);
    await qemuIoOk("img.qcow2", ["write -P 0x34 7T 64k"], { cwd: dir });
    const shrink = await qcowkit(["resize", "--shrink", "img.qcow2", "1G"], { cwd: dir, timeoutMs: 60_000 });
    assert.equal(shrink.code, 0, shrink.stderr);
    const chk = await qemuImg(["check", "img.qcow2"], { cwd: dir });
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    assert.ok((await fs.stat(path.join(dir, "img.qcow2"))).size < 2 * MiB);
    const r = await qemuIoOk("img.qcow2", ["read -P 0x31 0 64k"], { cwd: dir });
    assert.match(r.stdout, /read 65536\/65536/);
  });
});
