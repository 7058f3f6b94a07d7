/**
 * Helpers for the interop suite: run qemu-img / qemu-io / qcowkit side by side on the same image
 * and assert that qcowkit's output is qemu-img's, byte for byte.
 *
 * Interop tests never skip: a missing tool is a failure whose message says how to install it.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { accessSync, createReadStream, existsSync, constants as fsConstants, statSync } from "node:fs";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { after, before, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";

/** Repository root: this file runs as dist/test/interop/util.js, three levels below it. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const QCOWKIT_MAIN = path.join(REPO_ROOT, "dist/src/cli/qcowkit.cjs");

const KiB = 1024;
const MiB = 1024 * KiB;

// ---------------------------------------------------------------------------------------------
// Tools and processes
// ---------------------------------------------------------------------------------------------

/** The Debian package that provides each external tool the suite uses. */
const TOOL_PACKAGES: Record<string, string> = {
  "qemu-img": "qemu-utils",
  "qemu-io": "qemu-utils",
  "qemu-nbd": "qemu-utils",
  nbdinfo: "libnbd-bin",
  nbdcopy: "libnbd-bin",
  nbdsh: "python3-libnbd",
  fio: "fio",
};

const toolPaths = new Map<string, string>();

/**
 * Returns the absolute path of `name` on PATH, or throws
 * "<tool> not found: install it with `apt-get install -y <package>`".
 */
export function requireTool(name: string): string {
  const cached = toolPaths.get(name);
  if (cached !== undefined) return cached;
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (dir === "") continue;
    const candidate = path.join(dir, name);
    if (isExecutableFile(candidate)) {
      toolPaths.set(name, candidate);
      return candidate;
    }
  }
  const pkg = TOOL_PACKAGES[name] ?? name;
  throw new Error(`${name} not found: install it with \`apt-get install -y ${pkg}\``);
}

function isExecutableFile(p: string): boolean {
  try {
    // A directory on PATH named like the tool must not count.
    if (!statSync(p).isFile()) return false;
    accessSync(p, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

export interface RunResult {
  /** Exit code, or null when the process was killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** True when `timeoutMs` elapsed (or `watch` fired) and the process was killed. */
  killed: boolean;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Kill the process (SIGKILL) after this long. Default 120 s: nothing in this suite takes that. */
  timeoutMs?: number;
  /**
   * Called every 200 ms while the process runs; returning a string kills the process and records
   * that string in stderr (used to stop a convert that fills the disk with zeros).
   */
  watch?: () => Promise<string | undefined>;
}

/** Runs `cmd args` without a shell and collects its output. Never rejects on a non-zero exit. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let killed = false;
    let watchNote = "";
    child.stdout.on("data", (b: Buffer) => out.push(b));
    child.stderr.on("data", (b: Buffer) => err.push(b));
    const timer = setTimeout(() => {
      killed = true;
      watchNote = `\n[interop] killed after ${opts.timeoutMs ?? 120_000} ms`;
      child.kill("SIGKILL");
    }, opts.timeoutMs ?? 120_000);
    let watching = false;
    const watcher =
      opts.watch === undefined
        ? undefined
        : setInterval(() => {
            if (watching || opts.watch === undefined) return;
            watching = true;
            opts
              .watch()
              .then((why) => {
                if (why !== undefined && !killed) {
                  killed = true;
                  watchNote = `\n[interop] killed: ${why}`;
                  child.kill("SIGKILL");
                }
              })
              .catch(() => undefined)
              .finally(() => {
                watching = false;
              });
          }, 200);
    child.on("error", (e) => {
      clearTimeout(timer);
      if (watcher !== undefined) clearInterval(watcher);
      reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      if (watcher !== undefined) clearInterval(watcher);
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString("utf8"),
        stderr: Buffer.concat(err).toString("utf8") + watchNote,
        killed,
      });
    });
  });
}

export function qemuImg(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  return run(requireTool("qemu-img"), args, opts);
}

export function qemuIo(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  return run(requireTool("qemu-io"), args, opts);
}

/**
 * Runs the qcowkit CLI (`node dist/src/cli/qcowkit.cjs`).
 *
 * QCOWKIT_INTEROP_SELFTEST=1 runs qemu-img in its place: every comparison must then pass, except the
 * checks of qcowkit's own error messages. That checks the suite itself (e.g. on a new QEMU version).
 */
export function qcowkit(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  if (process.env.QCOWKIT_INTEROP_SELFTEST === "1") return qemuImg(args, opts);
  if (!existsSync(QCOWKIT_MAIN)) {
    throw new Error(`qcowkit CLI not built: ${QCOWKIT_MAIN} is missing (run \`npx tsc -p .\`)`);
  }
  return run(process.execPath, [QCOWKIT_MAIN, ...args], opts);
}

function describeRun(what: string, args: readonly string[], r: RunResult): string {
  return (
    `${what} ${args.join(" ")}\n  exit: ${r.code}${r.signal ? ` (signal ${r.signal})` : ""}` +
    `\n  stdout: ${r.stdout.trimEnd()}\n  stderr: ${r.stderr.trimEnd()}`
  );
}

/** Runs qemu-img to build a fixture; a failure here is a bug in the test, said so. */
export async function qemuImgOk(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  const r = await qemuImg(args, opts);
  if (r.code !== 0) throw new Error(`fixture: ${describeRun("qemu-img", args, r)}`);
  return r;
}

/**
 * Runs qemu-io on an image, one `-c` per command, failing on a non-zero exit or on an error line
 * (qemu-io exits 0 even when a command fails).
 */
export async function qemuIoOk(
  image: string,
  commands: readonly string[],
  opts: RunOptions & { format?: string; extraArgs?: readonly string[] } = {},
): Promise<RunResult> {
  const args = [...(opts.extraArgs ?? []), "-f", opts.format ?? "qcow2"];
  for (const c of commands) args.push("-c", c);
  args.push(image);
  const r = await qemuIo(args, opts);
  if (r.code !== 0 || /failed|error|invalid/i.test(r.stdout + r.stderr)) {
    throw new Error(`fixture: ${describeRun("qemu-io", args, r)}`);
  }
  return r;
}

/**
 * The dirty ranges of persistent bitmap `name` as QEMU sees them: the image exported by
 * `qemu-nbd -B NAME`, listed by `nbdinfo --map=qemu:dirty-bitmap:NAME`.
 */
export async function dirtyMap(image: string, name: string): Promise<string> {
  const sock = `${image}.sock`;
  const server = spawn(requireTool("qemu-nbd"), ["-r", "-t", "-f", "qcow2", "-B", name, "-k", sock, image], {
    stdio: "ignore",
  });
  try {
    for (let i = 0; i < 50; i++) {
      const r = await run(requireTool("nbdinfo"), [`--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`]);
      if (r.code === 0) return r.stdout;
      await new Promise((res) => setTimeout(res, 100));
    }
    throw new Error(`qemu-nbd did not serve ${image}`);
  } finally {
    // Until it has exited it holds its lock on the image: the next step may want to write.
    const exited = new Promise((res) => server.once("exit", res));
    if (server.exitCode === null && server.signalCode === null) {
      server.kill();
      await exited;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------------------------

/** Creates a fresh `$TMPDIR/qcowkit-<tag>-XXXXXX` directory. */
export function makeTempDir(tag: string): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), `qcowkit-${tag}-`));
}

export function removeTempDir(dir: string): Promise<void> {
  return fs.rm(dir, { recursive: true, force: true });
}

/**
 * Registers before/after hooks in the current scope that create and remove a temp dir.
 * `dir()` is valid inside tests.
 */
export function useTempDir(tag: string): {
  dir(): string;
  file(...parts: string[]): string;
  /** A fresh subdirectory per test case, so file names in outputs stay short and predictable. */
  caseDir(name: string): Promise<string>;
} {
  let dir: string | undefined;
  before(async () => {
    dir = await makeTempDir(tag);
  });
  after(async () => {
    if (dir !== undefined) await removeTempDir(dir);
  });
  const get = (): string => {
    if (dir === undefined) throw new Error("temp dir used outside a test");
    return dir;
  };
  const file = (...parts: string[]): string => path.join(get(), ...parts);
  const caseDir = async (name: string): Promise<string> => {
    await fs.mkdir(file(name), { recursive: true });
    return file(name);
  };
  return { dir: get, file, caseDir };
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/** A small seeded PRNG (mulberry32): the same seed gives the same bytes on every run. */
export function seededBytes(seed: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let s = seed >>> 0;
  for (let i = 0; i < length; i += 4) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    const v = (t ^ (t >>> 14)) >>> 0;
    for (let j = 0; j < 4 && i + j < length; j++) buf[i + j] = (v >>> (8 * j)) & 0xff;
  }
  return buf;
}

/**
 * Writes a sparse raw file of `size` bytes holding `chunks` (offset → bytes); everything else is a
 * hole. Feed it to `qemu-img convert -f raw -O qcow2` to get an image with arbitrary data.
 */
export async function writeSparseRaw(
  file: string,
  size: number,
  chunks: ReadonlyArray<readonly [number, Uint8Array]>,
): Promise<void> {
  const fh = await fs.open(file, "w");
  try {
    await fh.truncate(size);
    for (const [off, bytes] of chunks) await fh.write(bytes, 0, bytes.length, off);
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

export interface RawDifference {
  offset: number;
  expected: string;
  actual: string;
}

function hexWindow(buf: Buffer, start: number, end: number): string {
  return buf.subarray(start, end).toString("hex").replace(/(..)/g, "$1 ").trim();
}

/**
 * Streams through two files in 1 MiB chunks (bounded memory) and returns the first difference,
 * or undefined when they hold the same bytes. Files of different sizes differ at the shorter size.
 */
export async function diffFiles(expectedPath: string, actualPath: string): Promise<RawDifference | undefined> {
  const CHUNK = 1 * MiB;
  const [fe, fa] = await Promise.all([fs.open(expectedPath, "r"), fs.open(actualPath, "r")]);
  try {
    const [se, sa] = await Promise.all([fe.stat(), fa.stat()]);
    const be = Buffer.alloc(CHUNK);
    const ba = Buffer.alloc(CHUNK);
    const common = Math.min(se.size, sa.size);
    for (let pos = 0; pos < common; pos += CHUNK) {
      const n = Math.min(CHUNK, common - pos);
      await Promise.all([readFully(fe, be, n, pos), readFully(fa, ba, n, pos)]);
      if (be.compare(ba, 0, n, 0, n) !== 0) {
        let i = 0;
        while (be[i] === ba[i]) i++;
        const from = Math.max(0, i - 8);
        const to = Math.min(n, i + 8);
        return {
          offset: pos + i,
          expected: `bytes ${pos + from}..${pos + to}: ${hexWindow(be, from, to)}`,
          actual: `bytes ${pos + from}..${pos + to}: ${hexWindow(ba, from, to)}`,
        };
      }
    }
    if (se.size !== sa.size) {
      return { offset: common, expected: `size ${se.size}`, actual: `size ${sa.size}` };
    }
    return undefined;
  } finally {
    await Promise.all([fe.close(), fa.close()]);
  }
}

/** Fails with the first differing bytes unless the two files hold the same bytes. */
export async function assertSameFile(expected: string, actual: string, what: string): Promise<void> {
  const d = await diffFiles(expected, actual);
  if (d !== undefined) assert.fail(`${what}: differs at ${d.offset}\n  expected ${d.expected}\n  actual   ${d.actual}`);
}

async function readFully(fh: fs.FileHandle, buf: Buffer, n: number, pos: number): Promise<void> {
  let done = 0;
  while (done < n) {
    const { bytesRead } = await fh.read(buf, done, n - done, pos + done);
    if (bytesRead === 0) throw new Error(`short read at ${pos + done}`);
    done += bytesRead;
  }
}

/** Bytes a file occupies on disk (st_blocks × 512). */
/**
 * The raw entries of a qcow2 image's snapshot table, read straight from the file (nb_snapshots
 * at 60, the table offset at 64), each with its parts: the 40 fixed bytes, extra data, ID, name.
 */
export async function snapshotTableEntries(
  file: string,
): Promise<{ bytes: Buffer; extra: Buffer; id: Buffer; name: Buffer }[]> {
  const data = await fs.readFile(file);
  const count = data.readUInt32BE(60);
  let at = Number(data.readBigUInt64BE(64));
  const out = [];
  for (let i = 0; i < count; i++) {
    const idLen = data.readUInt16BE(at + 12);
    const nameLen = data.readUInt16BE(at + 14);
    const extraLen = data.readUInt32BE(at + 36);
    const e = at + 40;
    const end = e + extraLen + idLen + nameLen;
    out.push({
      bytes: data.subarray(at, end),
      extra: data.subarray(e, e + extraLen),
      id: data.subarray(e + extraLen, e + extraLen + idLen),
      name: data.subarray(e + extraLen + idLen, end),
    });
    at += Math.ceil((end - at) / 8) * 8;
  }
  return out;
}

export async function allocatedBytes(file: string): Promise<number> {
  return (await fs.stat(file)).blocks * 512;
}

export interface ConvertOptions {
  /** Scratch directory for the two raw outputs (removed again afterwards). */
  dir: string;
  /** `-f FMT` for the source, when given. */
  format?: string;
  /** Extra convert arguments placed before SRC, e.g. ["-l", "snapshot.name=s1"]. */
  extraArgs?: readonly string[];
  /** qcowkit's extra arguments when they differ from qemu-img's (e.g. ["-s", "s1"]). */
  qcowkitExtraArgs?: readonly string[];
  cwd?: string;
  /**
   * For huge sparse images: compare the outputs with `qemu-img compare -f raw -F raw` instead of
   * reading them, and kill qcowkit if its output allocates more than this many bytes.
   */
  hugeMaxAllocated?: number;
  timeoutMs?: number;
}

/**
 * Converts `src` to raw with qemu-img and with qcowkit and asserts that the outputs are
 * byte-identical and that qcowkit's is about as sparse as qemu-img's.
 */
export async function assertConvertMatches(src: string, opts: ConvertOptions): Promise<void> {
  const tag = Math.random().toString(36).slice(2, 8);
  const expected = path.join(opts.dir, `expected-${tag}.raw`);
  const actual = path.join(opts.dir, `actual-${tag}.raw`);
  const args = (dst: string, extra = opts.extraArgs ?? []): string[] => [
    "convert",
    ...(opts.format !== undefined ? ["-f", opts.format] : []),
    "-O",
    "raw",
    ...extra,
    src,
    dst,
  ];
  const kArgs = args(actual, opts.qcowkitExtraArgs ?? opts.extraArgs ?? []);
  try {
    await qemuImgOk(args(expected), { cwd: opts.cwd, timeoutMs: opts.timeoutMs });
    const limit = opts.hugeMaxAllocated;
    const r = await qcowkit(kArgs, {
      cwd: opts.cwd,
      timeoutMs: opts.timeoutMs,
      watch:
        limit === undefined
          ? undefined
          : async () => {
              const used = await allocatedBytes(actual).catch(() => 0);
              return used > limit ? `output allocated ${used} bytes (> ${limit}): not sparse` : undefined;
            },
    });
    assertCleanExit(r, 0, `qcowkit ${kArgs.join(" ")}`);
    const [es, as] = await Promise.all([fs.stat(expected), fs.stat(actual)]);
    assert.equal(as.size, es.size, `raw output size: expected ${es.size}, got ${as.size}`);
    if (limit === undefined) {
      await assertSameFile(expected, actual, "raw output, against qemu-img's");
    } else {
      const cmp = await qemuImg(["compare", "-f", "raw", "-F", "raw", expected, actual], {
        timeoutMs: opts.timeoutMs,
      });
      assert.equal(cmp.code, 0, `qemu-img compare of the raw outputs: ${cmp.stdout}${cmp.stderr}`);
    }
    const [ea, aa] = await Promise.all([allocatedBytes(expected), allocatedBytes(actual)]);
    assert.ok(
      aa <= ea + 1 * MiB,
      `raw output not sparse: qcowkit allocated ${aa} bytes, qemu-img ${ea} (+1 MiB allowed)`,
    );
  } finally {
    await Promise.all([fs.rm(expected, { force: true }), fs.rm(actual, { force: true })]);
  }
}

/** Asserts an exit code and a clean stderr (no stack trace). */
export function assertCleanExit(r: RunResult, code: number, what: string): void {
  if (r.code !== code) {
    assert.fail(
      `${what}: exit ${r.code}${r.signal ? ` (signal ${r.signal})` : ""}, expected ${code}\n  stderr: ${r.stderr.trimEnd()}`,
    );
  }
  assertNoStackTrace(r.stderr, what);
}

export function assertNoStackTrace(stderr: string, what: string): void {
  assert.ok(!/^ {4}at /m.test(stderr), `${what}: stack trace in stderr:\n${stderr}`);
}

export interface OutputOptions {
  format?: string;
  cwd?: string;
  timeoutMs?: number;
}

/** What a failing qcowkit prints first on stderr (qemu-img's own prefix in self-test mode). */
export const CLI_PREFIX = process.env.QCOWKIT_INTEROP_SELFTEST === "1" ? "qemu-img: " : "qcowkit: ";

export interface SameAsQemuOptions extends OutputOptions {
  /** Parse stdout as JSON and deep-compare instead of comparing text. */
  json?: boolean;
  /** The exit code qemu-img must give for the fixture to be what the test means (default 0). */
  qemuCode?: number;
}

/**
 * Runs `qemu-img ARGS` and `qcowkit ARGS` and asserts the same exit code and the same stdout
 * (parsed JSON deep-equal with `json`); when qemu-img fails with an error message, qcowkit's
 * stderr must start with "qcowkit: ". Never a stack trace.
 */
export async function assertSameAsQemu(args: readonly string[], opts: SameAsQemuOptions = {}): Promise<void> {
  const q = await qemuImg(args, opts);
  const expectedCode = opts.qemuCode ?? 0;
  if (q.code !== expectedCode) {
    throw new Error(`fixture: expected exit ${expectedCode} from ${describeRun("qemu-img", args, q)}`);
  }
  const k = await qcowkit(args, opts);
  const what = `qcowkit ${args.join(" ")}`;
  assertNoStackTrace(k.stderr, what);
  if (k.code !== q.code) {
    assert.fail(
      `${what}: exit ${k.code}${k.signal ? ` (signal ${k.signal})` : ""}, qemu-img exits ${q.code}` +
        `\n  qcowkit stderr:  ${k.stderr.trimEnd()}\n  qemu-img stderr: ${q.stderr.trimEnd()}`,
    );
  }
  if (opts.json && q.code === 0) {
    let actual: unknown;
    try {
      actual = JSON.parse(k.stdout);
    } catch (e) {
      assert.fail(`${what}: stdout is not JSON (${(e as Error).message}):\n${k.stdout}`);
    }
    assert.deepEqual(actual, JSON.parse(q.stdout), `${what}: JSON differs from qemu-img's`);
  } else {
    assert.equal(k.stdout, q.stdout, `${what}: stdout differs from qemu-img's`);
  }
  if (q.code !== 0 && q.stderr.startsWith("qemu-img: ")) {
    assert.ok(
      k.stderr.startsWith(CLI_PREFIX),
      `${what}: stderr should start with "${CLI_PREFIX}" (qemu-img says: ${q.stderr.trimEnd()}), got: ${k.stderr.trimEnd()}`,
    );
  }
}

function fmtArgs(format: string | undefined): string[] {
  return format !== undefined ? ["-f", format] : [];
}

type InfoOptions = OutputOptions & { backingChain?: boolean; qemuCode?: number };

/** `info --output json` (optionally --backing-chain): qcowkit's parsed JSON deep-equals qemu-img's. */
export function assertInfoJsonMatches(image: string, opts: InfoOptions = {}): Promise<void> {
  const chain = opts.backingChain ? ["--backing-chain"] : [];
  return assertSameAsQemu(["info", ...fmtArgs(opts.format), "--output", "json", ...chain, image], {
    ...opts,
    json: true,
  });
}

/** `info` human output: qcowkit's text equals qemu-img's. */
export function assertInfoHumanMatches(image: string, opts: InfoOptions = {}): Promise<void> {
  const chain = opts.backingChain ? ["--backing-chain"] : [];
  return assertSameAsQemu(["info", ...fmtArgs(opts.format), ...chain, image], opts);
}

/** `map --output json`: qcowkit's array deep-equals qemu-img's. */
export function assertMapJsonMatches(image: string, opts: OutputOptions & { qemuCode?: number } = {}): Promise<void> {
  return assertSameAsQemu(["map", ...fmtArgs(opts.format), "--output", "json", image], { ...opts, json: true });
}

/**
 * `map` human output: equal text. qemu-img refuses (exit 1) the human format for images with
 * compressed or external-data clusters; pass qemuCode 1 there and qcowkit must refuse too.
 */
export function assertMapHumanMatches(image: string, opts: OutputOptions & { qemuCode?: number } = {}): Promise<void> {
  return assertSameAsQemu(["map", ...fmtArgs(opts.format), image], opts);
}

export interface MatchAllOptions extends OutputOptions {
  /** Scratch dir for the convert outputs. */
  dir: string;
  /** Also compare `info --backing-chain` (JSON and human). */
  backingChain?: boolean;
  /**
   * Extra convert runs: qemu-img's extra arguments, and qcowkit's when they differ, e.g.
   * { qemu: ["-l", "snapshot.name=s1"] } or { qemu: ["-l", "snapshot.name=s1"], qcowkit: ["-s", "s1"] }.
   */
  convertVariants?: ReadonlyArray<{ qemu: readonly string[]; qcowkit?: readonly string[] }>;
  hugeMaxAllocated?: number;
  /** qemu-img's exit code for human `map` (1 when the image has compressed clusters). */
  mapHumanQemuCode?: number;
}

/**
 * The standard per-layout check, one subtest per aspect so that a report names every aspect that
 * differs: info (JSON, human), map (JSON, human), convert -O raw; optionally the backing chain
 * and convert variants. Finally: qcowkit's reads left the image file as it was.
 */
export async function assertAllMatch(t: TestContext, image: string, opts: MatchAllOptions): Promise<void> {
  const io: OutputOptions = { format: opts.format, cwd: opts.cwd, timeoutMs: opts.timeoutMs };
  const file = path.resolve(opts.cwd ?? process.cwd(), image);
  const before = await sha256(file);
  await t.test("info --output json", () => assertInfoJsonMatches(image, io));
  await t.test("info (human)", () => assertInfoHumanMatches(image, io));
  if (opts.backingChain) {
    await t.test("info --backing-chain --output json", () =>
      assertInfoJsonMatches(image, { ...io, backingChain: true }),
    );
    await t.test("info --backing-chain (human)", () => assertInfoHumanMatches(image, { ...io, backingChain: true }));
  }
  await t.test("map --output json", () => assertMapJsonMatches(image, io));
  await t.test("map (human)", () => assertMapHumanMatches(image, { ...io, qemuCode: opts.mapHumanQemuCode ?? 0 }));
  await t.test("convert -O raw", () => assertConvertMatches(image, opts));
  for (const v of opts.convertVariants ?? []) {
    const name = v.qcowkit === undefined ? v.qemu.join(" ") : `${v.qcowkit.join(" ")} (qemu-img ${v.qemu.join(" ")})`;
    await t.test(`convert -O raw ${name}`, () =>
      assertConvertMatches(image, { ...opts, extraArgs: v.qemu, qcowkitExtraArgs: v.qcowkit }),
    );
  }
  await t.test("image file unchanged by reading it", async () => {
    assert.equal(await sha256(file), before, `${image} was modified by info/map/convert`);
  });
}

/** SHA-256 of a file's contents, streamed. */
export async function sha256(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** A header extension as found in an image file: its type, and where its data starts and ends. */
export interface HeaderExtension {
  type: number;
  /** File offset of the extension's 8-byte (type, length) header. */
  offset: number;
  dataOffset: number;
  length: number;
}

/** Header extension types of the qcow2 spec (docs/interop/qcow2.rst). */
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAME_TABLE = 0x6803f857;

/** Walks the header extensions of a qcow2 file (for fixtures that patch headers). */
export async function readHeaderExtensions(file: string): Promise<HeaderExtension[]> {
  const fh = await fs.open(file, "r");
  try {
    const head = Buffer.alloc(104);
    await fh.read(head, 0, head.length, 0);
    const version = head.readUInt32BE(4);
    const clusterSize = 2 ** head.readUInt32BE(20);
    const headerLength = version >= 3 ? head.readUInt32BE(100) : 72;
    const area = Buffer.alloc(clusterSize - headerLength);
    await fh.read(area, 0, area.length, headerLength);
    const out: HeaderExtension[] = [];
    for (let pos = 0; pos + 8 <= area.length; ) {
      const type = area.readUInt32BE(pos);
      if (type === 0) break;
      const length = area.readUInt32BE(pos + 4);
      out.push({ type, offset: headerLength + pos, dataOffset: headerLength + pos + 8, length });
      pos += 8 + Math.ceil(length / 8) * 8;
    }
    return out;
  } finally {
    await fh.close();
  }
}

/** Overwrites bytes of a file in place. */
export async function patchFile(file: string, offset: number, bytes: Uint8Array): Promise<void> {
  const fh = await fs.open(file, "r+");
  try {
    await fh.write(bytes, 0, bytes.length, offset);
  } finally {
    await fh.close();
  }
}

export const sizes = { KiB, MiB, GiB: 1024 * MiB, TiB: 1024 * 1024 * MiB };
