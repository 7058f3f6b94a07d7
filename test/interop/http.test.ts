/**
 * Remote images over HTTP: qemu-img's images (compressed, and a backing chain whose relative
 * backing names resolve against the URL) served by a local HTTP server with range support.
 *
 *  1. info / map / check / compare / convert on the URL: the same output as qemu-img on the same
 *     URL (its curl driver), and the same bytes as the local file.
 *  2. Request counts: the block cache and request coalescing keep a convert of a compressed
 *     image to fewer requests than clusters, each byte fetched once.
 *  3. Errors: a server ignoring ranges, 404s (also of a backing file), transient failures.
 *  4. Overlays: `create -b URL` as qemu-img; writes through the library land in the local
 *     overlay only; qemu-img check is clean and qemu-img reads the expected bytes.
 *  5. serve --read-only URL: nbdinfo and nbdcopy read the right bytes; without -r, a clear error.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { after, before, beforeEach, describe, test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { openImage } from "../../src/image/open.js";
import { FileStorage } from "../../src/io/file.js";
import { httpOpener } from "../../src/io/http.js";
import { openImageFile } from "../../src/node.js";
import { createOverlay } from "../../src/ops/overlay.js";
import { type HttpFixture, startHttpServer } from "../http-server.js";
import { assertCheckClean, killServers, startServer } from "./serve-util.js";
import {
  assertSameAsQemu,
  assertSameFile,
  makeTempDir,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  removeTempDir,
  requireTool,
  run,
  seededBytes,
  sha256,
  sizes,
  writeSparseRaw,
} from "./util.js";

const { KiB, MiB } = sizes;
let root: string;
let http: HttpFixture;
let images: string;
const url = (name: string): string => http.url(`images/${name}`);

/** Seeded bytes that deflate to about a third: each 64-byte line repeats its first 16 bytes. */
function compressible(seed: number, length: number): Uint8Array {
  const b = seededBytes(seed, length);
  for (let i = 0; i < length; i++) if (i % 64 >= 16) b[i] = b[i - 16];
  return b;
}

/** A fresh directory below the served root (so that files in it have URLs too). */
async function caseDir(name: string): Promise<string> {
  const dir = path.join(root, name);
  await fs.mkdir(dir, { recursive: true });
  return dir;
}

before(async () => {
  root = await makeTempDir("http");
  images = await caseDir("images");
  const seed = path.join(root, "seed.raw");
  const chunks: [number, Uint8Array][] = [];
  for (let i = 0; i < 12; i++) chunks.push([i * 700 * KiB + (i % 5) * 4096 + 77, compressible(10 + i, 300 * KiB)]);
  await writeSparseRaw(seed, 12 * MiB, chunks);
  // base: data and holes; top: over base by a relative name, with writes and zeroes of its own.
  await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", seed, "base.qcow2"], { cwd: images });
  await qemuImgOk(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], { cwd: images });
  await qemuIoOk(path.join(images, "top.qcow2"), ["write -P 0x5a 1M 1536k", "write -z 4M 512k", "write -P 7 11M 33k"]);
  // comp: the whole chain compressed; comptop: top's own clusters compressed, over base.
  await qemuImgOk(["convert", "-c", "-O", "qcow2", "top.qcow2", "comp.qcow2"], { cwd: images });
  await qemuImgOk(["convert", "-c", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "comptop.qcow2"], {
    cwd: images,
  });
  await fs.mkdir(path.join(images, "sub"));
  await qemuImgOk(["create", "-f", "qcow2", "-b", "../top.qcow2", "-F", "qcow2", "sub/leaf.qcow2"], { cwd: images });
  await qemuIoOk(path.join(images, "sub/leaf.qcow2"), ["write -P 0x33 6M 100k"]);
  http = await startHttpServer(root);
  // The interop reference is qemu-img on the same URL, through its curl block driver.
  const probe = await qemuImg(["info", url("base.qcow2")]);
  if (probe.code !== 0) {
    throw new Error(
      `qemu-img cannot open http:// URLs (${probe.stderr.trim()}): install its curl driver with \`apt-get install -y qemu-block-extra\``,
    );
  }
});
after(async () => {
  await killServers();
  await http?.close();
  if (root !== undefined) await removeTempDir(root);
});
beforeEach(() => {
  http.requests.length = 0;
  Object.assign(http, { ignoreRanges: false, advertiseRanges: false, refuseHead: false, failures: 0 });
});

const NAMES = ["base.qcow2", "top.qcow2", "comp.qcow2", "comptop.qcow2", "sub/leaf.qcow2"];

describe("http: qemu-img's images read over HTTP", () => {
  for (const name of NAMES) {
    test(`${name}: info, map, check and compare as qemu-img on the URL; convert gives the local file's bytes`, async (t) => {
      const u = url(name);
      const local = path.join(images, name);
      for (const args of [
        ["info", u],
        ["info", "--output=json", u],
        ["info", "--backing-chain", u],
        ["map", "--output=json", u],
        ["check", u],
        ["check", "--output=json", u],
        ["compare", u, local],
        ["compare", "-f", "qcow2", "-F", "qcow2", local, u],
      ]) {
        await t.test(args.join(" "), () => assertSameAsQemu(args, { json: args.includes("--output=json") }));
      }
      // Human map prints no offsets of compressed clusters: qemu-img refuses those images (exit 1).
      const compressed = name.startsWith("comp");
      await t.test("map", () => assertSameAsQemu(["map", u], { qemuCode: compressed ? 1 : 0 }));

      // Against the local file: the same, except the lines that name the file or its size on disk.
      const remote = await qcowkit(["info", u]);
      const onDisk = await qcowkit(["info", local]);
      const differing = /^(image|disk size|backing file): /;
      const lines = (s: string): string[] => s.split("\n").filter((l) => !differing.test(l));
      assert.deepEqual(lines(remote.stdout), lines(onDisk.stdout));
      assert.match(remote.stdout, /^disk size: unavailable$/m);
      const remoteMap = await qcowkit(["map", "--output=json", u]);
      assert.equal(remoteMap.stdout, (await qcowkit(["map", "--output=json", local])).stdout);

      const dir = await caseDir(`convert-${name.replace("/", "-")}`);
      const expected = path.join(dir, "expected.raw");
      await qemuImgOk(["convert", "-O", "raw", local, expected]);
      const before = await sha256(local);
      const out = path.join(dir, "out.raw");
      const r = await qcowkit(["convert", "-O", "raw", u, out]);
      assert.equal(r.code, 0, r.stderr);
      await assertSameFile(expected, out, `qcowkit convert -O raw ${u}`);
      const q2 = path.join(dir, "out.qcow2");
      assert.equal((await qcowkit(["convert", "-c", "-O", "qcow2", u, q2])).code, 0);
      const back = await qemuImg(["compare", "-f", "qcow2", "-F", "raw", q2, expected]);
      assert.equal(back.code, 0, `qemu-img compare of qcowkit convert -c ${u}: ${back.stdout}${back.stderr}`);
      assert.equal(await sha256(local), before);
    });
  }
});

test("http: the block cache and coalescing fetch each byte of a compressed image once, in fewer requests than clusters", async () => {
  const local = path.join(images, "comp.qcow2");
  const size = (await fs.stat(local)).size;
  const clusters = Number(/(\d+)\/\d+ = /.exec((await qemuImgOk(["check", local])).stdout)?.[1]);
  const dir = await caseDir("counts");
  const r = await qcowkit(["convert", "-O", "raw", url("comp.qcow2"), path.join(dir, "out.raw")]);
  assert.equal(r.code, 0, r.stderr);
  const gets = http.requests.filter((q) => q.method === "GET");
  const fetched = gets.reduce((n, q) => {
    const m = /^bytes=(\d+)-(\d+)$/.exec(q.range ?? "");
    assert.ok(m, `every GET is a range request: ${q.range}`);
    return n + Number(m[2]) - Number(m[1]) + 1;
  }, 0);
  // The whole file fits the default 4 MiB cache: no block is fetched twice.
  assert.ok(size < 4 * MiB);
  assert.ok(fetched <= Math.ceil(size / (64 * KiB)) * 64 * KiB, `fetched ${fetched} bytes of a ${size}-byte file`);
  assert.ok(gets.length * 4 < clusters, `${gets.length} GETs for ${clusters} allocated clusters`);
  assert.equal(http.count("HEAD"), 1);
});

test("http: errors name the URL: ranges ignored, 404 (of the image, of a backing file), retried transient failures", async () => {
  const u = url("top.qcow2");
  http.ignoreRanges = true;
  let r = await qcowkit(["info", u]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `qcowkit: Could not open '${u}': server does not support range requests: ${u}\n`);
  http.ignoreRanges = false;

  r = await qcowkit(["info", url("nothing.qcow2")]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `qcowkit: Could not open '${url("nothing.qcow2")}': HTTP 404 Not Found\n`);

  const dir = await caseDir("orphan");
  await qemuImgOk(["create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "1M"], {
    cwd: dir,
  });
  r = await qcowkit(["map", http.url("orphan/orphan.qcow2")]);
  assert.equal(r.code, 1);
  assert.equal(
    r.stderr,
    // As qemu-img words it for its curl driver: the image, then the backing file's error.
    `qcowkit: Could not open '${http.url("orphan/orphan.qcow2")}': Could not open backing file: HTTP 404 Not Found\n`,
  );

  http.failures = 3;
  http.failStatus = 503;
  r = await qcowkit(["info", "--output=json", u]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout)["virtual-size"], 12 * MiB);
  assert.equal(http.requests.filter((q) => q.status === 503).length, 3);

  r = await qcowkit(["check", "-r", "all", u]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `qcowkit: Could not open '${u}': the http driver does not support writes\n`);
});

describe("http: local copy-on-write overlays on a remote image", () => {
  test("create -b URL writes what qemu-img writes; writes land in the overlay only", async () => {
    const dir = await caseDir("overlay-cli");
    const u = url("top.qcow2");
    const args = ["create", "-f", "qcow2", "-b", u, "-F", "qcow2", "ov.qcow2"];
    await assertSameAsQemu(args, { cwd: dir });
    const qemuMade = await fs.readFile(path.join(dir, "ov.qcow2"));
    await fs.rm(path.join(dir, "ov.qcow2"));
    assert.equal((await qcowkit(args, { cwd: dir })).code, 0);
    assert.deepEqual(await fs.readFile(path.join(dir, "ov.qcow2")), qemuMade, "the same header bytes as qemu-img's");

    const expected = path.join(dir, "expected.raw");
    await qemuImgOk(["convert", "-O", "raw", path.join(images, "top.qcow2"), expected]);
    const served = await Promise.all(NAMES.map((n) => sha256(path.join(images, n))));
    const ov = await openImageFile(path.join(dir, "ov.qcow2"), { readOnly: false });
    const fh = await fs.open(expected, "r+");
    for (let i = 0; i < 20; i++) {
      const data = seededBytes(500 + i, 10 * KiB + i * 3001);
      const at = (i * 613 * KiB + i * 511) % (12 * MiB - data.length);
      await ov.write(data, at);
      await fh.write(data, 0, data.length, at);
    }
    await fh.close();
    await ov.close();
    assert.ok(
      http.requests.every((q) => q.method === "GET" || q.method === "HEAD"),
      "only reads went to the server",
    );
    assert.deepEqual(await Promise.all(NAMES.map((n) => sha256(path.join(images, n)))), served);
    await assertCheckClean(path.join(dir, "ov.qcow2"), "overlay written by qcowkit");
    // qemu-img reads the overlay with its backing file over HTTP.
    const cmp = await qemuImg(["compare", "-f", "qcow2", "-F", "raw", path.join(dir, "ov.qcow2"), expected]);
    assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
    const back = path.join(dir, "back.raw");
    assert.equal((await qcowkit(["convert", "-O", "raw", path.join(dir, "ov.qcow2"), back])).code, 0);
    await assertSameFile(expected, back, "qcowkit's read of the overlay");
  });

  test("createOverlay: an image opened over HTTP under a new local overlay file", async () => {
    const dir = await caseDir("overlay-lib");
    const remote = await openImage(url("sub/leaf.qcow2"), { opener: httpOpener, codecs: nodeCodecs });
    const file = path.join(dir, "local.qcow2");
    const overlay = await createOverlay(remote, await FileStorage.open(file, { readOnly: false, create: true }), {
      codecs: nodeCodecs,
    });
    const expected = path.join(dir, "expected.raw");
    await qemuImgOk(["convert", "-O", "raw", path.join(images, "sub/leaf.qcow2"), expected]);
    const fh = await fs.open(expected, "r+");
    for (const [at, len] of [
      [0, 4096],
      [6 * MiB - 1000, 200 * KiB],
      [12 * MiB - 512, 512],
    ]) {
      const data = seededBytes(at + len, len);
      await overlay.write(data, at);
      await fh.write(data, 0, len, at);
    }
    await overlay.writeZeroes(MiB, 64 * KiB);
    await fh.write(new Uint8Array(64 * KiB), 0, 64 * KiB, MiB);
    await fh.close();
    await overlay.close();
    const info = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout);
    assert.equal(info["backing-filename"], url("sub/leaf.qcow2"));
    assert.equal(info["backing-filename-format"], "qcow2");
    await assertCheckClean(file, "createOverlay's file");
    const cmp = await qemuImg(["compare", "-f", "qcow2", "-F", "raw", file, expected]);
    assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
  });
});

describe("http: serve --read-only URL", () => {
  test("nbdinfo and nbdcopy read the remote image's bytes", async () => {
    const dir = await caseDir("serve");
    const expected = path.join(dir, "expected.raw");
    await qemuImgOk(["convert", "-O", "raw", path.join(images, "comptop.qcow2"), expected]);
    const k = await startServer("qcowkit", path.join(dir, "s.sock"), ["-r", "-t", url("comptop.qcow2")]);
    const info = await run(requireTool("nbdinfo"), ["--json", k.uri()]);
    assert.equal(info.code, 0, info.stderr);
    const exp = JSON.parse(info.stdout).exports[0];
    assert.equal(exp["export-size"], 12 * MiB);
    assert.equal(exp.is_read_only, true);
    const out = path.join(dir, "out.raw");
    const copy = await run(requireTool("nbdcopy"), [k.uri(), out]);
    assert.equal(copy.code, 0, copy.stderr);
    await assertSameFile(expected, out, "nbdcopy out of qcowkit serve -r URL");
    const exit = await k.stop("SIGTERM");
    assert.equal(exit.code, 0, k.stderr());
  });

  test("without --read-only: a clear error, no server", async () => {
    const dir = await caseDir("serve-rw");
    const r = await qcowkit(["serve", "-k", path.join(dir, "s.sock"), url("top.qcow2")]);
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      `qcowkit: Could not open '${url("top.qcow2")}': the http driver does not support writes (serve it with --read-only)\n`,
    );
  });
});
