/**
 * qemu-iotests 080 (qcow2 header input validation), case by case: the same damaged header, and
 * qcowkit refuses it with QEMU's words where qemu-img does ("Could not open 'X': ...").
 *
 * The iotest opens with qemu-io ("can't open device X: MSG"); qcowkit's equivalent is any command
 * that opens the image, here `info`, whose qemu-img line is "Could not open 'X': MSG".
 * Not reproduced: the two `qemu-io -c "open -o overlap-check.inactive-l2=on"` writes (a qemu-io
 * option with no qcowkit equivalent).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import {
  assertSaid,
  assertSameCheck,
  assertSameRefusal,
  corruptBit,
  makeImage,
  peek,
  poke,
  show,
} from "./iotests-util.js";
import { assertConvertMatches, qcowkit, qemuImg, qemuIoOk, requireTool, useTempDir } from "./util.js";

const tmp = useTempDir("iotests-080");

/** The L2 table and the first snapshot's table entry of the iotest's 64M images. */
const L2_TABLE_0 = 0x40000;
const SNAP1 = 0x70000;

interface HeaderCase {
  name: string;
  pokes: ReadonlyArray<readonly [number | ((headerLength: number) => number), string]>;
  /** QEMU's message (080.out, as qemu-img 7.2 words it). */
  says: string;
  setup?: (file: string) => Promise<void>;
}

/** Each step of 080 that opens a damaged header; pokes accumulate within one image, as in 080. */
const HEADER_CASES: HeaderCase[][] = [
  [
    { name: "huge header size", pokes: [[100, "ffffffff"]], says: "qcow2 header exceeds cluster size" },
    { name: "huge header size (2^31-1)", pokes: [[100, "7fffffff"]], says: "qcow2 header exceeds cluster size" },
  ],
  [
    {
      name: "huge unknown header extension, backing file offset 2^64-1",
      pokes: [
        [8, "ffffffffffffffff"],
        [(hl) => hl, "12345678"],
        [(hl) => hl + 4, "7fffffff"],
      ],
      says: "Invalid backing file offset",
    },
    {
      name: "huge unknown header extension, ending at the backing file offset",
      pokes: [[8, "0000000000000000"]],
      says: "Header extension too large",
      // The backing file name "starts" in the middle of the extension's length field.
      setup: async (file) => poke(file, 8, ((await peek(file, 100, 4)) + 4).toString(16).padStart(16, "0")),
    },
    { name: "huge unknown header extension", pokes: [[8, "0000000000000000"]], says: "Header extension too large" },
  ],
  [
    { name: "huge refcount table size", pokes: [[56, "ffffffff"]], says: "Reference count table too large" },
    { name: "refcount table just too large", pokes: [[56, "00020001"]], says: "Reference count table too large" },
  ],
  [
    {
      name: "misaligned refcount table",
      pokes: [[48, "1234567890abcdef"]],
      says: "Reference count table offset invalid",
    },
  ],
  [
    {
      name: "huge refcount offset",
      pokes: [
        [48, "ffffffffffff0000"],
        [56, "0000007f"],
      ],
      says: "Reference count table offset invalid",
    },
  ],
  [
    { name: "nb_snapshots 2^32-1", pokes: [[60, "ffffffff"]], says: "Snapshot table too large" },
    { name: "nb_snapshots 2^31-1", pokes: [[60, "7fffffff"]], says: "Snapshot table too large" },
    {
      name: "huge snapshot table offset",
      pokes: [
        [64, "ffffffffffff0000"],
        [60, "0000ffff"],
      ],
      says: "Snapshot table offset invalid",
    },
    {
      name: "misaligned snapshot table offset, no snapshots",
      pokes: [
        [64, "1234567890abcdef"],
        [60, "00000000"],
      ],
      says: "Snapshot table offset invalid",
    },
  ],
  [
    { name: "l1_size 2^32-1", pokes: [[36, "ffffffff"]], says: "Active L1 table too large" },
    { name: "l1_size 2^31-1", pokes: [[36, "7fffffff"]], says: "Active L1 table too large" },
    {
      name: "huge L1 table offset",
      pokes: [
        [40, "7fffffffffff0000"],
        [36, "0000ffff"],
      ],
      says: "Active L1 table offset invalid",
    },
    {
      name: "misaligned L1 table offset",
      pokes: [
        [40, "1234567890abcdef"],
        [36, "00000001"],
      ],
      says: "Active L1 table offset invalid",
    },
  ],
  [
    {
      name: "L1 table too small (with an internal snapshot)",
      setup: async (file) => {
        await qemuImg(["snapshot", "-c", "foo", file]);
      },
      pokes: [[36, "00000000"]],
      says: "L1 table is too small",
    },
  ],
  [
    {
      name: "backing file name too long",
      pokes: [
        [8, "0000000000001000"],
        [16, "ffffffff"],
      ],
      says: "Backing file name too long",
    },
  ],
];

describe("qemu-iotests 080: qcow2 header input validation", () => {
  before(() => {
    requireTool("qemu-img");
    requireTool("qemu-io");
  });

  for (const [g, group] of HEADER_CASES.entries()) {
    test(group.map((c) => c.name).join("; "), async () => {
      const file = tmp.file(`hdr-${g}.qcow2`);
      await makeImage(file);
      const headerLength = await peek(file, 100, 4);
      for (const c of group) {
        await c.setup?.(file);
        for (const [at, bytes] of c.pokes) await poke(file, typeof at === "number" ? at : at(headerLength), bytes);
        const name = path.basename(file);
        // Both only read: one file serves both tools.
        await assertSameRefusal(
          (f) => ["info", f],
          { q: name, k: name, cwd: tmp.dir() },
          `Could not open '${name}': ${c.says}`,
        );
        await assertSameRefusal(
          (f) => ["convert", "-O", "raw", f, "out.raw"],
          { q: name, k: name, cwd: tmp.dir() },
          `Could not open '${name}': ${c.says}`,
        );
      }
    });
  }

  test("hitting the snapshot table size limit: 65536 snapshots, snapshot -c refused with EFBIG", async () => {
    const dir = await tmp.caseDir("snap-limit");
    const file = path.join(dir, "t.qcow2");
    await makeImage(file);
    // The table past the end of the file: 65536 all-zero entries, as QEMU reads them.
    await poke(file, 64, "0000000001000000");
    await poke(file, 60, "00010000");
    const q = path.join(dir, "q.qcow2");
    await fs.copyFile(file, q);
    await assertSameRefusal(
      (f) => ["snapshot", "-c", "test", f],
      { q, k: file },
      "Could not create snapshot 'test': -27 (File too large)",
    );
    // Still readable ("read 0 512" works in 080): as qemu-img reads it.
    await assertConvertMatches(file, { dir, format: "qcow2" });
    const info = await qcowkit(["info", "--output=json", file]);
    assert.equal(info.code, 0, show(info));
    assert.equal(JSON.parse(info.stdout).snapshots.length, 65536);
  });

  /** 64M image with one data cluster; `damage` pokes it; returns (qemu-img's copy, qcowkit's). */
  async function dataImage(name: string, damage: (file: string) => Promise<void>, snapshot = false) {
    const dir = await tmp.caseDir(name);
    const k = path.join(dir, "k.qcow2");
    await makeImage(k);
    await qemuIoOk(k, ["write 0 512"]);
    if (snapshot) await qemuImg(["snapshot", "-c", "test", k]);
    await damage(k);
    const q = path.join(dir, "q.qcow2");
    await fs.copyFile(k, q);
    return { dir, q, k };
  }

  test("invalid L2 entry (huge physical offset): snapshot -c refused", async () => {
    // Offset 1 TiB, past the end of the file with no refcount block: EAGAIN in QEMU (it would
    // need a new refcount block); qcowkit refuses the same way, and does not grow the file.
    const b = await dataImage("l2-1t", (f) => poke(f, L2_TABLE_0, "800000ffffff0000"));
    const before = (await fs.stat(b.k)).size;
    await assertSameRefusal(
      (f) => ["snapshot", "-c", "test", f],
      b,
      "Could not create snapshot 'test': -11 (Resource temporarily unavailable)",
    );
    assert.ok((await fs.stat(b.k)).size < before + 65536, "the failed snapshot grew the file");
    assert.equal(await qemuImg(["check", b.k]).then((r) => r.code), await qemuImg(["check", b.q]).then((r) => r.code));

    // 0xbfff...: the offset is past any refcount table (QEMU: EFBIG), and the entry also has
    // reserved bits set (qemu-img check: "found l2 entry with reserved bits set"). qcowkit
    // checks reserved bits first, as on every L2 access: refused with EIO, image marked corrupt.
    const a = await dataImage("l2-huge", (f) => poke(f, L2_TABLE_0, "bfffffffffff0000"));
    const q = await qemuImg(["snapshot", "-c", "test", a.q]);
    assert.match(q.stderr, /^qemu-img: Could not create snapshot 'test': -27 \(File too large\)$/m, show(q));
    const k = await qcowkit(["snapshot", "-c", "test", a.k]);
    assert.equal(k.code, 1, show(k));
    assertSaid(k, "Could not create snapshot 'test': -5 (Input/output error)", "snapshot -c");
    assert.equal(await corruptBit(a.k), true);
  });

  for (const [what, bytes, at, says] of [
    ["offset", "0000000000400200", SNAP1, "Snapshot L1 table offset invalid"],
    ["size", "10000000", SNAP1 + 8, "Snapshot L1 table too large"],
  ] as const) {
    test(`invalid snapshot L1 table ${what}: load, amend, apply, delete refused; check agrees`, async () => {
      const b = await dataImage(`snap-l1-${what}`, (f) => poke(f, at, bytes), true);
      const files = { q: b.q, k: b.k, cwd: b.dir };
      await assertSameRefusal(
        (f) => ["convert", "-l", "snapshot.name=test", "-O", "raw", f, `${f}.snap`],
        files,
        `Failed to load snapshot: ${says}`,
      );
      // qemu-img: "<says>" then "Failed to turn zero into data clusters: <errno>"; qcowkit one line.
      const amendQ = await qemuImg(["amend", "-o", "compat=0.10", b.q]);
      assert.match(amendQ.stderr, new RegExp(`^qemu-img: ${says}$`, "m"), show(amendQ));
      const amendK = await qcowkit(["amend", "-o", "compat=0.10", b.k]);
      assert.equal(amendK.code, amendQ.code, show(amendK));
      assertSaid(amendK, `Failed to turn zero into data clusters: ${says}`, "amend -o compat=0.10");
      const applyQ = await qemuImg(["snapshot", "-a", "test", b.q]);
      const applyK = await qcowkit(["snapshot", "-a", "test", b.k]);
      assert.match(applyQ.stderr, new RegExp(`^qemu-img: ${says}$`, "m"), show(applyQ));
      assert.equal(applyK.code, applyQ.code, show(applyK));
      assertSaid(applyK, `Could not apply snapshot 'test': ${says}`, "snapshot -a");
      await assertSameRefusal((f) => ["snapshot", "-d", "test", f], files, `Could not delete snapshot 'test': ${says}`);
      // Nothing was changed by the refusals: the check findings are the same as qemu-img's.
      await assertSameCheck(b.k, path.join(b.dir, "check"), [], { code: 2 });
    });
  }
});
