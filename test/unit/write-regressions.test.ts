/**
 * Minimal, deterministic reproductions of write-path bugs that the randomized tests
 * (write-random, write-crash, write-concurrency) found. Each test states what must hold; the
 * storage wrapper below holds a chosen write back so that a race happens on every run.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { constants, deflateRawSync } from "node:zlib";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import type { Storage } from "../../src/io/storage.js";
import { FileStorage, openImageFile } from "../../src/node.js";
import { writeEmptyQcow2 } from "../../src/ops/create.js";
import { buildImage, noise, qemuImg } from "./build-image.js";

const KiB = 1024;
const MiB = 1024 * KiB;

function filled(n: number, v: number): Uint8Array {
  return new Uint8Array(n).fill(v);
}

function deflate(data: Uint8Array): Uint8Array {
  return deflateRawSync(data, { windowBits: 12, level: constants.Z_DEFAULT_COMPRESSION });
}

/** `qemu-img check --output=json` on the bytes: [corruptions + check errors, leaks, raw output]. */
function check(
  bytes: Uint8Array,
  files: Record<string, Uint8Array> = {},
): { errors: number; leaks: number; text: string } {
  return withTempDirSync((dir) => {
    for (const [name, b] of Object.entries(files)) writeFileSync(join(dir, name), b);
    const file = join(dir, "image.qcow2");
    writeFileSync(file, bytes);
    const r = qemuImg(["check", "--output=json", file]);
    const j = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number; "check-errors"?: number };
    return { errors: (j.corruptions ?? 0) + (j["check-errors"] ?? 0), leaks: j.leaks ?? 0, text: r.stdout + r.stderr };
  });
}

function withTempDirSync<T>(fn: (dir: string) => T): T {
  const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
  try {
    return fn(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A storage whose writes matching a predicate wait until released, or fail. */
class GateStorage implements Storage {
  private gates: {
    kind: "read" | "write";
    match: (offset: number, length: number) => boolean;
    arrived: () => void;
    wait: Promise<void>;
  }[] = [];
  private failing: ((offset: number, length: number) => boolean)[] = [];
  /** Writes whose buffer changed between the call and the write itself (held by a gate). */
  changedInFlight = 0;
  constructor(private readonly inner: MemoryStorage) {}
  /** Fails the next write matching `match` with an I/O error. */
  failWhen(match: (offset: number, length: number) => boolean): void {
    this.failing.push(match);
  }
  get name() {
    return this.inner.name;
  }
  get readOnly() {
    return this.inner.readOnly;
  }
  /** Holds the next write (or read) matching `match`: `arrived` resolves when it is issued. */
  hold(
    match: (offset: number, length: number) => boolean,
    kind: "read" | "write" = "write",
  ): { arrived: Promise<void>; release: () => void } {
    let arrived!: () => void;
    let release!: () => void;
    const a = new Promise<void>((r) => (arrived = r));
    const wait = new Promise<void>((r) => (release = r));
    this.gates.push({ kind, match, arrived, wait });
    return { arrived: a, release };
  }
  private async gate(kind: "read" | "write", offset: number, length: number): Promise<void> {
    const i = this.gates.findIndex((g) => g.kind === kind && g.match(offset, length));
    if (i < 0) return;
    const [g] = this.gates.splice(i, 1);
    g.arrived();
    await g.wait;
  }
  size() {
    return this.inner.size();
  }
  async read(dst: Uint8Array, offset: number): Promise<number> {
    await this.gate("read", offset, dst.length);
    return this.inner.read(dst, offset);
  }
  async write(src: Uint8Array, offset: number): Promise<void> {
    const i = this.failing.findIndex((match) => match(offset, src.length));
    if (i >= 0) {
      this.failing.splice(i, 1);
      throw new QcowError("io", `Could not write '${this.name}' at offset ${offset}: Input/output error`);
    }
    const before = src.slice();
    await this.gate("write", offset, src.length);
    if (!before.every((v, k) => v === src[k])) this.changedInFlight++;
    await this.inner.write(src, offset);
  }
  flush() {
    return this.inner.flush();
  }
  truncate(size: number) {
    return this.inner.truncate(size);
  }
  close() {
    return this.inner.close();
  }
}

async function readAt(img: Qcow2Image, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length);
  await img.read(b, offset);
  return b;
}

describe("write path regressions", () => {
  test("compressed data is never packed into a cluster freed and reallocated since", async () => {
    const cs = 4 * KiB;
    const s = new MemoryStorage();
    await writeEmptyQcow2(s, { size: 1 * MiB, clusterSize: cs });
    const img = await Qcow2Image.open(s, { readOnly: false, codecs: nodeCodecs });
    // Compressed data starts a host cluster H and leaves room after it.
    await img.writeCompressed(0, deflate(filled(cs, 7)));
    // Overwriting guest cluster 0 frees H; the flush applies the decrement.
    await img.write(filled(cs, 1), 0);
    await img.flush();
    // H is the first free cluster again: guest cluster 1's data goes there.
    await img.write(filled(cs, 2), cs);
    // The next compressed cluster must not go into the rest of H.
    await img.writeCompressed(2, deflate(filled(cs, 9)));
    await img.flush();
    assert.deepEqual(await readAt(img, cs, cs), filled(cs, 2), "guest cluster 1 keeps its data");
    assert.deepEqual(await readAt(img, 2 * cs, cs), filled(cs, 9));
    await img.close();
    const c = check(s.bytes());
    assert.equal(c.errors, 0, c.text);
    assert.equal(c.leaks, 0, c.text);
  });

  test("refcount_bits=1: two compressed clusters do not share a host cluster (its refcount cannot reach 2)", async () => {
    const cs = 4 * KiB;
    const s = new MemoryStorage();
    await writeEmptyQcow2(s, { size: 1 * MiB, clusterSize: cs, refcountBits: 1 });
    const img = await Qcow2Image.open(s, { readOnly: false, codecs: nodeCodecs });
    await img.writeCompressed(0, deflate(filled(cs, 7)));
    await img.writeCompressed(1, deflate(filled(cs, 8)));
    assert.deepEqual(await readAt(img, 0, cs), filled(cs, 7));
    assert.deepEqual(await readAt(img, cs, cs), filled(cs, 8));
    await img.close();
    const c = check(s.bytes());
    assert.equal(c.errors + c.leaks, 0, c.text);
  });

  test("a compressed cluster written where an earlier compressed cluster was reads its own data", async () => {
    const cs = 4 * KiB;
    const s = new MemoryStorage();
    await writeEmptyQcow2(s, { size: 1 * MiB, clusterSize: cs });
    const img = await Qcow2Image.open(s, { readOnly: false, codecs: nodeCodecs });
    // A: about half a cluster compressed, at the start of host cluster H; read part of it (a
    // partial read keeps the decompressed cluster in the cache).
    const a = new Uint8Array(cs);
    a.set(noise(2000, 1));
    await img.writeCompressed(0, deflate(a));
    assert.deepEqual(await readAt(img, 0, 512), a.subarray(0, 512));
    // Free H, then B, too large for the rest of H, starts a new host cluster: H again.
    await img.write(filled(cs, 1), 0);
    await img.flush();
    const b = new Uint8Array(cs);
    b.set(noise(2200, 2));
    await img.writeCompressed(1, deflate(b));
    assert.deepEqual(await readAt(img, cs, 512), b.subarray(0, 512), "guest cluster 1 reads B, not the cached A");
    assert.deepEqual(await readAt(img, cs, cs), b, "guest cluster 1 reads B, not the cached A");
    await img.close();
  });

  test("v3 image with 512-byte clusters and a backing file can be created (QEMU leaves out the feature table)", async () => {
    const backing = buildImage({
      size: 1 * MiB,
      clusterBits: 16,
      clusters: [{ guestCluster: 0, kind: "data", data: filled(64 * KiB, 5) }],
    });
    for (const clusterSize of [512, 1024]) {
      const s = new MemoryStorage();
      await writeEmptyQcow2(s, { size: 1 * MiB, clusterSize, backingFile: "backing.qcow2", backingFormat: "qcow2" });
      const c = check(s.bytes(), { "backing.qcow2": backing.bytes });
      assert.equal(c.errors + c.leaks, 0, c.text);
      const img = await Qcow2Image.open(s, {
        readOnly: true,
        backing: await Qcow2Image.open(backing.storage("backing.qcow2")),
      });
      assert.equal(img.backingName, "backing.qcow2");
      assert.deepEqual(await readAt(img, 0, 512), filled(512, 5));
      await img.close();
    }
  });

  test("an L2 cache smaller than the dirty tables loses no table (l2CacheBytes of one table)", async () => {
    const s = new MemoryStorage();
    await writeEmptyQcow2(s, { size: 1 * MiB, clusterSize: 512 });
    const img = await Qcow2Image.open(s, { readOnly: false, l2CacheBytes: 512 });
    // 64 KiB with 512-byte clusters spans two L2 tables (64 entries each).
    await img.write(filled(64 * KiB, 7), 0);
    assert.deepEqual(await readAt(img, 0, 64 * KiB), filled(64 * KiB, 7), "before close");
    await img.close();
    const again = await Qcow2Image.open(new MemoryStorage(s.bytes()));
    assert.deepEqual(await readAt(again, 0, 64 * KiB), filled(64 * KiB, 7), "after reopening");
    const c = check(s.bytes());
    assert.equal(c.errors + c.leaks, 0, c.text);
  });

  test("copy-on-write of an allocating write does not undo a concurrent in-place write (extended L2)", async () => {
    const cs = 64 * KiB;
    const mem = new MemoryStorage();
    await writeEmptyQcow2(mem, { size: 1 * MiB, clusterSize: cs, extendedL2: true });
    const g = new GateStorage(mem);
    const img = await Qcow2Image.open(g, { readOnly: false });
    // Subcluster 0 (2 KiB) allocated.
    await img.write(filled(2048, 0x11), 0);
    // B touches subclusters 0 (allocated) and 1 (not): an allocating write whose COW copies
    // subcluster 0. Hold its data write (the next write of all) after it has read what it copies.
    const held = g.hold(() => true);
    const b = img.write(filled(1000, 0x22), 1500);
    await held.arrived;
    // A writes bytes B does not cover, in place into subcluster 0.
    await img.write(filled(10, 0x33), 100);
    held.release();
    await b;
    assert.deepEqual(await readAt(img, 100, 10), filled(10, 0x33), "A's bytes survive B's copy-on-write");
    assert.deepEqual(await readAt(img, 1500, 1000), filled(1000, 0x22));
    await img.close();
  });

  test("copy-on-write of an allocating write does not undo a concurrent in-place write (whole clusters)", async () => {
    const cs = 4 * KiB;
    const mem = new MemoryStorage();
    await writeEmptyQcow2(mem, { size: 1 * MiB, clusterSize: cs });
    const g = new GateStorage(mem);
    const img = await Qcow2Image.open(g, { readOnly: false });
    // C allocates guest cluster 1; hold its data write so that B queues behind it.
    const heldC = g.hold((_offset, length) => length === cs);
    const c = img.write(filled(100, 0x44), cs);
    await heldC.arrived;
    // B found cluster 1 unallocated: it waits for C, then finds it allocated and copies it.
    const heldB = g.hold(() => true);
    const b = img.write(filled(500, 0x22), cs + 1000);
    heldC.release();
    await c;
    await heldB.arrived;
    // A writes in place into cluster 1, bytes that B does not cover.
    await img.write(filled(10, 0x33), cs + 3000);
    heldB.release();
    await b;
    assert.deepEqual(await readAt(img, cs + 3000, 10), filled(10, 0x33), "A's bytes survive B's copy-on-write");
    assert.deepEqual(await readAt(img, cs, 100), filled(100, 0x44));
    assert.deepEqual(await readAt(img, cs + 1000, 500), filled(500, 0x22));
    await img.close();
  });

  test("a failed write's copy-on-write buffers are reused only once its other writes are done", async () => {
    // One allocating write in two pieces, each copied-on-write in a pooled buffer: the last
    // subcluster of an allocated cluster, and the first of a new one elsewhere in the file. The
    // first piece's write fails; the second is still in flight, and its buffer must not go to
    // the next request (which would fill it) before it is done.
    const cs = 64 * KiB;
    const sc = cs / 32;
    const mem = new MemoryStorage();
    await writeEmptyQcow2(mem, { size: 1 * MiB, clusterSize: cs, extendedL2: true });
    const g = new GateStorage(mem);
    const img = await Qcow2Image.open(g, { readOnly: false });
    await img.write(filled(sc, 0x11), 0); // guest cluster 0, subcluster 0
    await img.write(filled(sc, 0x11), 5 * cs); // after it in the file: cluster 1 goes elsewhere
    const host = (await img.mapping(0, cs)).hostOffset;
    assert.ok(host !== undefined);
    const failing = host + cs - sc;
    g.failWhen((offset) => offset === failing);
    const held = g.hold((offset, length) => offset !== failing && length === sc);
    const a = img.write(filled(2000, 0x22), cs - 1000).then(
      () => undefined,
      (e: unknown) => e,
    );
    await held.arrived;
    // A small write into a new subcluster takes a buffer from the pool and fills it.
    const b = img.write(filled(100, 0x33), 7 * cs + 100);
    await new Promise((r) => setTimeout(r, 20));
    held.release();
    assert.match(String(await a), /Input\/output error/, "the first write fails");
    await b;
    assert.equal(g.changedInFlight, 0, "a buffer was changed while its write was in flight");
    const want = new Uint8Array(sc);
    want.fill(0x33, 100, 200);
    assert.deepEqual(await readAt(img, 7 * cs, sc), want);
    assert.deepEqual(await readAt(img, 0, sc), filled(sc, 0x11));
    await img.close();
  });

  test("copy-on-write around a small write copies what the guest saw: zeros, or the backing file's bytes", async () => {
    const cs = 64 * KiB;
    // No backing file: the buffers of earlier copies-on-write are reused, dirty; the bytes
    // around each write must still be zeros.
    const s = new MemoryStorage();
    await writeEmptyQcow2(s, { size: 1 * MiB, clusterSize: cs });
    const img = await Qcow2Image.open(s, { readOnly: false });
    await img.write(filled(3000, 0xee), 0);
    for (const at of [cs + 5000, 2 * cs + 40, 4 * cs - 100]) await img.write(filled(100, 0x11), at);
    const expect = new Uint8Array(4 * cs);
    expect.fill(0xee, 0, 3000);
    for (const at of [cs + 5000, 2 * cs + 40, 4 * cs - 100]) expect.fill(0x11, at, at + 100);
    assert.deepEqual(await readAt(img, 0, 4 * cs), expect);
    await img.close();
    // Over a backing file: a zero-flagged cluster copies zeros, an unallocated one the backing bytes.
    const backing = buildImage({
      size: 1 * MiB,
      clusterBits: 16,
      clusters: [1, 2].map((g) => ({ guestCluster: g, kind: "data" as const, data: filled(cs, 5 + g) })),
    });
    const o = new MemoryStorage();
    await writeEmptyQcow2(o, { size: 1 * MiB, clusterSize: cs, backingFile: "backing.qcow2", backingFormat: "qcow2" });
    const over = await Qcow2Image.open(o, {
      readOnly: false,
      backing: await Qcow2Image.open(backing.storage("backing.qcow2")),
    });
    await over.writeZeroes(cs, cs);
    await over.write(filled(100, 0x22), cs + 1000);
    await over.write(filled(100, 0x33), 2 * cs + 1000);
    const want = new Uint8Array(2 * cs);
    want.fill(0x22, 1000, 1100);
    want.fill(7, cs);
    want.fill(0x33, cs + 1000, cs + 1100);
    assert.deepEqual(await readAt(over, cs, 2 * cs), want);
    await over.close();
    const c = check(o.bytes(), { "backing.qcow2": backing.bytes });
    assert.equal(c.errors + c.leaks, 0, c.text);
  });

  test("data_file_raw: a discarded range reads as zeros in the raw data file too", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
    try {
      const file = join(dir, "image.qcow2");
      const data = join(dir, "data.raw");
      const s = await FileStorage.open(file, { readOnly: false, create: true });
      await writeEmptyQcow2(s, { size: 1 * MiB, dataFile: "data.raw", dataFileRaw: true });
      await s.close();
      writeFileSync(data, new Uint8Array(1 * MiB));
      const img = (await openImageFile(file, { readOnly: false })) as Qcow2Image;
      await img.writer?.preallocate(false);
      await img.write(filled(64 * KiB, 0x55), 0);
      await img.discard(0, 64 * KiB);
      assert.deepEqual(await readAt(img, 0, 16), filled(16, 0), "the guest reads zeros");
      await img.close();
      assert.deepEqual(
        new Uint8Array(readFileSync(data).subarray(0, 64 * KiB)),
        filled(64 * KiB, 0),
        "data.raw is the guest disk",
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("one allocation of as many clusters as a refcount block covers, in space no block covers yet, ends", () => {
    // 512-byte clusters with refcount_bits=64: a refcount block covers 64 clusters, and an L2
    // table maps 64, so a 32 KiB write at an L2 table boundary allocates 64 clusters at once.
    // Run in a child process: an endless loop of resolved promises would starve this one.
    const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
    try {
      const mod = (p: string) => JSON.stringify(new URL(`../../src/${p}`, import.meta.url).href);
      const script = join(dir, "repro.mjs");
      writeFileSync(
        script,
        [
          `import { writeEmptyQcow2 } from ${mod("ops/create.js")};`,
          `import { MemoryStorage } from ${mod("io/memory.js")};`,
          `import { Qcow2Image } from ${mod("image/qcow2.js")};`,
          "const s = new MemoryStorage();",
          "await writeEmptyQcow2(s, { size: 4 << 20, clusterSize: 512, refcountBits: 64 });",
          "const img = await Qcow2Image.open(s, { readOnly: false });",
          "await img.write(new Uint8Array(32 * 1024).fill(9), 1 << 20);",
          "const b = new Uint8Array(32 * 1024); await img.read(b, 1 << 20);",
          "await img.close();",
          "console.log(b.every((x) => x === 9) ? 'done' : 'wrong data');",
        ].join("\n"),
      );
      const r = spawnSync(process.execPath, [script], { timeout: 15_000, encoding: "utf8" });
      assert.equal(r.signal, null, `the write did not finish within 15 s (killed: ${r.signal})`);
      assert.equal(r.stdout.trim(), "done", r.stderr);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a read in flight while its cluster is discarded and reused returns no other guest data", async () => {
    const cs = 4 * KiB;
    const mem = new MemoryStorage();
    await writeEmptyQcow2(mem, { size: 1 * MiB, clusterSize: cs });
    const g = new GateStorage(mem);
    const img = await Qcow2Image.open(g, { readOnly: false });
    await img.write(filled(cs, 0x11), cs);
    await img.flush();
    // R maps guest cluster 1 to its host cluster X, then waits to read X.
    const held = g.hold((_offset, length) => length === cs, "read");
    const r = readAt(img, cs, cs);
    await held.arrived;
    // Meanwhile guest cluster 1 is discarded, the flush frees X, and a new write reuses it.
    await img.discard(cs, cs);
    await img.flush();
    await img.write(filled(cs, 0x99), 5 * cs);
    held.release();
    const got = await r;
    const ok = got.every((b) => b === 0x11) || got.every((b) => b === 0);
    assert.ok(
      ok,
      `R reads ${got[0]}: neither the data before the discard (0x11) nor zeros (0x99 is guest cluster 5's)`,
    );
    await img.close();
  });
});
