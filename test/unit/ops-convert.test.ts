/**
 * convert: the target holds exactly what reading the sources gives, whatever their layout; on a
 * target that already reads as zeros (targetZeroed) the zero runs cost no writes; several
 * sources are concatenated.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { QcowError } from "../../src/errors.js";
import type { BlockDevice } from "../../src/image/block-device.js";
import { openImage } from "../../src/image/open.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { convert } from "../../src/ops/convert.js";
import { writeEmptyQcow2 } from "../../src/ops/create.js";
import { buildImage, MapOpener, noise, pattern, readAll, TracingStorage } from "./build-image.js";

const CS = 4096;

/** Half-zero data: the first 2 KiB zero, the second non-zero (not skippable at 4 KiB -S). */
function halfZero(seed: number): Uint8Array {
  const b = new Uint8Array(CS);
  b.set(pattern(CS / 2, seed), CS / 2);
  return b;
}

function source() {
  return buildImage({
    size: 40 * CS,
    clusterBits: 12,
    clusters: [
      { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 3, kind: "zero-alloc", data: pattern(CS, 2) },
      { guestCluster: 5, kind: "data", data: new Uint8Array(CS) }, // allocated, all zeros
      { guestCluster: 6, kind: "data", data: halfZero(3) },
      { guestCluster: 7, kind: "compressed", data: pattern(CS, 4) },
      { guestCluster: 8, kind: "data", data: noise(CS, 5) },
      { guestCluster: 9, kind: "data", data: noise(CS, 6) },
      { guestCluster: 39, kind: "data", data: pattern(CS, 7) },
    ],
  });
}

/** Guest ranges of the source that hold non-zero bytes, in 4 KiB blocks. */
const NONZERO_BLOCKS = [0, 6, 7, 8, 9, 39];

async function target(size: number, fill = 0): Promise<{ dev: RawImage; storage: TracingStorage }> {
  const storage = new TracingStorage(new Uint8Array(size).fill(fill), { name: "target.raw" });
  return { dev: await RawImage.open(storage), storage };
}

async function openSource(): Promise<Qcow2Image> {
  return Qcow2Image.open(source().storage("src.qcow2"), { codecs: nodeCodecs });
}

test("convert: the target equals reading the source", async () => {
  const src = await openSource();
  const { dev, storage } = await target(src.size);
  await convert([src], dev, { targetZeroed: true });
  assert.deepEqual(storage.bytes(), await readAll(src));
  assert.deepEqual(storage.bytes(), source().expected());
});

test("convert: on a zeroed target, zero runs are not written", async () => {
  const src = await openSource();
  const { dev, storage } = await target(src.size);
  await convert([src], dev, { targetZeroed: true });
  assert.ok(storage.writes.length > 0);
  for (const w of storage.writes) {
    assert.equal(w.zero, false, `an all-zero write of ${w.length} bytes at ${w.offset}`);
    for (let b = Math.floor(w.offset / CS); b < Math.ceil((w.offset + w.length) / CS); b++) {
      assert.ok(NONZERO_BLOCKS.includes(b), `write at ${w.offset}+${w.length} touches zero block ${b}`);
    }
  }
  const written = new Set(
    storage.writes.flatMap((w) =>
      [...Array(Math.ceil(w.length / CS)).keys()].map((i) => Math.floor(w.offset / CS) + i),
    ),
  );
  assert.deepEqual(
    [...written].sort((x, y) => x - y),
    NONZERO_BLOCKS,
  );
});

test("convert: on a target that is not zeroed, zero runs are overwritten", async () => {
  const src = await openSource();
  const { dev, storage } = await target(src.size, 0xa5);
  await convert([src], dev);
  assert.deepEqual(storage.bytes(), source().expected());
});

test("convert: minSparse 0 writes everything as data", async () => {
  const src = await openSource();
  const { dev, storage } = await target(src.size);
  await convert([src], dev, { minSparse: 0, targetZeroed: true });
  assert.deepEqual(storage.bytes(), source().expected());
  // Allocated zeros are copied too (only unallocated/zero-flagged runs are left to the target).
  assert.ok(
    storage.writes.some((w) => w.offset <= 5 * CS && w.offset + w.length >= 6 * CS),
    "allocated zero cluster written",
  );
  const dirty = await target(src.size, 0xa5);
  await convert([await openSource()], dirty.dev, { minSparse: 0 });
  assert.deepEqual(dirty.storage.bytes(), source().expected());
});

test("convert: several sources are concatenated", async () => {
  const a = await openSource();
  const rawBytes = noise(3 * CS + 1000, 9); // a raw source whose size is not a cluster multiple
  const b = await RawImage.open(new MemoryStorage(rawBytes, { name: "b.raw" }));
  const cImg = buildImage({
    size: 5 * CS,
    clusterBits: 12,
    backingFile: "base.raw",
    backingFormat: "raw",
    clusters: [{ guestCluster: 2, kind: "compressed", data: pattern(CS, 10) }],
  });
  const base = pattern(5 * CS, 11);
  const c = await openImage("c.qcow2", {
    opener: new MapOpener(
      new Map([
        ["c.qcow2", cImg.bytes],
        ["base.raw", base],
      ]),
    ),
    codecs: nodeCodecs,
  });
  const sources: BlockDevice[] = [a, b, c, a];
  const total = sources.reduce((n, s) => n + s.size, 0);
  const want = new Uint8Array(total);
  let at = 0;
  for (const s of sources) {
    want.set(await readAll(s), at);
    at += s.size;
  }
  assert.deepEqual(want.subarray(a.size, a.size + rawBytes.length), rawBytes);
  for (const targetZeroed of [true, false]) {
    const { dev, storage } = await target(total, targetZeroed ? 0 : 0x5a);
    await convert(sources, dev, { targetZeroed });
    assert.deepEqual(storage.bytes(), want, `targetZeroed ${targetZeroed}`);
  }
});

test("convert: the same result with one request in flight or many", async () => {
  const big = buildImage({
    size: 3 * 1024 * 1024,
    clusterBits: 16,
    clusters: Array.from({ length: 40 }, (_, i) => ({
      guestCluster: i + (i > 20 ? 3 : 0),
      kind: i % 3 === 0 ? ("compressed" as const) : ("data" as const),
      data: i % 3 === 0 ? pattern(65536, i) : noise(65536, i),
    })),
  });
  for (const parallel of [1, 3, 32]) {
    const src = await Qcow2Image.open(big.storage(), { codecs: nodeCodecs });
    const { dev, storage } = await target(src.size);
    await convert([src], dev, { parallel, targetZeroed: true });
    assert.deepEqual(storage.bytes(), big.expected(), `parallel ${parallel}`);
  }
});

test("convert: progress ends at 1", async () => {
  const src = await openSource();
  const { dev } = await target(src.size);
  const seen: number[] = [];
  await convert([src], dev, { targetZeroed: true, onProgress: (f) => seen.push(f) });
  assert.equal(seen[seen.length - 1], 1);
  assert.ok(seen.every((f) => f >= 0 && f <= 1));
});

test("convert: into 64 KiB clusters, chunks that reach into the ranges around them count once", async () => {
  // The source's extents start and end inside the target's clusters: chunks are widened to
  // whole clusters, and progress must still add up to exactly the whole disk.
  const src = await openSource();
  const mem = new MemoryStorage(new Uint8Array(0));
  await writeEmptyQcow2(mem, { size: src.size, clusterSize: 65536 });
  const dst = await Qcow2Image.open(mem, { readOnly: false, codecs: nodeCodecs });
  const seen: number[] = [];
  await convert([src], dst, { targetZeroed: true, onProgress: (f) => seen.push(f) });
  await dst.close();
  assert.ok(
    seen.every((f, i) => f >= 0 && f <= 1 && (i === 0 || f >= seen[i - 1])),
    seen.join(" "),
  );
  assert.equal(seen[seen.length - 1], 1);
  const back = await Qcow2Image.open(new MemoryStorage(mem.bytes()), { codecs: nodeCodecs });
  assert.deepEqual(await readAll(back), await readAll(await openSource()));
});

test("convert: a read error in a source fails the convert with that error", async () => {
  const img = source();
  const bytes = img.bytes.slice();
  const l2 = img.active.l2Offsets.get(0) as number;
  new DataView(bytes.buffer).setUint32(l2 + 8 * 8 + 4, ((img.active.hostOffsets.get(8) as number) + 512) >>> 0);
  const src = await Qcow2Image.open(new MemoryStorage(bytes), { codecs: nodeCodecs });
  const { dev } = await target(src.size);
  await assert.rejects(
    convert([src], dev, { targetZeroed: true }),
    (e: unknown) => e instanceof QcowError && e.code === "corrupt",
  );
});

/**
 * A raw device whose reads and writes take `readMs` / `writeMs`. A source and its target share
 * one counter of chunks in flight: read started and not yet written.
 */
class SlowDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly = false;
  constructor(
    private readonly inner: RawImage,
    private readonly readMs: number,
    private readonly writeMs: number,
    private readonly flight: { now: number; max: number },
  ) {
    this.size = inner.size;
  }
  async read(dst: Uint8Array, offset: number): Promise<void> {
    this.flight.now++;
    this.flight.max = Math.max(this.flight.max, this.flight.now);
    if (this.readMs > 0) await new Promise((r) => setTimeout(r, this.readMs));
    await this.inner.read(dst, offset);
  }
  async write(src: Uint8Array, offset: number): Promise<void> {
    if (this.writeMs > 0) await new Promise((r) => setTimeout(r, this.writeMs));
    await this.inner.write(src, offset);
    this.flight.now--;
  }
  writeZeroes(offset: number, length: number): Promise<void> {
    return this.inner.writeZeroes(offset, length);
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  blockStatus(offset: number, length: number) {
    return this.inner.blockStatus(offset, length);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

test("convert: in order, reads run only as far ahead as the writes need (up to -m)", async () => {
  const size = 24 * 1024 * 1024; // 12 chunks of 2 MiB, each read once and written once
  const data = noise(size, 9);
  const run = async (readMs: number, writeMs: number, opts: { parallel?: number; outOfOrder?: boolean } = {}) => {
    const flight = { now: 0, max: 0 };
    const src = new SlowDevice(await RawImage.open(new MemoryStorage(data.slice())), readMs, 0, flight);
    const { dev, storage } = await target(size);
    await convert([src], new SlowDevice(dev, 0, writeMs, flight), { targetZeroed: true, minSparse: 0, ...opts });
    assert.deepEqual(storage.bytes(), data);
    return flight.max;
  };
  // Reading costs nothing beside writing: six chunks, read ahead while the writes queue.
  assert.equal(await run(0, 25), 6);
  // Slow reads: as many ahead as -m allows (8 by default, here 5).
  assert.equal(await run(25, 0), 8);
  assert.equal(await run(25, 0, { parallel: 5 }), 5);
  // -m 1 stays one.
  assert.equal(await run(0, 5, { parallel: 1 }), 1);
  // Out of order (-W): all of -m from the start.
  assert.equal(await run(0, 25, { outOfOrder: true, parallel: 4 }), 4);
});

/** A raw target whose writes take `ms`; it records each call in call order and the most in flight. */
class RecordingTarget extends SlowDevice {
  readonly calls: { kind: "write" | "zeroes"; offset: number; inFlight: number }[] = [];
  inFlight = 0;
  maxInFlight = 0;
  constructor(
    inner: RawImage,
    private readonly ms: number,
  ) {
    super(inner, 0, 0, { now: 0, max: 0 });
  }
  private async timed(kind: "write" | "zeroes", offset: number, op: () => Promise<void>): Promise<void> {
    this.calls.push({ kind, offset, inFlight: this.inFlight });
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await new Promise((r) => setTimeout(r, this.ms));
      await op();
    } finally {
      this.inFlight--;
    }
  }
  override write(src: Uint8Array, offset: number): Promise<void> {
    return this.timed("write", offset, () => super.write(src, offset));
  }
  override writeZeroes(offset: number, length: number): Promise<void> {
    return this.timed("zeroes", offset, () => super.writeZeroes(offset, length));
  }
}

test("convert: in order, a chunk of data is issued while the write before it runs; zero writes wait for all", async () => {
  const chunk = 2 * 1024 * 1024;
  const size = 8 * chunk;
  const run = async (data: Uint8Array, opts: { targetZeroed: boolean; parallel?: number }) => {
    const { dev, storage } = await target(size, opts.targetZeroed ? 0 : 0xee);
    const t = new RecordingTarget(dev, 10);
    await convert([await RawImage.open(new MemoryStorage(data.slice()))], t, { minSparse: 4096, ...opts });
    assert.deepEqual(storage.bytes(), data);
    const offsets = t.calls.map((c) => c.offset);
    assert.deepEqual(
      offsets,
      [...offsets].sort((a, b) => a - b),
      "calls in guest order",
    );
    return t;
  };
  // Data only: each chunk's write is issued while those before it are in flight, as many as the
  // chunks in flight (six: reading costs nothing here).
  const dense = noise(size, 11);
  const d = await run(dense, { targetZeroed: true });
  assert.equal(d.calls.length, 8);
  assert.equal(d.maxInFlight, 6);
  assert.ok(d.calls.slice(1).every((c) => c.inFlight >= 1));
  // With -m 1, one at a time.
  assert.equal((await run(dense, { targetZeroed: true, parallel: 1 })).maxInFlight, 1);
  // Zero blocks in every other chunk, on a target that is not zeroed: the zero writes, and the
  // chunks that hold them, start once every earlier write is done.
  const sparse = dense.slice();
  for (let at = chunk; at < size; at += 2 * chunk) sparse.fill(0, at + 8192, at + 16384);
  const s = await run(sparse, { targetZeroed: false });
  assert.equal(s.calls.filter((c) => c.kind === "zeroes").length, 4);
  assert.equal(s.maxInFlight, 1);
  // The same chunks on a zeroed target skip the zeros: a chunk's two runs of data are issued
  // together, while the chunks before it are in flight (six chunks: nine writes).
  const z = await run(sparse, { targetZeroed: true });
  assert.equal(z.calls.length, 12);
  assert.ok(z.calls.every((c) => c.kind === "write"));
  assert.equal(z.maxInFlight, 9);
});
