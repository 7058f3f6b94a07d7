// qcowkit vs qemu-img, on this machine, in this run.
//
//   npm run bench [-- --runs N] [--only REGEX] [--skip REGEX] [--self-test] [--list]
//                    [--data DIR] [--json FILE] [--cli FILE] [--timeout SECONDS] [--no-verify]
//
// For each case: one untimed-for-the-table warm-up run of each tool (the page cache cannot be dropped, so
// both tools start warm), then N timed runs of each, the tools alternating and the one that goes first
// swapping every round. The table gives medians, their ratio and each tool's peak RSS; every sample
// goes to the JSON file. A case whose qcowkit side fails is reported as such and the bench goes on.
// --self-test puts qemu-img on the qcowkit side to check the harness itself (ratios should be near 1).

import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, freemem, release, tmpdir, totalmem } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import {
  type CaseEnv,
  type CompareCase,
  compareCases,
  defaultCleanup,
  type Invocation,
  type ReferenceCase,
  type RunCtx,
  referenceCases,
  selfTestCases,
  type Tool,
} from "./cases.js";
import { DataSet } from "./data.js";
import {
  atInterrupt,
  type Command,
  describeRssMethod,
  detectRssMethod,
  type RssMethod,
  runCommand,
  runWithServer,
  type Sample,
} from "./measure.js";
import { type CaseResult, fmtTime, renderTables, summarize } from "./report.js";

/** A case whose warm-up took less than this gets SHORT_RUNS_FACTOR times the runs. */
const SHORT_MS = 250;
const SHORT_RUNS_FACTOR = 4;

// dist/bench/run.js -> the repository root
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

const USAGE = `usage: npm run bench -- [options]
  --runs N          timed runs of each tool per case (default 5), after one warm-up each
  --only REGEX      run only cases whose name matches (repeatable)
  --skip REGEX      skip cases whose name matches (repeatable)
  --self-test       use qemu-img on the qcowkit side too, to check the harness
  --list            list the cases and exit
  --data DIR        input cache (default bench/.data)
  --json FILE       results file (default bench/results/latest.json)
  --cli FILE        qcowkit CLI entry (default dist/src/cli/qcowkit.cjs)
  --timeout SEC     limit for one command (default 600)
  --no-verify       skip the output checks (qemu-img compare / check of qcowkit's output)`;

interface Options {
  runs: number;
  only: RegExp[];
  skip: RegExp[];
  selfTest: boolean;
  list: boolean;
  dataDir: string;
  jsonFile: string;
  cli: string;
  timeoutMs: number;
  verify: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: "string", default: "5" },
      only: { type: "string", multiple: true, default: [] },
      skip: { type: "string", multiple: true, default: [] },
      "self-test": { type: "boolean", default: false },
      list: { type: "boolean", default: false },
      data: { type: "string", default: join(ROOT, "bench", ".data") },
      json: { type: "string", default: join(ROOT, "bench", "results", "latest.json") },
      cli: { type: "string", default: join(ROOT, "dist", "src", "cli", "qcowkit.cjs") },
      timeout: { type: "string", default: "600" },
      "no-verify": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const runs = Number(values.runs);
  const timeout = Number(values.timeout);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs: expected a positive integer, got ${values.runs}`);
  if (!(timeout > 0)) throw new Error(`--timeout: expected seconds, got ${values.timeout}`);
  return {
    runs,
    only: values.only.map((s) => new RegExp(s, "i")),
    skip: values.skip.map((s) => new RegExp(s, "i")),
    selfTest: values["self-test"],
    list: values.list,
    dataDir: resolve(values.data),
    jsonFile: resolve(values.json),
    cli: resolve(values.cli),
    timeoutMs: timeout * 1000,
    verify: !values["no-verify"],
  };
}

function firstLine(argv: string[]): string {
  try {
    return execFileSync(argv[0] as string, argv.slice(1), { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] })
      .trim()
      .split("\n")[0] as string;
  } catch {
    return "not found";
  }
}

function machine(rss: RssMethod) {
  const cpuModel = cpus()[0]?.model ?? "unknown";
  return {
    nproc: firstLine(["nproc"]),
    cpu: cpuModel,
    memoryGiB: Number((totalmem() / 2 ** 30).toFixed(1)),
    freeMemoryGiB: Number((freemem() / 2 ** 30).toFixed(1)),
    kernel: release(),
    node: process.version,
    qemuImg: firstLine(["qemu-img", "--version"]),
    nbdcopy: firstLine(["nbdcopy", "--version"]),
    fio: firstLine(["fio", "--version"]),
    loadavg: readFileSync("/proc/loadavg", "utf8").trim(),
    rssMethod: describeRssMethod(rss),
  };
}

const log = (msg: string) => process.stderr.write(`${msg}\n`);

class Bench {
  private readonly statsFile: string;

  constructor(
    private readonly opts: Options,
    private readonly rss: RssMethod,
    private readonly workDir: string,
    private readonly sockDir: string,
  ) {
    this.statsFile = join(sockDir, "rusage.txt");
  }

  ctx(slug: string, tool: Tool): RunCtx {
    return {
      tool,
      out: join(this.workDir, `${slug}.${tool}.out`),
      scratch: join(this.workDir, `${slug}.${tool}.scratch.qcow2`),
      socket: join(this.sockDir, `${tool}.sock`),
    };
  }

  private async invoke(inv: Invocation): Promise<Sample> {
    const cwd = ROOT;
    if ("cmd" in inv) {
      return runCommand(inv.cmd, { cwd, rss: this.rss, statsFile: this.statsFile, timeoutMs: this.opts.timeoutMs });
    }
    return runWithServer(inv.server, inv.socket, inv.client, { cwd, timeoutMs: this.opts.timeoutMs });
  }

  async runCompare(c: CompareCase, index: number, total: number): Promise<CaseResult> {
    const t0 = Date.now();
    const slug = `case${index}`;
    let runs = this.opts.runs;
    const result: CaseResult = { name: c.name, kind: "compare", status: "ok", runs, seconds: 0 };
    const sides: Record<Tool, { ctx: RunCtx; inv: (x: RunCtx) => Invocation; samples: Sample[] }> = {
      qcowkit: {
        ctx: this.ctx(slug, "qcowkit"),
        inv: this.opts.selfTest ? (x) => (c.selfTest ?? c.qemu)(x) : (x) => c.qcowkit(x),
        samples: [],
      },
      qemu: { ctx: this.ctx(slug, "qemu"), inv: (x) => c.qemu(x), samples: [] },
    };
    const cleanup = (tool: Tool) => (c.cleanup ?? defaultCleanup)(sides[tool].ctx);
    const once = async (tool: Tool): Promise<Sample> => {
      const s = sides[tool];
      c.prepare?.(s.ctx);
      return this.invoke(s.inv(s.ctx));
    };
    const fail = (tool: Tool, s: Sample): CaseResult => {
      result.status = tool === "qcowkit" ? "qcowkit-failed" : "qemu-failed";
      result.error = s.error ?? "unknown failure";
      return result;
    };
    log(`[${index}/${total}] ${c.name}`);
    try {
      // Warm-up: both outputs are kept until the output check has compared them.
      const wq = await once("qcowkit");
      if (!wq.ok) {
        cleanup("qcowkit");
        return fail("qcowkit", wq);
      }
      const we = await once("qemu");
      if (!we.ok) {
        cleanup("qcowkit");
        cleanup("qemu");
        return fail("qemu", we);
      }
      // Commands of a few milliseconds vary by more than five runs can average out: give them more.
      const short = Math.max(wq.wallMs, we.wallMs) < SHORT_MS;
      runs = this.opts.runs * (c.runsFactor ?? (short ? SHORT_RUNS_FACTOR : 1));
      result.runs = runs;
      log(`  warm-up: qcowkit ${fmtTime(wq.wallMs)}, qemu-img ${fmtTime(we.wallMs)}; ${runs} timed runs of each`);
      if (this.opts.verify && c.verify) {
        result.verify = c.verify(sides.qcowkit.ctx, sides.qemu.ctx);
        log(
          `  output check: ${result.verify.ok ? "ok" : "FAILED"}${result.verify.detail ? ` (${result.verify.detail})` : ""}`,
        );
      }
      cleanup("qcowkit");
      cleanup("qemu");

      for (let i = 0; i < runs; i++) {
        const order: Tool[] = i % 2 === 0 ? ["qcowkit", "qemu"] : ["qemu", "qcowkit"];
        for (const tool of order) {
          const s = await once(tool);
          cleanup(tool);
          if (!s.ok) return fail(tool, s);
          sides[tool].samples.push(s);
        }
      }
      result.qcowkit = summarize(sides.qcowkit.samples);
      result.qemu = summarize(sides.qemu.samples);
      result.ratio = result.qcowkit.medianMs / result.qemu.medianMs;
      return result;
    } catch (e) {
      cleanup("qcowkit");
      cleanup("qemu");
      result.status = "error";
      result.error = e instanceof Error ? e.message : String(e);
      return result;
    } finally {
      result.seconds = (Date.now() - t0) / 1000;
      const line =
        result.status === "ok" && result.qcowkit && result.qemu
          ? `qcowkit ${fmtTime(result.qcowkit.medianMs)}, qemu-img ${fmtTime(result.qemu.medianMs)}, ratio ${result.ratio?.toFixed(2)}`
          : `${result.status}: ${result.error}`;
      log(`  -> ${line} (${result.seconds.toFixed(0)} s)`);
    }
  }

  async runReference(c: ReferenceCase, index: number, total: number): Promise<CaseResult> {
    const t0 = Date.now();
    const ctx = this.ctx(`ref${index}`, "qemu");
    const cleanup = () => (c.cleanup ?? defaultCleanup)(ctx);
    const runs = this.opts.runs;
    const result: CaseResult = { name: c.name, kind: "reference", status: "ok", runs, seconds: 0 };
    log(`[${index}/${total}] ${c.name} (reference): ${runs} runs after a warm-up`);
    const samples: Sample[] = [];
    for (let i = 0; i <= runs; i++) {
      const s = await this.invoke({ cmd: c.cmd(ctx) });
      cleanup();
      if (!s.ok) {
        result.status = "error";
        result.error = s.error ?? "unknown failure";
        break;
      }
      if (i > 0) samples.push(s);
    }
    if (result.status === "ok") result.reference = summarize(samples);
    result.seconds = (Date.now() - t0) / 1000;
    log(
      `  -> ${result.reference ? fmtTime(result.reference.medianMs) : result.error} (${result.seconds.toFixed(0)} s)`,
    );
    return result;
  }
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const data = new DataSet(opts.dataDir);
  const qcowkit = (...args: string[]): Command => [process.execPath, opts.cli, ...args];
  const env: CaseEnv = { data, qcowkit };
  const selected = (name: string) =>
    (opts.only.length === 0 || opts.only.some((r) => r.test(name))) && !opts.skip.some((r) => r.test(name));
  const cases = [...compareCases(env), ...(opts.selfTest ? selfTestCases(env) : [])].filter((c) => selected(c.name));
  const refs = referenceCases(env).filter((c) => selected(c.name));

  if (opts.list) {
    for (const c of cases) console.log(c.name);
    for (const c of refs) console.log(`${c.name} (reference)`);
    return 0;
  }

  // NODE_EXTRA_CA_CERTS makes every Node process parse that certificate file at start-up (about
  // 40 ms for Debian's bundle, on this machine more than Node's own start). Nothing measured
  // here uses TLS, so the runs go without it; the run says so.
  const extraCaCerts = process.env.NODE_EXTRA_CA_CERTS;
  delete process.env.NODE_EXTRA_CA_CERTS;
  const rss = detectRssMethod();
  const info = {
    ...machine(rss),
    nodeExtraCaCerts: extraCaCerts === undefined ? "unset" : `unset for the runs (was ${extraCaCerts})`,
  };
  console.log("# qcowkit vs qemu-img");
  console.log("");
  console.log(`machine: nproc ${info.nproc}, ${info.cpu}, ${info.memoryGiB} GiB, Linux ${info.kernel}`);
  console.log(`load average at start: ${info.loadavg}`);
  console.log(`node ${info.node}; ${info.qemuImg}; ${info.nbdcopy}; ${info.fio}`);
  console.log(`peak memory: ${info.rssMethod}`);
  if (extraCaCerts !== undefined)
    console.log(`NODE_EXTRA_CA_CERTS ${info.nodeExtraCaCerts}: it costs each Node start ~40 ms`);
  console.log(`runs: ${opts.runs} timed runs of each tool per case, after one warm-up each, alternating`);
  if (opts.selfTest) console.log("SELF-TEST: qemu-img runs on the qcowkit side too; ratios should be near 1");
  else if (!existsSync(opts.cli))
    console.log(`note: ${relative(ROOT, opts.cli)} does not exist (yet); qcowkit cases will fail`);
  console.log("");

  const started = Date.now();
  for (const c of [...cases, ...refs]) for (const input of c.inputs) data.ensure(input);
  const generated = (Date.now() - started) / 1000;
  if (generated > 1) log(`inputs ready in ${generated.toFixed(0)} s`);

  const workDir = join(opts.dataDir, "work");
  rmSync(workDir, { recursive: true, force: true });
  mkdirSync(workDir, { recursive: true });
  const sockDir = mkdtempSync(join(tmpdir(), "qcowkit-bench-"));
  atInterrupt(() => {
    rmSync(sockDir, { recursive: true, force: true });
    rmSync(workDir, { recursive: true, force: true });
  });
  const bench = new Bench(opts, rss, workDir, sockDir);
  const results: CaseResult[] = [];
  const total = cases.length + refs.length;
  const benchStart = Date.now();
  try {
    let i = 0;
    for (const c of cases) results.push(await bench.runCompare(c, ++i, total));
    for (const c of refs) results.push(await bench.runReference(c, ++i, total));
  } finally {
    rmSync(sockDir, { recursive: true, force: true });
    rmSync(workDir, { recursive: true, force: true });
  }
  const seconds = (Date.now() - benchStart) / 1000;

  console.log(renderTables(results, opts.selfTest));
  console.log("");
  const loadEnd = readFileSync("/proc/loadavg", "utf8").trim();
  console.log(`bench time: ${seconds.toFixed(0)} s (input generation ${generated.toFixed(0)} s)`);
  console.log(`load average at end: ${loadEnd} (above ${info.nproc} means other work shared the machine)`);

  mkdirSync(dirname(opts.jsonFile), { recursive: true });
  const record = {
    version: 1,
    date: new Date().toISOString(),
    selfTest: opts.selfTest,
    runs: opts.runs,
    machine: info,
    inputs: opts.dataDir,
    seconds,
    loadavgAtEnd: loadEnd,
    results,
  };
  writeFileSync(opts.jsonFile, `${JSON.stringify(record, null, 2)}\n`);
  console.log(`results: ${relative(process.cwd(), opts.jsonFile)}`);

  if (opts.selfTest) return selfTestVerdict(results);
  return 0;
}

/** Under --self-test the harness checks itself: every real case runs, the planted failure is caught. */
function selfTestVerdict(results: CaseResult[]): number {
  const problems: string[] = [];
  for (const r of results) {
    const planted = r.name.startsWith("self-test:");
    if (planted && r.status !== "qcowkit-failed") problems.push(`${r.name}: expected qcowkit-failed, got ${r.status}`);
    if (!planted && r.status !== "ok") problems.push(`${r.name}: ${r.status}: ${r.error}`);
    if (!planted && r.verify && !r.verify.ok) problems.push(`${r.name}: output check failed: ${r.verify.detail}`);
    if (r.ratio !== undefined && (r.ratio < 0.67 || r.ratio > 1.5)) {
      log(`self-test warning: ${r.name}: ratio ${r.ratio.toFixed(2)} for identical commands (a noisy machine?)`);
    }
  }
  console.log("");
  if (problems.length === 0) {
    console.log("self-test: harness OK");
    return 0;
  }
  console.log(`self-test: ${problems.length} problem(s):`);
  for (const p of problems) console.log(`- ${p}`);
  return 1;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    console.error(`bench: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(2);
  },
);
