// The benchmark cases: one table entry each. To add a case, append an entry to `compareCases` (or
// `referenceCases` for a command that only sets the scale). The harness (run.ts) does the rest:
// generates the inputs named in `inputs`, runs one warm-up of each tool, then alternates the tools,
// calling prepare() before and cleanup() after every run, neither of them timed.

import { spawnSync } from "node:child_process";
import { rmSync, statSync } from "node:fs";
import type { DataSet, InputName } from "./data.js";
import type { Command } from "./measure.js";

export type Tool = "qcowkit" | "qemu";

/** What one run of one tool may use. Paths differ per tool, so the two outputs can be compared. */
export interface RunCtx {
  tool: Tool;
  /** Output file for this run; deleted by the default cleanup. */
  out: string;
  /** Scratch image for this run (e.g. a fresh image a server writes to); deleted by the default cleanup. */
  scratch: string;
  /** Unix socket path for a server. */
  socket: string;
}

/** A plain command is timed as a whole; a server case times the client and measures the server's memory. */
export type Invocation = { cmd: Command } | { server: Command; socket: string; client: Command };

export interface VerifyResult {
  ok: boolean;
  detail?: string;
}

export interface CompareCase {
  name: string;
  inputs: InputName[];
  /** Untimed, before each run of either tool (warm-up included). */
  prepare?(c: RunCtx): void;
  qcowkit(c: RunCtx): Invocation;
  qemu(c: RunCtx): Invocation;
  /** Untimed, after each run. The default deletes c.out and c.scratch. */
  cleanup?(c: RunCtx): void;
  /** Checks qcowkit's warm-up output against qemu-img's (or the input); runs once per case. */
  verify?(qcowkit: RunCtx, qemu: RunCtx): VerifyResult;
  /** Runs of this case are `--runs` times this; by default 4 for cases under 250 ms, else 1. */
  runsFactor?: number;
  /** Used instead of qemu(c) for the qcowkit side under --self-test. */
  selfTest?(c: RunCtx): Invocation;
}

export interface ReferenceCase {
  name: string;
  inputs: InputName[];
  cmd(c: RunCtx): Command;
  cleanup?(c: RunCtx): void;
}

export interface CaseEnv {
  data: DataSet;
  /** argv for the qcowkit CLI with these arguments. */
  qcowkit(...args: string[]): Command;
}

const qemuImg = (...args: string[]): Command => ["qemu-img", ...args];

// --- verification helpers (qemu-img is the referee) ---

function qemuImgStatus(args: string[]): { status: number | null; message: string } {
  const r = spawnSync("qemu-img", args, { encoding: "utf8" });
  return { status: r.status, message: (r.stderr || r.stdout || "").trim().split("\n")[0] ?? "" };
}

/** Same guest-visible content, by `qemu-img compare` (which uses block status, so 4 TiB holes are cheap). */
function sameContent(a: string, fmtA: string, b: string, fmtB: string): VerifyResult {
  const r = qemuImgStatus(["compare", "-q", "-f", fmtA, "-F", fmtB, a, b]);
  if (r.status === 0) return { ok: true };
  if (r.status === 1) return { ok: false, detail: "content differs from qemu-img's (qemu-img compare)" };
  return { ok: false, detail: `qemu-img compare failed: ${r.message}` };
}

function cleanImage(img: string): VerifyResult {
  const r = qemuImgStatus(["check", "-q", "-f", "qcow2", img]);
  if (r.status === 0) return { ok: true };
  return { ok: false, detail: `qemu-img check exit ${r.status}: ${r.message}` };
}

function allocated(file: string): number {
  return statSync(file).blocks * 512;
}

function sizeNote(what: string, qk: string, qemu: string): string | undefined {
  const a = allocated(qk);
  const b = allocated(qemu);
  if (a <= b * 1.1 + 1024 * 1024) return undefined;
  const mib = (n: number) => `${(n / 1048576).toFixed(0)} MiB`;
  return `${what} uses ${mib(a)} on disk vs qemu-img's ${mib(b)}`;
}

function all(...results: VerifyResult[]): VerifyResult {
  const bad = results.find((r) => !r.ok);
  if (bad) return bad;
  const details = results.map((r) => r.detail).filter((d) => d !== undefined);
  return details.length > 0 ? { ok: true, detail: details.join("; ") } : { ok: true };
}

/** Output raw image: same bytes as qemu-img's, and about as sparse. */
function verifyRawOutput(qk: RunCtx, qemu: RunCtx): VerifyResult {
  const same = sameContent(qk.out, "raw", qemu.out, "raw");
  if (!same.ok) return same;
  const note = sizeNote("output", qk.out, qemu.out);
  return note ? { ok: true, detail: note } : { ok: true };
}

/** Output qcow2 image: clean by qemu-img check, same content as the raw input, about qemu-img's size. */
function verifyQcow2Output(input: string) {
  return (qk: RunCtx, qemu: RunCtx): VerifyResult => {
    const r = all(cleanImage(qk.out), sameContent(qk.out, "qcow2", input, "raw"));
    if (!r.ok) return r;
    const note = sizeNote("output", qk.out, qemu.out);
    return note ? { ok: true, detail: note } : r;
  };
}

export function defaultCleanup(c: RunCtx): void {
  rmSync(c.out, { force: true });
  rmSync(c.scratch, { force: true });
}

// --- the cases ---

export function compareCases(env: CaseEnv): CompareCase[] {
  const { data, qcowkit } = env;
  const p = (n: InputName) => data.path(n);
  const nbdUri = (c: RunCtx) => `nbd+unix:///?socket=${c.socket}`;
  const fio = (c: RunCtx, rw: string, size: string, ioSize: string, extra: string[] = []): Command => [
    "fio",
    `--name=${rw}`,
    "--ioengine=nbd",
    `--uri=${nbdUri(c)}`,
    `--rw=${rw}`,
    "--bs=4k",
    "--iodepth=32",
    `--size=${size}`,
    `--io_size=${ioSize}`,
    "--randrepeat=1",
    "--norandommap",
    ...extra,
  ];
  // Servers are started persistent (-t) and read-only (-r) where they only serve reads. `qcowkit serve`
  // is assumed to take qemu-nbd's option spellings; adjust here when its CLI settles.
  const qemuNbd = (c: RunCtx, img: string, readOnly: boolean): Command => [
    "qemu-nbd",
    "-t",
    ...(readOnly ? ["-r"] : []),
    "-f",
    "qcow2",
    "-k",
    c.socket,
    img,
  ];
  const qcowkitServe = (c: RunCtx, img: string, readOnly: boolean): Command =>
    qcowkit("serve", "-t", ...(readOnly ? ["-r"] : []), "-f", "qcow2", "-k", c.socket, img);
  const freshImage = (c: RunCtx) => {
    rmSync(c.scratch, { force: true });
    const r = spawnSync("qemu-img", ["create", "-q", "-f", "qcow2", c.scratch, "2G"], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(`qemu-img create ${c.scratch}: ${r.stderr}`);
  };

  const convertToRaw = (name: string, input: InputName): CompareCase => ({
    name,
    inputs: [input],
    qcowkit: (c) => ({ cmd: qcowkit("convert", "-O", "raw", p(input), c.out) }),
    qemu: (c) => ({ cmd: qemuImg("convert", "-O", "raw", p(input), c.out) }),
    verify: verifyRawOutput,
  });
  const convertToQcow2 = (name: string, input: InputName, opts: string[]): CompareCase => ({
    name,
    inputs: [input],
    qcowkit: (c) => ({ cmd: qcowkit("convert", ...opts, "-f", "raw", "-O", "qcow2", p(input), c.out) }),
    qemu: (c) => ({ cmd: qemuImg("convert", ...opts, "-f", "raw", "-O", "qcow2", p(input), c.out) }),
    verify: verifyQcow2Output(p(input)),
  });

  return [
    convertToRaw("convert qcow2 -> raw (2 GiB, 0.9 GiB data)", "qcow2"),
    convertToRaw("convert zstd qcow2 -> raw", "zstd"),
    convertToRaw("convert zlib qcow2 -> raw", "zlib"),
    convertToRaw("convert 4 TiB sparse qcow2 -> raw", "big"),
    {
      name: "info small qcow2 (start-up)",
      inputs: ["small"],
      qcowkit: () => ({ cmd: qcowkit("info", p("small")) }),
      qemu: () => ({ cmd: qemuImg("info", p("small")) }),
    },
    {
      name: "check qcow2 (2 GiB)",
      inputs: ["qcow2"],
      qcowkit: () => ({ cmd: qcowkit("check", p("qcow2")) }),
      qemu: () => ({ cmd: qemuImg("check", p("qcow2")) }),
    },
    {
      // Many clusters: the same disk with 4 KiB clusters, ~265k data clusters in ~500 L2 tables.
      name: "check qcow2, 4 KiB clusters (265k clusters)",
      inputs: ["qcow2-4k"],
      qcowkit: () => ({ cmd: qcowkit("check", p("qcow2-4k")) }),
      qemu: () => ({ cmd: qemuImg("check", p("qcow2-4k")) }),
    },
    {
      name: "check 4 TiB sparse qcow2",
      inputs: ["big"],
      qcowkit: () => ({ cmd: qcowkit("check", p("big")) }),
      qemu: () => ({ cmd: qemuImg("check", p("big")) }),
    },
    convertToQcow2("convert raw -> qcow2", "raw", []),
    // Compression runs at tens of MB/s: a 256 MiB slice of the disk keeps these cases to a minute or two.
    convertToQcow2("convert -c zlib raw -> qcow2 (256 MiB slice)", "head", ["-c", "-o", "compression_type=zlib"]),
    convertToQcow2("convert -c zstd raw -> qcow2 (256 MiB slice)", "head", ["-c", "-o", "compression_type=zstd"]),
    {
      name: "nbd: nbdcopy qcow2 -> null: (vs qemu-nbd)",
      inputs: ["qcow2"],
      qcowkit: (c) => ({
        socket: c.socket,
        server: qcowkitServe(c, p("qcow2"), true),
        client: ["nbdcopy", nbdUri(c), "null:"],
      }),
      qemu: (c) => ({
        socket: c.socket,
        server: qemuNbd(c, p("qcow2"), true),
        client: ["nbdcopy", nbdUri(c), "null:"],
      }),
    },
    {
      name: "nbd: fio 4k randread qd32, 256 MiB (vs qemu-nbd)",
      inputs: ["qcow2"],
      qcowkit: (c) => ({
        socket: c.socket,
        server: qcowkitServe(c, p("qcow2"), true),
        client: fio(c, "randread", "2G", "256M"),
      }),
      qemu: (c) => ({
        socket: c.socket,
        server: qemuNbd(c, p("qcow2"), true),
        client: fio(c, "randread", "2G", "256M"),
      }),
    },
    {
      name: "nbd: fio 4k randwrite qd32, 128 MiB over 256 MiB of a new image, fsync",
      inputs: [],
      prepare: freshImage,
      qcowkit: (c) => ({
        socket: c.socket,
        server: qcowkitServe(c, c.scratch, false),
        client: fio(c, "randwrite", "256M", "128M", ["--end_fsync=1"]),
      }),
      qemu: (c) => ({
        socket: c.socket,
        server: qemuNbd(c, c.scratch, false),
        client: fio(c, "randwrite", "256M", "128M", ["--end_fsync=1"]),
      }),
      verify: (qk) => cleanImage(qk.scratch),
    },
  ];
}

export function referenceCases(env: CaseEnv): ReferenceCase[] {
  return [
    {
      name: "cp --sparse=always of the 2 GiB raw disk",
      inputs: ["raw"],
      cmd: (c) => ["cp", "--sparse=always", env.data.path("raw"), c.out],
    },
  ];
}

/** A case whose qcowkit side always fails, to show that the harness reports it and goes on. */
export function selfTestCases(env: CaseEnv): CompareCase[] {
  const missing = `${env.data.dir}/does-not-exist.qcow2`;
  return [
    {
      name: "self-test: failing qcowkit side",
      inputs: ["small"],
      qcowkit: () => ({ cmd: qemuImg("info", missing) }),
      qemu: () => ({ cmd: qemuImg("info", env.data.path("small")) }),
      selfTest: () => ({ cmd: qemuImg("info", missing) }),
    },
  ];
}
