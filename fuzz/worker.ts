/**
 * Runs every path of qcowkit on one damaged image and says how each ended: `ok`, `error` (a
 * clean QcowError or failed check, as a user would see it) or `crash` (anything else: a
 * TypeError, a RangeError, an assertion — a bug). Runs in a worker thread so that the runner can
 * stop a hang and notice a memory blow-up.
 */
import { createHash } from "node:crypto";
import { copyFile, stat } from "node:fs/promises";
import { parentPort } from "node:worker_threads";
import { QcowError } from "../src/errors.js";
import { CheckFailed, checkQcow2, FIX_ERRORS, FIX_LEAKS } from "../src/image/check.js";
import { FileStorage, openImageFile } from "../src/node.js";
import { imageInfo } from "../src/ops/info.js";
import { mapExtents } from "../src/ops/map.js";
import { Prng } from "../test/prng.js";

export type Outcome = "ok" | "error" | "crash";

export interface CaseRequest {
  file: string;
  seed: number;
}

export interface OpResult {
  op: string;
  outcome: Outcome;
  message?: string;
}

export interface CaseResult {
  ops: OpResult[];
  /** sha256 of the guest contents, when read in full (small images). */
  contents?: string;
  size?: number;
  /** Corruptions found by check before and after writing through qcowkit. */
  corruptionsBefore?: number;
  corruptionsAfterWrite?: number;
  /** File size before and after repair. */
  sizeBefore: number;
  sizeAfterRepair?: number;
  maxRssKb: number;
}

/** Guest contents are hashed only up to this size (qemu-img converts the same for comparison). */
export const FULL_READ_LIMIT = 64 * 1024 * 1024;
const READ_CAP = 256 * 1024 * 1024;

function classify(e: unknown): Outcome {
  return e instanceof QcowError || e instanceof CheckFailed ? "error" : "crash";
}

async function attempt(results: OpResult[], op: string, fn: () => Promise<void>): Promise<boolean> {
  if (process.env.QCOWKIT_FUZZ_TRACE) process.stderr.write(`${new Date().toISOString()} ${op}\n`);
  try {
    await fn();
    results.push({ op, outcome: "ok" });
    return true;
  } catch (e) {
    const outcome = classify(e);
    const message = e instanceof Error ? (outcome === "crash" ? (e.stack ?? e.message) : e.message) : String(e);
    results.push({ op, outcome, message });
    return false;
  }
}

async function runCase(req: CaseRequest): Promise<CaseResult> {
  const ops: OpResult[] = [];
  const r = new Prng(req.seed);
  const result: CaseResult = { ops, sizeBefore: (await stat(req.file)).size, maxRssKb: 0 };

  await attempt(ops, "info", async () => {
    const img = await openImageFile(req.file, { metadataOnly: true, noBacking: true });
    try {
      await imageInfo(img);
    } finally {
      await img.close();
    }
  });

  await attempt(ops, "read", async () => {
    const img = await openImageFile(req.file);
    try {
      result.size = img.size;
      const full = img.size <= FULL_READ_LIMIT;
      const hash = createHash("sha256");
      let at = 0;
      let read = 0;
      const buf = new Uint8Array(1024 * 1024);
      for await (const e of mapExtents(img)) {
        if (full && e.start > at) {
          hash.update(new Uint8Array(e.start - at));
          at = e.start;
        }
        for (let o = e.start; o < e.start + e.length; ) {
          const n = Math.min(buf.length, e.start + e.length - o);
          const part = buf.subarray(0, n);
          if (e.data || !e.zero) {
            if (read >= READ_CAP) return;
            await img.read(part, o);
            read += n;
          } else part.fill(0);
          if (full) hash.update(part);
          o += n;
        }
        at = e.start + e.length;
      }
      if (full) {
        if (at < img.size) hash.update(new Uint8Array(img.size - at));
        result.contents = hash.digest("hex");
      }
    } finally {
      await img.close();
    }
  });

  await attempt(ops, "check", async () => {
    const s = await FileStorage.open(req.file, { readOnly: true });
    try {
      result.corruptionsBefore = (await checkQcow2(s)).corruptions;
    } finally {
      await s.close();
    }
  });

  const repaired = `${req.file}.repair`;
  await copyFile(req.file, repaired);
  await attempt(ops, "repair", async () => {
    const s = await FileStorage.open(repaired, { readOnly: false });
    try {
      await checkQcow2(s, { fix: FIX_LEAKS | FIX_ERRORS });
      await checkQcow2(s);
    } finally {
      await s.close();
      result.sizeAfterRepair = (await stat(repaired)).size;
    }
  });

  const written = `${req.file}.write`;
  await copyFile(req.file, written);
  const wrote = await attempt(ops, "write", async () => {
    const img = await openImageFile(written, { readOnly: false });
    try {
      const span = Math.min(img.size, FULL_READ_LIMIT);
      for (let k = 0; k < 6 && span > 0; k++) {
        const offset = r.int(span);
        const length = Math.min(span - offset, 1 + r.int(200_000));
        const what = r.int(4);
        if (what === 0) await img.writeZeroes(offset, length, { unmap: r.chance(0.5) });
        else if (what === 1) await img.discard(offset, length);
        else await img.write(r.bytes(length), offset);
      }
      await img.flush();
    } finally {
      await img.close();
    }
  });
  if (wrote) {
    await attempt(ops, "check-after-write", async () => {
      const s = await FileStorage.open(written, { readOnly: true });
      try {
        result.corruptionsAfterWrite = (await checkQcow2(s)).corruptions;
      } finally {
        await s.close();
      }
    });
  }
  result.maxRssKb = process.resourceUsage().maxRSS;
  return result;
}

// A promise nobody awaited that fails would end a real program: report it as a crash, with its stack.
process.on("unhandledRejection", (e: unknown) => {
  throw new Error(`unhandled rejection: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
});

parentPort?.on("message", (req: CaseRequest) => {
  runCase(req).then(
    (res) => parentPort?.postMessage({ ok: true, res }),
    (e: unknown) =>
      parentPort?.postMessage({ ok: false, error: e instanceof Error ? (e.stack ?? e.message) : String(e) }),
  );
});
