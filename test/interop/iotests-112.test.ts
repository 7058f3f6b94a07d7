/**
 * qemu-iotests 112 (refcount widths): the refcount_bits values create accepts and refuses, the
 * snapshots and writes that meet the largest refcount of a width, amend between widths, and the
 * check of a cluster referenced more often than its width can count. Each case runs qemu-img and
 * qcowkit on copies of the same image (states set up with qemu-io) and compares what they say.
 *
 * Where qcowkit does better than QEMU it is said so: a refused snapshot leaves no leaked L1 table
 * (112's comment: "could/should be leaked"). Not matched: amend -p's progress figures (QEMU walks
 * the refcount table a varying number of times and its progress goes back from 66.67% to 50%;
 * qcowkit's amend reaches the same stable allocation its own way, shown as steady progress).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import { openImageFile } from "../../src/node.js";
import { assertSameRefusal, makeImage, poke, show } from "./iotests-util.js";
import {
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIoOk,
  type RunResult,
  requireTool,
  useTempDir,
  writeSparseRaw,
} from "./util.js";

const tmp = useTempDir("iotests-112");

/** The L2 table and the refcount entry of the first data cluster (0x50000) in a 64M image. */
const L2_TABLE_0 = 0x40000;
const REFCOUNT64_OF_CLUSTER_5 = 0x20028;

/** `refcount bits: N` as `qemu-img info` prints it (112's print_refcount_bits). */
async function refcountBits(file: string): Promise<number> {
  const info = JSON.parse((await qemuImgOk(["info", "-U", "--output=json", file])).stdout);
  return info["format-specific"].data["refcount-bits"];
}

/** Both tools run `args` on their own copy: the same exit code and stderr (in their own names). */
async function same(args: (f: string) => string[], q: string, k: string): Promise<{ q: RunResult; k: RunResult }> {
  const rq = await qemuImg(args(q), { cwd: path.dirname(q) });
  const rk = await qcowkit(args(k), { cwd: path.dirname(k) });
  const ctx = `${args("IMG").join(" ")}\n=== qemu-img: ${show(rq)}=== qcowkit: ${show(rk)}`;
  assert.equal(rk.code, rq.code, `exit code differs: ${ctx}`);
  assert.equal(rk.stderr.replaceAll(/^qcowkit: /gm, "qemu-img: "), rq.stderr, `stderr differs: ${ctx}`);
  return { q: rq, k: rk };
}

/** `check ARGS` by each tool on its own copy: same findings, summary and exit code. */
async function sameCheck(q: string, k: string, args: string[] = []): Promise<{ q: RunResult; k: RunResult }> {
  const r = await same((f) => ["check", ...args, path.basename(f)], q, k);
  // The image end offset depends on where each tool placed its metadata; the rest is the same.
  const strip = (s: string): string => s.replace(/^Image end offset: \d+\n/m, "");
  assert.equal(strip(r.k.stdout), strip(r.q.stdout), `check ${args.join(" ")} stdout differs`);
  return r;
}

/** A fresh `name` directory with qemu-img's and qcowkit's copies (same file name) of an image. */
async function pair(name: string, setup: (file: string) => Promise<void>): Promise<{ q: string; k: string }> {
  const dir = await tmp.caseDir(name);
  const q = path.join(dir, "q", "t.qcow2");
  const k = path.join(dir, "k", "t.qcow2");
  for (const f of [q, k]) await fs.mkdir(path.dirname(f), { recursive: true });
  await setup(q);
  await fs.copyFile(q, k);
  return { q, k };
}

describe("qemu-iotests 112: refcount widths", () => {
  before(() => {
    requireTool("qemu-img");
    requireTool("qemu-io");
  });

  test("refcount_bits limits: 0, -1, 128 and 42 refused; 1, 64 and the default 16 made", async () => {
    const p = await pair("limits", (f) => fs.writeFile(f, ""));
    for (const [opts, bits] of [
      ["refcount_bits=0", undefined],
      ["refcount_bits=-1", undefined],
      ["refcount_bits=128", undefined],
      ["refcount_bits=42", undefined],
      ["refcount_bits=1", 1],
      ["refcount_bits=64", 64],
      ["compat=1.1", 16],
      ["compat=0.10,refcount_bits=16", 16],
      ["compat=0.10,refcount_bits=1", undefined],
      ["compat=0.10,refcount_bits=64", undefined],
    ] as const) {
      for (const f of [p.q, p.k]) await fs.rm(f, { force: true });
      const args = (f: string): string[] => ["create", "-f", "qcow2", "-o", opts, path.basename(f), "64M"];
      const r = await same(args, p.q, p.k);
      assert.equal(r.k.stdout, r.q.stdout, `create -o ${opts}: stdout`);
      if (bits === undefined) {
        assert.equal(r.q.code, 1, `fixture: qemu-img create -o ${opts}\n${show(r.q)}`);
        const says = opts.startsWith("compat=0.10")
          ? "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
          : "Refcount width must be a power of two and may not exceed 64 bits";
        assert.match(r.k.stderr, new RegExp(`^qcowkit: t.qcow2: ${says.replace(/[()]/g, "\\$&")}$`, "m"));
      } else {
        assert.equal(await refcountBits(p.k), bits, `create -o ${opts}`);
      }
    }
  });

  test("snapshot limit on refcount_bits=1: the first snapshot is refused (EINVAL)", async () => {
    const p = await pair("snap-rb1", async (f) => {
      await makeImage(f, "64M", "refcount_bits=1");
      await qemuIoOk(f, ["write 0 512"]);
    });
    await assertSameRefusal(
      (f) => ["snapshot", "-c", "foo", f],
      p,
      "Could not create snapshot 'foo': -22 (Invalid argument)",
    );
    // QEMU leaks the new L1 table (cluster 6); qcowkit frees it again.
    const q = await qemuImg(["check", p.q]);
    assert.equal(q.code, 3, `fixture: ${show(q)}`);
    assert.match(q.stderr, /^Leaked cluster 6 refcount=1 reference=0$/m);
    const k = await qemuImg(["check", p.k]);
    assert.equal(k.code, 0, `qcowkit left the image unclean: ${show(k)}`);
  });

  test("snapshot limit on refcount_bits=2: two snapshots, the third refused (4th reference)", async () => {
    const p = await pair("snap-rb2", async (f) => {
      await makeImage(f, "64M", "refcount_bits=2");
      await qemuIoOk(f, ["write 0 512"]);
    });
    for (const name of ["foo", "bar"]) await same((f) => ["snapshot", "-c", name, f], p.q, p.k);
    await assertSameRefusal(
      (f) => ["snapshot", "-c", "baz", f],
      p,
      "Could not create snapshot 'baz': -22 (Invalid argument)",
    );
    assert.match((await qemuImg(["check", p.q])).stderr, /^Leaked cluster 7 refcount=1 reference=0$/m);
    assert.equal((await qemuImg(["check", p.k])).code, 0, "qcowkit leaves no leaked L1 table");
  });

  test("compressed clusters with refcount_bits=1: each gets its own host cluster", async () => {
    const dir = await tmp.caseDir("compressed-rb1");
    const raw = path.join(dir, "src.raw");
    // Two compressible clusters whose compressed data would fit into one host cluster.
    await writeSparseRaw(raw, 64 * 1024 * 1024, [
      [0, new Uint8Array(65536).fill(1)],
      [65536, new Uint8Array(65536).fill(2)],
    ]);
    const out = path.join(dir, "k.qcow2");
    const r = await qcowkit(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "refcount_bits=1", raw, out]);
    assert.equal(r.code, 0, show(r));
    const check = await qemuImg(["check", out]);
    assert.equal(check.code, 0, `qemu-img check: ${show(check)}`);
    assert.match(check.stdout, /^No errors were found on the image\.$/m);
    await qemuIoOk(out, ["read -P 1 0 64k", "read -P 2 64k 64k"]);
  });

  test("MSb set in a 64-bit refcount: a write copies the cluster, the refcount drops by one", async () => {
    const p = await pair("msb64", async (f) => {
      await makeImage(f, "64M", "refcount_bits=64");
      await qemuIoOk(f, ["write 0 512"]);
      await poke(f, REFCOUNT64_OF_CLUSTER_5, "8000000000000000");
      await poke(f, L2_TABLE_0, "0000000000050000"); // COPIED cleared
    });
    await qemuIoOk(p.q, ["write -P 7 0 512"]);
    const img = await openImageFile(p.k, { readOnly: false });
    try {
      await img.write(new Uint8Array(512).fill(7), 0);
    } finally {
      await img.close();
    }
    await qemuIoOk(p.k, ["read -P 7 0 512"]);
    const r = await sameCheck(p.q, p.k);
    assert.equal(r.k.code, 3);
    assert.match(r.k.stderr, /^Leaked cluster 5 refcount=9223372036854775807 reference=0$/m);
  });

  test("snapshot on the maximum 64-bit refcount: refused (EINVAL), the refcount reported exactly", async () => {
    const p = await pair("max64", async (f) => {
      await makeImage(f, "64M", "refcount_bits=64");
      await qemuIoOk(f, ["write 0 512"]);
      await poke(f, REFCOUNT64_OF_CLUSTER_5, "ffffffffffffffff");
      await poke(f, L2_TABLE_0, "0000000000050000");
    });
    await assertSameRefusal(
      (f) => ["snapshot", "-c", "foo", f],
      p,
      "Could not create snapshot 'foo': -22 (Invalid argument)",
    );
    const q = await qemuImg(["check", p.q]);
    const k = await qcowkit(["check", p.k]);
    const cluster5 = /^Leaked cluster 5 refcount=18446744073709551615 reference=1$/m;
    assert.match(q.stderr, cluster5, `fixture: ${show(q)}`);
    assert.match(q.stderr, /^Leaked cluster 6 refcount=1 reference=0$/m, "fixture: QEMU leaks the L1 copy");
    // qcowkit: the same finding for cluster 5, and no leaked L1 table.
    assert.equal(k.stderr, "Leaked cluster 5 refcount=18446744073709551615 reference=1\n", show(k));
    assert.equal(k.code, 3);
  });

  test("amend between widths (16 -> 1 -> 64), to and from compat=0.10, with a snapshot", async () => {
    const p = await pair("amend", async (f) => {
      await makeImage(f, "64M");
      await qemuIoOk(f, ["write 16M 32M"]);
    });
    const amend = (o: string) => (f: string) => ["amend", "-o", o, f];
    for (const [opts, bits] of [
      ["refcount_bits=1", 1],
      ["refcount_bits=64", 64],
    ] as const) {
      await same(amend(opts), p.q, p.k);
      await sameCheck(p.q, p.k);
      assert.equal(await refcountBits(p.k), bits, `amend -o ${opts}`);
    }
    await assertSameRefusal(amend("compat=0.10"), p, "compat=0.10 requires refcount_bits=16");
    assert.equal(await refcountBits(p.k), 64, "a refused amend changes nothing");
    await same(amend("compat=0.10,refcount_bits=16"), p.q, p.k);
    await sameCheck(p.q, p.k);
    assert.equal(await refcountBits(p.k), 16);
    await same(amend("compat=1.1"), p.q, p.k);
    await assertSameRefusal(
      amend("refcount_bits=32,compat=0.10"),
      p,
      "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
    );
    assert.equal(await refcountBits(p.k), 16);

    // With a snapshot, the clusters it shares have refcount 2: 1 bit cannot hold that, 2 can.
    await same((f) => ["snapshot", "-c", "foo", f], p.q, p.k);
    for (const f of [p.q, p.k]) await qemuIoOk(f, ["write 0 16M"]);
    await assertSameRefusal(
      amend("refcount_bits=1"),
      p,
      "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x50000 has a refcount of 2",
    );
    await sameCheck(p.q, p.k);
    assert.equal(await refcountBits(p.k), 16);
    await same(amend("refcount_bits=2"), p.q, p.k);
    await sameCheck(p.q, p.k);
    assert.equal(await refcountBits(p.k), 2);
  });

  test("too many references for check: 'use amend', then repaired after amend", async () => {
    const p = await pair("overflow-check", async (f) => {
      await makeImage(f, "64M", "refcount_bits=1");
      await qemuIoOk(f, ["write 0 64k"]);
      await poke(f, L2_TABLE_0 + 8, "8000000000050000"); // a second reference to cluster 5
    });
    const refused = await sameCheck(p.q, p.k, ["-r", "all"]);
    assert.equal(refused.k.code, 2);
    assert.match(refused.k.stderr, /^ERROR: overflow cluster offset=0x50000\nUse qemu-img amend to increase/m);
    await same((f) => ["amend", "-o", "refcount_bits=2", f], p.q, p.k);
    assert.equal(await refcountBits(p.k), 2);
    const repaired = await sameCheck(p.q, p.k, ["-r", "all"]);
    assert.equal(repaired.k.code, 0);
    assert.match(repaired.k.stdout, /^ {4}3 corruptions$/m);
  });

  test("amend whose new refcount structures need several passes (512-byte clusters, 1 -> 64 bits)", async () => {
    const p = await pair("walks", async (f) => {
      await makeImage(f, "64k", "refcount_bits=1,cluster_size=512");
      // 63 clusters in use: the first 64-bit refcount block has exactly one free entry left.
      await qemuIoOk(f, [`write 0 ${58 * 512}`]);
    });
    const q = await qemuImg(["amend", "-o", "refcount_bits=64", "-p", p.q]);
    assert.match(q.stdout, /\(66\.67\/100%\)\r {4}\(50\.00\/100%\)/, `fixture: four walks in QEMU\n${show(q)}`);
    const k = await qcowkit(["amend", "-o", "refcount_bits=64", "-p", p.k]);
    assert.equal(k.code, 0, show(k));
    assert.match(k.stdout, /\(100\.00\/100%\)\r?\n$/);
    assert.equal(await refcountBits(p.k), 64);
    const check = await qemuImg(["check", p.k]);
    assert.equal(check.code, 0, show(check));
    const cmp = await qemuImg(["compare", p.q, p.k]);
    assert.equal(cmp.code, 0, `the data is intact: ${show(cmp)}`);
  });
});
