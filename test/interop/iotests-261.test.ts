/**
 * qemu-iotests 261 (snapshot table entries with unusual extra data, and tables past QEMU's
 * limits): a v2 table whose entries hold no, unknown, or only 8 bytes of extra data, upgraded to
 * v3, with snapshots added and removed (the table must come out as QEMU 7.2 writes it: 24 known
 * bytes for every entry, unknown bytes kept); a botched v3 table (entries under the 16 bytes v3
 * needs), too much extra data, a table over 64 MiB (also one that only truncating extra data
 * brings back under it) and over 65536 snapshots: open refused in QEMU's words, and check and
 * check -r all with qemu-img's findings, summary and exit code, leaving the same table.
 *
 * 261.out follows the current script (extra data of 50 bytes with the unknown data after the
 * icount); that is the layout built here.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import { assertSameCheck, assertSameRefusal, makeImage, peek, poke, show } from "./iotests-util.js";
import { qcowkit, qemuImg, qemuImgOk, requireTool, snapshotTableEntries, useTempDir } from "./util.js";

const tmp = useTempDir("iotests-261");

interface Entry {
  id: string;
  name: string;
  extra: Buffer;
}

/** The snapshot table as 261's print_snapshot_table reads it (ID, name, raw extra data). */
async function snapshotTable(file: string): Promise<Entry[]> {
  return (await snapshotTableEntries(file)).map((e) => ({
    extra: e.extra,
    id: e.id.toString(),
    name: e.name.toString(),
  }));
}

/** 261's template: v2 with sn0 (no extra data), sn1 (50 bytes, unknown data), sn2 (8 bytes). */
async function v2Template(file: string): Promise<void> {
  await makeImage(file, "64M", "compat=0.10");
  for (const sn of ["sn0", "sn1", "sn2"]) await qemuImgOk(["snapshot", "-c", sn, file]);
  const data = await fs.readFile(file);
  const base = Number(data.readBigUInt64BE(64));
  let at = base;
  const parts: Buffer[] = [];
  for (let i = 0; i < 3; i++) {
    const idLen = data.readUInt16BE(at + 12);
    const nameLen = data.readUInt16BE(at + 14);
    const extraLen = data.readUInt32BE(at + 36);
    const fixed = Buffer.from(data.subarray(at, at + 40));
    const names = data.subarray(at + 40 + extraLen, at + 40 + extraLen + idLen + nameLen);
    let extra = Buffer.alloc(0);
    if (i === 1) {
      extra = Buffer.alloc(50);
      data.copy(extra, 0, at + 40, at + 40 + 24);
      extra.write("very important data", 24);
    } else if (i === 2) {
      extra = Buffer.from(data.subarray(at + 40, at + 48));
    }
    fixed.writeUInt32BE(extra.length, 36);
    const entry = Buffer.concat([fixed, extra, names]);
    parts.push(entry, Buffer.alloc((8 - (entry.length % 8)) % 8));
    at += Math.ceil((40 + extraLen + idLen + nameLen) / 8) * 8;
  }
  const fh = await fs.open(file, "r+");
  try {
    const table = Buffer.concat(parts);
    await fh.write(table, 0, table.length, base);
  } finally {
    await fh.close();
  }
}

/** Each tool does `args` on its own copy of `src`; both succeed and leave the same table. */
async function sameTableAfter(src: string, dir: string, args: string[]): Promise<Entry[]> {
  const q = path.join(dir, "q.qcow2");
  const k = path.join(dir, "k.qcow2");
  await fs.copyFile(src, q);
  await fs.copyFile(src, k);
  await qemuImgOk([...args, q]);
  const r = await qcowkit([...args, k]);
  assert.equal(r.code, 0, show(r));
  const [tq, tk] = [await snapshotTable(q), await snapshotTable(k)];
  // Dates and clocks of a new snapshot differ; IDs, names and the extra data may not (a new
  // snapshot's extra data holds the disk size and icount, both fixed).
  assert.deepEqual(tk, tq, `${args.join(" ")}: snapshot table`);
  for (const f of [q, k]) {
    const c = await qemuImg(["check", f]);
    assert.equal(c.code, 0, `${path.basename(f)}: ${show(c)}`);
  }
  return tk;
}

const icount = (e: Entry): bigint | undefined => (e.extra.length >= 24 ? e.extra.readBigInt64BE(16) : undefined);

describe("qemu-iotests 261: snapshot table extra data and limits", () => {
  let v2: string;
  let v3: string;

  before(async () => {
    requireTool("qemu-img");
    v2 = tmp.file("t.v2.orig");
    v3 = tmp.file("t.v3.orig");
    await v2Template(v2);
    await fs.copyFile(v2, v3);
    await qemuImgOk(["amend", "-o", "compat=1.1", v3]);
  });

  test("the v2 template reads the same through both tools; upgraded to v3 as QEMU does it", async () => {
    const check = await qcowkit(["check", v2]);
    assert.equal(check.code, 0, show(check));
    const info = async (run: typeof qcowkit, f: string) => JSON.parse((await run(["info", "--output=json", f])).stdout);
    assert.deepEqual(await info(qcowkit, v2), await info(qemuImg, v2));
    const t = await sameTableAfter(v2, await tmp.caseDir("upgrade"), ["amend", "-o", "compat=1.1"]);
    assert.deepEqual(
      t.map((e) => [e.name, e.extra.length, icount(e)]),
      [
        ["sn0", 24, -1n],
        ["sn1", 50, 0n],
        ["sn2", 24, -1n],
      ],
    );
    assert.equal(t[1].extra.subarray(24).toString().replace(/\0+$/, ""), "very important data");
  });

  for (const version of ["v2", "v3"] as const) {
    test(`${version}: a new snapshot and removals rewrite the table as QEMU does`, async () => {
      const src = version === "v2" ? v2 : v3;
      const added = await sameTableAfter(src, await tmp.caseDir(`${version}-add`), ["snapshot", "-c", "sn3"]);
      assert.deepEqual(
        added.map((e) => [e.id, e.name, e.extra.length]),
        [
          ["1", "sn0", 24],
          ["2", "sn1", 50],
          ["3", "sn2", 24],
          ["4", "sn3", 24],
        ],
      );
      for (const sn of ["sn0", "sn1", "sn2"]) {
        const left = await sameTableAfter(src, await tmp.caseDir(`${version}-del-${sn}`), ["snapshot", "-d", sn]);
        assert.deepEqual(
          left.map((e) => e.name),
          ["sn0", "sn1", "sn2"].filter((n) => n !== sn),
        );
      }
    });
  }

  /**
   * Both tools check (`args`) their own copy of `src` with the same findings, summary and exit
   * code; after a repair both copies hold the same snapshot table and pass qemu-img check.
   */
  async function sameCheck(src: string, dir: string, args: string[], code: number): Promise<string> {
    const r = await assertSameCheck(src, dir, args, { code });
    const k = path.join(r.kdir, "img.qcow2");
    if (args.includes("-r")) {
      assert.deepEqual(await snapshotTable(k), await snapshotTable(path.join(r.qdir, "img.qcow2")), "snapshot table");
      const c = await qemuImg(["check", k]);
      assert.equal(c.code, 0, `repaired by qcowkit: ${show(c)}`);
    }
    return k;
  }

  test("a botched v3 (entries without the 16 bytes v3 needs): reported, and repaired by -r all", async () => {
    const dir = await tmp.caseDir("botched");
    const file = path.join(dir, "t.qcow2");
    await fs.copyFile(v2, file);
    await poke(file, 4, "00000003");
    await poke(file, 100, "00000068");
    await poke(file, 96, "00000004");
    const q = await qemuImg(["check", file]);
    assert.equal(q.stderr, "ERROR snapshot table entry 0 is incomplete\nERROR snapshot table entry 2 is incomplete\n");
    await sameCheck(file, path.join(dir, "check"), [], 2);
    const k = await sameCheck(file, path.join(dir, "repair"), ["-r", "all"], 0);
    assert.deepEqual(
      (await snapshotTable(k)).map((e) => [e.name, e.extra.length, icount(e)]),
      [
        ["sn0", 24, -1n],
        ["sn1", 50, 0n],
        ["sn2", 24, -1n],
      ],
    );
  });

  test("too much extra data (64 KiB): open refused in QEMU's words; check fails; -r all drops it", async () => {
    const dir = await tmp.caseDir("extra");
    const file = path.join(dir, "t.qcow2");
    await fs.copyFile(v3, file);
    await qemuImgOk(["snapshot", "-c", "sn3", file]);
    let at = await peek(file, 64, 8);
    for (let i = 0; i < 3; i++) {
      const len = 40 + (await peek(file, at + 36, 4)) + (await peek(file, at + 12, 2)) + (await peek(file, at + 14, 2));
      at += Math.ceil(len / 8) * 8;
    }
    // This spills the entry into the next cluster: a refcount error besides (as in 261).
    await poke(file, at + 36, "00010000");
    const says = "Too much extra metadata in snapshot table entry 3";
    const r = await assertSameRefusal(
      (f) => ["info", f],
      { q: "t.qcow2", k: "t.qcow2", cwd: dir },
      `Could not open 't.qcow2': ${says}`,
    );
    assert.match(r.k.stderr, /^You can force-remove this extra metadata with qemu-img check -r all$/m);
    const c = await assertSameCheck(file, path.join(dir, "check"), [], { code: 1 });
    assert.match(c.q.stderr, new RegExp(`^qemu-img: ERROR failed to read the snapshot table: ${says}$`, "m"));
    assert.match(c.q.stderr, /^qemu-img: Check failed: File too large$/m);
    await assertSameCheck(file, path.join(dir, "leaks"), ["-r", "leaks"], { code: 1 });
    const k = await sameCheck(file, path.join(dir, "repair"), ["-r", "all"], 0);
    const t = await snapshotTable(k);
    assert.deepEqual(
      t.map((e) => [e.name, e.extra.length]),
      [
        ["sn0", 24],
        ["sn1", 50],
        ["sn2", 24],
        // ID and name were read from past the 64 KiB: zeros, so empty (C strings in QEMU).
        ["", 1024],
      ],
    );
  });

  // 261's big tables: entries of 1 KiB extra data and a 65535-byte ID and name (all zeros, so
  // empty C strings: QEMU rewrites them as empty), at 1 MiB.
  const BIG_ENTRY = 40 + 1024 + 2 * 0xffff + 2;
  const bigEntry = (extra = 1024): Buffer => {
    const e = Buffer.alloc(40);
    e.writeUInt16BE(0xffff, 12);
    e.writeUInt16BE(0xffff, 14);
    e.writeUInt32BE(extra, 36);
    return e;
  };

  /** 261's refblock0_allocate: refcount 1 for every cluster of [start, end) (64 KiB clusters). */
  async function allocateInRefblock0(file: string, start: number, end: number): Promise<void> {
    const refblock = await peek(file, await peek(file, 48, 8), 8);
    for (let c = Math.floor(start / 65536); c < Math.ceil(end / 65536); c++) await poke(file, refblock + c * 2, "0001");
  }

  /** Gives entry at `at` an L1 table at 0xe0000 whose one L2 table is at 0xf0000 (as 261 does). */
  async function hookUpL1(file: string, at: number): Promise<void> {
    await poke(file, at, "00000000000e0000");
    await poke(file, at + 8, "00000001");
    await poke(file, 0xe0000, "80000000000f0000");
  }

  test("snapshot table too big (over 64 MiB): refused; -r all drops the overhanging snapshot", async () => {
    const dir = await tmp.caseDir("too-big");
    const file = path.join(dir, "t.qcow2");
    await makeImage(file, "64M");
    await poke(file, 64, "0000000000100000");
    let count = 0;
    let end = 1024 * 1024;
    const fh = await fs.open(file, "r+");
    try {
      for (let written = 0; written <= 64 * 1024 * 1024; written += BIG_ENTRY, end += BIG_ENTRY, count++) {
        await fh.write(bigEntry(), 0, 40, end);
      }
      await fh.truncate(end);
    } finally {
      await fh.close();
    }
    await hookUpL1(file, end - BIG_ENTRY);
    await allocateInRefblock0(file, 0xe0000, end);
    await poke(file, 60, count.toString(16).padStart(8, "0"));

    const r = await assertSameRefusal(
      (f) => ["info", f],
      { q: "t.qcow2", k: "t.qcow2", cwd: dir },
      "Could not open 't.qcow2': Snapshot table is too big",
    );
    assert.match(r.k.stderr, /^You can force-remove all 1 overhanging snapshots with qemu-img check -r all$/m);
    const c = await assertSameCheck(file, path.join(dir, "check"), [], { code: 1 });
    assert.match(c.q.stderr, /^qemu-img: ERROR failed to read the snapshot table: Snapshot table is too big$/m);
    const k = await sameCheck(file, path.join(dir, "repair"), ["-r", "all"], 0);
    assert.equal(await peek(k, 60, 4), count - 1);
    const repairedByQemu = path.join(dir, "repair", "q", "img.qcow2");
    const info = JSON.parse((await qcowkit(["info", "--output=json", k])).stdout);
    assert.equal(info.snapshots.length, count - 1);

    // 261 goes on from the image QEMU repaired: entry 505 gets so much extra data that only
    // truncating it to 1 KiB brings the table back under 64 MiB, but for one last entry.
    const next = path.join(dir, "t505.qcow2");
    await fs.copyFile(repairedByQemu, next);
    const oldEnd = end - BIG_ENTRY;
    let at = end - 3 * BIG_ENTRY;
    let n = count - 3;
    // The table up to and with the entry that gets the extra data, before it gets it.
    const written = (count - 2) * BIG_ENTRY;
    const extra = 64 * 1024 * 1024 + 8 - BIG_ENTRY - (written - 1024);
    await poke(next, at + 36, extra.toString(16).padStart(8, "0"));
    at += BIG_ENTRY - 1024 + extra;
    n++;
    const fh2 = await fs.open(next, "r+");
    try {
      for (let i = 0; i < 2; i++, at += BIG_ENTRY, n++) await fh2.write(bigEntry(), 0, 40, at);
      await fh2.truncate(at);
    } finally {
      await fh2.close();
    }
    await allocateInRefblock0(next, oldEnd, at);
    await poke(next, 60, n.toString(16).padStart(8, "0"));
    const c2 = await assertSameCheck(next, path.join(dir, "check505"), [], { code: 1 });
    assert.match(
      c2.q.stderr,
      /^qemu-img: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 505$/m,
    );
    const r2 = await assertSameCheck(next, path.join(dir, "repair505"), ["-r", "all"], { code: 0 });
    assert.match(
      r2.q.stderr,
      /^Discarding too much extra metadata in snapshot table entry 505 \(\d+ > 1024\)\nDiscarding 1 overhanging snapshots \(snapshot table is too big\)$/m,
    );
    const k2 = path.join(r2.kdir, "img.qcow2");
    assert.deepEqual(await snapshotTable(k2), await snapshotTable(path.join(r2.qdir, "img.qcow2")));
    assert.equal((await qemuImg(["check", k2])).code, 0);
  });

  test("too many snapshots (over 65536): refused; -r all keeps the first 65536", async () => {
    const dir = await tmp.caseDir("too-many");
    const file = path.join(dir, "t.qcow2");
    // v2, so that all-zero 40-byte entries are valid.
    await makeImage(file, "64M", "compat=0.10");
    await poke(file, 64, "0000000000100000");
    await poke(file, 60, "00020000");
    await fs.truncate(file, 1024 * 1024 + 40 * 131072);
    await hookUpL1(file, 1024 * 1024 + 40 * 65536);
    await allocateInRefblock0(file, 0xe0000, 1024 * 1024 + 40 * 131072);
    await assertSameRefusal(
      (f) => ["info", f],
      { q: "t.qcow2", k: "t.qcow2", cwd: dir },
      "Could not open 't.qcow2': Snapshot table too large",
    );
    const c = await assertSameCheck(file, path.join(dir, "check"), [], { code: 1 });
    assert.equal(
      c.q.stderr,
      "qemu-img: ERROR snapshot table too large\nYou can force-remove all 65536 overhanging snapshots with qemu-img check -r all\nqemu-img: Check failed: File too large\n",
    );
    const r = await assertSameCheck(file, path.join(dir, "repair"), ["-r", "all"], { code: 0 });
    assert.match(r.q.stdout, /^ {4}42 leaked clusters\n {4}65536 corruptions$/m);
    const k = path.join(r.kdir, "img.qcow2");
    assert.equal(await peek(k, 60, 4), 65536);
    assert.equal((await qemuImg(["check", k])).code, 0);
  });
});
