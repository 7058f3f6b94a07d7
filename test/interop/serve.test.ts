/**
 * Interop test of `qcowkit serve` (the NBD server) against real NBD clients and against qemu-nbd.
 *
 * Every server listens on its own Unix socket in the temp dir, so the groups run in parallel.
 * Where qemu-nbd and qcowkit should agree (nbdinfo's view of an export, block status maps, what
 * qemu-img reads and writes through nbd+unix:// URLs, a random workload), both serve copies of
 * the same image side by side and their outputs are compared; elsewhere the protocol
 * (doc/proto.md of NetworkBlockDevice/nbd) and the lifetime rules of qemu-nbd are the reference.
 *
 *  1. nbdinfo --json / --list / --map / --map=qemu:allocation-depth vs qemu-nbd -A.
 *  2. qemu-img convert and map through the server (also -l SNAPSHOT); qemu-io writes (-P, -z, -z -u, discard,
 *     flush, -f) through it, then qemu-img check and compare with the same writes done directly.
 *  3. nbdcopy --connections=4 out of and into a server with -e 4.
 *  4. A seeded random workload (serve-protocol.py workload) through qcowkit and qemu-nbd on
 *     copies of a qcow2 with an internal snapshot: identical results, snapshot untouched.
 *     The same on a raw image (TRIM ignored, as qemu-nbd's default --discard=ignore).
 *  5. Protocol edge cases: serve-protocol.py edges (libnbd); what doc/proto.md says a server
 *     MUST accept (serve-protocol.py musts, checked on qemu-nbd first); malformed input, EXPORT_NAME,
 *     pipelined writes + DISC over node:net.
 *  6. Lifetime: exit after the last client, -t, SIGTERM/SIGINT (idle, in the handshake, during
 *     writes), kill -9 during writes and flushes, -e 1.
 *
 * The workload seed comes from QCOWKIT_SEED (repeat a failure) or the clock.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { after, describe, test } from "node:test";
import { BASE_SEED } from "../prng.js";
import {
  assertCheckClean,
  exitWithin,
  killServers,
  NBD,
  protocolScriptOk,
  RawClient,
  runProtocolScript,
  type Server,
  sleep,
  startServer,
} from "./serve-util.js";
import {
  assertSameFile,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  requireTool,
  run,
  seededBytes,
  sizes,
  useTempDir,
  writeSparseRaw,
} from "./util.js";

const { KiB, MiB } = sizes;

after(killServers);

const tmp = useTempDir("serve");

/** Fails unless the server exited 0 (with its stderr in the message). */
function assertExit0(s: Server, e: { code: number | null; signal: string | null } | undefined, what: string): void {
  assert.ok(e !== undefined, `${what}: ${s.kind} still running`);
  assert.equal(e.code, 0, `${what}: ${s.kind} exit ${e.code ?? e.signal}; stderr: ${s.stderr()}`);
}

async function nbdinfo(args: readonly string[]): Promise<string> {
  const r = await run(requireTool("nbdinfo"), args);
  if (r.code !== 0) assert.fail(`nbdinfo ${args.join(" ")}: exit ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/**
 * An 8 MiB qcow2 over an 8 MiB qcow2 backing file: data in both layers, a compressed cluster in
 * the backing file, zero clusters over backing data and over nothing, a written run of zeros
 * (data), and holes. Returns the top image's path.
 */
async function makeChain(dir: string): Promise<string> {
  const base = path.join(dir, "base.qcow2");
  const top = path.join(dir, "top.qcow2");
  await qemuImgOk(["create", "-q", "-f", "qcow2", base, "8M"]);
  await qemuIoOk(base, [
    "write -P 0xa1 0 1M",
    "write -c -P 0xa2 2M 64k",
    "write -c -P 0xa3 2176k 64k",
    "write -P 0xa4 5M 512k",
    "write -P 0xa5 7M 100k",
  ]);
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top], { cwd: dir });
  await qemuIoOk(top, [
    "write -P 0xb1 512k 256k",
    "write -z 2M 64k",
    "write -z 3M 128k",
    "write -P 0 6M 64k",
    "write -z -u 5M 64k",
    "write -P 0xb2 5200k 4k",
    "write -P 0xb3 8000k 12k",
  ]);
  return top;
}

/** A 6 MiB raw file: random data runs with holes between them. */
async function makeRaw(file: string): Promise<void> {
  await writeSparseRaw(file, 6 * MiB, [
    [0, seededBytes(1, 300 * KiB)],
    [1 * MiB, seededBytes(2, 64 * KiB)],
    [3 * MiB + 4096, seededBytes(3, 1 * MiB)],
    [6 * MiB - 8192, seededBytes(4, 8192)],
  ]);
}

/** Replaces socket paths so that outputs of two servers compare. */
function normalize(text: string, ...socks: string[]): string {
  let out = text;
  for (const s of socks) out = out.split(s).join("SOCK");
  return out;
}

describe("qcowkit serve", { concurrency: true }, () => {
  // -------------------------------------------------------------------------------------------
  // 1. nbdinfo
  // -------------------------------------------------------------------------------------------
  test("nbdinfo sees what it sees on qemu-nbd", async (t) => {
    const dir = await tmp.caseDir("nbdinfo");
    const top = await makeChain(dir);
    const raw = path.join(dir, "disk.raw");
    await makeRaw(raw);
    const cases: { name: string; file: string; args: string[]; ro: boolean; multi: boolean | undefined }[] = [
      { name: "qcow2", file: top, args: ["-f", "qcow2"], ro: false, multi: false },
      { name: "qcow2 -r", file: top, args: ["-f", "qcow2", "-r"], ro: true, multi: undefined },
      { name: "qcow2 -e 4", file: top, args: ["-f", "qcow2", "-e", "4"], ro: false, multi: true },
      { name: "qcow2 -r -e 4", file: top, args: ["-f", "qcow2", "-r", "-e", "4"], ro: true, multi: true },
      {
        name: "qcow2 -x -D",
        file: top,
        args: ["-f", "qcow2", "-x", "disk1", "-D", "the first disk"],
        ro: false,
        multi: false,
      },
      { name: "raw", file: raw, args: ["-f", "raw"], ro: false, multi: false },
      { name: "raw -r -x", file: raw, args: ["-f", "raw", "-r", "-x", "r"], ro: true, multi: undefined },
    ];
    await Promise.all(
      cases.map((c, i) =>
        t.test(`nbdinfo --json: ${c.name}`, async () => {
          const name = c.args.includes("-x") ? c.args[c.args.indexOf("-x") + 1] : "";
          // Each server its own copy: a writable qemu-nbd locks its image.
          const ext = path.extname(c.file);
          const [kf, qf] = [path.join(dir, `k${i}${ext}`), path.join(dir, `q${i}${ext}`)];
          await Promise.all([fs.copyFile(c.file, kf), fs.copyFile(c.file, qf)]);
          const k = await startServer("qcowkit", path.join(dir, `k${i}.sock`), [...c.args, "-t", kf]);
          const q = await startServer("qemu-nbd", path.join(dir, `q${i}.sock`), [...c.args, "-A", "-t", qf]);
          try {
            const kj = JSON.parse(await nbdinfo(["--json", k.uri(name)]));
            const qj = JSON.parse(await nbdinfo(["--json", q.uri(name)]));
            for (const j of [kj, qj]) for (const e of j.exports) delete e.uri;
            const e = kj.exports[0];
            assert.equal(kj.exports.length, 1);
            assert.equal(e["export-name"], name, "export name");
            if (c.args.includes("-D")) assert.equal(e.description, "the first disk", "description");
            assert.equal(e["export-size"], c.file === raw ? 6 * MiB : 8 * MiB, "size");
            assert.equal(e.is_read_only, c.ro, "is_read_only");
            assert.equal(e.can_trim, !c.ro, "can_trim");
            assert.equal(e.can_zero, !c.ro, "can_zero");
            if (c.multi !== undefined) assert.equal(e.can_multi_conn, c.multi, "can_multi_conn");
            assert.equal(e.block_size_minimum, 1);
            assert.equal(e.block_size_preferred, 4096);
            assert.equal(e.block_size_maximum, 32 * MiB);
            assert.equal(kj.structured, true);
            assert.deepEqual(e.contexts, ["base:allocation", "qemu:allocation-depth"]);
            assert.deepEqual(kj, qj, "nbdinfo --json differs from qemu-nbd's");
          } finally {
            await Promise.all([k.stop(), q.stop()]);
          }
          assertExit0(k, k.exit, "SIGTERM");
        }),
      ),
    );

    for (const [label, file, fmt] of [
      ["qcow2 with backing", top, "qcow2"],
      ["raw with holes", raw, "raw"],
    ] as const) {
      await t.test(`nbdinfo --list, --map, --map=qemu:allocation-depth: ${label}`, async () => {
        const common = ["-f", fmt, "-r", "-D", `the ${fmt} disk`, "-t"];
        const k = await startServer("qcowkit", path.join(dir, `km-${fmt}.sock`), [...common, file]);
        const q = await startServer("qemu-nbd", path.join(dir, `qm-${fmt}.sock`), [...common, "-A", file]);
        try {
          for (const args of [["--list"], ["--map"], ["--map=qemu:allocation-depth"], ["--map", "--totals"]]) {
            const ko = normalize(await nbdinfo([...args, k.uri()]), k.sock, q.sock);
            const qo = normalize(await nbdinfo([...args, q.uri()]), k.sock, q.sock);
            assert.equal(ko, qo, `nbdinfo ${args.join(" ")}: differs from qemu-nbd's`);
            if (fmt === "qcow2" && args[0] === "--map=qemu:allocation-depth") {
              // The fixture is what it means to be: all three depths occur.
              for (const word of ["local", "backing depth 2", "absent"]) assert.match(ko, new RegExp(word));
            }
            if (args[0] === "--map" && args.length === 1) assert.match(ko, /hole,zero/);
            if (args[0] === "--list") assert.match(ko, new RegExp(`the ${fmt} disk`), "description in --list");
          }
        } finally {
          await Promise.all([k.stop(), q.stop()]);
        }
      });
    }
  });

  // -------------------------------------------------------------------------------------------
  // 2. qemu-img and qemu-io through nbd+unix:// URLs
  // -------------------------------------------------------------------------------------------
  test("qemu-img and qemu-io through the server", async (t) => {
    const dir = await tmp.caseDir("qemu");
    const top = await makeChain(dir);
    const raw = path.join(dir, "disk.raw");
    await makeRaw(raw);

    for (const [label, file, fmt] of [
      ["qcow2 chain with compressed clusters", top, "qcow2"],
      ["raw", raw, "raw"],
    ] as const) {
      await t.test(`convert and map: ${label}`, async () => {
        const k = await startServer("qcowkit", path.join(dir, `kc-${fmt}.sock`), ["-f", fmt, "-r", "-t", file]);
        const q = await startServer("qemu-nbd", path.join(dir, `qc-${fmt}.sock`), ["-f", fmt, "-r", "-A", "-t", file]);
        try {
          const viaNbd = path.join(dir, `via-nbd-${fmt}.raw`);
          const direct = path.join(dir, `direct-${fmt}.raw`);
          await qemuImgOk(["convert", "-f", "raw", "-O", "raw", k.uri(), viaNbd]);
          await qemuImgOk(["convert", "-f", fmt, "-O", "raw", file, direct]);
          await assertSameFile(direct, viaNbd, "qemu-img convert through qcowkit serve");
          const km = await qemuImgOk(["map", "--output=json", "-f", "raw", k.uri()]);
          const qm = await qemuImgOk(["map", "--output=json", "-f", "raw", q.uri()]);
          assert.deepEqual(JSON.parse(km.stdout), JSON.parse(qm.stdout), "qemu-img map differs from qemu-nbd's");
          assert.ok(JSON.parse(km.stdout).length > 2, "map has several extents");
        } finally {
          await Promise.all([k.stop(), q.stop()]);
        }
        assertExit0(k, k.exit, "SIGTERM");
      });
    }

    await t.test("-l SNAPSHOT serves the internal snapshot read-only", async () => {
      const img = path.join(dir, "snap.qcow2");
      await qemuImgOk(["create", "-q", "-f", "qcow2", img, "4M"]);
      await qemuIoOk(img, ["write -P 0x31 0 1M", "write -P 0x32 2M 64k"]);
      await qemuImgOk(["snapshot", "-c", "s1", img]);
      await qemuIoOk(img, ["write -P 0x41 512k 1M", "write -z 2M 64k", "write -P 0x42 3M 4k"]);
      const before = (await qemuImgOk(["snapshot", "-l", img])).stdout;
      const expected = path.join(dir, "snap-expected.raw");
      await qemuImgOk(["convert", "-l", "snapshot.name=s1", "-O", "raw", img, expected]);
      for (const spec of ["s1", "snapshot.name=s1", "snapshot.id=1"]) {
        const k = await startServer("qcowkit", path.join(dir, `ks-${spec}.sock`), [
          "-f",
          "qcow2",
          "-l",
          spec,
          "-t",
          img,
        ]);
        const q = await startServer("qemu-nbd", path.join(dir, `qs-${spec}.sock`), [
          "-f",
          "qcow2",
          "-A",
          "-l",
          spec,
          "-t",
          img,
        ]);
        try {
          const got = path.join(dir, "snap-got.raw");
          await qemuImgOk(["convert", "-f", "raw", "-O", "raw", k.uri(), got]);
          await assertSameFile(expected, got, `qcowkit serve -l ${spec}`);
          const kj = JSON.parse(await nbdinfo(["--json", k.uri()]));
          const qj = JSON.parse(await nbdinfo(["--json", q.uri()]));
          for (const j of [kj, qj]) for (const e of j.exports) delete e.uri;
          assert.equal(kj.exports[0].is_read_only, true, "-l exports read-only");
          assert.deepEqual(kj, qj, `nbdinfo --json with -l ${spec} differs from qemu-nbd's`);
          for (const m of ["--map", "--map=qemu:allocation-depth"]) {
            assert.equal(await nbdinfo([m, k.uri()]), await nbdinfo([m, q.uri()]), `nbdinfo ${m} with -l ${spec}`);
          }
        } finally {
          await Promise.all([k.stop(), q.stop()]);
        }
      }
      assert.equal((await qemuImgOk(["snapshot", "-l", img])).stdout, before, "snapshot list changed");
      await assertCheckClean(img, "image served with -l");
    });

    await t.test("qemu-io writes, zeroes, discards, flushes, FUA", async () => {
      const a = path.join(dir, "a.qcow2");
      const b = path.join(dir, "b.qcow2");
      await qemuImgOk(["convert", "-f", "qcow2", "-O", "qcow2", top, a]);
      await fs.copyFile(a, b);
      const writes = [
        "write -P 0x5a 100000 70000",
        "write -z 1M 256k",
        "write -z -u 2M 512k",
        "write -z 8190 5000",
        "discard 3M 1M",
        "flush",
        "write -f -P 0x6b 5M 64k",
        "write -P 0x7c 7M 3000",
        "discard 7M 64k",
        "write -P 0x7d 8000k 100k",
        "flush",
      ];
      const k = await startServer("qcowkit", path.join(dir, "kio.sock"), ["-f", "qcow2", a]);
      await qemuIoOk(k.uri(), writes, { format: "raw" });
      // Without -t the server leaves after qemu-io.
      assertExit0(k, await exitWithin(k, 10_000), "exit after the last client");
      await qemuIoOk(b, writes, { extraArgs: ["-d", "unmap"] });
      await assertCheckClean(a, "image written through qcowkit serve");
      await qemuIoOk(a, [
        "read -P 0x5a 100000 70000",
        "read -P 0 1M 256k",
        "read -P 0 2M 512k",
        "read -P 0 8190 5000",
        "read -P 0x6b 5M 64k",
        "read -P 0x7d 8000k 100k",
      ]);
      const cmp = await qemuImg(["compare", a, b]);
      assert.equal(cmp.code, 0, `same qemu-io writes through qcowkit serve and directly: ${cmp.stdout}${cmp.stderr}`);
    });
  });

  // -------------------------------------------------------------------------------------------
  // 3. nbdcopy with several connections
  // -------------------------------------------------------------------------------------------
  test("nbdcopy --connections=4 out of and into the server", async () => {
    const dir = await tmp.caseDir("nbdcopy");
    const nbdcopy = requireTool("nbdcopy");
    const src = path.join(dir, "src.qcow2");
    const seedRaw = path.join(dir, "seed.raw");
    const chunks: [number, Uint8Array][] = [];
    for (let i = 0; i < 40; i++)
      chunks.push([Math.floor(i * 1.6 * MiB) + (i % 7) * 4096 + (i % 3) * 77, seededBytes(100 + i, 700 * KiB)]);
    await writeSparseRaw(seedRaw, 64 * MiB, chunks);
    await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", seedRaw, src]);
    const ref = path.join(dir, "ref.raw");
    await qemuImgOk(["convert", "-O", "raw", src, ref]);

    const k = await startServer("qcowkit", path.join(dir, "out.sock"), ["-f", "qcow2", "-r", "-e", "4", src]);
    const out = path.join(dir, "out.raw");
    const r = await run(nbdcopy, ["--connections=4", "--requests=16", k.uri(), out]);
    assert.equal(r.code, 0, `nbdcopy out: ${r.stderr}`);
    assertExit0(k, await exitWithin(k, 10_000), "exit after nbdcopy");
    await assertSameFile(ref, out, "nbdcopy out of qcowkit serve");

    const dst = path.join(dir, "dst.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", dst, "64M"]);
    const w = await startServer("qcowkit", path.join(dir, "in.sock"), ["-f", "qcow2", "-e", "4", "-t", dst]);
    const r2 = await run(nbdcopy, ["--connections=4", "--requests=16", out, w.uri()]);
    assert.equal(r2.code, 0, `nbdcopy in: ${r2.stderr}`);
    assertExit0(w, await w.stop(), "SIGTERM");
    const cmp = await qemuImg(["compare", "-f", "raw", "-F", "qcow2", ref, dst]);
    assert.equal(cmp.code, 0, `nbdcopy into qcowkit serve: ${cmp.stdout}${cmp.stderr}`);
    await assertCheckClean(dst, "image written by nbdcopy");
  });

  // -------------------------------------------------------------------------------------------
  // 4. Differential random workload
  // -------------------------------------------------------------------------------------------
  test(`random workload: qcowkit serve vs qemu-nbd (seed ${BASE_SEED})`, async () => {
    const dir = await tmp.caseDir("workload");
    const orig = path.join(dir, "orig.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", orig, "32M"]);
    await qemuIoOk(orig, ["write -P 0x11 0 4M", "write -P 0x22 10M 3M", "write -c -P 0x33 20M 1M"]);
    await qemuImgOk(["snapshot", "-c", "snap1", orig]);
    await qemuIoOk(orig, ["write -P 0x44 1M 2M", "write -z 11M 64k", "discard 12M 128k"]);
    const snapList = (await qemuImgOk(["snapshot", "-l", orig])).stdout;
    const snapRaw = path.join(dir, "snap.raw");
    await qemuImgOk(["convert", "-l", "snapshot.name=snap1", "-O", "raw", orig, snapRaw]);
    const a = path.join(dir, "a.qcow2");
    const b = path.join(dir, "b.qcow2");
    await fs.copyFile(orig, a);
    await fs.copyFile(orig, b);

    const k = await startServer("qcowkit", path.join(dir, "a.sock"), ["-f", "qcow2", a]);
    const q = await startServer("qemu-nbd", path.join(dir, "b.sock"), ["-f", "qcow2", "--discard=unmap", b]);
    const args = (sock: string) => [
      "workload",
      "--sock",
      sock,
      "--seed",
      String(BASE_SEED),
      "--size",
      String(32 * MiB),
    ];
    const [ka, qa] = await Promise.all([
      protocolScriptOk([...args(k.sock), "--ops", "1500"]),
      protocolScriptOk([...args(q.sock), "--ops", "1500"]),
    ]);
    assertExit0(k, await exitWithin(k, 10_000), "exit after the workload");
    await exitWithin(q, 10_000);
    assert.equal(ka, qa, "digest of everything read differs between qcowkit serve and qemu-nbd");
    const cmp = await qemuImg(["compare", a, b]);
    assert.equal(cmp.code, 0, `image after the workload differs from qemu-nbd's: ${cmp.stdout}${cmp.stderr}`);
    await assertCheckClean(a, "image after the workload");
    assert.equal((await qemuImgOk(["snapshot", "-l", a])).stdout, snapList, "snapshot list changed");
    const snapAfter = path.join(dir, "snap-after.raw");
    await qemuImgOk(["convert", "-l", "snapshot.name=snap1", "-O", "raw", a, snapAfter]);
    await assertSameFile(snapRaw, snapAfter, "internal snapshot after the workload");
  });

  test(`random workload on a raw image: qcowkit serve vs qemu-nbd (seed ${BASE_SEED})`, async () => {
    // TRIM on a raw export is ignored, as by qemu-nbd's default --discard=ignore.
    const dir = await tmp.caseDir("workload-raw");
    const a = path.join(dir, "a.raw");
    const b = path.join(dir, "b.raw");
    const mk = await runProtocolScript(["mkpattern", a, String(8 * MiB)]);
    assert.equal(mk.code, 0, mk.stderr);
    await fs.truncate(a, 16 * MiB);
    await fs.copyFile(a, b);
    const k = await startServer("qcowkit", path.join(dir, "a.sock"), ["-f", "raw", a]);
    const q = await startServer("qemu-nbd", path.join(dir, "b.sock"), ["-f", "raw", b]);
    const args = (sock: string) => [
      "workload",
      "--sock",
      sock,
      "--seed",
      String(BASE_SEED + 1),
      "--size",
      String(16 * MiB),
    ];
    const [ka, qa] = await Promise.all([
      protocolScriptOk([...args(k.sock), "--ops", "600"]),
      protocolScriptOk([...args(q.sock), "--ops", "600"]),
    ]);
    assertExit0(k, await exitWithin(k, 10_000), "exit after the workload");
    await exitWithin(q, 10_000);
    assert.equal(ka, qa, "digest of everything read differs between qcowkit serve and qemu-nbd");
    await assertSameFile(b, a, "raw image after the workload (qemu-nbd's, qcowkit's)");
  });

  // -------------------------------------------------------------------------------------------
  // 5. Protocol edge cases
  // -------------------------------------------------------------------------------------------
  test("protocol edge cases through libnbd", async () => {
    const dir = await tmp.caseDir("edges");
    const size = 40 * MiB;
    const raw = path.join(dir, "e.raw");
    const ro = path.join(dir, "ro.raw");
    const qcow2 = path.join(dir, "e.qcow2");
    const mk = await runProtocolScript(["mkpattern", raw, String(size)]);
    assert.equal(mk.code, 0, mk.stderr);
    await fs.copyFile(raw, ro);
    await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
    const sq = await startServer("qcowkit", path.join(dir, "q.sock"), ["-f", "qcow2", "-t", qcow2]);
    const sr = await startServer("qcowkit", path.join(dir, "r.sock"), ["-f", "raw", "-t", raw]);
    const so = await startServer("qcowkit", path.join(dir, "o.sock"), ["-f", "raw", "-r", "-t", "-e", "2", ro]);
    try {
      await protocolScriptOk([
        "edges",
        "--rw-qcow2",
        sq.sock,
        "--rw-raw",
        sr.sock,
        "--ro",
        so.sock,
        "--size",
        String(size),
      ]);
    } finally {
      for (const s of [sq, sr, so]) assertExit0(s, await s.stop(), "SIGTERM");
    }
    await assertCheckClean(qcow2, "qcow2 after the edge cases");
    const cmp = await qemuImg(["compare", "-f", "raw", "-F", "qcow2", raw, qcow2]);
    assert.equal(cmp.code, 0, `raw and qcow2 exports hold the same data afterwards: ${cmp.stdout}`);
    await assertSameFile(raw, ro, "read-only export unchanged");
  });

  test("what doc/proto.md says a server MUST accept: FUA on every command, zero-length requests", async () => {
    const dir = await tmp.caseDir("musts");
    const raw = path.join(dir, "p.raw");
    const mk = await runProtocolScript(["mkpattern", raw, String(1 * MiB)]);
    assert.equal(mk.code, 0, mk.stderr);
    const [a, b] = [path.join(dir, "a.qcow2"), path.join(dir, "b.qcow2")];
    await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", raw, a]);
    await fs.copyFile(a, b);
    // qemu-nbd passes: the checks themselves are right.
    const q = await startServer("qemu-nbd", path.join(dir, "q.sock"), ["-f", "qcow2", "-t", b]);
    try {
      await protocolScriptOk(["musts", "--sock", q.sock]);
    } finally {
      await q.stop();
    }
    const k = await startServer("qcowkit", path.join(dir, "k.sock"), ["-f", "qcow2", "-t", a]);
    try {
      await protocolScriptOk(["musts", "--sock", k.sock]);
    } finally {
      await k.stop();
    }
  });

  test("malformed input over a raw socket", async (t) => {
    const dir = await tmp.caseDir("raw-socket");
    const img = path.join(dir, "m.qcow2");
    const seedRaw = path.join(dir, "m.raw");
    await writeSparseRaw(seedRaw, 4 * MiB, [[0, seededBytes(9, 1 * MiB)]]);
    await qemuImgOk(["convert", "-f", "raw", "-O", "qcow2", seedRaw, img]);
    const expected = seededBytes(9, 1 * MiB);
    const s = await startServer("qcowkit", path.join(dir, "m.sock"), ["-f", "qcow2", "-t", "-e", "2", img]);

    /** A new, well-behaved client can still connect and read the data. */
    const stillServes = async (): Promise<void> => {
      const c = await RawClient.connect(s.sock);
      try {
        assert.equal(await c.go(), BigInt(4 * MiB), "export size");
        const got = await c.readAt(4096, 64 * KiB);
        assert.ok(got.equals(Buffer.from(expected.subarray(4096, 4096 + 64 * KiB))), "data read after the bad client");
        c.disconnect();
      } finally {
        c.destroy();
      }
      assert.equal(s.exit, undefined, `server exited: ${s.stderr()}`);
    };

    try {
      await t.test("unknown client flags: the server closes", async () => {
        const c = await RawClient.connect(s.sock);
        await c.greeting();
        c.sendClientFlags(0x80 | 1);
        assert.ok(await c.closedWithin(3000), "connection still open after unknown client flags");
        await stillServes();
      });

      await t.test("bad option magic: the server closes", async () => {
        const c = await RawClient.connect(s.sock);
        await c.greeting();
        c.sendClientFlags(3);
        c.sendOption(NBD.OPT_LIST, Buffer.alloc(0), 0x1122334455667788n);
        assert.ok(await c.closedWithin(3000), "connection still open after a bad option magic");
        await stillServes();
      });

      await t.test("unknown option: NBD_REP_ERR_UNSUP, then the connection is usable", async () => {
        const c = await RawClient.connect(s.sock);
        try {
          await c.greeting();
          c.sendClientFlags(3);
          c.sendOption(0x4242, Buffer.from("some option data"));
          const r = await c.optionReply();
          assert.equal(r.option, 0x4242, "the reply names the option");
          assert.equal(r.type, NBD.REP_ERR_UNSUP, `reply type 0x${r.type.toString(16)}`);
          c.sendOption(NBD.OPT_LIST);
          const l = await c.optionReply();
          assert.equal(l.type, NBD.REP_SERVER, "LIST after the unknown option");
          assert.equal((await c.optionReply()).type, NBD.REP_ACK);
          c.sendOption(NBD.OPT_ABORT);
          const ab = await c.optionReply();
          assert.equal(ab.option, NBD.OPT_ABORT);
          assert.equal(ab.type, NBD.REP_ACK, "ABORT is acknowledged");
          assert.ok(await c.closedWithin(3000), "connection still open after ABORT");
        } finally {
          c.destroy();
        }
        await stillServes();
      });

      await t.test("bad request magic: the server closes without a reply", async () => {
        const c = await RawClient.connect(s.sock);
        await c.go();
        c.write(c.request(NBD.CMD_READ, 0, 512, 5n, 0, 0xdeadbeef));
        assert.ok(await c.closedWithin(3000), "connection still open after a request with a bad magic");
        assert.equal(c.pending, 0, "no reply to a request with a bad magic");
        await stillServes();
      });

      await t.test("client leaves in the middle of a WRITE payload", async () => {
        const c = await RawClient.connect(s.sock);
        await c.go();
        c.write(c.request(NBD.CMD_WRITE, 0, 64 * KiB, 6n));
        c.write(Buffer.alloc(1000, 0xee));
        await sleep(100);
        c.destroy();
        await sleep(100);
        // Nothing of the partial write may reach the image.
        await stillServes();
        const d = await RawClient.connect(s.sock);
        await d.go();
        const head = await d.readAt(0, 4096);
        assert.ok(head.equals(Buffer.from(expected.subarray(0, 4096))), "partial WRITE payload reached the image");
        d.disconnect();
        d.destroy();
      });

      await t.test("NBD_OPT_EXPORT_NAME without NO_ZEROES: size, flags, 124 zero bytes, then reads", async () => {
        const c = await RawClient.connect(s.sock);
        try {
          await c.greeting();
          c.sendClientFlags(1);
          c.sendOption(NBD.OPT_EXPORT_NAME, Buffer.alloc(0));
          const r = await c.read(134);
          assert.equal(r.readBigUInt64BE(0), BigInt(4 * MiB), "export size");
          const flags = r.readUInt16BE(8);
          assert.equal(flags & 1, 1, "NBD_FLAG_HAS_FLAGS");
          assert.equal(flags & 2, 0, "not read-only");
          assert.ok(r.subarray(10).equals(Buffer.alloc(124)), "124 zero bytes");
          const got = await c.readAt(100_000, 5000);
          assert.ok(got.equals(Buffer.from(expected.subarray(100_000, 105_000))), "read after EXPORT_NAME");
          c.disconnect();
        } finally {
          c.destroy();
        }
        await stillServes();
      });

      await t.test("NBD_OPT_EXPORT_NAME with an unknown name: the server closes", async () => {
        const c = await RawClient.connect(s.sock);
        await c.greeting();
        c.sendClientFlags(3);
        c.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from("nope"));
        assert.ok(await c.closedWithin(3000), "connection still open after EXPORT_NAME of an unknown export");
        assert.equal(c.pending, 0, "no export data for an unknown export");
        await stillServes();
      });

      await t.test("100 pipelined WRITEs then DISC: all answered, all written", async () => {
        const c = await RawClient.connect(s.sock);
        await c.go();
        const parts: Buffer[] = [];
        for (let i = 0; i < 100; i++) {
          parts.push(c.request(NBD.CMD_WRITE, 2 * MiB + i * 4096, 4096, BigInt(1000 + i)));
          parts.push(Buffer.alloc(4096, (i % 250) + 1));
        }
        parts.push(c.request(NBD.CMD_DISC, 0, 0, 9999n));
        c.write(Buffer.concat(parts));
        const handles = new Set<bigint>();
        for (let i = 0; i < 100; i++) {
          const r = await c.read(16);
          assert.equal(r.readUInt32BE(0), NBD.SIMPLE_REPLY_MAGIC, "reply magic");
          assert.equal(r.readUInt32BE(4), 0, "write error");
          handles.add(r.readBigUInt64BE(8));
        }
        assert.equal(handles.size, 100, "one reply per write");
        assert.ok(await c.closedWithin(3000), "connection open after DISC");
        assert.equal(c.pending, 0, "nothing after the replies (no reply to DISC)");
        const d = await RawClient.connect(s.sock);
        await d.go();
        const got = await d.readAt(2 * MiB, 400 * KiB);
        for (let i = 0; i < 100; i++) {
          assert.ok(got.subarray(i * 4096, (i + 1) * 4096).equals(Buffer.alloc(4096, (i % 250) + 1)), `write ${i}`);
        }
        d.disconnect();
        d.destroy();
      });

      await t.test("two clients at once with -e 2", async () => {
        const [c1, c2] = await Promise.all([RawClient.connect(s.sock), RawClient.connect(s.sock)]);
        await Promise.all([c1.go(), c2.go()]);
        const [x, y] = await Promise.all([c1.readAt(0, 4096), c2.readAt(8192, 4096)]);
        assert.ok(x.equals(Buffer.from(expected.subarray(0, 4096))));
        assert.ok(y.equals(Buffer.from(expected.subarray(8192, 12288))));
        c1.disconnect();
        c2.disconnect();
        c1.destroy();
        c2.destroy();
      });
    } finally {
      assertExit0(s, await s.stop(), "SIGTERM");
    }
    await assertCheckClean(img, "image after the malformed clients");
    await qemuIoOk(img, ["read -P 0 1M 1M", "read -P 1 2M 4k", "read -P 100 2444k 4k", "read -P 0 2448k 1648k"]);
  });

  // -------------------------------------------------------------------------------------------
  // 6. Lifetime
  // -------------------------------------------------------------------------------------------
  test("lifetime", async (t) => {
    const dir = await tmp.caseDir("lifetime");
    const img = path.join(dir, "l.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "16M"]);

    await t.test("without -t: exits 0 after the only client leaves", async () => {
      const s = await startServer("qcowkit", path.join(dir, "a.sock"), ["-f", "qcow2", img]);
      assert.equal(await exitWithin(s, 500), undefined, "server exited before any client came");
      assert.equal((await nbdinfo(["--size", s.uri()])).trim(), String(16 * MiB));
      assertExit0(s, await exitWithin(s, 10_000), "exit after the last client");
    });

    await t.test("with -t: stays after clients leave", async () => {
      const s = await startServer("qcowkit", path.join(dir, "b.sock"), ["-f", "qcow2", "-t", img]);
      await nbdinfo(["--size", s.uri()]);
      await nbdinfo(["--size", s.uri()]);
      assert.equal(await exitWithin(s, 500), undefined, `server with -t exited: ${s.stderr()}`);
      assertExit0(s, await s.stop("SIGINT"), "SIGINT");
    });

    await t.test("SIGTERM with a client in the handshake: exit 0", async () => {
      const s = await startServer("qcowkit", path.join(dir, "h.sock"), ["-f", "qcow2", img]);
      const c = await RawClient.connect(s.sock);
      try {
        await c.greeting();
        s.proc.kill("SIGTERM");
        assertExit0(s, await exitWithin(s, 5000), "SIGTERM during option haggling");
      } finally {
        c.destroy();
      }
    });

    await t.test("-e 1: a second client waits, unanswered, until the first leaves (as with qemu-nbd)", async () => {
      const s = await startServer("qcowkit", path.join(dir, "c.sock"), ["-f", "qcow2", "-t", "-e", "1", img]);
      try {
        const c1 = await RawClient.connect(s.sock);
        await c1.greeting();
        const c2 = await RawClient.connect(s.sock);
        const c3 = await RawClient.connect(s.sock);
        await sleep(500);
        assert.equal(c2.pending, 0, "a second client got a greeting with -e 1");
        assert.equal(c3.pending, 0, "a third client got a greeting with -e 1");
        // The third one gives up while waiting; the second is served once the first leaves.
        c3.destroy();
        await sleep(100);
        c1.destroy();
        assert.equal(await c2.go(), BigInt(16 * MiB), "the waiting client is served after the first leaves");
        c2.disconnect();
        c2.destroy();
        const c4 = await RawClient.connect(s.sock);
        await c4.greeting(5000);
        c4.destroy();
      } finally {
        assertExit0(s, await s.stop(), "SIGTERM");
      }
    });

    /** Runs the writer against a fresh 16 MiB image, stops the server with `signal` mid-way. */
    const writeAndStop = async (
      name: string,
      signal: NodeJS.Signals,
    ): Promise<{ file: string; acked: number[]; durable: number[]; exit: string }> => {
      const file = path.join(dir, `${name}.qcow2`);
      await qemuImgOk(["create", "-q", "-f", "qcow2", file, "16M"]);
      const s = await startServer("qcowkit", path.join(dir, `${name}.sock`), ["-f", "qcow2", file]);
      const log = path.join(dir, `${name}.log`);
      const writer = runProtocolScript(["writer", "--sock", s.sock, "--log", log]);
      // Let it write (wrapping the image at least once) and flush a few times.
      const deadline = Date.now() + 20_000;
      for (;;) {
        const text = await fs.readFile(log, "utf8").catch(() => "");
        if ((text.match(/^F /gm) ?? []).length >= 20 && (text.match(/^W /gm) ?? []).length >= 5000) break;
        if (Date.now() > deadline) assert.fail(`writer too slow: ${text.slice(-500)} ${s.stderr()}`);
        if (s.exit !== undefined) assert.fail(`server exited: ${s.stderr()}`);
        await sleep(50);
      }
      const e = await s.stop(signal);
      const w = await writer;
      assert.equal(w.code, 0, `writer: ${w.stderr}`);
      const lines = (await fs.readFile(log, "utf8")).split("\n");
      const acked: number[] = [];
      let durableCount = 0;
      for (const l of lines) {
        if (l.startsWith("W ")) acked.push(Number(l.slice(2)));
        else if (l.startsWith("F ")) durableCount = Math.max(durableCount, Number(l.slice(2)));
        // Requests cut off by the server's exit fail with ENOTCONN; any other error is a failure.
        else if (l.startsWith("E ") && !/ENOTCONN|ESHUTDOWN|ECONNRESET|EPIPE/.test(l)) {
          assert.fail(`a request failed: ${l}`);
        }
      }
      return {
        file,
        acked,
        durable: acked.slice(0, durableCount),
        exit: `${e.code ?? e.signal}; stderr: ${s.stderr()}`,
      };
    };

    /** Every write in `writes` reads back (or was overwritten by a later write to its block). */
    const assertWritesPresent = async (file: string, writes: number[], what: string): Promise<void> => {
      const out = `${file}.raw`;
      await qemuImgOk(["convert", "-O", "raw", file, out]);
      const data = await fs.readFile(out);
      const block = 4096;
      const nblocks = data.length / block;
      let missing = 0;
      let first = "";
      for (const seq of writes) {
        const blk = seq % nblocks;
        const got = data.readBigUInt64BE(blk * block);
        const ok = got >= BigInt(seq) && got % BigInt(nblocks) === BigInt(blk);
        if (!ok) {
          missing++;
          if (first === "") first = `write ${seq} (block ${blk}) reads ${got}`;
        }
      }
      assert.equal(missing, 0, `${what}: ${missing} of ${writes.length} writes lost; first: ${first}`);
      await fs.rm(out);
    };

    await t.test("SIGTERM while a client writes: exit 0, clean, acknowledged writes kept", async () => {
      const r = await writeAndStop("term", "SIGTERM");
      assert.ok(r.exit.startsWith("0;"), `exit after SIGTERM: ${r.exit}`);
      await assertCheckClean(r.file, "image after SIGTERM");
      await assertWritesPresent(r.file, r.durable, "writes acknowledged before the last flush");
      // The server finishes requests in flight and flushes before it exits: every acknowledged write stays.
      await assertWritesPresent(r.file, r.acked, "acknowledged writes after SIGTERM");
    });

    await t.test("kill -9 while a client writes and flushes: no corruption, flushed writes kept", async () => {
      const r = await writeAndStop("kill", "SIGKILL");
      assert.ok(r.exit.startsWith("SIGKILL"), `exit: ${r.exit}`);
      await assertCheckClean(r.file, "image after kill -9", true);
      await assertWritesPresent(r.file, r.durable, "writes acknowledged before the last completed flush");
    });
  });
});
