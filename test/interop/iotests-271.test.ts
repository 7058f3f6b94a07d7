/**
 * qemu-iotests 271 (extended L2 entries), its cases about invalid and unusual states: L2 entries
 * with both the zero and the allocation bit of a subcluster, allocation bits without a host
 * cluster, the unused "cluster is zero" bit, a compressed cluster with a non-zero bitmap, and
 * unaligned host offsets found and repaired by check -r all; plus the writes of its "standard
 * write tests", whose subcluster bitmaps must come out as QEMU's.
 *
 * The state is made with qemu-io and byte pokes; qemu-io does the operation on one copy, qcowkit
 * (the library, which is what does guest I/O) on the other; the L2 entries, the errors and the
 * corrupt bit must agree (also the all-zero bitmap a discard leaves, with or without a backing
 * file). Not reproduced: the blkdebug concurrency case, the rebase, resize and
 * measure cases (covered by ops-rebase, resize and measure interop tests).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import type { Qcow2Image } from "../../src/image/qcow2.js";
import { openImageFile } from "../../src/node.js";
import { assertSameCheck, assertSameRefusal, corruptBit, peek, poke, show } from "./iotests-util.js";
import { qemuImg, qemuImgOk, qemuIo, qemuIoOk, requireTool, useTempDir } from "./util.js";

const tmp = useTempDir("iotests-271");

const L2_TABLE = 0x40000;
const KiB = 1024;

/**
 * L2 entry `n` of the first L2 table as 271 prints it: "0x<entry> <bitmap>". The table is found
 * through the L1 table (QEMU puts it at 0x40000; qcowkit may put it elsewhere).
 */
async function l2Entry(file: string, n: number): Promise<string> {
  const l2 = (await peek(file, await peek(file, 40, 8), 8)) % 2 ** 56;
  const fh = await fs.open(file, "r");
  try {
    const b = Buffer.alloc(16);
    await fh.read(b, 0, 16, l2 + n * 16);
    return `0x${b.subarray(0, 8).toString("hex")} ${b.subarray(8).toString("hex")}`;
  } finally {
    await fh.close();
  }
}

type Op = { kind: "read" | "write" | "zero" | "unmap" | "discard"; offset: number; length: number; pattern?: number };

/** The qemu-io command for `op` (271's _run_test). */
function qemuIoCommand(op: Op): string {
  const p = op.pattern !== undefined ? ` -P ${op.pattern}` : "";
  switch (op.kind) {
    case "read":
      return `read -q${p} ${op.offset} ${op.length}`;
    case "write":
      return `write -q${p} ${op.offset} ${op.length}`;
    case "zero":
      return `write -q -z ${op.offset} ${op.length}`;
    case "unmap":
      return `write -q -z -u ${op.offset} ${op.length}`;
    case "discard":
      return `discard -q ${op.offset} ${op.length}`;
  }
}

/** Runs `op` through qcowkit's library on an image opened for writing (as qemu-io opens it). */
async function qcowkitOp(file: string, op: Op): Promise<Error | undefined> {
  const img = (await openImageFile(file, { readOnly: false })) as Qcow2Image;
  try {
    switch (op.kind) {
      case "read": {
        const b = new Uint8Array(op.length);
        await img.read(b, op.offset);
        if (op.pattern !== undefined)
          assert.ok(
            b.every((x) => x === op.pattern),
            "read: pattern differs",
          );
        break;
      }
      case "write":
        await img.write(new Uint8Array(op.length).fill(op.pattern ?? 0xcd), op.offset);
        break;
      case "zero":
        await img.writeZeroes(op.offset, op.length);
        break;
      case "unmap":
        await img.writeZeroes(op.offset, op.length, { unmap: true });
        break;
      case "discard":
        await img.discard(op.offset, op.length);
        break;
    }
    return undefined;
  } catch (e) {
    return e as Error;
  } finally {
    await img.close().catch(() => undefined);
  }
}

/** qemu-io and qcowkit each do `op` on their own copy of `src`; returns the copies. */
async function both(src: string, dir: string, op: Op): Promise<{ q: string; k: string; qio: string; kerr?: Error }> {
  const q = path.join(dir, "q.qcow2");
  const k = path.join(dir, "k.qcow2");
  await fs.copyFile(src, q);
  await fs.copyFile(src, k);
  const r = await qemuIo(["-f", "qcow2", "-c", qemuIoCommand(op), q]);
  return { q, k, qio: r.stdout + r.stderr, kerr: await qcowkitOp(k, op) };
}

async function extImage(file: string, size = "1M", backing?: string): Promise<void> {
  const b = backing ? ["-F", "raw", "-b", backing] : [];
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ...b, file, size]);
}

interface CorruptCase {
  name: string;
  setup: (file: string) => Promise<void>;
  /** The L2 entry the case looks at. */
  entry: number;
  op: (kind: "read" | "write") => Op;
  /** QEMU refuses the access and marks the image corrupt. */
  invalid: boolean;
}

const CORRUPT_CASES: CorruptCase[] = [
  {
    name: "allocated, 'cluster is zero' bit set on the standard descriptor (ignored)",
    setup: async (f) => {
      await qemuIoOk(f, ["write -q -P 0x11 0 2k"]);
      await poke(f, L2_TABLE + 7, "01");
    },
    entry: 0,
    op: (kind) => ({ kind, offset: 0, length: KiB, pattern: 0x11 }),
    invalid: false,
  },
  {
    name: "allocated, both 'subcluster is zero' and 'subcluster is allocated' bits set",
    setup: async (f) => {
      await qemuIoOk(f, ["write -q 32k 128k"]);
      await poke(f, L2_TABLE + 24, "00000001");
    },
    entry: 1,
    op: (kind) => ({ kind, offset: 0, length: 192 * KiB }),
    invalid: true,
  },
  {
    name: "unallocated, 'cluster is zero' bit set on the standard descriptor (ignored)",
    setup: async (f) => {
      await qemuIoOk(f, ["write -q 256k 1k"]);
      await poke(f, L2_TABLE + 7, "01");
    },
    entry: 0,
    op: (kind) => ({ kind, offset: 0, length: KiB }),
    invalid: false,
  },
  {
    name: "unallocated, 'subcluster is allocated' bit set",
    setup: async (f) => {
      await qemuIoOk(f, ["write -q 256k 1k"]);
      await poke(f, L2_TABLE + 15, "01");
    },
    entry: 0,
    op: (kind) => ({ kind, offset: 0, length: KiB }),
    invalid: true,
  },
  {
    name: "unallocated, both 'subcluster is zero' and 'subcluster is allocated' bits set",
    setup: async (f) => {
      await qemuIoOk(f, ["write -q 256k 1k"]);
      await poke(f, L2_TABLE + 24, "0000000100000001");
    },
    entry: 1,
    op: (kind) => ({ kind, offset: 0, length: 192 * KiB }),
    invalid: true,
  },
  {
    name: "compressed cluster with a non-zero subcluster bitmap (ignored)",
    setup: async (f) => {
      await qemuIoOk(f, ["write -q -P 11 -c 0 64k"]);
      await poke(f, L2_TABLE + 11, "0180"); // subcluster 31 allocated, subcluster 0 zero
    },
    entry: 0,
    op: (kind) => ({ kind, offset: 0, length: 64 * KiB, pattern: 11 }),
    invalid: false,
  },
];

describe("qemu-iotests 271: extended L2 entries in invalid states", () => {
  before(() => {
    requireTool("qemu-img");
    requireTool("qemu-io");
  });

  for (const kind of ["read", "write"] as const) {
    for (const c of CORRUPT_CASES) {
      test(`${kind}: ${c.name}`, async () => {
        const dir = await tmp.caseDir(`${kind}-${c.name.replace(/[^a-z]+/g, "-")}`);
        const src = path.join(dir, "src.qcow2");
        await extImage(src);
        await c.setup(src);
        const r = await both(src, dir, c.op(kind));
        if (c.invalid) {
          assert.match(r.qio, /Marking image as corrupt: Invalid cluster entry found/, `fixture: ${r.qio}`);
          assert.ok(r.kerr, `qcowkit ${kind} should fail on the invalid entry`);
          assert.equal((r.kerr as { code?: string }).code, "corrupt", String(r.kerr));
        } else {
          assert.doesNotMatch(r.qio, /failed|corrupt/i, `fixture: ${r.qio}`);
          assert.equal(r.kerr, undefined, `qcowkit ${kind}: ${r.kerr}`);
        }
        // The entry after the access: as QEMU left it (a write may have replaced it).
        assert.equal(await l2Entry(r.k, c.entry), await l2Entry(r.q, c.entry), "L2 entry");
        assert.equal(await corruptBit(r.k), await corruptBit(r.q), "corrupt bit");
        if (!c.invalid) {
          const cmp = await qemuImg(["compare", r.q, r.k]);
          assert.equal(cmp.code, 0, `guest data differs: ${show(cmp)}`);
        }
      });
    }
  }

  test("check -r all: an unaligned data cluster cannot be repaired, an unaligned zeroed one can", async () => {
    const dir = await tmp.caseDir("unaligned");
    const base = path.join(dir, "base.raw");
    await qemuImgOk(["create", "-q", "-f", "raw", base, "128k"]);
    await qemuIoOk(base, ["write -q -P 0xff 0 128k"], { format: "raw" });
    const src = path.join(dir, "src.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", base, src]);
    await qemuIoOk(src, ["write -q -P 1 4k 2k"]);
    await poke(src, L2_TABLE + 6, "02");
    // The backing file is found relative to each copy: check runs on copies next to it.
    const data = await assertSameCheck(src, dir, ["-r", "all"], { code: 2 });
    assert.match(data.k.stderr, /^ERROR offset=50200: Data cluster is not properly aligned; L2 entry corrupted\.$/m);

    await fs.rm(src);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", base, src]);
    await qemuIoOk(src, ["write -q -P 1 4k 2k", "write -q -z 4k 2k"]);
    await poke(src, L2_TABLE + 6, "02");
    const zero = await assertSameCheck(src, dir, ["-r", "all"], { code: 0 });
    assert.match(zero.k.stderr, /^Repairing offset=50200: Preallocated cluster is not properly aligned/m);
    const fixed = path.join(zero.kdir, "img.qcow2");
    await qemuIoOk(fixed, ["read -q -P 0xff 0 4k", "read -q -P 0x00 4k 2k", "read -q -P 0xff 6k 122k"]);
  });

  test("creation and amend refusals: clusters under 16k, extended_l2 changed by amend", async () => {
    const dir = await tmp.caseDir("options");
    // Refused before anything is created: both tools can be given the same name.
    await assertSameRefusal(
      (f) => ["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=8k", f, "1M"],
      { q: "x.qcow2", k: "x.qcow2", cwd: dir },
      "x.qcow2: Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
    for (const [from, to] of [
      ["on", "off"],
      ["off", "on"],
    ]) {
      const file = path.join(dir, `amend-${from}.qcow2`);
      await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", `extended_l2=${from}`, file, "1M"]);
      await assertSameRefusal(
        (f) => ["amend", "-o", `extended_l2=${to}`, f],
        { q: file, k: file },
        "Invalid parameter 'extended_l2'",
      );
    }
  });

  for (const backing of [true, false]) {
    test(`standard writes (backing file: ${backing ? "yes" : "no"}): the same subcluster bitmaps as QEMU`, async () => {
      const dir = await tmp.caseDir(`standard-${backing}`);
      let base: string | undefined;
      if (backing) {
        base = path.join(dir, "base.raw");
        await qemuImgOk(["create", "-q", "-f", "raw", base, "1M"]);
        await qemuIoOk(base, ["write -q -P 0xff 0 1M"], { format: "raw" });
      }
      const q = path.join(dir, "q.qcow2");
      const k = path.join(dir, "k.qcow2");
      await extImage(q, "1M", base);
      await extImage(k, "1M", base);
      // 271's sequence: subclusters are 2k; "sc=N off=M" is N * 2k + M k.
      const ops: Op[] = [
        { kind: "write", offset: 0, length: KiB, pattern: 1 },
        { kind: "write", offset: 3 * KiB, length: 512, pattern: 2 },
        { kind: "write", offset: 5 * KiB, length: KiB, pattern: 3 },
        { kind: "write", offset: 6 * KiB, length: 2 * KiB, pattern: 4 },
        { kind: "write", offset: 8 * KiB, length: 6 * KiB, pattern: 5 },
        { kind: "write", offset: 15 * KiB, length: 4 * KiB, pattern: 6 },
        { kind: "write", offset: 32 * KiB, length: KiB, pattern: 7 },
        { kind: "write", offset: 63 * KiB, length: 4 * KiB, pattern: 8 },
        { kind: "zero", offset: 2 * KiB, length: 2 * KiB },
        { kind: "zero", offset: 0, length: 64 * KiB },
        { kind: "write", offset: 0, length: 64 * KiB, pattern: 9 },
        { kind: "unmap", offset: 0, length: 32 * KiB },
        { kind: "unmap", offset: 0, length: 64 * KiB },
        { kind: "write", offset: 3 * KiB, length: 512, pattern: 10 },
        { kind: "write", offset: 0, length: 64 * KiB, pattern: 11 },
        { kind: "discard", offset: 0, length: 64 * KiB },
        // Not 271's: QEMU 7.2 discards whole clusters only, also with subclusters.
        { kind: "write", offset: 0, length: 128 * KiB, pattern: 12 },
        { kind: "discard", offset: 2 * KiB, length: 2 * KiB },
        { kind: "discard", offset: 32 * KiB, length: 64 * KiB },
        { kind: "discard", offset: 32 * KiB, length: 96 * KiB },
      ];
      for (const op of ops) {
        await qemuIoOk(q, [qemuIoCommand(op)]);
        const err = await qcowkitOp(k, op);
        assert.equal(err, undefined, `${qemuIoCommand(op)}: ${err}`);
        for (const n of [0, 1]) {
          const [eq, ek] = [await l2Entry(q, n), await l2Entry(k, n)];
          // Host offsets may differ; the flags and the bitmap may not.
          assert.equal(
            ek.slice(0, 4) + ek.slice(18),
            eq.slice(0, 4) + eq.slice(18),
            `${qemuIoCommand(op)}: entry ${n}`,
          );
        }
        const cmp = await qemuImg(["compare", q, k]);
        assert.equal(cmp.code, 0, `${qemuIoCommand(op)}: ${show(cmp)}`);
      }
      const check = await qemuImg(["check", k]);
      assert.equal(check.code, 0, show(check));
    });
  }
});
