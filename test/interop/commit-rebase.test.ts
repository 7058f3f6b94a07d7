/**
 * `qcowkit commit` and `qcowkit rebase` on chains built by qemu-img and qemu-io: afterwards
 * `qemu-img check` is clean on every image written, `qemu-img compare` shows the guest contents
 * QEMU expects (the base holds the committed top's contents; a rebased image reads as before),
 * `qemu-img map` shows the committed top emptied, `qemu-img info` the new backing file; and the
 * refusals are qemu-img's (same stdout, exit code, error prefix).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  assertCleanExit,
  assertSameAsQemu,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  sha256,
  sizes,
  useTempDir,
} from "./util.js";

const { KiB } = sizes;

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
}

async function mapJson(file: string): Promise<MapEntry[]> {
  return JSON.parse((await qemuImgOk(["map", "--output=json", file])).stdout) as MapEntry[];
}

async function assertChecked(file: string): Promise<void> {
  const r = await qemuImg(["check", file]);
  assert.equal(r.code, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /No errors were found on the image/);
}

async function assertSameContents(a: string, b: string): Promise<void> {
  const r = await qemuImg(["compare", a, b]);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

describe("commit", () => {
  const tmp = useTempDir("commit");

  /** base <- mid <- top in a fresh directory; returns its path and a raw copy of each layer's contents. */
  async function chain(
    name: string,
    opts: { topSize?: string; baseSize?: string; topOptions?: string[] } = {},
  ): Promise<string> {
    const dir = await tmp.caseDir(name);
    const p = (n: string): string => path.join(dir, n);
    await qemuImgOk(["create", "-q", "-f", "qcow2", p("base.qcow2"), opts.baseSize ?? "16M"]);
    await qemuIoOk(p("base.qcow2"), ["write -P 1 0 2M", "write -P 2 6M 1M", "write -P 3 15M 64k"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("mid.qcow2"), "16M"]);
    await qemuIoOk(p("mid.qcow2"), ["write -P 4 1M 64k", "write -z 6M 128k", "write -P 5 9M 3k"]);
    const o = opts.topOptions?.length ? ["-o", opts.topOptions.join(",")] : [];
    await qemuImgOk(["create", "-q", "-f", "qcow2", ...o, "-b", "mid.qcow2", "-F", "qcow2", p("top.qcow2")]);
    if (opts.topSize) await qemuImgOk(["resize", "-q", p("top.qcow2"), opts.topSize]);
    await qemuIoOk(p("top.qcow2"), [
      "write -P 6 512k 1M",
      "write -z 0 4k",
      "write -P 7 6100k 2k",
      "write -z 15M 64k",
      "write -P 8 12M 1000",
      "write -P 9 10M 64k",
      "discard 10M 64k",
    ]);
    for (const l of ["base", "mid", "top"]) {
      await qemuImgOk(["convert", "-q", "-O", "raw", p(`${l}.qcow2`), p(`${l}-before.raw`)]);
    }
    return dir;
  }

  test("into the backing file: base holds the top's contents, the top is emptied", async () => {
    const dir = await chain("plain");
    const p = (n: string): string => path.join(dir, n);
    const r = await qcowkit(["commit", p("top.qcow2")]);
    assertCleanExit(r, 0, "qcowkit commit");
    assert.equal(r.stdout, "Image committed.\n");
    for (const l of ["base", "mid", "top"]) await assertChecked(p(`${l}.qcow2`));
    await assertSameContents(p("top-before.raw"), p("mid.qcow2"));
    await assertSameContents(p("top-before.raw"), p("top.qcow2"));
    await assertSameContents(p("base-before.raw"), p("base.qcow2")); // untouched below
    for (const e of await mapJson(p("top.qcow2"))) {
      assert.ok(!(e.present && e.depth === 0), `top still allocates ${e.start}+${e.length}`);
    }
    // As small as QEMU leaves it: header, refcount table and block, L1 table.
    assert.ok((await fs.stat(p("top.qcow2"))).size <= 4 * 64 * KiB);
  });

  test("-d keeps the top; -q prints nothing; -p shows progress", async () => {
    const dir = await chain("drop");
    const p = (n: string): string => path.join(dir, n);
    const before = await sha256(p("top.qcow2"));
    const r = await qcowkit(["commit", "-d", "-q", p("top.qcow2")]);
    assertCleanExit(r, 0, "qcowkit commit -d -q");
    assert.equal(r.stdout, "");
    assert.equal(await sha256(p("top.qcow2")), before, "top unchanged");
    await assertSameContents(p("top-before.raw"), p("mid.qcow2"));
    await assertChecked(p("mid.qcow2"));
    const r2 = await qcowkit(["commit", "-p", p("top.qcow2")]);
    assertCleanExit(r2, 0, "qcowkit commit -p");
    assert.match(r2.stdout, /^ {4}\(0\.00\/100%\)\r.*\(100\.00\/100%\)\r\nImage committed\.\n$/s);
  });

  test("-b BASE three deep: every layer above the base is written into it, the others stay", async () => {
    const dir = await chain("deep");
    const p = (n: string): string => path.join(dir, n);
    const top = await sha256(p("top.qcow2"));
    const mid = await sha256(p("mid.qcow2"));
    const r = await qcowkit(["commit", "-b", "base.qcow2", p("top.qcow2")]);
    assertCleanExit(r, 0, "qcowkit commit -b");
    assert.equal(r.stdout, "Image committed.\n");
    await assertChecked(p("base.qcow2"));
    await assertSameContents(p("top-before.raw"), p("base.qcow2"));
    assert.equal(await sha256(p("top.qcow2")), top, "-b implies -d");
    assert.equal(await sha256(p("mid.qcow2")), mid);
  });

  test("a base shorter than the top grows to its size, as QEMU's commit grows it", async () => {
    const dir = await chain("grow", { topSize: "20M", baseSize: "16M" });
    const p = (n: string): string => path.join(dir, n);
    await qemuIoOk(p("top.qcow2"), ["write -P 10 19M 64k"]);
    await qemuImgOk(["convert", "-q", "-O", "raw", p("top.qcow2"), p("top-before.raw")]);
    const r = await qcowkit(["commit", p("top.qcow2")]);
    assertCleanExit(r, 0, "qcowkit commit");
    await assertChecked(p("mid.qcow2"));
    const info = JSON.parse((await qemuImgOk(["info", "--output=json", p("mid.qcow2")])).stdout);
    assert.equal(info["virtual-size"], 20 * 1024 * KiB);
    await assertSameContents(p("top-before.raw"), p("mid.qcow2"));
    // Past what its L1 table maps (512 MiB per entry): the table moves.
    await qemuImgOk(["resize", "-q", p("top.qcow2"), "3G"]);
    await qemuIoOk(p("top.qcow2"), ["write -P 12 2G 1M", "write -P 13 3071M 1M"]);
    await qemuImgOk(["convert", "-q", "-O", "raw", p("top.qcow2"), p("top-3g.raw")]);
    const r2 = await qcowkit(["commit", "-b", "base.qcow2", p("top.qcow2")]);
    assertCleanExit(r2, 0, "qcowkit commit -b (L1 table moves)");
    await assertChecked(p("base.qcow2"));
    await assertSameContents(p("top-3g.raw"), p("base.qcow2"));
    await fs.rm(p("top-3g.raw"));
  });

  test("v2 and snapshot-holding tops are emptied cluster by cluster; the snapshot stays intact", async () => {
    for (const [name, topOptions] of [
      ["v2", ["compat=0.10"]],
      ["snapshot", []],
      ["subclusters", ["extended_l2=on"]],
    ] as const) {
      const dir = await chain(name, { topOptions: [...topOptions] });
      const p = (n: string): string => path.join(dir, n);
      if (name === "snapshot") {
        await qemuImgOk(["snapshot", "-c", "s1", p("top.qcow2")]);
        await qemuIoOk(p("top.qcow2"), ["write -P 11 3M 64k"]);
        await qemuImgOk(["convert", "-q", "-O", "raw", p("top.qcow2"), p("top-before.raw")]);
      }
      const r = await qcowkit(["commit", p("top.qcow2")]);
      assertCleanExit(r, 0, `qcowkit commit (${name})`);
      await assertChecked(p("top.qcow2"));
      await assertChecked(p("mid.qcow2"));
      await assertSameContents(p("top-before.raw"), p("mid.qcow2"));
      await assertSameContents(p("top-before.raw"), p("top.qcow2"));
      for (const e of await mapJson(p("top.qcow2"))) assert.ok(!(e.present && e.depth === 0), `${name}: not emptied`);
      if (name === "snapshot") {
        await qemuImgOk(["convert", "-q", "-O", "raw", "-l", "snapshot.name=s1", p("top.qcow2"), p("s1.raw")]);
        // The snapshot keeps its own clusters; what it does not hold it reads from the
        // backing file, which now holds the committed contents: the same bytes as the top had.
        const r2 = await qemuImg(["compare", "-f", "raw", "-F", "raw", p("s1.raw"), p("top-before.raw")]);
        assert.equal(r2.code, 0, `snapshot s1 after commit: ${r2.stdout}`);
        assert.match((await qemuImgOk(["snapshot", "-l", p("top.qcow2")])).stdout, /\bs1\b/);
      }
    }
  });

  test("refusals are qemu-img's", async () => {
    const dir = await chain("errors");
    await qemuImgOk(["create", "-q", "-f", "raw", path.join(dir, "plain.raw"), "1M"]);
    const refused = [
      ["base.qcow2"],
      ["-b", "nothere.qcow2", "top.qcow2"],
      ["-b", "top.qcow2", "top.qcow2"],
      ["missing.qcow2"],
      [],
      ["top.qcow2", "mid.qcow2"],
      ["-t", "foo", "top.qcow2"],
      ["-r", "abc", "top.qcow2"],
      ["-f", "raw", "plain.raw"],
    ];
    for (const args of refused) await assertSameAsQemu(["commit", ...args], { cwd: dir, qemuCode: 1 });
  });

  test("a 4 TiB sparse chain commits quickly", async () => {
    const dir = await tmp.caseDir("huge");
    const p = (n: string): string => path.join(dir, n);
    await qemuImgOk(["create", "-q", "-f", "qcow2", p("base.qcow2"), "4T"]);
    await qemuIoOk(p("base.qcow2"), ["write -P 1 1G 64k"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("top.qcow2")]);
    await qemuIoOk(p("top.qcow2"), ["write -P 2 3T 1M", "write -z 1G 4k"]);
    const started = Date.now();
    const r = await qcowkit(["commit", p("top.qcow2")], { timeoutMs: 30_000 });
    assertCleanExit(r, 0, "qcowkit commit (4 TiB)");
    assert.ok(Date.now() - started < 20_000, `took ${Date.now() - started} ms`);
    await assertChecked(p("base.qcow2"));
    const m = await mapJson(p("base.qcow2"));
    assert.ok(m.some((e) => e.start <= 3 * 1024 ** 4 && e.start + e.length > 3 * 1024 ** 4 && e.present));
  });
});

describe("rebase", () => {
  const tmp = useTempDir("rebase");

  /** old <- top, and a new base that shares some data with old and differs elsewhere. */
  async function setup(name: string): Promise<string> {
    const dir = await tmp.caseDir(name);
    const p = (n: string): string => path.join(dir, n);
    await qemuImgOk(["create", "-q", "-f", "qcow2", p("old.qcow2"), "16M"]);
    await qemuIoOk(p("old.qcow2"), ["write -P 1 0 2M", "write -P 2 3M 100k", "write -P 3 12M 64k"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", p("new.qcow2"), "8M"]);
    await qemuIoOk(p("new.qcow2"), ["write -P 1 0 1M", "write -P 4 1M 1k", "write -P 5 5M 1M"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", p("top.qcow2")]);
    await qemuIoOk(p("top.qcow2"), ["write -P 6 2M 64k", "write -z 12M 64k", "write -P 7 9000k 3k"]);
    await qemuImgOk(["convert", "-q", "-O", "raw", p("top.qcow2"), p("before.raw")]);
    return dir;
  }

  async function backingOf(file: string): Promise<{ name?: string; format?: string }> {
    const info = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout);
    return { name: info["backing-filename"], format: info["backing-filename-format"] };
  }

  test("safe mode: same guest contents over the new backing file, same clusters copied as qemu-img", async () => {
    const dir = await setup("safe");
    const p = (n: string): string => path.join(dir, n);
    await fs.copyFile(p("top.qcow2"), p("theirs.qcow2"));
    await qemuImgOk(["rebase", "-b", "new.qcow2", "-F", "qcow2", p("theirs.qcow2")]);
    const r = await qcowkit(["rebase", "-b", "new.qcow2", "-F", "qcow2", p("top.qcow2")]);
    assertCleanExit(r, 0, "qcowkit rebase");
    assert.equal(r.stdout, "");
    await assertChecked(p("top.qcow2"));
    await assertSameContents(p("before.raw"), p("top.qcow2"));
    assert.deepEqual(await backingOf(p("top.qcow2")), { name: "new.qcow2", format: "qcow2" });
    const own = async (f: string) =>
      (await mapJson(f)).filter((e) => e.present && e.depth === 0).map((e) => [e.start, e.length]);
    assert.deepEqual(await own(p("top.qcow2")), await own(p("theirs.qcow2")));
  });

  test('-b "": the image becomes standalone', async () => {
    const dir = await setup("standalone");
    const p = (n: string): string => path.join(dir, n);
    const r = await qcowkit(["rebase", "-b", "", p("top.qcow2")]);
    assertCleanExit(r, 0, 'qcowkit rebase -b ""');
    await assertChecked(p("top.qcow2"));
    assert.deepEqual(await backingOf(p("top.qcow2")), { name: undefined, format: undefined });
    await fs.rm(p("old.qcow2"));
    await assertSameContents(p("before.raw"), p("top.qcow2"));
  });

  test("-u: only the name changes; relative names are taken from the image's directory", async () => {
    const dir = await setup("unsafe");
    const p = (n: string): string => path.join(dir, n);
    await fs.mkdir(p("sub"));
    await fs.rename(p("old.qcow2"), p("sub/moved.qcow2"));
    await fs.rename(p("top.qcow2"), p("sub/top.qcow2"));
    const before = await fs.readFile(p("sub/top.qcow2"));
    const r = await qcowkit(["rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", "sub/top.qcow2"], { cwd: dir });
    assertCleanExit(r, 0, "qcowkit rebase -u");
    const after = await fs.readFile(p("sub/top.qcow2"));
    assert.ok(after.subarray(64 * KiB).equals(before.subarray(64 * KiB)), "only the header cluster changed");
    assert.deepEqual(await backingOf(p("sub/top.qcow2")), { name: "moved.qcow2", format: "qcow2" });
    await assertChecked(p("sub/top.qcow2"));
    await assertSameContents(p("before.raw"), p("sub/top.qcow2"));
    // Safe mode with a relative name, run from elsewhere: the name is found beside the image.
    await fs.rename(p("new.qcow2"), p("sub/new.qcow2"));
    const r2 = await qcowkit(["rebase", "-b", "new.qcow2", "-F", "qcow2", "sub/top.qcow2"], { cwd: dir });
    assertCleanExit(r2, 0, "qcowkit rebase (relative)");
    assert.deepEqual(await backingOf(p("sub/top.qcow2")), { name: "new.qcow2", format: "qcow2" });
    await assertSameContents(p("before.raw"), p("sub/top.qcow2"));
  });

  test("onto a layer further down the chain", async () => {
    const dir = await setup("prefix");
    const p = (n: string): string => path.join(dir, n);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", p("over.qcow2")]);
    await qemuIoOk(p("over.qcow2"), ["write -P 8 4M 64k"]);
    await qemuImgOk(["convert", "-q", "-O", "raw", p("over.qcow2"), p("over.raw")]);
    const r = await qcowkit(["rebase", "-p", "-b", "old.qcow2", "-F", "qcow2", p("over.qcow2")]);
    assertCleanExit(r, 0, "qcowkit rebase -p");
    assert.match(r.stdout, /\(100\.00\/100%\)\r\n$/);
    await assertChecked(p("over.qcow2"));
    await assertSameContents(p("over.raw"), p("over.qcow2"));
    assert.deepEqual(await backingOf(p("over.qcow2")), { name: "old.qcow2", format: "qcow2" });
  });

  test("a 4 TiB sparse image rebases quickly", async () => {
    const dir = await tmp.caseDir("huge");
    const p = (n: string): string => path.join(dir, n);
    await qemuImgOk(["create", "-q", "-f", "qcow2", p("old.qcow2"), "4T"]);
    await qemuIoOk(p("old.qcow2"), ["write -P 1 1G 64k", "write -P 3 3T 64k"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", p("new.qcow2"), "4T"]);
    await qemuIoOk(p("new.qcow2"), ["write -P 2 2T 64k"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", p("top.qcow2")]);
    await qemuIoOk(p("top.qcow2"), ["write -P 4 3T 4k"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", p("ref.qcow2")]);
    await qemuIoOk(p("ref.qcow2"), ["write -P 4 3T 4k"]);
    const started = Date.now();
    const r = await qcowkit(["rebase", "-b", "new.qcow2", "-F", "qcow2", p("top.qcow2")], { timeoutMs: 30_000 });
    assertCleanExit(r, 0, "qcowkit rebase (4 TiB)");
    assert.ok(Date.now() - started < 20_000, `took ${Date.now() - started} ms`);
    await assertChecked(p("top.qcow2"));
    await assertSameContents(p("ref.qcow2"), p("top.qcow2"));
  });

  test("refusals are qemu-img's", async () => {
    const dir = await setup("errors");
    const p = (n: string): string => path.join(dir, n);
    await qemuImgOk(["create", "-q", "-f", "raw", p("plain.raw"), "1M"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p("small.qcow2"), "1M"]);
    const long = "a".repeat(1024);
    const refused = [
      ["top.qcow2"],
      ["-b", "new.qcow2"],
      ["-b", "new.qcow2", "-F", "foo", "top.qcow2"],
      ["-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
      ["-b", "new.qcow2", "-F", "qcow2", "missing.qcow2"],
      ["-u", "-b", long, "-F", "qcow2", "top.qcow2"],
      ["-u", "-b", "b".repeat(600), "-F", "qcow2", "small.qcow2"],
      ["-f", "raw", "-u", "-b", "new.qcow2", "-F", "qcow2", "plain.raw"],
      ["-t", "foo", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
      ["-T", "foo", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    ];
    for (const args of refused) {
      const before = await sha256(p("top.qcow2"));
      await assertSameAsQemu(["rebase", ...args], { cwd: dir, qemuCode: 1 });
      assert.equal(await sha256(p("top.qcow2")), before, `rebase ${args.join(" ")} changed the image`);
    }
    // Without -F qemu-img 7.2 copies, then fails to name the backing file; the message is the same.
    await fs.copyFile(p("top.qcow2"), p("top2.qcow2"));
    const q = await qemuImg(["rebase", "-b", "new.qcow2", "top2.qcow2"], { cwd: dir });
    const k = await qcowkit(["rebase", "-b", "new.qcow2", "top.qcow2"], { cwd: dir });
    assert.equal(q.code, 1);
    assert.equal(k.code, 1);
    assert.equal(k.stderr.replace("qcowkit: ", ""), q.stderr.replace("qemu-img: ", ""));
    await assertSameContents(p("before.raw"), p("top.qcow2"));
  });
});
