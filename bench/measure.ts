// Running one command and measuring it: wall time (from just before spawn to the child's exit, in this
// process), peak resident memory and CPU time of the child.
//
// Peak memory comes from the kernel's accounting at wait4() time (ru_maxrss), which covers every thread
// of the child and the children it waited for, and cannot miss a short spike the way polling can. We get
// it through GNU time (`/usr/bin/time -f ...`), or, where that is missing, a five-line python3 wrapper
// that forks, execs and calls os.wait4(). A server (NBD) is the exception: it is killed rather than
// waited for, so its peak comes from VmHWM in /proc/PID/status, read every 50 ms and once more just
// before the SIGTERM; VmHWM is the kernel's own high-water mark, so the last reading is exact.

import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { connect } from "node:net";

export type Command = readonly string[];

export type RssMethod = "gnu-time" | "python3-wait4" | "none";

export interface Sample {
  ok: boolean;
  /** Wall time of the timed command (for a server case: of the client), milliseconds. */
  wallMs: number;
  /** Peak resident set of the tool under test, KiB; null when it could not be measured. */
  maxRssKiB: number | null;
  /** CPU time of the tool under test, milliseconds; null when unknown. */
  userMs: number | null;
  sysMs: number | null;
  /** Why it failed: "<command>: <first meaningful stderr line>". */
  error?: string;
}

const STDERR_LIMIT = 64 * 1024;
const WRAPPER_PY = [
  "import os, sys",
  "out, argv = sys.argv[1], sys.argv[2:]",
  "pid = os.fork()",
  "if pid == 0:",
  "    try: os.execvp(argv[0], argv)",
  "    except OSError as e: sys.stderr.write(f'{argv[0]}: {e.strerror}\\n'); os._exit(127)",
  "_, status, ru = os.wait4(pid, 0)",
  "open(out, 'w').write(f'{ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime}\\n')",
  "sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))",
].join("\n");

export function detectRssMethod(): RssMethod {
  const probe = (argv: string[]): boolean => {
    const r = spawnSync(argv[0] as string, argv.slice(1), { encoding: "utf8", timeout: 10_000 });
    return r.status === 0;
  };
  if (existsSync("/usr/bin/time") && probe(["/usr/bin/time", "-f", "%M %U %S", "-o", "/dev/null", "true"])) {
    return "gnu-time";
  }
  if (probe(["python3", "-c", "import os; os.wait4"])) return "python3-wait4";
  return "none";
}

export function describeRssMethod(m: RssMethod): string {
  switch (m) {
    case "gnu-time":
      return "GNU time (/usr/bin/time -f '%M %U %S'): ru_maxrss from wait4(); servers: VmHWM from /proc";
    case "python3-wait4":
      return "python3 os.wait4() wrapper: ru_maxrss; servers: VmHWM from /proc";
    case "none":
      return "not measured (neither /usr/bin/time nor python3 found); servers: VmHWM from /proc";
  }
}

/** The line of a failed command's stderr that says what went wrong. */
export function firstErrorLine(stderr: string): string {
  const lines = stderr
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "");
  if (lines.length === 0) return "(no message on stderr)";
  // A Node.js crash starts with the location of the throw and a code excerpt; the message comes later.
  const first = lines[0] as string;
  if (/^(file:|node:)|:\d+$/.test(first)) {
    const msg = lines.find((l) => /^(\w*Error\b|qcowkit:)/.test(l));
    if (msg !== undefined) return msg;
  }
  return first;
}

// Children run in process groups of their own; if the bench itself is interrupted, end them too.
const running = new Set<ChildProcess>();

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    // already gone
  }
}

function track(child: ChildProcess): void {
  running.add(child);
  child.on("close", () => running.delete(child));
  child.on("error", () => running.delete(child));
}

const interruptHooks: (() => void)[] = [];

/** Run `fn` (e.g. remove scratch files) if the bench is interrupted, after its children are ended. */
export function atInterrupt(fn: () => void): void {
  interruptHooks.push(fn);
}

for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    for (const child of running) killGroup(child, "SIGKILL");
    for (const fn of interruptHooks) {
      try {
        fn();
      } catch {
        // best effort
      }
    }
    process.stderr.write(`bench: interrupted by ${signal}\n`);
    process.exit(130);
  });
}

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  wallMs: number;
  stderr: string;
  timedOut: boolean;
}

function spawnAndWait(argv: Command, cwd: string, timeoutMs: number): Promise<Exit> {
  return new Promise((resolve) => {
    const start = process.hrtime.bigint();
    let end = start;
    let stderr = "";
    let timedOut = false;
    let exited: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    let closed = false;
    // Its own process group, so that a timeout also ends what runs under the time wrapper.
    const child = spawn(argv[0] as string, argv.slice(1), { cwd, stdio: ["ignore", "pipe", "pipe"], detached: true });
    track(child);
    const finish = () => {
      if (exited === null || !closed) return;
      clearTimeout(timer);
      resolve({ ...exited, wallMs: Number(end - start) / 1e6, stderr, timedOut });
    };
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(child, "SIGKILL");
    }, timeoutMs);
    child.stdout.resume(); // output is not examined; drain it so the child never blocks on a full pipe
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (s: string) => {
      if (stderr.length < STDERR_LIMIT) stderr += s;
    });
    child.on("error", (e) => {
      stderr += `${argv[0]}: ${e.message}\n`;
      exited ??= { code: 127, signal: null };
      closed = true;
      finish();
    });
    child.on("exit", (code, signal) => {
      end = process.hrtime.bigint();
      exited = { code, signal };
      finish();
    });
    child.on("close", () => {
      closed = true;
      finish();
    });
  });
}

function failure(argv: Command, e: Exit): string {
  const name = (argv[0] as string).split("/").pop();
  if (e.timedOut) return `${name}: timed out`;
  if (e.signal !== null) return `${name}: killed by ${e.signal}: ${firstErrorLine(e.stderr)}`;
  return firstErrorLine(e.stderr);
}

/** Run one command to completion, measuring time, peak RSS and CPU. */
export async function runCommand(
  argv: Command,
  opts: { cwd: string; rss: RssMethod; statsFile: string; timeoutMs: number },
): Promise<Sample> {
  let wrapped: Command = argv;
  if (opts.rss === "gnu-time") {
    wrapped = ["/usr/bin/time", "-o", opts.statsFile, "-f", "%M %U %S", ...argv];
  } else if (opts.rss === "python3-wait4") {
    wrapped = ["python3", "-c", WRAPPER_PY, opts.statsFile, ...argv];
  }
  rmSync(opts.statsFile, { force: true });
  const e = await spawnAndWait(wrapped, opts.cwd, opts.timeoutMs);
  let maxRssKiB: number | null = null;
  let userMs: number | null = null;
  let sysMs: number | null = null;
  if (opts.rss !== "none" && existsSync(opts.statsFile)) {
    // GNU time puts "Command exited with non-zero status N" before the numbers: take the last line.
    const last = readFileSync(opts.statsFile, "utf8").trim().split("\n").pop() ?? "";
    const m = /^(\d+) ([\d.]+) ([\d.]+)$/.exec(last);
    if (m) {
      maxRssKiB = Number(m[1]);
      userMs = Number(m[2]) * 1000;
      sysMs = Number(m[3]) * 1000;
    }
  }
  const ok = e.code === 0 && !e.timedOut;
  const sample: Sample = { ok, wallMs: e.wallMs, maxRssKiB, userMs, sysMs };
  if (!ok) sample.error = failure(argv, e);
  return sample;
}

const CLK_TCK = 100; // USER_HZ: the unit of /proc/PID/stat times on every Linux architecture Node runs on

interface ProcReading {
  hwmKiB: number;
  userMs: number;
  sysMs: number;
}

function readProc(pid: number): ProcReading | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const hwm = /^VmHWM:\s+(\d+) kB/m.exec(status);
    if (!hwm) return null; // a zombie has no memory lines
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 of the line.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return {
      hwmKiB: Number(hwm[1]),
      userMs: (Number(rest[11]) * 1000) / CLK_TCK,
      sysMs: (Number(rest[12]) * 1000) / CLK_TCK,
    };
  } catch {
    return null;
  }
}

function canConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(socket);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function stopServer(child: ChildProcess, exitPromise: Promise<void>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) {
    child.kill("SIGTERM");
    const killed = await Promise.race([exitPromise.then(() => true), sleep(5000).then(() => false)]);
    if (!killed) {
      killGroup(child, "SIGKILL");
      await exitPromise;
    }
  }
}

/**
 * Start an NBD server listening on a Unix socket, wait until it accepts connections, time the client
 * against it, then stop the server. Time is the client's; memory and CPU are the server's.
 * The readiness probe connects once, so a server that exits after its first client (qemu-nbd without
 * -t) would not survive it: start servers in persistent mode.
 */
export async function runWithServer(
  server: Command,
  socket: string,
  client: Command,
  opts: { cwd: string; timeoutMs: number },
): Promise<Sample> {
  rmSync(socket, { force: true });
  let stderr = "";
  const child = spawn(server[0] as string, server.slice(1), {
    cwd: opts.cwd,
    stdio: ["ignore", "ignore", "pipe"],
    detached: true,
  });
  track(child);
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (s: string) => {
    if (stderr.length < STDERR_LIMIT) stderr += s;
  });
  let spawnError: string | null = null;
  const exitPromise = new Promise<void>((resolve) => {
    child.on("error", (e) => {
      spawnError = `${server[0]}: ${e.message}`;
      resolve();
    });
    child.on("close", () => resolve());
  });
  const serverFailed = (what: string): Sample => ({
    ok: false,
    wallMs: 0,
    maxRssKiB: null,
    userMs: null,
    sysMs: null,
    error: spawnError ?? `${what}: ${firstErrorLine(stderr)}`,
  });

  const deadline = Date.now() + 30_000;
  let ready = false;
  while (Date.now() < deadline && child.exitCode === null && child.signalCode === null && spawnError === null) {
    if (existsSync(socket) && (await canConnect(socket))) {
      ready = true;
      break;
    }
    await sleep(10);
  }
  if (!ready) {
    const alive = child.exitCode === null && child.signalCode === null && spawnError === null;
    await stopServer(child, exitPromise);
    return serverFailed(alive ? "server did not listen within 30 s" : "server exited");
  }

  const pid = child.pid as number;
  let last = readProc(pid);
  const poll = setInterval(() => {
    last = readProc(pid) ?? last;
  }, 50);
  const e = await spawnAndWait(client, opts.cwd, opts.timeoutMs);
  clearInterval(poll);
  last = readProc(pid) ?? last;
  await stopServer(child, exitPromise);
  rmSync(socket, { force: true });

  const ok = e.code === 0 && !e.timedOut;
  const sample: Sample = {
    ok,
    wallMs: e.wallMs,
    maxRssKiB: last?.hwmKiB ?? null,
    userMs: last?.userMs ?? null,
    sysMs: last?.sysMs ?? null,
  };
  if (!ok) {
    const clientName = (client[0] as string).split("/").pop();
    sample.error = `${clientName}: ${failure(client, e)}`;
    if (stderr.trim() !== "") sample.error += ` (server: ${firstErrorLine(stderr)})`;
  }
  return sample;
}
