/**
 * Concurrency stress for the write path (DESIGN.md, "Concurrency"): bursts of requests in flight
 * at once (Promise.all) over storage that answers after random delays, so requests interleave
 * at every await. Bursts aim at one cluster, at adjacent clusters, at fresh clusters that need
 * allocation (in one L2 table and across several), at clusters over a backing file (COW), at
 * compressed clusters and at clusters shared with an internal snapshot, mixing writes, zero
 * writes, cluster-aligned discards, compressed writes, flushes and reads.
 *
 * Requests of a burst may overlap, so the expected result is that of SOME serial order: every
 * piece of the image (the bytes between two request boundaries, within one cluster, or one
 * subcluster with extended L2) must hold the data of one of the requests that cover it, and bytes
 * no request covers keep their value. Pieces are no larger than the allocation unit because a
 * request is not atomic as a whole, in QEMU either: an unaligned zero write, for one, is a write
 * of zeros over its unaligned head and tail and a zero flag over the units between.
 * A read in a burst returns, for every byte, its value before the burst or one written by a
 * request of the burst. After each burst and a flush `qemu-img check` must find no corruption
 * (a cluster allocated twice shows as a refcount error) and the snapshot must read as it did;
 * after close, no leaks either, and `qemu-img convert -O raw` must read what qcowkit reads.
 * Seeded: a failure names QCOWKIT_SEED to repeat it.
 */
import assert from "node:assert/strict";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { constants, deflateRawSync } from "node:zlib";
import { nodeCodecs } from "../../src/codec/node.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { BASE_SEED, Prng } from "../prng.js";
import { buildImage, type ClusterSpec, noise, pattern, qemuImg, withTempDir } from "./build-image.js";
import { DelayStorage } from "./crash-storage.js";

type ReqKind = "write" | "zero" | "discard" | "compressed" | "flush" | "read";

interface Req {
  kind: ReqKind;
  offset: number;
  length: number;
  /** What the request makes [offset, offset+length) read (write, zero, discard, compressed). */
  value?: Uint8Array;
  unmap?: boolean;
  /** compressed: the deflated cluster. */
  compressed?: Uint8Array;
  /** read: what it returned. */
  result?: Uint8Array;
}

interface Config {
  name: string;
  version: 2 | 3;
  clusterBits: number;
  extendedL2?: boolean;
  refcountOrder?: number;
  /** A small L2 cache makes write-back and eviction happen between and within requests. */
  l2CacheBytes?: number;
  size: number;
  bursts: number;
}

const KiB = 1024;

const CONFIGS: Config[] = [
  { name: "v3, 4k clusters", version: 3, clusterBits: 12, size: 1024 * KiB, bursts: 80 },
  { name: "v3, 512-byte clusters (many L2 tables)", version: 3, clusterBits: 9, size: 256 * KiB, bursts: 80 },
  { name: "v2, 4k clusters", version: 2, clusterBits: 12, size: 1024 * KiB, bursts: 60 },
  {
    name: "v3, 64k clusters, extended L2",
    version: 3,
    clusterBits: 16,
    extendedL2: true,
    size: 4096 * KiB,
    bursts: 60,
  },
  {
    name: "v3, 512-byte clusters, refcount_bits=64, an L2 cache of 4 tables",
    version: 3,
    clusterBits: 9,
    refcountOrder: 6,
    l2CacheBytes: 2 * KiB,
    size: 512 * KiB,
    bursts: 60,
  },
];

/**
 * The starting image: a backing file with data in two clusters of three; in the image, data
 * clusters, compressed clusters, zero clusters (v3) and unallocated ones, all shared with a
 * snapshot named "snap".
 */
function buildFixture(c: Config) {
  const cs = 2 ** c.clusterBits;
  const n = c.size / cs;
  const backingClusters: ClusterSpec[] = [];
  for (let gc = 0; gc < n; gc++) {
    if (gc % 3 !== 0) backingClusters.push({ guestCluster: gc, kind: "data", data: noise(cs, 1000 + gc) });
  }
  // The backing file has 4k clusters whatever the image's: lay its data out at that granularity.
  const backingData = new Uint8Array(c.size);
  for (const b of backingClusters) backingData.set(b.data as Uint8Array, b.guestCluster * cs);
  const bclusters: ClusterSpec[] = [];
  for (let gc = 0; gc < c.size / 4096; gc++) {
    const d = backingData.subarray(gc * 4096, (gc + 1) * 4096);
    if (d.some((x) => x !== 0)) bclusters.push({ guestCluster: gc, kind: "data", data: d.slice() });
  }
  const backingImage = buildImage({ size: c.size, version: 3, clusterBits: 12, clusters: bclusters });
  const clusters: ClusterSpec[] = [];
  for (let gc = 0; gc < n; gc++) {
    const k = gc % 5;
    if (k === 0) clusters.push({ guestCluster: gc, kind: "compressed", data: pattern(cs, gc) });
    else if (k === 1) clusters.push({ guestCluster: gc, kind: "data", data: noise(cs, gc) });
    else if (k === 3 && c.version === 3 && !c.extendedL2) clusters.push({ guestCluster: gc, kind: "zero" });
  }
  const image = buildImage({
    size: c.size,
    version: c.version,
    clusterBits: c.clusterBits,
    extendedL2: c.extendedL2,
    refcountOrder: c.refcountOrder,
    clusters,
    backingFile: "backing.qcow2",
    backingFormat: "qcow2",
    snapshots: [{ id: "1", name: "snap", shareActive: true }],
  });
  return { image, backingImage, backingData };
}

/** A random range [offset, offset+length) inside clusters [c0, c1). */
function rangeIn(r: Prng, cs: number, size: number, c0: number, c1: number): [number, number] {
  const from = c0 * cs;
  const to = Math.min(size, c1 * cs);
  let offset: number;
  let length: number;
  if (r.chance(0.3)) {
    offset = from + 512 * r.int((to - from) / 512);
    length = 512 * (1 + r.int(Math.max(1, (to - offset) / 512)));
  } else {
    offset = from + r.int(to - from);
    length = 1 + r.int(to - offset);
  }
  return [offset, Math.min(length, to - offset)];
}

function makeBurst(r: Prng, c: Config): { kind: string; reqs: Req[] } {
  const cs = 2 ** c.clusterBits;
  const n = c.size / cs;
  const reqs: Req[] = [];
  // The v2 images here have a backing file: QEMU (and qcowkit) do not discard there at all.
  const v2Backing = c.version < 3;
  const data = (offset: number, length: number, kind: ReqKind): Req => {
    if (kind === "write") return { kind, offset, length, value: r.bytes(length) };
    if (kind === "zero") return { kind, offset, length, value: new Uint8Array(length), unmap: r.chance(0.5) };
    // Discards stay cluster-aligned: whole clusters read as zeros.
    const c0 = Math.floor(offset / cs);
    const c1 = Math.max(c0 + 1, Math.ceil((offset + length) / cs));
    const off = c0 * cs;
    const len = Math.min(c.size, c1 * cs) - off;
    return { kind: "discard", offset: off, length: len, value: new Uint8Array(len) };
  };
  const anyKind = (): ReqKind => {
    const k = r.int(10);
    return k < 6 ? "write" : k < 8 || v2Backing ? "zero" : "discard";
  };
  /** Guest clusters whose starting type is `k` (gc % 5, see buildFixture). */
  const clusterOfType = (k: number): number => Math.min(n - 1, 5 * r.int(Math.floor(n / 5)) + k);
  const kinds = [
    "same cluster",
    "adjacent clusters",
    "fresh clusters",
    "over the backing file",
    "compressed clusters",
    "snapshot-shared clusters",
    "disjoint",
    "long requests",
    "anywhere",
  ];
  const kind = kinds[r.int(kinds.length)];
  const count = 3 + r.int(8);
  switch (kind) {
    case "same cluster": {
      const gc = r.int(n);
      for (let i = 0; i < count; i++) reqs.push(data(...rangeIn(r, cs, c.size, gc, gc + 1), anyKind()));
      break;
    }
    case "adjacent clusters": {
      const gc = r.int(n - 2);
      for (let i = 0; i < count; i++) {
        // Around the boundaries of gc, gc+1, gc+2.
        const b = (gc + 1 + r.int(2)) * cs;
        const offset = Math.max(gc * cs, b - 1 - r.int(cs));
        const length = Math.min(c.size - offset, 2 + r.int(cs));
        reqs.push(data(offset, length, r.chance(0.8) ? "write" : anyKind()));
      }
      break;
    }
    case "fresh clusters":
    case "over the backing file": {
      // Unallocated clusters (types 2 and 4): some requests share a cluster, some do not.
      for (let i = 0; i < count; i++) {
        const gc = clusterOfType(r.chance(0.5) ? 2 : 4);
        reqs.push(
          data(...rangeIn(r, cs, c.size, gc, Math.min(n, gc + 1 + r.int(2))), r.chance(0.85) ? "write" : "zero"),
        );
      }
      break;
    }
    case "compressed clusters": {
      for (let i = 0; i < count; i++) {
        const gc = clusterOfType(0);
        if (r.chance(0.2)) {
          const target = r.int(n);
          const plain = pattern(cs, r.int(1000));
          const z = deflateRawSync(plain, { windowBits: 12, level: constants.Z_DEFAULT_COMPRESSION });
          reqs.push({ kind: "compressed", offset: target * cs, length: cs, value: plain, compressed: z });
        } else {
          reqs.push(data(...rangeIn(r, cs, c.size, gc, gc + 1), r.chance(0.8) ? "write" : anyKind()));
        }
      }
      break;
    }
    case "snapshot-shared clusters": {
      for (let i = 0; i < count; i++) {
        const gc = clusterOfType(r.chance(0.7) ? 1 : 0);
        reqs.push(data(...rangeIn(r, cs, c.size, gc, gc + 1), r.chance(0.8) ? "write" : anyKind()));
      }
      break;
    }
    case "disjoint": {
      const used = new Set<number>();
      for (let i = 0; i < count; i++) {
        const gc = r.int(n);
        if (used.has(gc)) continue;
        used.add(gc);
        reqs.push(data(...rangeIn(r, cs, c.size, gc, gc + 1), anyKind()));
      }
      break;
    }
    case "long requests": {
      // Across many clusters and L2 tables: allocations of many clusters at once.
      for (let i = 0; i < 2 + r.int(3); i++) {
        const offset = r.chance(0.5) ? cs * r.int(n) : r.int(c.size);
        const length = 1 + r.int(Math.min(c.size - offset, 80 * cs));
        reqs.push(data(offset, length, r.chance(0.7) ? "write" : anyKind()));
      }
      break;
    }
    default: {
      for (let i = 0; i < count; i++) {
        const offset = r.int(c.size);
        const length = 1 + r.int(Math.min(c.size - offset, 3 * cs));
        reqs.push(data(offset, length, anyKind()));
      }
    }
  }
  if (r.chance(0.3)) reqs.splice(r.int(reqs.length + 1), 0, { kind: "flush", offset: 0, length: 0 });
  if (r.chance(0.4)) {
    const offset = r.int(c.size);
    reqs.splice(r.int(reqs.length + 1), 0, {
      kind: "read",
      offset,
      length: 1 + r.int(Math.min(c.size - offset, 4 * cs)),
    });
  }
  return { kind, reqs };
}

function issue(img: Qcow2Image, q: Req): Promise<void> {
  switch (q.kind) {
    case "write":
      return img.write(q.value as Uint8Array, q.offset);
    case "zero":
      return img.writeZeroes(q.offset, q.length, { unmap: q.unmap });
    case "discard":
      return img.discard(q.offset, q.length);
    case "compressed":
      return img.writeCompressed(q.offset / img.clusterSize, q.compressed as Uint8Array);
    case "flush":
      return img.flush();
    case "read": {
      q.result = new Uint8Array(q.length);
      return img.read(q.result, q.offset);
    }
  }
}

function describeReq(q: Req): string {
  return `${q.kind} ${q.offset}+${q.length}${q.unmap ? " unmap" : ""}`;
}

/**
 * Checks the image after a burst against the state before it: every piece between request
 * boundaries within one allocation unit holds one covering request's data; uncovered bytes are
 * unchanged.
 */
function checkBurst(before: Uint8Array, after: Uint8Array, reqs: Req[], unit: number, what: string): void {
  const changing = reqs.filter((q) => q.value !== undefined);
  const cuts = new Set<number>([0, after.length]);
  for (const q of changing) {
    cuts.add(q.offset);
    cuts.add(q.offset + q.length);
  }
  for (let c = unit; c < after.length; c += unit) cuts.add(c);
  const points = [...cuts].sort((a, b) => a - b);
  for (let i = 0; i + 1 < points.length; i++) {
    const from = points[i];
    const to = points[i + 1];
    const covering = changing.filter((q) => q.offset <= from && to <= q.offset + q.length);
    const got = after.subarray(from, to);
    if (covering.length === 0) {
      const want = before.subarray(from, to);
      if (!Buffer.from(got).equals(Buffer.from(want))) {
        const at = got.findIndex((v, k) => v !== want[k]);
        assert.fail(
          `${what}: byte ${from + at} changed (${want[at]} -> ${got[at]}) though no request of the burst covers it`,
        );
      }
      continue;
    }
    const match = covering.some((q) =>
      Buffer.from(got).equals(Buffer.from((q.value as Uint8Array).subarray(from - q.offset, to - q.offset))),
    );
    if (!match) {
      const detail = covering
        .map((q) => {
          const v = (q.value as Uint8Array).subarray(from - q.offset, to - q.offset);
          const at = got.findIndex((b, k) => b !== v[k]);
          return `${describeReq(q)} (differs at ${from + at}: wants ${v[at]}, reads ${got[at]})`;
        })
        .join("; ");
      assert.fail(`${what}: bytes ${from}..${to} hold none of the covering requests' data: ${detail}`);
    }
  }
  for (const q of reqs) {
    if (q.kind !== "read") continue;
    const res = q.result as Uint8Array;
    for (let k = 0; k < q.length; k++) {
      const p = q.offset + k;
      if (res[k] === before[p]) continue;
      if (
        changing.some(
          (w) => p >= w.offset && p < w.offset + w.length && (w.value as Uint8Array)[p - w.offset] === res[k],
        )
      ) {
        continue;
      }
      assert.fail(
        `${what}: a read in the burst returned ${res[k]} at ${p}: neither the old value ${before[p]} nor any request's`,
      );
    }
  }
}

interface CheckReport {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
}

function qemuCheck(file: string, what: string, allowLeaks: boolean): void {
  const chk = qemuImg(["check", "--output=json", file]);
  let report: CheckReport;
  try {
    report = JSON.parse(chk.stdout) as CheckReport;
  } catch {
    assert.fail(`${what}: qemu-img check gave no JSON (exit ${chk.code}): ${chk.stdout}${chk.stderr}`);
  }
  const bad = (report.corruptions ?? 0) + (report["check-errors"] ?? 0) + (allowLeaks ? 0 : (report.leaks ?? 0));
  assert.ok(bad === 0, `${what}: qemu-img check (exit ${chk.code}): ${JSON.stringify(report)}\n${chk.stderr}`);
}

describe("concurrent requests: the result of some serial order, no cluster allocated twice", () => {
  let index = 0;
  for (const c of CONFIGS) {
    const caseIndex = index++;
    test(c.name, async () => {
      const seed = (BASE_SEED + Math.imul(caseIndex + 7, 0x9e3779b1)) >>> 0;
      const r = new Prng(seed);
      const history: string[] = [];
      try {
        await withTempDir(async (dir) => {
          const fixture = buildFixture(c);
          writeFileSync(join(dir, "backing.qcow2"), fixture.backingImage.bytes);
          const file = join(dir, "image.qcow2");
          const mem = new MemoryStorage(fixture.image.bytes, { name: "image.qcow2" });
          const delays = new Prng(seed ^ 0x5bd1e995);
          const random = (k: number) => delays.int(k);
          const openBacking = () =>
            Qcow2Image.open(new DelayStorage(fixture.backingImage.storage("backing.qcow2"), random), {
              readOnly: true,
              codecs: nodeCodecs,
            });
          const img = await Qcow2Image.open(new DelayStorage(mem, random), {
            readOnly: false,
            codecs: nodeCodecs,
            backing: await openBacking(),
            l2CacheBytes: c.l2CacheBytes,
          });
          const cs = img.clusterSize;
          const snapshot = fixture.image.expectedSnapshot(0, fixture.backingData);
          let model = new Uint8Array(c.size);
          await img.read(model, 0);
          assert.ok(
            Buffer.from(model).equals(Buffer.from(fixture.image.expected(fixture.backingData))),
            "the fixture reads as built",
          );
          try {
            for (let b = 0; b < c.bursts; b++) {
              const { kind, reqs } = makeBurst(r, c);
              const what = `burst ${b} (${kind}: ${reqs.map(describeReq).join(", ")})`;
              history.push(what);
              await Promise.all(reqs.map((q) => issue(img, q)));
              const after = new Uint8Array(c.size);
              await img.read(after, 0);
              checkBurst(model, after, reqs, c.extendedL2 ? cs / 32 : cs, what);
              model = after;
              await img.flush();
              writeFileSync(file, mem.bytes());
              qemuCheck(file, `after ${what} and a flush`, true);
              const snap = await Qcow2Image.open(new MemoryStorage(mem.bytes()), {
                readOnly: true,
                codecs: nodeCodecs,
                snapshot: "snap",
                backing: await openBacking(),
              });
              const s = new Uint8Array(c.size);
              try {
                await snap.read(s, 0);
              } finally {
                await snap.close();
              }
              assert.ok(Buffer.from(s).equals(Buffer.from(snapshot)), `after ${what}: the snapshot's contents changed`);
            }
          } finally {
            await img.close();
          }
          writeFileSync(file, mem.bytes());
          qemuCheck(file, "after close", false);
          const raw = join(dir, "image.raw");
          const cv = qemuImg(["convert", "-O", "raw", file, raw]);
          assert.equal(cv.code, 0, `qemu-img convert: ${cv.stderr}`);
          assert.ok(
            Buffer.from(readFileSync(raw)).equals(Buffer.from(model)),
            "qemu-img convert -O raw reads what qcowkit reads",
          );
          const sraw = join(dir, "snap.raw");
          const sv = qemuImg(["convert", "-O", "raw", "-l", "snapshot.name=snap", file, sraw]);
          assert.equal(sv.code, 0, `qemu-img convert -l snapshot.name=snap: ${sv.stderr}`);
          assert.ok(
            Buffer.from(readFileSync(sraw)).equals(Buffer.from(snapshot)),
            "qemu-img reads the snapshot unchanged",
          );
          rmSync(raw);
          rmSync(sraw);
        });
      } catch (e) {
        if (e instanceof Error) {
          e.message = `${e.message}\n[seed ${seed}: rerun with QCOWKIT_SEED=${BASE_SEED}; ${history.length} bursts]`;
        }
        throw e;
      }
    });
  }
});
