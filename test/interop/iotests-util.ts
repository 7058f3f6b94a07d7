/**
 * Helpers for the qemu-iotests reproductions (iotests-NNN.test.ts): damaged images built as the
 * iotests build them (qemu-img create, then byte pokes as their poke_file does), and the checks
 * that qcowkit says what QEMU says.
 *
 * Every case also runs the QEMU tool on its own copy, so that the expectation taken from the
 * iotest's .out file is proven against the installed QEMU, not only copied.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { CLI_PREFIX, qcowkit, qemuImg, qemuImgOk, type RunResult } from "./util.js";

/** Writes `hex` (bytes as hex digits) at `offset`, as the iotests' poke_file. */
export async function poke(file: string, offset: number, hex: string): Promise<void> {
  const fh = await fs.open(file, "r+");
  try {
    const b = Buffer.from(hex, "hex");
    await fh.write(b, 0, b.length, offset);
  } finally {
    await fh.close();
  }
}

/** Reads a big-endian integer of `bytes` bytes, as the iotests' peek_file_be. */
export async function peek(file: string, offset: number, bytes: number): Promise<number> {
  const fh = await fs.open(file, "r");
  try {
    const b = Buffer.alloc(bytes);
    await fh.read(b, 0, bytes, offset);
    return Number(BigInt(`0x${b.toString("hex")}`));
  } finally {
    await fh.close();
  }
}

/** `qemu-img create -f qcow2 [-o OPTS] FILE SIZE` (the iotests' _make_test_img). */
export async function makeImage(file: string, size = "64M", opts?: string): Promise<void> {
  await qemuImgOk(["create", "-q", "-f", "qcow2", ...(opts ? ["-o", opts] : []), file, size]);
}

export function show(r: RunResult): string {
  return `exit ${r.code}${r.signal ? ` (signal ${r.signal})` : ""}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
}

/** The error lines of a run, without the program's prefix. */
function errorLines(stderr: string, prefix: string): string[] {
  return stderr
    .split("\n")
    .filter((l) => l.startsWith(prefix))
    .map((l) => l.slice(prefix.length));
}

/**
 * qcowkit printed `expected` (QEMU's words) as an error line of its own: the line starts with
 * them, and anything after them is detail (not the rest of a longer word).
 */
export function assertSaid(k: RunResult, expected: string, what: string): void {
  assert.ok(!/^ {4}at /m.test(k.stderr), `${what}: stack trace\n${k.stderr}`);
  const ok = errorLines(k.stderr, CLI_PREFIX).some(
    (l) => l.startsWith(expected) && !/^[A-Za-z0-9]/.test(l.slice(expected.length)),
  );
  assert.ok(ok, `${what}: qcowkit should say "${expected}"\n${show(k)}`);
}

/**
 * Runs `args` with qemu-img on `qfile` and with qcowkit on `kfile` (copies of one image, or the
 * same file for commands that only read). qemu-img must print `expected` (the .out file's line)
 * and exit `code`; qcowkit must exit the same and print it too, in its own name.
 */
export async function assertSameRefusal(
  args: (file: string) => string[],
  files: { q: string; k: string; cwd?: string },
  expected: string,
  code = 1,
): Promise<{ q: RunResult; k: RunResult }> {
  const q = await qemuImg(args(files.q), { cwd: files.cwd });
  const k = await qcowkit(args(files.k), { cwd: files.cwd });
  const what = `qcowkit ${args(files.k).join(" ")}`;
  assert.equal(q.code, code, `fixture: qemu-img ${args(files.q).join(" ")}\n${show(q)}`);
  assert.ok(
    errorLines(q.stderr, "qemu-img: ").some((l) => l === expected || l.startsWith(`${expected}`)),
    `fixture: qemu-img should say "${expected}"\n${show(q)}`,
  );
  assert.equal(k.code, q.code, `${what}: exit code differs from qemu-img's\n${show(k)}`);
  assertSaid(k, expected, what);
  return { q, k };
}

/** Copies `src` to `dir`/q/img.qcow2 and `dir`/k/img.qcow2 (same relative names in outputs). */
export async function pairOf(src: string, dir: string): Promise<{ q: string; k: string }> {
  const q = path.join(dir, "q");
  const k = path.join(dir, "k");
  for (const d of [q, k]) {
    await fs.rm(d, { recursive: true, force: true });
    await fs.mkdir(d, { recursive: true });
    await fs.copyFile(src, path.join(d, "img.qcow2"));
  }
  return { q, k };
}

/**
 * `check ARGS img.qcow2` by both tools on their own copies of `src`: the same findings on
 * stderr, summary on stdout and exit code; returns the runs and the copies' directories.
 */
export async function assertSameCheck(
  src: string,
  dir: string,
  args: readonly string[],
  opts: { code?: number } = {},
): Promise<{ q: RunResult; k: RunResult; qdir: string; kdir: string }> {
  const p = await pairOf(src, dir);
  const full = ["check", ...args, "img.qcow2"];
  const [q, k] = await Promise.all([qemuImg(full, { cwd: p.q }), qcowkit(full, { cwd: p.k })]);
  const ctx = `check ${args.join(" ")}\n=== qemu-img: ${show(q)}=== qcowkit: ${show(k)}`;
  if (opts.code !== undefined) assert.equal(q.code, opts.code, `fixture: ${ctx}`);
  assert.ok(!/^ {4}at /m.test(k.stderr), `stack trace: ${ctx}`);
  assert.equal(k.stdout, q.stdout, `stdout differs: ${ctx}`);
  assert.equal(k.stderr.replaceAll(/^qcowkit: /gm, "qemu-img: "), q.stderr, `stderr differs: ${ctx}`);
  assert.equal(k.code, q.code, `exit code differs: ${ctx}`);
  return { q, k, qdir: p.q, kdir: p.k };
}

/** `qemu-img check` of an image: its exit code (0 clean, 2 corruptions, 3 leaks only). */
export async function qemuCheckCode(file: string): Promise<number | null> {
  return (await qemuImg(["check", file])).code;
}

/** Whether QEMU sees the image's corrupt bit. */
export async function corruptBit(file: string): Promise<boolean> {
  const info = JSON.parse((await qemuImgOk(["info", "-U", "--output=json", file])).stdout);
  return info["format-specific"].data.corrupt === true;
}
