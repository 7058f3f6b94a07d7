/**
 * `qcowkit snapshot` against `qemu-img snapshot`, both ways: snapshots qcowkit makes are listed,
 * read, applied and deleted by QEMU, and QEMU's by qcowkit; after every step `qemu-img check` is
 * clean; an applied snapshot reads as `qemu-img convert -l snapshot.name=X` read it before; the
 * same sequence run by qemu-img on a copy of the image gives the same guest data and the same
 * snapshot list; `snapshot -l` prints what qemu-img prints, byte for byte; refusals carry
 * qemu-img's messages and exit codes.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertCleanExit,
  assertNoStackTrace,
  assertSameAsQemu,
  assertSameFile,
  CLI_PREFIX,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  snapshotTableEntries,
  useTempDir,
} from "./util.js";

describe("qcowkit snapshot", () => {
  const tmp = useTempDir("snapshot-cmd");

  async function kit(args: string[]): Promise<void> {
    const r = await qcowkit(["snapshot", ...args]);
    assertCleanExit(r, 0, `qcowkit snapshot ${args.join(" ")}`);
    assert.equal(r.stdout, "", `qcowkit snapshot ${args.join(" ")} prints nothing`);
  }

  async function assertCheckClean(img: string, what: string): Promise<void> {
    const r = await qemuImg(["check", img]);
    assert.equal(r.code, 0, `${what}: qemu-img check exit ${r.code}\n${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /No errors were found on the image/, `${what}: qemu-img check\n${r.stdout}${r.stderr}`);
    assert.doesNotMatch(r.stdout + r.stderr, /leak/i, `${what}: qemu-img check\n${r.stdout}${r.stderr}`);
  }

  /** The guest contents of the active layer, or of a snapshot, as qemu-img reads them. */
  async function raw(img: string, out: string, snapshot?: string): Promise<string> {
    const l = snapshot === undefined ? [] : ["-l", `snapshot.name=${snapshot}`];
    await qemuImgOk(["convert", "-O", "raw", ...l, img, out]);
    return out;
  }

  /**
   * `snapshot -l` byte for byte, and `info` (human and JSON) apart from the disk size: ext4 may
   * still be allocating extent blocks of a file just written, so st_blocks can change between
   * two runs a few milliseconds apart.
   */
  async function assertListsMatch(img: string): Promise<void> {
    await assertSameAsQemu(["snapshot", "-l", img]);
    for (const args of [
      ["info", img],
      ["info", "--output=json", img],
    ]) {
      const mask = (out: string) => out.replace(/^disk size: .*$/m, "").replace(/"actual-size": \d+/, "");
      const q = await qemuImgOk(args);
      const k = await qcowkit(args);
      assertCleanExit(k, 0, `qcowkit ${args.join(" ")}`);
      assert.equal(mask(k.stdout), mask(q.stdout), `qcowkit ${args.join(" ")}`);
    }
  }

  /** Snapshot table fields per entry, with the dates left out (entries made at other times). */
  async function table(img: string): Promise<unknown[]> {
    const r = await qemuImgOk(["info", "--output=json", img]);
    const info = JSON.parse(r.stdout) as { snapshots?: Record<string, unknown>[] };
    return (info.snapshots ?? []).map(({ "date-sec": _s, "date-nsec": _n, ...rest }) => rest);
  }

  /** Raw bytes of every snapshot table entry, without its L1 offset and dates. */
  async function entryBytes(img: string): Promise<string[]> {
    return (await snapshotTableEntries(img)).map(({ bytes }) => {
      const e = Buffer.from(bytes);
      e.fill(0, 0, 8); // l1_table_offset
      e.fill(0, 16, 24); // date_sec, date_nsec
      return e.toString("hex");
    });
  }

  type Step = { op: "c" | "a" | "d"; name: string } | { io: string[] };

  /**
   * Runs the same steps on two copies of an image, snapshot operations by qemu-img on one and by
   * qcowkit on the other (qemu-io writes on both), checking after every step that qemu-img check
   * is clean, and at the end that both hold the same guest data (active layer and every
   * snapshot) and the same snapshot table apart from dates.
   */
  async function parallel(dir: string, base: string, steps: Step[]): Promise<string> {
    const q = path.join(dir, "by-qemu.qcow2");
    const k = path.join(dir, "by-qcowkit.qcow2");
    await fs.copyFile(base, q);
    await fs.copyFile(base, k);
    for (const s of steps) {
      if ("io" in s) {
        await qemuIoOk(q, s.io);
        await qemuIoOk(k, s.io);
        continue;
      }
      const what = `snapshot -${s.op} ${s.name}`;
      await qemuImgOk(["snapshot", `-${s.op}`, s.name, q]);
      await kit([`-${s.op}`, s.name, k]);
      await assertCheckClean(k, `qcowkit ${what}`);
      await assertListsMatch(k);
    }
    assert.deepEqual(await table(k), await table(q), "snapshot tables (dates aside)");
    assert.deepEqual(await entryBytes(k), await entryBytes(q), "snapshot table entries, byte for byte (dates aside)");
    const infoK = JSON.parse((await qemuImgOk(["info", "--output=json", k])).stdout);
    const infoQ = JSON.parse((await qemuImgOk(["info", "--output=json", q])).stdout);
    assert.equal(infoK["virtual-size"], infoQ["virtual-size"], "virtual size");
    await assertSameFile(await raw(q, path.join(dir, "q.raw")), await raw(k, path.join(dir, "k.raw")), "active layer");
    for (const sn of infoQ.snapshots ?? []) {
      await assertSameFile(
        await raw(q, path.join(dir, `q-${sn.name}.raw`), sn.name),
        await raw(k, path.join(dir, `k-${sn.name}.raw`), sn.name),
        `snapshot ${sn.name}`,
      );
    }
    return k;
  }

  const layouts: [string, string[], string][] = [
    ["v3, 64k clusters", [], "4M"],
    ["v2 (compat=0.10), 4k clusters", ["-o", "compat=0.10,cluster_size=4k"], "2M"],
    ["extended L2, 64k clusters", ["-o", "extended_l2=on"], "4M"],
    ["refcount_bits=64, 512-byte clusters", ["-o", "refcount_bits=64,cluster_size=512"], "2M"],
    ["refcount_bits=4, lazy refcounts", ["-o", "refcount_bits=4,lazy_refcounts=on"], "4M"],
  ];
  for (const [name, opts, size] of layouts) {
    test(`${name}: create, write, create, apply, delete — as qemu-img does them`, async () => {
      const dir = await tmp.caseDir(name.replace(/[^a-z0-9]+/gi, "-"));
      const base = path.join(dir, "base.qcow2");
      await qemuImgOk(["create", "-q", "-f", "qcow2", ...opts, base, size]);
      await qemuIoOk(base, ["write -P 0xa1 0 1M", "write -P 0xa2 1500k 100k", "write -z 1200k 64k"]);
      await parallel(dir, base, [
        { op: "c", name: "first" },
        { io: ["write -P 0xb1 512k 1M", "write -z 0 64k", "discard 1500k 64k"] },
        { op: "c", name: "second" },
        { io: ["write -P 0xc1 100k 10k"] },
        { op: "a", name: "first" },
        { io: ["write -P 0xd1 64k 64k"] },
        { op: "d", name: "first" },
        { op: "a", name: "second" },
        { op: "c", name: "third" },
        { op: "d", name: "second" },
        { op: "d", name: "third" },
      ]);
    });
  }

  test("compressed clusters, shared and then freed", async () => {
    const dir = await tmp.caseDir("compressed");
    const src = path.join(dir, "src.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", src, "4M"]);
    await qemuIoOk(src, ["write -P 0x11 0 2M", "write -P 0x12 3M 300k"]);
    const base = path.join(dir, "base.qcow2");
    await qemuImgOk(["convert", "-c", "-O", "qcow2", src, base]);
    await parallel(dir, base, [
      { op: "c", name: "s1" },
      { io: ["write -P 0x21 0 100k", "write -c -P 0x22 3584k 64k"] },
      { op: "c", name: "s2" },
      { op: "a", name: "s1" },
      { op: "d", name: "s1" },
      { op: "d", name: "s2" },
    ]);
  });

  test("an overlay: snapshots of what the top layer holds, the backing file untouched", async () => {
    const dir = await tmp.caseDir("overlay");
    const backing = path.join(dir, "backing.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", backing, "4M"]);
    await qemuIoOk(backing, ["write -P 0x61 0 4M"]);
    const base = path.join(dir, "base.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "backing.qcow2", "-F", "qcow2", base], { cwd: dir });
    await qemuIoOk(base, ["write -P 0x62 1M 100k"]);
    const backingBytes = await fs.readFile(backing);
    await parallel(dir, base, [
      { op: "c", name: "s" },
      { io: ["write -P 0x63 0 2M", "write -z 3M 64k"] },
      { op: "a", name: "s" },
      { op: "d", name: "s" },
    ]);
    assert.ok(backingBytes.equals(await fs.readFile(backing)), "the backing file is not written");
  });

  test("QEMU's snapshots applied and deleted by qcowkit; writes after a snapshot undone by apply", async () => {
    const dir = await tmp.caseDir("from-qemu");
    const img = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "4M"]);
    await qemuIoOk(img, ["write -P 0x31 0 3M"]);
    await qemuImgOk(["snapshot", "-c", "a", img]);
    await qemuIoOk(img, ["write -P 0x32 1M 2M"]);
    await qemuImgOk(["snapshot", "-c", "b", img]);
    const a = await raw(img, path.join(dir, "a.raw"), "a");
    await qemuIoOk(img, ["write -P 0x33 0 4M"]);
    await kit(["-a", "a", img]);
    await assertCheckClean(img, "after -a a");
    await assertSameFile(a, await raw(img, path.join(dir, "now1.raw")), "active after applying a");
    await qemuIoOk(img, ["write -P 0x34 2M 64k"]);
    await kit(["-d", "b", img]);
    await assertCheckClean(img, "after -d b");
    await kit(["-a", "1", img]); // by id
    await assertCheckClean(img, "after -a 1");
    await assertSameFile(a, await raw(img, path.join(dir, "now2.raw")), "active after applying id 1");
    await assertSameFile(a, await raw(img, path.join(dir, "a2.raw"), "a"), "snapshot a kept its contents");
    await kit(["-d", "a", img]);
    await assertCheckClean(img, "after -d a");
    await assertListsMatch(img);
    await assertSameFile(a, await raw(img, path.join(dir, "now3.raw")), "active after deleting everything");
  });

  test("qcowkit's snapshots applied and deleted by QEMU", async () => {
    const dir = await tmp.caseDir("to-qemu");
    const img = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "4M"]);
    await qemuIoOk(img, ["write -P 0x41 0 3M"]);
    const before = await raw(img, path.join(dir, "before.raw"));
    await kit(["-c", "mine", img]);
    await assertListsMatch(img);
    await assertSameFile(before, await raw(img, path.join(dir, "mine.raw"), "mine"), "snapshot as QEMU reads it");
    await qemuIoOk(img, ["write -P 0x42 512k 2M"]);
    await kit(["-c", "mine2", img]);
    await qemuImgOk(["snapshot", "-a", "mine", img]);
    await assertCheckClean(img, "qemu-img applied qcowkit's snapshot");
    await assertSameFile(before, await raw(img, path.join(dir, "now.raw")), "active after QEMU applied it");
    await qemuImgOk(["snapshot", "-d", "mine", img]);
    await qemuImgOk(["snapshot", "-d", "mine2", img]);
    await assertCheckClean(img, "qemu-img deleted qcowkit's snapshots");
  });

  test("a snapshot's disk size: apply shrinks and grows the image as qemu-img does", async () => {
    const dir = await tmp.caseDir("sizes");
    const base = path.join(dir, "base.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", base, "1M"]);
    await qemuIoOk(base, ["write -P 0x51 0 1M"]);
    const k = await parallel(dir, base, [{ op: "c", name: "small" }]);
    const q = path.join(dir, "by-qemu.qcow2");
    for (const f of [k, q]) {
      await qemuImgOk(["resize", "-q", f, "70M"]);
      await qemuIoOk(f, ["write -P 0x52 65M 64k"]);
    }
    // Continue from the resized copies (parallel copies its base: run the rest by hand).
    await qemuImgOk(["snapshot", "-c", "big", q]);
    await kit(["-c", "big", k]);
    await qemuImgOk(["snapshot", "-a", "small", q]);
    await kit(["-a", "small", k]);
    await assertCheckClean(k, "after applying the small snapshot");
    await assertListsMatch(k);
    await assertSameFile(await raw(q, path.join(dir, "q1.raw")), await raw(k, path.join(dir, "k1.raw")), "small");
    await qemuImgOk(["snapshot", "-a", "big", q]);
    await kit(["-a", "big", k]);
    await assertCheckClean(k, "after applying the big snapshot");
    await assertSameFile(await raw(q, path.join(dir, "q2.raw")), await raw(k, path.join(dir, "k2.raw")), "big");
    const size = (f: string) =>
      qemuImgOk(["info", "--output=json", f]).then((r) => JSON.parse(r.stdout)["virtual-size"]);
    assert.equal(await size(k), 70 * 1024 * 1024);
    assert.equal(await size(k), await size(q));
  });

  test("-l: byte for byte, with odd names (UTF-8, 300 bytes cut to 255 as qemu-img cuts it)", async () => {
    const dir = await tmp.caseDir("list");
    const img = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "1M"]);
    await assertSameAsQemu(["snapshot", "-l", img]); // no snapshots: nothing at all
    const long = "n".repeat(300);
    await qemuImgOk(["snapshot", "-c", long, img]);
    await kit(["-c", long, img]);
    await qemuImgOk(["snapshot", "-c", "ünïcödé", img]);
    await kit(["-c", "ünïcödé", img]);
    await kit(["-c", "", img]);
    await kit(["-c", "with space", img]);
    await assertListsMatch(img);
    await assertSameAsQemu(["snapshot", "-U", "-l", img]);
    const names = (await table(img)).map((e) => (e as { name: string }).name);
    assert.deepEqual(names, ["n".repeat(255), "n".repeat(255), "ünïcödé", "ünïcödé", "", "with space"]);
    // qemu-img deletes by name only: "2" is an id here, not a name.
    await assertRefusedLikeQemu(["snapshot", "-d", "2", img]);
    await kit(["-d", "with space", img]);
    await assertCheckClean(img, "after deletes");
  });

  /** Same exit code and stdout as qemu-img, and the same message after the program's prefix. */
  async function assertRefusedLikeQemu(args: string[], qemuCode = 1): Promise<void> {
    const q = await qemuImg(args);
    assert.equal(q.code, qemuCode, `fixture: qemu-img ${args.join(" ")}: ${q.stderr}`);
    const k = await qcowkit(args);
    const what = `qcowkit ${args.join(" ")}`;
    assertNoStackTrace(k.stderr, what);
    assert.equal(k.code, q.code, `${what}: exit code\n  qcowkit: ${k.stderr}\n  qemu-img: ${q.stderr}`);
    assert.equal(k.stdout, q.stdout, `${what}: stdout`);
    const message = (s: string, prefix: string) =>
      s
        .split("\n")
        .find((l) => l.startsWith(prefix))
        ?.slice(prefix.length);
    assert.equal(message(k.stderr, CLI_PREFIX), message(q.stderr, "qemu-img: "), `${what}: message`);
  }

  test("refusals: qemu-img's messages and exit codes, and the image left as it was", async () => {
    const dir = await tmp.caseDir("refusals");
    const img = path.join(dir, "img.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "1M"]);
    await qemuImgOk(["snapshot", "-c", "s", img]);
    const bytes = await fs.readFile(img);
    await assertRefusedLikeQemu(["snapshot", "-a", "nope", img]);
    await assertRefusedLikeQemu(["snapshot", "-d", "nope", img]);
    await assertRefusedLikeQemu(["snapshot", "-l", "-c", "x", img]);
    await assertRefusedLikeQemu(["snapshot", "-c", "x", "-c", "y", img]);
    await assertRefusedLikeQemu(["snapshot", "-l", img, img]);
    await assertRefusedLikeQemu(["snapshot", "-l"]);
    await assertRefusedLikeQemu(["snapshot", "-U", "-c", "x", img]);
    assert.ok(bytes.equals(await fs.readFile(img)), "refusals leave the image unchanged");
    await assertSameAsQemu(["snapshot", img]); // no action: nothing done, exit 0

    const rc1 = path.join(dir, "rc1.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", rc1, "1M"]);
    await qemuIoOk(rc1, ["write 0 64k"]);
    const rc1Bytes = await fs.readFile(rc1);
    const k = await qcowkit(["snapshot", "-c", "s", rc1]);
    assertNoStackTrace(k.stderr, "refcount_bits=1");
    assert.equal(k.code, 1);
    assert.equal(k.stderr, `${CLI_PREFIX}Could not create snapshot 's': -22 (Invalid argument)\n`);
    await assertCheckClean(rc1, "refcount_bits=1 after the refused create (qemu-img leaks a cluster here)");
    await fs.writeFile(rc1, rc1Bytes);
    await assertRefusedLikeQemu(["snapshot", "-c", "s", rc1]);

    const withData = path.join(dir, "df.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", `data_file=${path.join(dir, "df.raw")}`, withData, "1M"]);
    await assertRefusedLikeQemu(["snapshot", "-c", "s", withData]);

    const bm = path.join(dir, "bm.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", bm, "1M"]);
    await qemuImgOk(["bitmap", "--add", bm, "b0"]);
    await kit(["-c", "s", bm]);
    await assertCheckClean(bm, "snapshot of an image with a bitmap");
    await assertListsMatch(bm);
    await assertRefusedLikeQemu(["snapshot", "-a", "s", bm]);
    await kit(["-d", "s", bm]);
    await assertCheckClean(bm, "deleted from an image with a bitmap");
    await assertListsMatch(bm);

    const rawImg = path.join(dir, "r.raw");
    await fs.writeFile(rawImg, Buffer.alloc(1 << 20));
    for (const op of [
      ["-c", "s"],
      ["-a", "s"],
      ["-d", "s"],
    ]) {
      await assertRefusedLikeQemu(["snapshot", ...op, rawImg]);
    }
    await assertSameAsQemu(["snapshot", "-l", rawImg]);
  });
});
