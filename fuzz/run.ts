/**
 * npm run fuzz -- [--seed N] [--cases N] [--seconds S] [--jobs N] [--keep DIR] [--case I]
 *
 * Damages the metadata of real images (made by qemu-img: every layout qcowkit supports) and runs
 * every reading, checking, repairing and writing path on each one in worker threads. Every
 * outcome is classified — clean error, success, crash, hang, memory blow-up, file growth — and,
 * where qemu-img also reads the damaged image, the guest bytes are compared. Exits 1 if anything
 * but clean errors and successes happened. A run is reproducible from its seed; `--case I`
 * repeats one case (failing cases print the command).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { Worker } from "node:worker_threads";
import { Prng } from "../test/prng.js";
import { mutate } from "./mutate.js";
import { type CaseResult, FULL_READ_LIMIT } from "./worker.js";

export interface FuzzOptions {
  seed: number;
  cases: number;
  seconds: number;
  jobs: number;
  keep?: string;
  only?: number;
  quiet?: boolean;
}

export interface FuzzReport {
  seed: number;
  cases: number;
  /** outcome -> count, over every operation of every case ("info:ok", "read:error", ...). */
  outcomes: Map<string, number>;
  /** Cases that went wrong: crash, hang, blow-up, growth, mismatch. */
  failures: string[];
  comparedWithQemu: number;
  worseAfterWrite: number;
}

const MAX_RSS_KB = 2 * 1024 * 1024;
const CASE_TIMEOUT_MS = 30_000;

function requireQemuImg(): void {
  const r = spawnSync("qemu-img", ["--version"]);
  if (r.error || r.status !== 0) throw new Error("qemu-img not found: install it with `apt-get install -y qemu-utils`");
}

/** Seed images: the layouts qcowkit reads and writes, each with data, zeros and holes. */
function makeSeeds(dir: string): string[] {
  const img = (name: string, opts: string, size: string, io: string[], after?: (f: string) => void): string => {
    const f = join(dir, name);
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", ...(opts ? ["-o", opts] : []), f, size]);
    if (io.length) execFileSync("qemu-io", ["-f", "qcow2", ...io.flatMap((c) => ["-c", c]), f], { stdio: "ignore" });
    after?.(f);
    return f;
  };
  const common = ["write -P 1 0 200k", "write -z 1M 128k", "write -c -P 2 2M 64k", "write -P 3 5M 4k"];
  const seeds = [
    img("v3.qcow2", "", "8M", common, (f) => {
      execFileSync("qemu-img", ["snapshot", "-c", "snap", f]);
      execFileSync("qemu-io", ["-f", "qcow2", "-c", "write -P 4 0 64k", f], { stdio: "ignore" });
      execFileSync("qemu-img", ["bitmap", "--add", f, "b0"]);
    }),
    img("v2.qcow2", "compat=0.10", "8M", ["write -P 1 0 200k", "write -c -P 2 2M 64k"], (f) =>
      execFileSync("qemu-img", ["snapshot", "-c", "snap", f]),
    ),
    img("small.qcow2", "cluster_size=512,refcount_bits=64", "2M", common.slice(0, 2)),
    img("r1.qcow2", "cluster_size=4k,refcount_bits=1", "4M", ["write -P 1 0 200k", "write -z 1M 128k"]),
    img("extl2.qcow2", "extended_l2=on,cluster_size=64k", "8M", ["write -P 1 4k 8k", ...common]),
    img("zstd.qcow2", "compression_type=zstd", "8M", common),
    img("lazy.qcow2", "lazy_refcounts=on", "8M", common),
  ];
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", join(dir, "base.qcow2"), "8M"]);
  execFileSync("qemu-io", ["-f", "qcow2", "-c", "write -P 9 0 8M", join(dir, "base.qcow2")], { stdio: "ignore" });
  seeds.push(
    img("overlay.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "8M", ["write -P 5 64k 64k", "write -z 1M 64k"]),
  );
  return seeds;
}

function qemuContents(file: string, raw: string): string | undefined {
  const r = spawnSync("qemu-img", ["convert", "-U", "-f", "qcow2", "-O", "raw", file, raw], { stdio: "ignore" });
  if (r.status !== 0) return undefined;
  const h = createHash("sha256").update(readFileSync(raw)).digest("hex");
  rmSync(raw, { force: true });
  return h;
}

class WorkerSlot {
  private worker!: Worker;
  constructor(private readonly url: URL) {
    this.spawn();
  }
  private spawn(): void {
    this.worker = new Worker(this.url, { resourceLimits: { maxOldGenerationSizeMb: 1024 } });
    this.worker.unref();
  }
  /** Runs one case: the result, or "hang" / "blowup" / a crash of the worker itself. */
  run(file: string, seed: number): Promise<CaseResult | { failed: string }> {
    return new Promise((resolve) => {
      const w = this.worker;
      const timer = setTimeout(() => {
        cleanup();
        void w.terminate();
        this.spawn();
        resolve({ failed: "hang" });
      }, CASE_TIMEOUT_MS);
      const onMessage = (m: { ok: boolean; res?: CaseResult; error?: string }): void => {
        cleanup();
        resolve(m.ok ? (m.res as CaseResult) : { failed: `crash (worker): ${m.error}` });
      };
      const onError = (e: Error & { code?: string }): void => {
        cleanup();
        this.spawn();
        resolve({ failed: e.code === "ERR_WORKER_OUT_OF_MEMORY" ? "blowup" : `crash (worker): ${e.message}` });
      };
      const cleanup = (): void => {
        clearTimeout(timer);
        w.off("message", onMessage);
        w.off("error", onError);
      };
      w.on("message", onMessage);
      w.on("error", onError);
      w.postMessage({ file, seed });
    });
  }
  stop(): Promise<number> {
    return this.worker.terminate();
  }
}

export async function fuzz(o: FuzzOptions): Promise<FuzzReport> {
  requireQemuImg();
  const dir = mkdtempSync(join(tmpdir(), "qcowkit-fuzz-"));
  const report: FuzzReport = {
    seed: o.seed,
    cases: 0,
    outcomes: new Map(),
    failures: [],
    comparedWithQemu: 0,
    worseAfterWrite: 0,
  };
  const say = (s: string): void => {
    if (!o.quiet) process.stdout.write(`${s}\n`);
  };
  try {
    const seeds = makeSeeds(dir);
    const seedBytes = seeds.map((f) => readFileSync(f));
    const url = new URL("./worker.js", import.meta.url);
    const slots = Array.from({ length: Math.max(1, o.jobs) }, () => new WorkerSlot(url));
    const deadline = Date.now() + o.seconds * 1000;
    let next = o.only ?? 0;
    const last = o.only ?? o.cases - 1;
    const runSlot = async (k: number): Promise<void> => {
      for (;;) {
        if (next > last || (o.only === undefined && Date.now() > deadline)) return;
        const i = next++;
        const seedIndex = i % seeds.length;
        const r = new Prng((o.seed + Math.imul(i, 0x9e3779b1)) >>> 0);
        const m = mutate(seedBytes[seedIndex], r);
        // The damaged image keeps its seed's name so that an overlay finds base.qcow2.
        const caseDir = join(dir, `w${k}`);
        mkdirSync(caseDir, { recursive: true });
        copyFileSync(join(dir, "base.qcow2"), join(caseDir, "base.qcow2"));
        const file = join(caseDir, seeds[seedIndex].split("/").pop() as string);
        writeFileSync(file, m.bytes);
        const res = await slots[k].run(file, r.next());
        report.cases++;
        const where = `case ${i} (${seeds[seedIndex].split("/").pop()}: ${m.what}); repeat: npm run fuzz -- --seed ${o.seed} --case ${i}`;
        const fail = (what: string): void => {
          report.failures.push(`${what} — ${where}`);
          if (o.keep) {
            mkdirSync(o.keep, { recursive: true });
            writeFileSync(join(o.keep, `seed${o.seed}-case${i}.qcow2`), m.bytes);
          }
          say(`FAIL ${what} — ${where}`);
        };
        if ("failed" in res) {
          report.outcomes.set(res.failed.split(" ")[0], (report.outcomes.get(res.failed.split(" ")[0]) ?? 0) + 1);
          fail(res.failed);
          continue;
        }
        for (const op of res.ops) {
          const key = `${op.op}:${op.outcome}`;
          report.outcomes.set(key, (report.outcomes.get(key) ?? 0) + 1);
          if (op.outcome === "crash") fail(`crash in ${op.op}: ${op.message}`);
        }
        if (res.maxRssKb > MAX_RSS_KB) fail(`memory blow-up: peak RSS ${Math.round(res.maxRssKb / 1024)} MiB`);
        if (
          res.sizeAfterRepair !== undefined &&
          res.sizeAfterRepair > Math.max(2 * res.sizeBefore, res.sizeBefore + 16 * 2 ** 20)
        )
          fail(`file growth in repair: ${res.sizeBefore} -> ${res.sizeAfterRepair} bytes`);
        if (
          res.corruptionsBefore !== undefined &&
          res.corruptionsAfterWrite !== undefined &&
          res.corruptionsAfterWrite > res.corruptionsBefore
        ) {
          report.worseAfterWrite++;
        }
        if (res.contents !== undefined && (res.size ?? 0) <= FULL_READ_LIMIT) {
          const q = qemuContents(file, join(caseDir, "qemu.raw"));
          if (q !== undefined) {
            report.comparedWithQemu++;
            if (q !== res.contents) fail("guest bytes differ from qemu-img convert");
          }
        }
      }
    };
    await Promise.all(slots.map((_, k) => runSlot(k)));
    await Promise.all(slots.map((s) => s.stop()));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return report;
}

export function formatReport(r: FuzzReport): string {
  const ops = ["info", "read", "check", "repair", "write", "check-after-write"];
  const lines = [
    `seed ${r.seed}: ${r.cases} damaged images`,
    "",
    "| operation | ok | clean error | crash |",
    "| --- | --- | --- | --- |",
    ...ops.map(
      (op) =>
        `| ${op} | ${r.outcomes.get(`${op}:ok`) ?? 0} | ${r.outcomes.get(`${op}:error`) ?? 0} | ${r.outcomes.get(`${op}:crash`) ?? 0} |`,
    ),
    "",
    `hangs: ${r.outcomes.get("hang") ?? 0}, memory blow-ups: ${r.outcomes.get("blowup") ?? 0}, failures: ${r.failures.length}`,
    `guest bytes compared with qemu-img convert: ${r.comparedWithQemu} images`,
    `writes that found more corruption afterwards than before: ${r.worseAfterWrite}`,
  ];
  return lines.join("\n");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      seed: { type: "string" },
      cases: { type: "string" },
      seconds: { type: "string" },
      jobs: { type: "string" },
      keep: { type: "string" },
      case: { type: "string" },
    },
  });
  const seed = values.seed !== undefined ? Number(values.seed) >>> 0 : (Date.now() ^ (process.pid << 8)) >>> 0;
  const report = await fuzz({
    seed,
    cases: values.cases !== undefined ? Number(values.cases) : 1_000_000,
    seconds: values.seconds !== undefined ? Number(values.seconds) : 60,
    jobs: values.jobs !== undefined ? Number(values.jobs) : 2,
    keep: values.keep ?? "fuzz-failures",
    only: values.case !== undefined ? Number(values.case) : undefined,
  });
  process.stdout.write(`${formatReport(report)}\n`);
  process.exitCode = report.failures.length > 0 ? 1 : 0;
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split("/").pop() as string)) {
  main().catch((e: unknown) => {
    process.stderr.write(`fuzz: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  });
}
