/**
 * `qcowkit check` against `qemu-img check` 7.2 on damaged and clean images: the same findings on
 * stderr, the same summary (human and JSON) on stdout, the same exit code; and after `-r leaks` /
 * `-r all`, qcowkit's repaired copy is no worse than QEMU's and holds the same guest data.
 *
 * Every case runs both tools on two identical copies, q/img.qcow2 and k/img.qcow2, each from its
 * own directory with the relative name img.qcow2, so that file names in the outputs are equal.
 */

import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import {
  CLI_PREFIX,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIo,
  qemuIoOk,
  type RunResult,
  requireTool,
  sha256,
  sizes,
  useTempDir,
} from "./util.js";

const tmp = useTempDir("check");
const IMG = "img.qcow2";

const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const COPIED = 1n << 63n;

// ---------------------------------------------------------------------------------------------
// Raw file access for the damage
// ---------------------------------------------------------------------------------------------

async function r64(file: string, at: number): Promise<bigint> {
  const fh = await fs.open(file, "r");
  try {
    const b = new Uint8Array(8);
    await fh.read(b, 0, 8, at);
    return new DataView(b.buffer).getBigUint64(0);
  } finally {
    await fh.close();
  }
}

async function writeAt(file: string, at: number, bytes: Uint8Array): Promise<void> {
  const fh = await fs.open(file, "r+");
  try {
    await fh.write(bytes, 0, bytes.length, at);
  } finally {
    await fh.close();
  }
}

function w64(file: string, at: number, v: bigint): Promise<void> {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v);
  return writeAt(file, at, b);
}

function w16(file: string, at: number, v: number): Promise<void> {
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, v);
  return writeAt(file, at, b);
}

/** Where the base image keeps its first tables, read from the header as the damage needs them. */
interface Layout {
  clusterSize: number;
  l1Off: number;
  /** L1 entry 0 (with its flags). */
  l1: bigint;
  /** Offset of the first L2 table. */
  l2: number;
  /** L2 entry 0 (with its flags). */
  e0: bigint;
  /** Offset of the first data cluster. */
  d0: number;
  rtOff: number;
  /** Offset of the first refcount block (16-bit refcounts). */
  rb0: number;
  fileSize: number;
}

async function readLayout(file: string): Promise<Layout> {
  const fh = await fs.open(file, "r");
  const head = new Uint8Array(104);
  try {
    await fh.read(head, 0, head.length, 0);
  } finally {
    await fh.close();
  }
  const dv = new DataView(head.buffer);
  const clusterSize = 2 ** dv.getUint32(20);
  const l1Off = Number(dv.getBigUint64(40));
  const rtOff = Number(dv.getBigUint64(48));
  assert.ok(dv.getUint32(36) >= 1, "base image: L1 table has an entry");
  const l1 = await r64(file, l1Off);
  const l2 = Number(l1 & OFFSET_MASK);
  const e0 = await r64(file, l2);
  const rb0 = Number((await r64(file, rtOff)) & OFFSET_MASK);
  const fileSize = (await fs.stat(file)).size;
  return { clusterSize, l1Off, l1, l2, e0, d0: Number(e0 & OFFSET_MASK), rtOff, rb0, fileSize };
}

type Damage = (file: string, g: Layout) => Promise<void>;

/** The damage scenarios, applied to a copy of the base image. */
const DAMAGE: Record<string, Damage> = {
  leak: async (file, g) => {
    const n = Math.floor(g.fileSize / g.clusterSize);
    await writeAt(file, n * g.clusterSize + 3 * g.clusterSize - 1, new Uint8Array([0]));
    await w16(file, g.rb0 + 2 * (n + 1), 1);
  },
  low0: (file, g) => w16(file, g.rb0 + 2 * (g.d0 / g.clusterSize), 0),
  share: (file, g) => w64(file, g.l2 + 8, g.e0),
  l1self: (file, g) => w64(file, g.l1Off, BigInt(g.l1Off) | COPIED),
  emptyrt: (file, g) => writeAt(file, g.rtOff, new Uint8Array(g.clusterSize)),
  copied: (file, g) => w64(file, g.l2, g.e0 & ~COPIED),
  copiedl1: (file, g) => w64(file, g.l1Off, g.l1 & ~COPIED),
  reserved2: (file, g) => w64(file, g.l2, g.e0 | (1n << 58n)),
  reserved1: (file, g) => w64(file, g.l1Off, g.l1 | (1n << 60n)),
  unal2: (file, g) => w64(file, g.l1Off, g.l1 + 512n),
  unaldata: (file, g) => w64(file, g.l2, g.e0 + 512n),
  rbunal: (file, g) => w64(file, g.rtOff, BigInt(g.rb0 + 512)),
  rbout: (file, g) => w64(file, g.rtOff + 8, 1n << 40n),
  corruptbit: async (file) => w64(file, 72, (await r64(file, 72)) | 2n),
  autoclear: (file) => w64(file, 88, 1n << 40n),
  l2outside: (file, g) => w64(file, g.l1Off, (1n << 40n) | COPIED),
  dataoutside: (file, g) => w64(file, g.l2, (1n << 40n) | COPIED),
};

// ---------------------------------------------------------------------------------------------
// Running both tools
// ---------------------------------------------------------------------------------------------

interface Pair {
  /** The case directory, holding q/ (qemu-img's copy) and k/ (qcowkit's copy). */
  dir: string;
  q: string;
  k: string;
}

/** Copies `files` (the first one is the image) from `srcDir` into a new case's q/ and k/ as IMG… */
async function makePair(name: string, srcDir: string, files: readonly string[]): Promise<Pair> {
  const dir = await tmp.caseDir(name);
  const pair = { dir, q: path.join(dir, "q"), k: path.join(dir, "k") };
  for (const side of [pair.q, pair.k]) {
    await fs.mkdir(side, { recursive: true });
    for (const f of files) await fs.copyFile(path.join(srcDir, f), path.join(side, f === files[0] ? IMG : f));
  }
  return pair;
}

/** qcowkit's own name where qemu-img names itself, so that the rest can be compared as text. */
function asQemu(stderr: string): string {
  return stderr.replaceAll(/^qcowkit: /gm, "qemu-img: ").replaceAll("Try 'qcowkit --help'", "Try 'qemu-img --help'");
}

function show(r: RunResult): string {
  return `exit ${r.code}${r.signal ? ` (signal ${r.signal})` : ""}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
}

async function checkBoth(p: Pair, args: readonly string[], file = IMG): Promise<{ q: RunResult; k: RunResult }> {
  const full = ["check", ...args, file];
  const [q, k] = await Promise.all([qemuImg(full, { cwd: p.q }), qcowkit(full, { cwd: p.k })]);
  assert.ok(!/^ {4}at /m.test(k.stderr), `qcowkit ${full.join(" ")}: stack trace\n${k.stderr}`);
  return { q, k };
}

function assertSame(q: RunResult, k: RunResult, what: string): void {
  const ctx = `${what}\n=== qemu-img: ${show(q)}=== qcowkit: ${show(k)}`;
  assert.equal(k.stdout, q.stdout, `stdout differs: ${ctx}`);
  assert.equal(asQemu(k.stderr), q.stderr, `stderr differs: ${ctx}`);
  assert.equal(k.code, q.code, `exit code differs: ${ctx}`);
  if (q.stderr.startsWith("qemu-img: ")) assert.ok(k.stderr.startsWith(CLI_PREFIX), ctx);
}

/**
 * For failures whose message qcowkit words its own way (as elsewhere in the suite): the same exit
 * code and stdout, and stderr starting with qcowkit's prefix where qemu-img's starts with its own.
 */
function assertSameFailure(q: RunResult, k: RunResult, what: string): void {
  const ctx = `${what}\n=== qemu-img: ${show(q)}=== qcowkit: ${show(k)}`;
  assert.equal(k.code, q.code, `exit code differs: ${ctx}`);
  assert.equal(k.stdout, q.stdout, `stdout differs: ${ctx}`);
  if (q.stderr.startsWith("qemu-img: ")) assert.ok(k.stderr.startsWith(CLI_PREFIX), `stderr prefix: ${ctx}`);
}

/** `qemu-img check` verdict of a copy (its exit code; 0 clean, 2 corruptions, 3 leaks). */
async function qemuVerdict(dir: string): Promise<RunResult> {
  return qemuImg(["check", IMG], { cwd: dir });
}

/**
 * After a repair on both copies: qcowkit's copy is no worse for qemu-img check than QEMU's, and
 * the guest data of both copies is the same. Returns qemu-img check's result for qcowkit's copy.
 */
async function assertRepairNoWorse(p: Pair, what: string): Promise<RunResult> {
  const [vq, vk] = await Promise.all([qemuVerdict(p.q), qemuVerdict(p.k)]);
  assert.ok(
    vk.code !== null && vq.code !== null && vk.code <= vq.code,
    `${what}: qemu-img check of qcowkit's repaired copy is worse than of QEMU's\n=== QEMU's copy: ${show(vq)}=== qcowkit's copy: ${show(vk)}`,
  );
  const cmp = await qemuImg(["compare", "q/img.qcow2", "k/img.qcow2"], { cwd: p.dir });
  if (cmp.code === 0) return vk;
  const self = await qemuImg(["compare", "q/img.qcow2", "q/img.qcow2"], { cwd: p.dir });
  assert.notEqual(
    self.code,
    0,
    `${what}: the repaired copies hold different data:\n${show(cmp)}=== qemu-img check of qcowkit's copy: ${show(vk)}`,
  );
  // QEMU's own repaired copy cannot be read: qcowkit's must not read differently, or be judged the same.
  const kself = await qemuImg(["compare", "k/img.qcow2", "k/img.qcow2"], { cwd: p.dir });
  assert.ok(
    kself.code !== 0 || vk.code === vq.code,
    `${what}: QEMU's repaired copy cannot be read (${self.stderr.trim()}) but qcowkit's can, with a different verdict\n=== QEMU's copy: ${show(vq)}=== qcowkit's copy: ${show(vk)}`,
  );
  return vk;
}

/** In self-test mode qemu-img stands in for qcowkit: qcowkit's intended differences do not apply. */
const SELFTEST = process.env.QCOWKIT_INTEROP_SELFTEST === "1";

/** Modes that only look (the image must stay untouched) and modes that repair. */
interface Modes {
  read: ReadonlyArray<readonly string[]>;
  repair: ReadonlyArray<readonly string[]>;
}
/** Damaged images: the repair's report in JSON too (corruptions-fixed, leaks-fixed). */
const DAMAGED_MODES: Modes = {
  read: [[], ["--output=json"]],
  repair: [
    ["-r", "leaks"],
    ["-r", "all"],
    ["-r", "all", "--output=json"],
  ],
};
/** Clean images: nothing to repair, so no JSON repair report; -q and -f instead. */
const CLEAN_MODES: Modes = {
  read: [[], ["--output=json"], ["-q", "-f", "qcow2"]],
  repair: [
    ["-r", "leaks"],
    ["-r", "all"],
  ],
};

type Both = { q: RunResult; k: RunResult };

/** A known, intended difference for a repair mode: assert this instead of equal output. */
type Expectation = (p: Pair, r: Both, what: string) => Promise<void>;

interface CaseSpec {
  /** Directory holding `files`; the first file is the image (copied as img.qcow2). */
  srcDir: () => string;
  files: readonly string[];
  damage?: Damage;
  /** qemu-img check's exit code without -r: the fixture is what the case means (default 0). */
  qemuCode?: number;
  /** Per repair mode (its args joined by spaces), the intended difference. */
  differs?: Record<string, Expectation>;
  /** Default: DAMAGED_MODES with `damage`, CLEAN_MODES without. */
  modes?: Modes;
  /** Further checks after each repair mode, on both copies. */
  afterRepair?: (p: Pair, mode: string) => Promise<void>;
}

async function preparePair(name: string, spec: CaseSpec): Promise<Pair> {
  const p = await makePair(name, spec.srcDir(), spec.files);
  if (spec.damage !== undefined) {
    for (const side of [p.q, p.k]) {
      const file = path.join(side, IMG);
      await spec.damage(file, await readLayout(file));
    }
  }
  return p;
}

/**
 * The read-only checks (human, JSON, -q): same output and exit code, image untouched; then each
 * repair mode on fresh copies: same output and exit code (or the intended difference), and a
 * repaired copy no worse than QEMU's.
 */
async function runCase(name: string, spec: CaseSpec): Promise<void> {
  const modes = spec.modes ?? (spec.damage !== undefined ? DAMAGED_MODES : CLEAN_MODES);
  for (const mode of modes.read) {
    const p = await preparePair(`${name}${mode.join("") || "-human"}`, spec);
    const before = await sha256(path.join(p.k, IMG));
    const r = await checkBoth(p, mode);
    const what = `${name}: check ${mode.join(" ")}`;
    assert.equal(r.q.code, spec.qemuCode ?? 0, `fixture ${what}: qemu-img\n${show(r.q)}`);
    assertSame(r.q, r.k, what);
    assert.equal(await sha256(path.join(p.k, IMG)), before, `${what}: qcowkit modified the image`);
  }
  for (const mode of modes.repair) {
    const key = mode.join(" ");
    const p = await preparePair(`${name}${mode.join("")}`, spec);
    const r = await checkBoth(p, mode);
    const what = `${name}: check ${key}`;
    const differs = SELFTEST ? undefined : spec.differs?.[key];
    if (differs !== undefined) await differs(p, r, what);
    else {
      assertSame(r.q, r.k, what);
      await assertRepairNoWorse(p, what);
    }
    await spec.afterRepair?.(p, key);
  }
}

/** qcowkit's repair leaves an image that qemu-img check finds clean. */
async function assertRepairedClean(p: Pair, r: Both, what: string): Promise<void> {
  assert.equal(r.k.code, 0, `${what}: qcowkit should repair the image\n${show(r.k)}`);
  const v = await qemuVerdict(p.k);
  assert.equal(v.code, 0, `${what}: qemu-img check after qcowkit's repair\n${show(v)}`);
}

async function qcow2Info(dir: string): Promise<{ corrupt: boolean; dirty: unknown }> {
  const info = JSON.parse((await qemuImgOk(["info", "--output=json", IMG], { cwd: dir })).stdout);
  return { corrupt: info["format-specific"].data.corrupt, dirty: info["dirty-flag"] };
}

/** The headers' incompatible (72) and autoclear (88) feature bits. */
async function featureBits(dir: string): Promise<{ incompatible: bigint; autoclear: bigint }> {
  const file = path.join(dir, IMG);
  return { incompatible: await r64(file, 72), autoclear: await r64(file, 88) };
}

/** Intended differences of qcowkit's repair from QEMU's, by damage scenario. */
const DIFFERS: Record<string, Record<string, Expectation>> = {
  // QEMU marks the image corrupt and gives up; qcowkit with -r all rebuilds the refcount structure.
  rbunal: {
    "-r leaks": async (p, r, what) => {
      assert.equal(r.q.code, 1, `${what}: qemu-img\n${show(r.q)}`);
      assert.equal(r.k.code, 1, `${what}: qcowkit\n${show(r.k)}`);
      await assertRepairNoWorse(p, what);
    },
    "-r all": async (p, r, what) => {
      assert.equal(r.q.code, 1, `${what}: qemu-img\n${show(r.q)}`);
      await assertRepairedClean(p, r, what);
      await assertRepairNoWorse(p, what);
    },
  },
  // QEMU grows the file to 1 TiB to reach the refcount block; qcowkit rebuilds without growing it.
  rbout: {
    "-r all": async (p, r, what) => {
      assert.equal(r.q.code, 0, `${what}: qemu-img\n${show(r.q)}`);
      await assertRepairedClean(p, r, what);
      const size = (await fs.stat(path.join(p.k, IMG))).size;
      assert.ok(size < 2 * sizes.MiB, `${what}: qcowkit grew the file to ${size} bytes`);
      await assertRepairNoWorse(p, what);
    },
  },
};
for (const d of Object.values(DIFFERS)) {
  if (d["-r all"] !== undefined) d["-r all --output=json"] = d["-r all"];
}

/** qemu-img check's exit code without -r for each damage (the fixture does what it says). */
const DAMAGE_CODE: Record<string, number> = {
  leak: 3,
  rbunal: 1,
  corruptbit: 0,
  autoclear: 0,
};

/** After -r leaks/all the corrupt bit and unknown autoclear bits are gone, as QEMU leaves them. */
async function assertFeatureBitsCleared(p: Pair, mode: string): Promise<void> {
  const [kb, qb, ki] = await Promise.all([featureBits(p.k), featureBits(p.q), qcow2Info(p.k)]);
  assert.equal(ki.corrupt, false, `check ${mode}: qemu-img info still says corrupt`);
  assert.equal(kb.incompatible & 2n, 0n, `check ${mode}: corrupt bit still set`);
  assert.equal(kb.autoclear & (1n << 40n), 0n, `check ${mode}: unknown autoclear bit 40 still set`);
  assert.deepEqual(kb, qb, `check ${mode}: feature bits differ from QEMU's repaired copy`);
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/** An overlay img.qcow2 on base.qcow2 (relative name), each with data. */
async function buildOverlay(dir: string): Promise<void> {
  await qemuImgOk(["create", "-q", "-f", "qcow2", "base.qcow2", "64M"], { cwd: dir });
  await qemuIoOk("base.qcow2", ["write -P 1 0 1M"], { cwd: dir });
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", IMG], { cwd: dir });
  await qemuIoOk(IMG, ["write -P 2 64k 64k", "write -z 512k 64k"], { cwd: dir });
}

/** Runs qemu-io on a fixture and expects it to be killed by its own `sigraise 9`. */
async function qemuIoKilled(cwd: string, image: string, commands: readonly string[]): Promise<void> {
  const args = ["-f", "qcow2"];
  for (const c of commands) args.push("-c", c);
  const r = await qemuIo([...args, image], { cwd });
  assert.equal(r.signal, "SIGKILL", `fixture: qemu-io should be killed by sigraise 9\n${show(r)}`);
}

describe("check", { concurrency: 4 }, () => {
  let baseDir = "";
  before(async () => {
    requireTool("qemu-img");
    requireTool("qemu-io");
    baseDir = await tmp.caseDir("base");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "a.qcow2", "64M"], { cwd: baseDir });
    await qemuIoOk("a.qcow2", ["write -P 1 0 1M", "write -c -P 2 4M 64k"], { cwd: baseDir });
  });
  const fromBase = { srcDir: () => baseDir, files: ["a.qcow2"] };

  test("the base image is clean", () => runCase("base", fromBase));

  for (const [name, damage] of Object.entries(DAMAGE)) {
    const bits = name === "corruptbit" || name === "autoclear";
    test(`damage: ${name}`, () =>
      runCase(name, {
        ...fromBase,
        damage,
        qemuCode: DAMAGE_CODE[name] ?? 2,
        differs: DIFFERS[name],
        afterRepair: bits ? assertFeatureBitsCleared : undefined,
      }));
  }

  test("a dirty lazy-refcounts image (qemu-io killed, as qemu-iotests 039)", async () => {
    const src = await tmp.caseDir("dirty-src");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", IMG, "64M"], { cwd: src });
    await qemuIoKilled(src, IMG, ["write -P 0x5a 0 512", "write -P 1 1M 64k", "sigraise 9"]);
    assert.equal((await featureBits(src)).incompatible & 1n, 1n, "fixture: the dirty bit is set");
    const readBack = ["read -P 0x5a 0 512", "read -P 1 1M 64k"];

    const p = await preparePair("dirty-plain", { srcDir: () => src, files: [IMG] });
    const k = await qcowkit(["check", IMG], { cwd: p.k });
    assert.equal(k.code, 2, `qcowkit check of a dirty image\n${show(k)}`);
    assert.match(k.stderr, /^ERROR cluster \d+ refcount=0 reference=1$/m);

    await runCase("dirty", {
      srcDir: () => src,
      files: [IMG],
      qemuCode: 2,
      modes: { read: [...DAMAGED_MODES.read, ["-q"]], repair: DAMAGED_MODES.repair },
      afterRepair: async (pair, mode) => {
        const bits = await featureBits(pair.k);
        if (mode === "-r leaks") {
          if (SELFTEST) return;
          // Leaks only cannot fix refcounts of zero: the image stays dirty, so that the next
          // read-write open repairs it. (QEMU clears the dirty bit here all the same.)
          assert.equal(bits.incompatible & 1n, 1n, `check ${mode}: dirty bit cleared with refcounts still wrong`);
          return;
        }
        assert.equal(bits.incompatible & 1n, 0n, `check ${mode}: dirty bit still set`);
        assert.equal((await qcow2Info(pair.k)).dirty, false, `check ${mode}: qemu-img info dirty-flag`);
        assert.equal((await qemuVerdict(pair.k)).code, 0, `check ${mode}: qemu-img check after the repair`);
        await qemuIoOk(IMG, readBack, { cwd: pair.k });
      },
    });
  });

  // Clean images of many layouts: nothing to find and nothing to repair, in every mode.
  const layouts: Record<string, { files?: string[]; build: (dir: string) => Promise<void> }> = {
    "v2 (compat=0.10) with a snapshot": {
      build: async (dir) => {
        await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", IMG, "64M"], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 1 0 256k", "write -c -P 2 1M 64k"], { cwd: dir });
        await qemuImgOk(["snapshot", "-c", "s1", IMG], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 3 64k 64k", "write -P 4 8M 64k"], { cwd: dir });
      },
    },
    "extended L2, 128k clusters, compressed and zero writes, a snapshot": {
      build: async (dir) => {
        await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", IMG, "64M"], {
          cwd: dir,
        });
        await qemuIoOk(IMG, ["write -P 1 0 256k", "write -c -P 2 1M 128k", "write -z 2M 128k", "write -P 3 4M 4k"], {
          cwd: dir,
        });
        await qemuImgOk(["snapshot", "-c", "s1", IMG], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 4 8k 4k", "write -z 16k 32k"], { cwd: dir });
      },
    },
    "a persistent bitmap": {
      build: async (dir) => {
        await qemuImgOk(["create", "-q", "-f", "qcow2", IMG, "64M"], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 1 0 1M"], { cwd: dir });
        await qemuImgOk(["bitmap", "--add", IMG, "b1"], { cwd: dir });
        // Written with the bitmap enabled: it gets dirty bits, so a bitmap table and data.
        await qemuIoOk(IMG, ["write -P 2 2M 128k"], { cwd: dir });
      },
    },
    "an external data file": {
      files: [IMG, "img.data"],
      build: async (dir) => {
        await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "data_file=img.data", IMG, "64M"], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 1 0 1M", "write -z 2M 64k"], { cwd: dir });
      },
    },
  };
  layouts["an overlay with a backing file"] = {
    files: [IMG, "base.qcow2"],
    build: buildOverlay,
  };
  for (const bits of [1, 8, 64]) {
    layouts[`refcount_bits=${bits}, 4k clusters`] = {
      build: async (dir) => {
        const o = `cluster_size=4k,refcount_bits=${bits}`;
        await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", o, IMG, "16M"], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 1 0 64k", "write -c -P 2 1M 8k", "write -z 2M 8k"], { cwd: dir });
        // A snapshot needs refcounts of 2: not with 1-bit refcounts.
        if (bits > 1) await qemuImgOk(["snapshot", "-c", "s1", IMG], { cwd: dir });
        await qemuIoOk(IMG, ["write -P 3 4k 4k"], { cwd: dir });
      },
    };
  }
  for (const [name, layout] of Object.entries(layouts)) {
    test(`clean: ${name}`, async () => {
      const src = await tmp.caseDir(name.replaceAll(/[^a-z0-9]+/gi, "-"));
      await layout.build(src);
      // QEMU's read-write open may rewrite a persistent bitmap (and then find the old one leaked);
      // qcowkit leaves it be and finds the image clean.
      const bitmapRepair: Expectation = async (p, r, what) => {
        if (r.q.code === 0) assertSame(r.q, r.k, what);
        await assertRepairedClean(p, r, what);
      };
      await runCase(name.replaceAll(/[^a-z0-9]+/gi, "-"), {
        srcDir: () => src,
        files: layout.files ?? [IMG],
        differs: name.includes("bitmap") ? { "-r all": bitmapRepair, "-r all --output=json": bitmapRepair } : undefined,
      });
    });
  }

  test("an overlay whose backing file is missing cannot be opened", async () => {
    const src = await tmp.caseDir("no-backing-src");
    await buildOverlay(src);
    const p = await makePair("no-backing", src, [IMG]);
    for (const args of [[], ["--output=json"], ["-U"], ["-r", "all"]]) {
      const r = await checkBoth(p, args);
      assert.equal(r.q.code, 1, `fixture: qemu-img check ${args.join(" ")}\n${show(r.q)}`);
      assertSameFailure(r.q, r.k, `no backing file: check ${args.join(" ")}`);
    }
  });

  test("a raw file: 63, with and without -f raw", async () => {
    const dir = await tmp.caseDir("raw");
    await qemuImgOk(["create", "-q", "-f", "raw", "img.raw", "1M"], { cwd: dir });
    const p = await makePair("raw-pair", dir, ["img.raw"]);
    for (const args of [
      [],
      ["-f", "raw"],
      ["-f", "raw", "--output=json"],
      ["-f", "raw", "-r", "all"],
      ["-r", "leaks"],
    ]) {
      const r = await checkBoth(p, args);
      assert.equal(r.q.code, 63, `fixture: qemu-img check ${args.join(" ")}\n${show(r.q)}`);
      assertSame(r.q, r.k, `raw: check ${args.join(" ")}`);
    }
  });

  test("bad arguments: -r foo, --output=xml", async () => {
    const p = await makePair("bad-args", baseDir, ["a.qcow2"]);
    for (const args of [["-r", "foo"], ["--output=xml"], ["-r", "foo", "--output=json"]]) {
      const r = await checkBoth(p, args);
      assert.equal(r.q.code, 1, `fixture: qemu-img check ${args.join(" ")}\n${show(r.q)}`);
      assertSame(r.q, r.k, `check ${args.join(" ")}`);
    }
    const r = await checkBoth(p, ["-r", "foo"]);
    if (!SELFTEST) assert.match(r.k.stderr, /Try 'qcowkit --help'/);
    for (const args of [[], ["-r", "all"]]) {
      const missing = await checkBoth(p, args, "nope.qcow2");
      assert.equal(missing.q.code, 1, `fixture: qemu-img check of a missing file\n${show(missing.q)}`);
      assertSameFailure(missing.q, missing.k, `check ${args.join(" ")} nope.qcow2`);
    }
  });
});

// Many 4 KiB clusters, written out of guest order (fragmented runs), damaged in the middle of a
// table and of a refcount block: where check's tight loops over L2 entries and refcounts hand
// an entry back to the full checks.
describe("check: many clusters", { concurrency: 4 }, () => {
  let manyDir = "";
  before(async () => {
    requireTool("qemu-img");
    requireTool("qemu-io");
    manyDir = await tmp.caseDir("many-base");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "a.qcow2", "64M"], { cwd: manyDir });
    await qemuIoOk(
      "a.qcow2",
      ["write -P 1 1M 1M", "write -P 2 0 1M", "write -P 3 3M 4k", "write -P 4 2M 512k", "write -c -P 5 3200k 4k"],
      { cwd: manyDir },
    );
  });
  const fromMany = { srcDir: () => manyDir, files: ["a.qcow2"] };
  /** L2 entry 300 of the first table (guest offset 1200 KiB, in the middle of the first write). */
  const entry = async (file: string, g: Layout, i = 300) => {
    const e = await r64(file, g.l2 + 8 * i);
    return { at: g.l2 + 8 * i, e, rc: g.rb0 + 2 * (Number(e & OFFSET_MASK) / g.clusterSize) };
  };
  const MANY: Record<string, Damage> = {
    copied: async (file, g) => {
      const x = await entry(file, g);
      await w64(file, x.at, x.e & ~COPIED);
    },
    // Refcount 2 of a cluster referenced once: a leak, and a COPIED flag that should be clear.
    leak: async (file, g) => w16(file, (await entry(file, g)).rc, 2),
    low0: async (file, g) => w16(file, (await entry(file, g)).rc, 0),
    share: async (file, g) => w64(file, (await entry(file, g, 301)).at, (await entry(file, g)).e),
  };
  test("clean", () => runCase("many", fromMany));
  for (const [name, damage] of Object.entries(MANY)) {
    test(`damage: ${name}`, () => runCase(`many-${name}`, { ...fromMany, damage, qemuCode: 2 }));
  }
});
