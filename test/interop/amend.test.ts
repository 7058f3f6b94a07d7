/**
 * `qcowkit amend` against qemu-img 7.2 on images QEMU wrote (data, zero clusters from
 * `qemu-io write -z`, compressed clusters, internal snapshots, a backing file): after each
 * amendment `qemu-img check` is clean, `qemu-img info` shows the change, and the guest contents
 * (active layer and snapshots) compare equal to the original's. Refusals: the same exit code,
 * stdout and message as qemu-img on a copy of the same image, and both images still alike.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertCleanExit,
  assertInfoJsonMatches,
  assertMapJsonMatches,
  CLI_PREFIX,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  useTempDir,
} from "./util.js";

interface Qcow2Specific {
  compat: string;
  "refcount-bits": number;
  "lazy-refcounts"?: boolean;
  "compression-type"?: string;
  "data-file"?: string;
}

async function specific(file: string, cwd?: string): Promise<Qcow2Specific & { size: number }> {
  const info = JSON.parse((await qemuImgOk(["info", "--output=json", file], { cwd })).stdout) as {
    "format-specific": { data: Qcow2Specific };
    "virtual-size": number;
  };
  return { ...info["format-specific"].data, size: info["virtual-size"] };
}

async function assertCheckClean(file: string, cwd?: string): Promise<void> {
  const r = await qemuImg(["check", file], { cwd });
  assert.equal(r.code, 0, `qemu-img check ${file}: exit ${r.code}\n${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /No errors were found on the image/);
}

/** The active layer and every snapshot of `a` and `b` read the same (qemu-img's reading). */
async function assertSameContents(a: string, b: string, snapshots: string[], dir: string, cwd?: string): Promise<void> {
  const cmp = await qemuImg(["compare", a, b], { cwd });
  assert.equal(cmp.code, 0, `qemu-img compare ${a} ${b}: ${cmp.stdout}${cmp.stderr}`);
  for (const s of snapshots) {
    const ra = path.join(dir, `a-${s}.raw`);
    const rb = path.join(dir, `b-${s}.raw`);
    await qemuImgOk(["convert", "-O", "raw", "-l", `snapshot.name=${s}`, a, ra]);
    await qemuImgOk(["convert", "-O", "raw", "-l", `snapshot.name=${s}`, b, rb]);
    // Read at each image's current size: a grown image's snapshot reads longer, as zeros.
    const c = await qemuImg(["compare", "-f", "raw", "-F", "raw", ra, rb]);
    assert.equal(c.code, 0, `snapshot ${s}: ${c.stdout}${c.stderr}`);
    await fs.rm(ra);
    await fs.rm(rb);
  }
}

/** Runs qcowkit amend; then qcowkit's info and map of the result must be qemu-img's. */
async function amendOk(args: string[], file: string): Promise<void> {
  const r = await qcowkit(["amend", ...args, file]);
  assertCleanExit(r, 0, `qcowkit amend ${args.join(" ")} ${file}`);
  assert.equal(r.stdout, "");
  await assertInfoJsonMatches(file);
  await assertMapJsonMatches(file);
}

/**
 * A v3 image over a backing file: data, a zero cluster, a zero cluster keeping its host
 * cluster, compressed data, a snapshot, and zero writes after it (so that the snapshot and the
 * active layer disagree).
 */
async function qemuImage(dir: string, name: string, createOpts = "compat=1.1"): Promise<string> {
  const base = path.join(dir, "base.qcow2");
  await fs.rm(base, { force: true });
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", base, "4M"]);
  await qemuIoOk(base, ["write -P 0x11 0 4M"]);
  const file = path.join(dir, name);
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", createOpts, "-b", "base.qcow2", "-F", "qcow2", file, "4M"]);
  const v3 = !createOpts.includes("compat=0.10");
  await qemuIoOk(file, [
    "write -P 0x22 0 64k",
    v3 ? "write -z 64k 64k" : "write -P 0 64k 64k",
    "write -P 0x33 128k 64k",
    "write -c -P 0x44 192k 64k",
    "write -P 0x55 1M 192k",
  ]);
  await qemuImgOk(["snapshot", "-c", "s1", file]);
  await qemuIoOk(file, [
    v3 ? "write -z 128k 64k" : "write -P 0 128k 64k",
    v3 ? "write -z 1M 64k" : "write -P 0 1M 64k",
    "write -P 0x66 2M 64k",
  ]);
  return file;
}

describe("amend", () => {
  const tmp = useTempDir("amend");

  test("v3 -> v2 -> v3 with zero clusters and snapshots", async () => {
    const dir = await tmp.caseDir("roundtrip");
    const file = await qemuImage(dir, "img.qcow2");
    const orig = path.join(dir, "orig.qcow2");
    await fs.copyFile(file, orig);
    const map = JSON.parse((await qemuImgOk(["map", "--output=json", file])).stdout) as {
      zero: boolean;
      depth: number;
    }[];
    assert.ok(
      map.some((e) => e.zero && e.depth === 0),
      "fixture: the image has zero clusters",
    );

    await amendOk(["-o", "compat=0.10"], file);
    await assertCheckClean(file);
    assert.equal((await specific(file)).compat, "0.10");
    await assertSameContents(orig, file, ["s1"], dir);

    await amendOk(["-o", "compat=1.1"], file);
    await assertCheckClean(file);
    assert.equal((await specific(file)).compat, "1.1");
    await assertSameContents(orig, file, ["s1"], dir);
    // QEMU's own view of the round trip: its amend takes the result down again.
    const again = await qemuImg(["amend", "-o", "compat=0.10", file]);
    assert.equal(again.code, 0, again.stderr);
    await assertCheckClean(file);
    await assertSameContents(orig, file, ["s1"], dir);
  });

  test("v2 -> v3 of a QEMU v2 image, then lazy refcounts on and off", async () => {
    const dir = await tmp.caseDir("upgrade");
    const file = await qemuImage(dir, "img.qcow2", "compat=0.10");
    const orig = path.join(dir, "orig.qcow2");
    await fs.copyFile(file, orig);
    await amendOk(["-o", "compat=1.1"], file);
    await assertCheckClean(file);
    assert.equal((await specific(file)).compat, "1.1");
    await assertSameContents(orig, file, ["s1"], dir);
    // The header is the one qemu-img's own upgrade writes.
    const q = path.join(dir, "qemu.qcow2");
    await fs.copyFile(orig, q);
    await qemuImgOk(["amend", "-o", "compat=1.1", q]);
    const [mine, theirs] = await Promise.all([fs.readFile(file), fs.readFile(q)]);
    assert.deepEqual(mine.subarray(0, 4096), theirs.subarray(0, 4096), "first 4 KiB (header and extensions)");

    await amendOk(["-o", "lazy_refcounts=on"], file);
    await assertCheckClean(file);
    assert.equal((await specific(file))["lazy-refcounts"], true);
    await amendOk(["-o", "lazy_refcounts=off"], file);
    await assertCheckClean(file);
    assert.equal((await specific(file))["lazy-refcounts"], false);
    await assertSameContents(orig, file, ["s1"], dir);
  });

  test("refcount_bits through the widths that hold the shared clusters", async () => {
    const dir = await tmp.caseDir("refcount-bits");
    const file = await qemuImage(dir, "img.qcow2", "compat=1.1,cluster_size=4k");
    const orig = path.join(dir, "orig.qcow2");
    await fs.copyFile(file, orig);
    // Compressed 4k clusters packed into one host cluster give refcounts up to 32: 8 bits at least.
    for (const bits of [64, 8, 32, 16]) {
      await amendOk(["-o", `refcount_bits=${bits}`], file);
      await assertCheckClean(file);
      assert.equal((await specific(file))["refcount-bits"], bits);
      await assertSameContents(orig, file, ["s1"], dir);
    }
    // And QEMU amends what qcowkit wrote.
    await qemuImgOk(["amend", "-o", "refcount_bits=8", file]);
    await assertCheckClean(file);
    await assertSameContents(orig, file, ["s1"], dir);
  });

  test("1-bit refcounts on an image without shared clusters, and back", async () => {
    const dir = await tmp.caseDir("one-bit");
    const file = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", file, "8M"]);
    await qemuIoOk(file, ["write -P 0x77 0 3M", "write -z 4M 1M", "write -P 0x78 6M 512k"]);
    const orig = path.join(dir, "orig.qcow2");
    await fs.copyFile(file, orig);
    await amendOk(["-o", "refcount_bits=1"], file);
    await assertCheckClean(file);
    assert.equal((await specific(file))["refcount-bits"], 1);
    await assertSameContents(orig, file, [], dir);
    await amendOk(["-o", "refcount_bits=16,compat=0.10"], file);
    await assertCheckClean(file);
    const s = await specific(file);
    assert.equal(s.compat, "0.10");
    assert.equal(s["refcount-bits"], 16);
    await assertSameContents(orig, file, [], dir);
  });

  test("downgrade keeps a snapshot's data where a zero cluster shares its host cluster", async () => {
    // qemu-img 7.2 zeroes the shared host cluster in place and marks it COPIED: the snapshot
    // then reads zeros and qemu-img check reports an OFLAG_COPIED error. qcowkit gives the zero
    // cluster a host cluster of its own.
    const dir = await tmp.caseDir("shared-zero-alloc");
    const base = path.join(dir, "base.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", base, "1M"]);
    const file = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", file, "1M"]);
    await qemuIoOk(file, ["write -P 0x33 128k 64k"]);
    await qemuImgOk(["snapshot", "-c", "s1", file]);
    await qemuIoOk(file, ["write -z 128k 64k"]);
    const map = JSON.parse((await qemuImgOk(["map", "--output=json", file])).stdout) as {
      start: number;
      zero: boolean;
      offset?: number;
    }[];
    assert.ok(
      map.some((e) => e.start === 131072 && e.zero && e.offset !== undefined),
      "fixture: a zero cluster with a host cluster",
    );
    const orig = path.join(dir, "orig.qcow2");
    await fs.copyFile(file, orig);
    await amendOk(["-o", "compat=0.10"], file);
    await assertCheckClean(file);
    await assertSameContents(orig, file, ["s1"], dir);
  });

  test("downgrade removes persistent bitmaps and frees their clusters", async () => {
    // qemu-img 7.2 keeps the bitmaps extension in the v2 header; v2 readers ignore it, so its
    // later checks report the bitmaps' clusters as leaked. qcowkit removes the bitmaps.
    const dir = await tmp.caseDir("bitmaps");
    const file = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", file, "64M"]);
    await qemuImgOk(["bitmap", "--add", file, "b0"]);
    await qemuImgOk(["bitmap", "--add", "-g", "64k", file, "b1"]);
    await qemuIoOk(file, ["write -P 0x12 0 1M", "write -P 0x13 40M 256k"]);
    const bitmaps = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout) as {
      "format-specific": { data: { bitmaps?: unknown[] } };
    };
    assert.equal(bitmaps["format-specific"].data.bitmaps?.length, 2, "fixture: two bitmaps");
    const orig = path.join(dir, "orig.qcow2");
    await fs.copyFile(file, orig);
    await amendOk(["-o", "compat=0.10"], file);
    await assertCheckClean(file);
    const s = await specific(file);
    assert.equal(s.compat, "0.10");
    assert.equal((s as { bitmaps?: unknown }).bitmaps, undefined);
    await assertSameContents(orig, file, [], dir);
    const q = await qemuImg(["check", file]);
    assert.doesNotMatch(q.stderr, /bitmaps/);
  });

  test("external data file: rename, clear data_file_raw, refuse downgrade", async () => {
    const dir = await tmp.caseDir("data-file");
    // Data file names are taken from the current directory at creation: work inside `dir`.
    const cwd = { cwd: dir };
    const run = async (tool: "qemu-img" | "qcowkit", name: string): Promise<string> => {
      const file = `${name}.qcow2`;
      await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", `data_file=${name}.raw,data_file_raw=on`, file, "4M"], cwd);
      await qemuIoOk(file, ["write -P 0x21 0 128k", "write -z 1M 64k"], cwd);
      const amendWith = tool === "qemu-img" ? qemuImg : qcowkit;
      for (const o of ["data_file_raw=off", `data_file=${name}2.raw`]) {
        const r = await amendWith(["amend", "-o", o, file], cwd);
        assert.equal(r.code, 0, `${tool} amend -o ${o}: ${r.stderr}`);
      }
      await fs.rename(path.join(dir, `${name}.raw`), path.join(dir, `${name}2.raw`));
      const down = await amendWith(["amend", "-o", "compat=0.10", file], cwd);
      assert.equal(down.code, 1);
      assert.match(down.stderr, /: Cannot downgrade an image with a data file\n$/);
      await assertCheckClean(file, dir);
      return file;
    };
    const q = await run("qemu-img", "q");
    const k = await run("qcowkit", "k");
    const [sq, sk] = await Promise.all([specific(q, dir), specific(k, dir)]);
    assert.deepEqual({ ...sk, "data-file": "" }, { ...sq, "data-file": "" });
    assert.equal(sk["data-file"], "k2.raw");
    await assertSameContents(q, k, [], dir, dir);
  });

  describe("the same result and message as qemu-img", () => {
    const cases: [string, string[], string][] = [
      ["unknown compat", ["-o", "compat=0.9"], ""],
      ["refcount width", ["-o", "refcount_bits=3"], ""],
      ["refcount width not a number", ["-o", "refcount_bits=abc"], ""],
      ["bad bool", ["-o", "lazy_refcounts=maybe"], ""],
      ["backing file change", ["-o", "backing_file=other.qcow2"], ""],
      ["backing file change after a width change", ["-o", "refcount_bits=8,backing_fmt=raw"], ""],
      ["backing file unchanged", ["-o", "backing_file=base.qcow2,backing_fmt=qcow2"], ""],
      ["encryption", ["-o", "encrypt.new-secret=x"], ""],
      ["data file", ["-o", "data_file=x"], ""],
      ["data file raw", ["-o", "data_file_raw=on"], ""],
      ["creation-only option", ["-o", "cluster_size=4k"], ""],
      ["creation-only option, bad value", ["-o", "extended_l2=maybe"], ""],
      ["unknown option", ["-o", "foo=bar"], ""],
      ["compat=0.10 with 8-bit refcounts", ["-o", "compat=0.10,refcount_bits=8"], ""],
      ["compat=0.10 with lazy refcounts", ["-o", "compat=0.10,lazy_refcounts=on"], ""],
      ["1-bit refcounts with shared clusters", ["-o", "refcount_bits=1"], ""],
      ["downgrade of 8-bit refcounts", ["-o", "compat=0.10"], "refcount_bits=8"],
      ["downgrade with extended L2", ["-o", "compat=0.10"], "extended_l2=on"],
      ["downgrade with zstd and compressed clusters", ["-o", "compat=0.10"], "compression_type=zstd"],
      ["option help", ["-o", "help"], ""],
      ["empty option list", ["-o", ""], ""],
      ["no -o", [], ""],
      ["bad cache mode", ["-t", "bogus", "-o", "compat=1.1"], ""],
      ["raw format", ["-f", "raw", "-o", "compat=1.1"], ""],
      ["lazy refcounts off, no change", ["-o", "lazy_refcounts=off"], ""],
      ["data_file_raw off, no change", ["-o", "data_file_raw=off"], ""],
      ["grow", ["-o", "size=6M"], ""],
      ["grow past the L1 table", ["-o", "size=64G"], ""],
      ["grow with the current size", ["-o", "size=4M"], ""],
      ["size not a multiple of 512", ["-o", "size=5000000"], ""],
      ["size not a size", ["-o", "size=big"], ""],
      ["grow a v2 image with snapshots", ["-o", "size=8M"], "compat=0.10"],
      ["grow then downgrade", ["-o", "size=8M,compat=0.10"], ""],
    ];
    for (const [name, args, createOpts] of cases) {
      test(name, async () => {
        const dir = await tmp.caseDir(name.replace(/[^a-z0-9]+/gi, "-"));
        const img = await qemuImage(
          dir,
          "img.qcow2",
          createOpts.startsWith("compat") ? createOpts : createOpts ? `compat=1.1,${createOpts}` : "compat=1.1",
        );
        const q = path.join(dir, "q.qcow2");
        const k = path.join(dir, "k.qcow2");
        const orig = path.join(dir, "orig.qcow2");
        await fs.copyFile(img, q);
        await fs.copyFile(img, orig);
        await fs.rename(img, k);
        const qr = await qemuImg(["amend", ...args, "q.qcow2"], { cwd: dir });
        const kr = await qcowkit(["amend", ...args, "k.qcow2"], { cwd: dir });
        const what = `amend ${args.join(" ")}`;
        assert.equal(
          kr.code,
          qr.code,
          `${what}: exit ${kr.code}, qemu-img ${qr.code}\n  qcowkit: ${kr.stderr}\n  qemu-img: ${qr.stderr}`,
        );
        assert.equal(kr.stdout, qr.stdout, `${what}: stdout`);
        const message = (s: string, prefix: string): string =>
          s
            .replace(new RegExp(`^${prefix}`, "gm"), "")
            .replace(/'(q|k)\.qcow2'/g, "'FILE'")
            .replace(/(qemu-img|qcowkit)( amend)? --help/, "HELP");
        assert.equal(message(kr.stderr, CLI_PREFIX), message(qr.stderr, "qemu-img: "), `${what}: message`);
        await assertCheckClean(k);
        await assertSameContents(orig, k, ["s1"], dir);
        // QEMU's zero cluster expansion, which runs before the zstd refusal, zeroes a cluster a
        // snapshot shares (see "downgrade keeps ..." below): its result is not held to this.
        if (!name.includes("zstd")) {
          await assertCheckClean(q);
          await assertSameContents(orig, q, ["s1"], dir);
        }
        const [sq, sk] = await Promise.all([specific(q), specific(k)]);
        assert.deepEqual(sk, sq, `${what}: qemu-img info of the two images`);
      });
    }
  });
});
