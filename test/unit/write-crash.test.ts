/**
 * Crash simulation (DESIGN.md, "Write ordering", invariant 3): a workload runs on a CrashStorage
 * that records every write and flush. Then, for flush boundaries k (all of them when there are
 * few, a sample otherwise), crashed images are built from everything up to flush k plus random
 * subsets of the writes issued after it (some torn at a 512-byte boundary), and each must
 *  - pass `qemu-img check` with no corruptions and no check errors (leaks are allowed);
 *  - read back, through qcowkit and through `qemu-img convert -O raw`, every guest write that was
 *    followed by a completed guest flush whose storage flushes all lie at or before flush k; bytes
 *    touched by later requests may hold the durable value or the value of one of those requests.
 *
 * Workloads: 512-byte clusters with refcount_bits=64 (new refcount blocks every 64 clusters, a
 * refcount-table move after 2 MiB) and refcount_bits=1, copy-on-write over a backing file (v2 and
 * v3 with extended L2), and an image with compressed clusters and a snapshot sharing them.
 * Seeded: a failure names QCOWKIT_SEED to repeat it.
 */
import assert from "node:assert/strict";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { type Qcow2CreateOptions, writeEmptyQcow2 } from "../../src/ops/create.js";
import { BASE_SEED, Prng } from "../prng.js";
import { buildImage, type ClusterSpec, noise, pattern, qemuImg, withTempDir } from "./build-image.js";
import { CrashStorage, type StorageOp, tornWrite } from "./crash-storage.js";

/** A guest request of the workload and what it left the guest reading over its range. */
interface GuestOp {
  kind: "write" | "zero" | "discard" | "flush";
  offset: number;
  length: number;
  /** What the range reads right after the request (write: its data; discard: as read back). */
  effect: Uint8Array;
  /** Log positions: the first storage op the request issued, and the log length when it ended. */
  logStart: number;
  logEnd: number;
}

interface Workload {
  name: string;
  /** Options for writeEmptyQcow2, or a ready image (built with buildImage). */
  create?: Qcow2CreateOptions;
  built?: ReturnType<typeof buildImage>;
  /** A backing image (its file is written next to the crashed images as backing.qcow2). */
  backing?: ReturnType<typeof buildImage>;
  requests: number;
  /** Keep writing (mostly sequentially) until the image file is this large. */
  fill?: number;
  /** Guest bytes a request spans at most. */
  maxLength: number;
  l2CacheBytes?: number;
  /** The image has a snapshot (id "1", name "snap") whose contents must survive any crash. */
  snapshot?: boolean;
  /** How many flush boundaries to test (all of them when there are fewer). */
  boundaries: number;
  /** Expectations on the log, e.g. that the refcount table moved. */
  expectLog?: (s: CrashStorage, img: Qcow2Image) => void;
}

const KiB = 1024;
const MiB = 1024 * KiB;

function backingImage(
  size: number,
  clusterBits: number,
  seed: number,
  version: 2 | 3 = 3,
): ReturnType<typeof buildImage> {
  const cs = 2 ** clusterBits;
  const clusters: ClusterSpec[] = [];
  for (let gc = 0; gc < size / cs; gc++) {
    if ((gc * 7 + seed) % 3 !== 0) clusters.push({ guestCluster: gc, kind: "data", data: noise(cs, seed + gc) });
  }
  return buildImage({ size, version, clusterBits, clusters });
}

function workloads(): Workload[] {
  const out: Workload[] = [];
  out.push({
    name: "512-byte clusters, refcount_bits=64: new refcount blocks and a refcount-table move",
    create: { size: 3 * MiB, clusterSize: 512, refcountBits: 64 },
    requests: 250,
    fill: 2 * MiB + 256 * KiB,
    maxLength: 16 * KiB,
    boundaries: 16,
    expectLog: (s) => {
      const headerWrites = s.log.filter((op, i) => i > 0 && op.kind === "write" && op.offset === 0).length;
      assert.ok(headerWrites > 0, "the workload should move the refcount table (rewriting the header)");
    },
  });
  out.push({
    name: "512-byte clusters, refcount_bits=1: a second refcount block",
    create: { size: 3 * MiB, clusterSize: 512, refcountBits: 1 },
    requests: 200,
    fill: 2 * MiB + 256 * KiB,
    maxLength: 16 * KiB,
    boundaries: 10,
    expectLog: (s) => {
      const end = Math.max(...s.log.map((op) => (op.kind === "write" ? op.offset + op.data.length : 0)));
      assert.ok(end > 2 * MiB, `the workload should need a second refcount block (file end ${end})`);
    },
  });
  const b2 = backingImage(2 * MiB, 12, 5, 2);
  out.push({
    name: "v2, 4k clusters, copy-on-write over a backing file",
    create: { size: 2 * MiB, version: 2, clusterSize: 4 * KiB, backingFile: "backing.qcow2", backingFormat: "qcow2" },
    backing: b2,
    requests: 250,
    maxLength: 20 * KiB,
    boundaries: 12,
  });
  const b3 = backingImage(4 * MiB, 16, 9);
  out.push({
    name: "v3, 64k clusters, extended L2, copy-on-write over a backing file",
    create: {
      size: 4 * MiB,
      clusterSize: 64 * KiB,
      extendedL2: true,
      refcountBits: 16,
      backingFile: "backing.qcow2",
      backingFormat: "qcow2",
    },
    backing: b3,
    requests: 180,
    maxLength: 150 * KiB,
    boundaries: 10,
  });
  const cs = 4 * KiB;
  const clusters: ClusterSpec[] = [];
  for (let gc = 0; gc < 256; gc++) {
    if (gc % 4 === 0) clusters.push({ guestCluster: gc, kind: "compressed", data: pattern(cs, gc) });
    else if (gc % 4 === 1) clusters.push({ guestCluster: gc, kind: "data", data: noise(cs, gc) });
  }
  out.push({
    name: "4k clusters: compressed clusters and clusters shared with a snapshot",
    built: buildImage({
      size: 2 * MiB,
      clusterBits: 12,
      clusters,
      snapshots: [{ id: "1", name: "snap", shareActive: true }],
    }),
    snapshot: true,
    requests: 250,
    maxLength: 16 * KiB,
    boundaries: 12,
  });
  return out;
}

async function openBacking(w: Workload): Promise<Qcow2Image | undefined> {
  if (!w.backing) return undefined;
  return Qcow2Image.open(w.backing.storage("backing.qcow2"), { readOnly: true, codecs: nodeCodecs });
}

async function runWorkload(
  w: Workload,
  r: Prng,
): Promise<{ storage: CrashStorage; ops: GuestOp[]; initial: Uint8Array; size: number }> {
  const mem = new MemoryStorage(undefined, { name: "image.qcow2" });
  if (w.create) await writeEmptyQcow2(mem, w.create);
  else await mem.write((w.built as ReturnType<typeof buildImage>).bytes, 0);
  const storage = new CrashStorage(mem);
  const img = await Qcow2Image.open(storage, {
    readOnly: false,
    codecs: nodeCodecs,
    backing: await openBacking(w),
    l2CacheBytes: w.l2CacheBytes,
  });
  const size = img.size;
  const cs = img.clusterSize;
  const initial = new Uint8Array(size);
  await img.read(initial, 0);
  const ops: GuestOp[] = [];
  const clusters = Math.ceil(size / cs);
  // A fill phase first (mostly sequential allocating writes with gaps, so that the file grows
  // past `fill` bytes quickly), then requests anywhere.
  let cursor = r.int(cs);
  const fill = w.fill ?? 0;
  for (let i = 0; i < w.requests || (fill > 0 && (await storage.size()) < fill && cursor < size); i++) {
    const filling = fill > 0 && (await storage.size()) < fill && cursor < size;
    const k = r.int(100);
    let offset: number;
    if (filling && k < 80) offset = cursor;
    else if (r.chance(0.5)) offset = r.int(clusters) * cs + (r.chance(0.5) ? 0 : 512 * r.int(cs / 512));
    else offset = r.int(size);
    offset = Math.min(offset, size - 1);
    const length = Math.max(1, Math.min(size - offset, 1 + r.int(w.maxLength)));
    if (filling && k < 80) cursor = offset + length + (r.chance(0.3) ? r.int(4 * cs) : 0);
    const logStart = storage.log.length;
    let op: GuestOp;
    if (k < 62 || (filling && k < 80)) {
      const data = r.bytes(length);
      await img.write(data, offset);
      op = { kind: "write", offset, length, effect: data, logStart, logEnd: 0 };
    } else if (k < 74 || (filling && k < 85)) {
      await img.writeZeroes(offset, length, { unmap: r.chance(0.5) });
      op = { kind: "zero", offset, length, effect: new Uint8Array(length), logStart, logEnd: 0 };
    } else if (k < 86 || (filling && k < 90)) {
      await img.discard(offset, length);
      const effect = new Uint8Array(length);
      await img.read(effect, offset);
      op = { kind: "discard", offset, length, effect, logStart, logEnd: 0 };
    } else {
      await img.flush();
      op = { kind: "flush", offset: 0, length: 0, effect: new Uint8Array(0), logStart, logEnd: 0 };
    }
    op.logEnd = storage.log.length;
    ops.push(op);
  }
  w.expectLog?.(storage, img);
  // No close: the end of the log is a crash point too (writes after the last flush).
  return { storage, ops, initial, size };
}

/** The guest contents after requests [0, n). */
function contentsAfter(initial: Uint8Array, ops: GuestOp[], n: number): Uint8Array {
  const out = initial.slice();
  for (let i = 0; i < n; i++) if (ops[i].kind !== "flush") out.set(ops[i].effect, ops[i].offset);
  return out;
}

interface CrashPoint {
  /** Log position of flush k (-1: before the first flush). */
  flushAt: number;
  persisted: (number | StorageOp)[];
  what: string;
}

function crashPoints(s: CrashStorage, r: Prng, boundaries: number): CrashPoint[] {
  const flushes = [-1, ...s.flushPositions()];
  // Windows with writes only; those that rewrite the header or the refcount table first.
  const withWrites = flushes.filter((f) => s.windowAfter(f).ops.length > 0);
  const special = withWrites.filter((f) =>
    s.windowAfter(f).ops.some((i) => {
      const op = s.log[i];
      return op.kind === "write" && op.offset === 0;
    }),
  );
  const chosen = new Set<number>(special.slice(0, Math.ceil(boundaries / 3)));
  chosen.add(withWrites[withWrites.length - 1]);
  while (chosen.size < Math.min(boundaries, withWrites.length)) chosen.add(withWrites[r.int(withWrites.length)]);
  const points: CrashPoint[] = [];
  for (const f of [...chosen].sort((a, b) => a - b)) {
    const win = s.windowAfter(f).ops;
    points.push({ flushAt: f, persisted: [], what: "no write after the flush" });
    points.push({ flushAt: f, persisted: win, what: `all ${win.length} writes after the flush` });
    for (let n = 0; n < 2; n++) {
      const subset = win.filter(() => r.chance(0.5));
      points.push({ flushAt: f, persisted: subset, what: `writes ${subset.join(",")} of ${win.join(",")}` });
    }
    // Each write of a random subset torn at a random 512-byte boundary where it spans several.
    const torn: (number | StorageOp)[] = [];
    const notes: string[] = [];
    for (const i of win) {
      if (!r.chance(0.6)) continue;
      const op = s.log[i];
      if (op.kind === "write" && op.data.length > 512) {
        const at = 512 * (1 + r.int(op.data.length / 512 - 1));
        const keepFirst = r.chance(0.5);
        if (at < op.data.length) {
          torn.push(tornWrite(op, at, keepFirst));
          notes.push(`${i} torn at ${at} (${keepFirst ? "first" : "second"} part)`);
          continue;
        }
      }
      torn.push(i);
      notes.push(String(i));
    }
    if (notes.some((n) => n.includes("torn")))
      points.push({ flushAt: f, persisted: torn, what: `writes ${notes.join(", ")}` });
  }
  return points;
}

interface CheckReport {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
}

describe("crash at any point: no corruption, flushed writes intact", () => {
  let index = 0;
  for (const w of workloads()) {
    const caseIndex = index++;
    test(w.name, async () => {
      const seed = (BASE_SEED + Math.imul(caseIndex + 1, 0x9e3779b1)) >>> 0;
      const r = new Prng(seed);
      const note = `[seed ${seed}: rerun with QCOWKIT_SEED=${BASE_SEED}]`;
      try {
        const { storage, ops, initial, size } = await runWorkload(w, r);
        await withTempDir(async (dir) => {
          if (w.backing) writeFileSync(join(dir, "backing.qcow2"), w.backing.bytes);
          const file = join(dir, "crash.qcow2");
          const raw = join(dir, "crash.raw");
          const cache = new Map<number, Uint8Array>();
          for (const p of crashPoints(storage, r, w.boundaries)) {
            const win = storage.windowAfter(p.flushAt);
            const describeOp = (i: number): string => {
              const op = storage.log[i];
              return op.kind === "write"
                ? `${i}: write 0x${op.offset.toString(16)}+${op.data.length}`
                : `${i}: ${op.kind}`;
            };
            const where =
              `crash after the flush at log position ${p.flushAt} (of ${storage.log.length}) with ${p.what}` +
              `\n  window: ${win.ops.map(describeOp).join("; ")}`;
            const bytes = storage.crashImage(p.flushAt + 1, p.persisted);
            writeFileSync(file, bytes);
            const chk = qemuImg(["check", "--output=json", file]);
            let report: CheckReport;
            try {
              report = JSON.parse(chk.stdout) as CheckReport;
            } catch {
              assert.fail(`${where}: qemu-img check gave no JSON (exit ${chk.code}): ${chk.stdout}${chk.stderr}`);
            }
            assert.ok(
              (report.corruptions ?? 0) === 0 &&
                (report["check-errors"] ?? 0) === 0 &&
                (chk.code === 0 || chk.code === 3),
              `${where}: qemu-img check (exit ${chk.code}): ${JSON.stringify(report)} ${chk.stderr}`,
            );
            // The last guest flush whose storage flushes are all durable at this point.
            let g = -1;
            for (let i = 0; i < ops.length; i++) if (ops[i].kind === "flush" && ops[i].logEnd - 1 <= p.flushAt) g = i;
            const windowEnd = storage.windowAfter(p.flushAt).end;
            let durable = cache.get(g);
            if (!durable) {
              durable = contentsAfter(initial, ops, g + 1);
              cache.set(g, durable);
            }
            const later = ops.filter((op, i) => i > g && op.kind !== "flush" && op.logStart < windowEnd);
            const img = await Qcow2Image.open(new MemoryStorage(bytes, { name: "crash.qcow2" }), {
              readOnly: true,
              codecs: nodeCodecs,
              backing: await openBacking(w),
            });
            const got = new Uint8Array(size);
            try {
              await img.read(got, 0);
            } finally {
              await img.close();
            }
            const cv = qemuImg(["convert", "-O", "raw", file, raw]);
            assert.equal(cv.code, 0, `${where}: qemu-img convert: ${cv.stderr}`);
            const qemuGot = new Uint8Array(readFileSync(raw));
            rmSync(raw);
            assert.equal(qemuGot.length, size, `${where}: converted size`);
            for (const [reader, data] of [
              ["qcowkit", got],
              ["qemu-img convert", qemuGot],
            ] as const) {
              if (Buffer.from(data).equals(Buffer.from(durable))) continue;
              // Bytes that differ from the flushed state must hold what some later request wrote.
              const unexplained = new Uint8Array(size);
              for (let pos = 0; pos < size; pos++) unexplained[pos] = data[pos] !== durable[pos] ? 1 : 0;
              for (const op of later) {
                for (let i = 0; i < op.length; i++)
                  if (data[op.offset + i] === op.effect[i]) unexplained[op.offset + i] = 0;
              }
              const pos = unexplained.indexOf(1);
              if (pos >= 0) {
                const by = later
                  .filter((op) => pos >= op.offset && pos < op.offset + op.length)
                  .map((op) => `${op.kind} ${op.offset}+${op.length}`);
                assert.fail(
                  `${where}: ${reader} reads ${data[pos]} at guest offset ${pos}, expected the flushed value ${durable[pos]}` +
                    (by.length > 0
                      ? ` or what a later request wrote (${by.join("; ")})`
                      : " (no later request touched it)"),
                );
              }
            }
            if (w.snapshot && w.built) {
              const snap = await Qcow2Image.open(new MemoryStorage(bytes), {
                readOnly: true,
                codecs: nodeCodecs,
                snapshot: "snap",
              });
              const s = new Uint8Array(size);
              try {
                await snap.read(s, 0);
              } finally {
                await snap.close();
              }
              assert.ok(
                Buffer.from(s).equals(Buffer.from(w.built.expectedSnapshot(0))),
                `${where}: the snapshot's contents changed`,
              );
            }
          }
        });
      } catch (e) {
        if (e instanceof Error) e.message = `${e.message}\n${note}`;
        throw e;
      }
    });
  }
});
