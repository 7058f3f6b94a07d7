/**
 * Helpers for serve.test.ts: NBD servers (qcowkit serve and qemu-nbd) as child processes on Unix
 * sockets, the Python libnbd client script, `qemu-img check` verdicts, and a raw NBD client over
 * node:net for the malformed-input tests.
 */

import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import * as net from "node:net";
import * as path from "node:path";
import { QCOWKIT_MAIN, qemuImg, REPO_ROOT, type RunOptions, type RunResult, requireTool, run } from "./util.js";

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Server {
  kind: "qcowkit" | "qemu-nbd";
  proc: ChildProcess;
  sock: string;
  /** Resolves when the process has exited. */
  exited: Promise<Exit>;
  /** The exit, once there is one. */
  exit: Exit | undefined;
  stderr(): string;
  /** nbd+unix:///NAME?socket=SOCK */
  uri(name?: string): string;
  /** Sends `signal` and waits (up to `timeoutMs`) for the exit; SIGKILL after that. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<Exit>;
}

const live = new Set<Server>();

export function nbdUri(sock: string, name = ""): string {
  return `nbd+unix:///${encodeURIComponent(name)}?socket=${sock}`;
}

/**
 * Starts `qcowkit serve -k SOCK ARGS` or `qemu-nbd -k SOCK ARGS` and waits until the socket
 * exists (a server that exits first fails the test with its stderr).
 */
export async function startServer(
  kind: "qcowkit" | "qemu-nbd",
  sock: string,
  args: readonly string[],
  opts: { cwd?: string } = {},
): Promise<Server> {
  assert.ok(!existsSync(sock), `socket ${sock} already exists: each server needs its own`);
  const [cmd, argv] =
    kind === "qcowkit"
      ? [process.execPath, [QCOWKIT_MAIN, "serve", "-k", sock, ...args]]
      : [requireTool("qemu-nbd"), ["-k", sock, ...args]];
  if (kind === "qcowkit" && !existsSync(QCOWKIT_MAIN)) throw new Error(`qcowkit CLI not built: ${QCOWKIT_MAIN}`);
  const proc = spawn(cmd, argv, { cwd: opts.cwd, stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr?.on("data", (b: Buffer) => {
    err += b.toString("utf8");
  });
  const server: Server = {
    kind,
    proc,
    sock,
    exit: undefined,
    exited: new Promise<Exit>((resolve) => {
      proc.on("exit", (code, signal) => {
        server.exit = { code, signal };
        live.delete(server);
        resolve(server.exit);
      });
    }),
    stderr: () => err,
    uri: (name = "") => nbdUri(sock, name),
    async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 10_000): Promise<Exit> {
      if (server.exit === undefined) proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
      try {
        return await server.exited;
      } finally {
        clearTimeout(timer);
      }
    },
  };
  live.add(server);
  proc.on("error", (e) => {
    err += `spawn error: ${e.message}`;
  });
  const deadline = Date.now() + 15_000;
  // The socket file appears at bind(), a moment before listen(): wait until it listens.
  while (!(await listening(sock))) {
    if (server.exit !== undefined) {
      throw new Error(`${kind} ${argv.join(" ")} exited (${server.exit.code ?? server.exit.signal}): ${err}`);
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`${kind} ${argv.join(" ")}: socket never appeared; stderr: ${err}`);
    }
    await sleep(20);
  }
  return server;
}

/**
 * Whether a Unix socket at `sock` is listening: /proc/net/unix lists it with __SO_ACCEPTCON
 * (flag 0x10000). Where /proc/net/unix is not readable: the file exists, plus 100 ms.
 */
async function listening(sock: string): Promise<boolean> {
  if (!existsSync(sock)) return false;
  let table: string;
  try {
    table = await readFile("/proc/net/unix", "utf8");
  } catch {
    await sleep(100);
    return true;
  }
  for (const line of table.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length >= 8 && f[7] === sock && (Number.parseInt(f[3], 16) & 0x10000) !== 0) return true;
  }
  return false;
}

/** SIGKILLs every server still running (for `after`). */
export async function killServers(): Promise<void> {
  const all = [...live];
  for (const s of all) s.proc.kill("SIGKILL");
  await Promise.all(all.map((s) => s.exited));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Resolves with the exit, or undefined when the process is still running after `ms`. */
export function exitWithin(server: Server, ms: number): Promise<Exit | undefined> {
  return Promise.race([server.exited, sleep(ms).then(() => undefined)]);
}

// ---------------------------------------------------------------------------------------------
// The Python libnbd client
// ---------------------------------------------------------------------------------------------

export const PROTOCOL_SCRIPT = path.join(REPO_ROOT, "test/interop/serve-protocol.py");

let python: string | undefined;

/**
 * A Python interpreter that can `import nbd`. The python3 first on PATH may be another
 * installation (pyenv) without the Debian binding, so the system one is tried first;
 * QCOWKIT_PYTHON overrides.
 */
export function pythonWithNbd(): string {
  if (python !== undefined) return python;
  const candidates = [process.env.QCOWKIT_PYTHON, "/usr/bin/python3", "python3"].filter(
    (c): c is string => c !== undefined && c !== "",
  );
  for (const c of candidates) {
    const r = spawnSync(c, ["-c", "import nbd"], { stdio: "ignore" });
    if (r.status === 0) {
      python = c;
      return c;
    }
  }
  throw new Error(
    `python3 with libnbd's binding not found (tried ${candidates.join(", ")}): ` +
      "install it with `apt-get install -y python3-libnbd`",
  );
}

/** Runs serve-protocol.py with `args`. */
export function runProtocolScript(args: readonly string[], opts?: RunOptions): Promise<RunResult> {
  return run(pythonWithNbd(), [PROTOCOL_SCRIPT, ...args], opts);
}

/** Runs serve-protocol.py and fails the test unless it exits 0; returns its stdout. */
export async function protocolScriptOk(args: readonly string[], opts?: RunOptions): Promise<string> {
  const r = await runProtocolScript(args, opts);
  if (r.code !== 0) {
    assert.fail(`serve-protocol.py ${args.join(" ")}: exit ${r.code ?? r.signal}\n${r.stderr.trimEnd()}`);
  }
  return r.stdout;
}

// ---------------------------------------------------------------------------------------------
// Image checks
// ---------------------------------------------------------------------------------------------

interface CheckReport {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
}

/** `qemu-img check`: no errors, no corruptions, and no leaks unless `allowLeaks`. */
export async function assertCheckClean(file: string, what: string, allowLeaks = false): Promise<void> {
  const r = await qemuImg(["check", "--output=json", file], { cwd: path.dirname(file) });
  let report: CheckReport;
  try {
    report = JSON.parse(r.stdout) as CheckReport;
  } catch {
    assert.fail(`${what}: qemu-img check gave no JSON (exit ${r.code}): ${r.stdout}${r.stderr}`);
  }
  const errors = (report["check-errors"] ?? 0) + (report.corruptions ?? 0);
  const leaks = report.leaks ?? 0;
  if (errors > 0 || (!allowLeaks && leaks > 0)) {
    const human = await qemuImg(["check", file]);
    assert.fail(`${what}: qemu-img check is not clean (exit ${r.code}):\n${human.stdout}${human.stderr}`);
  }
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client (node:net) for malformed input
// ---------------------------------------------------------------------------------------------

export const NBD = {
  NBDMAGIC: 0x4e42444d41474943n,
  IHAVEOPT: 0x49484156454f5054n,
  REPLY_MAGIC: 0x3e889045565a9n,
  REQUEST_MAGIC: 0x25609513,
  SIMPLE_REPLY_MAGIC: 0x67446698,
  OPT_EXPORT_NAME: 1,
  OPT_ABORT: 2,
  OPT_LIST: 3,
  OPT_GO: 7,
  REP_ACK: 1,
  REP_SERVER: 2,
  REP_INFO: 3,
  REP_ERR_UNSUP: 0x80000001,
  CMD_READ: 0,
  CMD_WRITE: 1,
  CMD_DISC: 2,
  CMD_FLUSH: 3,
};

/** Reads exact byte counts from a Unix socket; knows when the server closed it. */
export class RawClient {
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;
  private readonly closedP: Promise<void>;

  private constructor(private readonly socket: net.Socket) {
    socket.on("data", (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.waiter?.();
    });
    this.closedP = new Promise((resolve) => {
      const done = (): void => {
        this.closed = true;
        this.waiter?.();
        resolve();
      };
      socket.on("close", done);
      socket.on("end", done);
    });
    socket.on("error", () => {});
  }

  static connect(sock: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(sock, () => {
        s.off("error", reject);
        resolve(new RawClient(s));
      });
      s.once("error", reject);
    });
  }

  /** Bytes received and not yet taken. */
  get pending(): number {
    return this.buf.length;
  }

  /** Exactly `n` bytes; rejects when the connection closes first or after `timeoutMs`. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed after ${this.buf.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  write(b: Uint8Array): void {
    this.socket.write(b);
  }

  /** True when the server closed the connection within `timeoutMs`. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    await Promise.race([this.closedP, sleep(timeoutMs)]);
    return this.closed;
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Reads the server's 18-byte greeting and checks its magic. */
  async greeting(timeoutMs = 5000): Promise<number> {
    const g = await this.read(18, timeoutMs);
    assert.equal(g.readBigUInt64BE(0), NBD.NBDMAGIC, "greeting: NBDMAGIC");
    assert.equal(g.readBigUInt64BE(8), NBD.IHAVEOPT, "greeting: IHAVEOPT");
    return g.readUInt16BE(16);
  }

  sendClientFlags(flags: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags, 0);
    this.write(b);
  }

  sendOption(option: number, data: Uint8Array = Buffer.alloc(0), magic = NBD.IHAVEOPT): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), NBD.REPLY_MAGIC, "option reply magic");
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Fixed newstyle with NO_ZEROES, then NBD_OPT_GO for `name`; returns the export size. */
  async go(name = ""): Promise<bigint> {
    await this.greeting();
    this.sendClientFlags(3);
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    this.sendOption(NBD.OPT_GO, d);
    let size = -1n;
    for (;;) {
      const r = await this.optionReply();
      assert.equal(r.option, NBD.OPT_GO, "reply to GO");
      if (r.type === NBD.REP_ACK) break;
      assert.equal(r.type, NBD.REP_INFO, `GO reply type 0x${r.type.toString(16)}: ${r.data.toString()}`);
      if (r.data.readUInt16BE(0) === 0) size = r.data.readBigUInt64BE(2);
    }
    return size;
  }

  request(type: number, offset: number, length: number, handle = 1n, flags = 0, magic = NBD.REQUEST_MAGIC): Buffer {
    const b = Buffer.alloc(28);
    b.writeUInt32BE(magic, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeBigUInt64BE(handle, 8);
    b.writeBigUInt64BE(BigInt(offset), 16);
    b.writeUInt32BE(length, 24);
    return b;
  }

  /** READ with simple replies (no structured replies negotiated); returns the data. */
  async readAt(offset: number, length: number, handle = 7n): Promise<Buffer> {
    this.write(this.request(NBD.CMD_READ, offset, length, handle));
    const h = await this.read(16);
    assert.equal(h.readUInt32BE(0), NBD.SIMPLE_REPLY_MAGIC, "simple reply magic");
    assert.equal(h.readUInt32BE(4), 0, "read error");
    assert.equal(h.readBigUInt64BE(8), handle, "reply handle");
    return this.read(length);
  }

  disconnect(): void {
    this.write(this.request(NBD.CMD_DISC, 0, 0));
    this.socket.end();
  }
}
