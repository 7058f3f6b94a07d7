/**
 * FileStorage's I/O paths on a real file: small reads served from the page cache on the calling
 * thread (preadv2 RWF_NOWAIT), larger ones through the thread pool, short reads at the end of the
 * file, and large writes that first fallocate their range — which must leave the rest of a
 * sparse file sparse and the file exactly as long as the writes make it.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { QcowError } from "../../src/errors.js";
import { FileStorage, pageCacheVisible } from "../../src/io/file.js";
import { noise } from "./build-image.js";

const dir = mkdtempSync(path.join(tmpdir(), "qcowkit-io-file-"));
after(() => rmSync(dir, { recursive: true, force: true }));

async function collect(s: FileStorage): Promise<[number, number, boolean][]> {
  const out: [number, number, boolean][] = [];
  for await (const r of s.dataRuns(0, await s.size())) out.push([r.start, r.length, r.data]);
  return out;
}

test("FileStorage: reads of every size give the file's bytes, short at the end of the file", async () => {
  const file = path.join(dir, "read.bin");
  const bytes = noise(3 * 1024 * 1024 + 123, 1);
  writeFileSync(file, bytes);
  const s = await FileStorage.open(file);
  try {
    // Below and above the size read from the page cache on the calling thread (64 KiB).
    for (const [offset, length] of [
      [0, 1],
      [4095, 4097],
      [70000, 65536],
      [70001, 65537],
      [1, 2 * 1024 * 1024],
      [bytes.length - 10, 10],
    ]) {
      const dst = new Uint8Array(length);
      assert.equal(await s.read(dst, offset), length, `${offset}+${length}`);
      assert.deepEqual(dst, bytes.subarray(offset, offset + length), `${offset}+${length}`);
    }
    for (const length of [100, 200 * 1024]) {
      const dst = new Uint8Array(length).fill(0xee);
      assert.equal(await s.read(dst, bytes.length - 50), 50, `short read of ${length}`);
      assert.deepEqual(dst.subarray(0, 50), bytes.subarray(bytes.length - 50));
      assert.equal(await s.read(dst, bytes.length + 4096), 0, "past the end");
    }
  } finally {
    await s.close();
  }
});

test("FileStorage: large writes into a sparse file keep the other holes and the file's length", async () => {
  const file = path.join(dir, "sparse.bin");
  const MiB = 1024 * 1024;
  const s = await FileStorage.open(file, { readOnly: false, create: true, locking: "none" });
  const a = noise(2 * MiB, 2);
  const b = noise(128 * 1024, 3);
  const small = noise(4096, 4);
  try {
    await s.truncate(16 * MiB);
    await s.write(a, 4 * MiB);
    await s.write(b, 10 * MiB);
    await s.write(small, 12 * MiB);
    assert.equal(statSync(file).size, 16 * MiB);
    // Past the end: the file grows to exactly the end of the write.
    await s.write(b, 20 * MiB);
    assert.equal(statSync(file).size, 20 * MiB + b.length);
    await s.flush();
    const runs = await collect(s);
    // Holes stay where nothing was written (file systems allocate in blocks of up to 64 KiB).
    const dataAt = (offset: number) =>
      runs.some(([start, length, data]) => data && start <= offset && offset < start + length);
    for (const hole of [0, 2 * MiB, 8 * MiB, 14 * MiB, 18 * MiB]) assert.equal(dataAt(hole), false, `hole at ${hole}`);
    for (const at of [4 * MiB, 6 * MiB - 1, 10 * MiB, 12 * MiB, 20 * MiB])
      assert.equal(dataAt(at), true, `data at ${at}`);
  } finally {
    await s.close();
  }
  const content = readFileSync(file);
  const expected = new Uint8Array(20 * MiB + b.length);
  expected.set(a, 4 * MiB);
  expected.set(b, 10 * MiB);
  expected.set(small, 12 * MiB);
  expected.set(b, 20 * MiB);
  assert.ok(Buffer.compare(content, expected) === 0, "file content");
});

test("FileStorage: writes of every size, on the calling thread (up to 64 KiB) or the pool, land whole", async () => {
  const file = path.join(dir, "writes.bin");
  const s = await FileStorage.open(file, { readOnly: false, create: true, locking: "none" });
  const expected = new Uint8Array(3 * 1024 * 1024);
  try {
    let at = 0;
    let seed = 10;
    // Sizes around the 64 KiB line, at odd offsets, some overwriting what came before.
    for (const length of [1, 511, 4096, 65535, 65536, 65537, 200_000, 1_000_000]) {
      const data = noise(length, seed++);
      await s.write(data, at);
      expected.set(data, at);
      at += Math.floor(length / 2) + 7;
    }
    // Many small writes in flight at once: each is whole, the last one to a place wins.
    const burst = Array.from({ length: 64 }, (_, i) => noise(4096, 100 + i));
    await Promise.all(burst.map((d, i) => s.write(d, (i % 16) * 4096 + 123)));
    for (let i = 48; i < 64; i++) expected.set(burst[i], (i % 16) * 4096 + 123);
  } finally {
    await s.close();
  }
  const content = readFileSync(file);
  assert.ok(Buffer.compare(content, expected.subarray(0, content.length)) === 0, "file content");
});

test("FileStorage: a failed write, small or large, is reported with the file and offset", async () => {
  const file = path.join(dir, "closed.bin");
  writeFileSync(file, new Uint8Array(8192));
  const s = await FileStorage.open(file, { readOnly: false, locking: "none" });
  await s.close();
  // Writing through a closed descriptor: EBADF, from the small (calling-thread) path and the pool.
  for (const length of [4096, 128 * 1024]) {
    await assert.rejects(
      s.write(new Uint8Array(length), 4096),
      (e: unknown) => e instanceof QcowError && /closed\.bin' at offset 4096: Bad file descriptor$/.test(e.message),
    );
  }
});

test("FileStorage: a device that refuses a write (/dev/full) gives ENOSPC, from every write path", async () => {
  const s = await FileStorage.open("/dev/full", { readOnly: false, locking: "none" });
  try {
    // The calling thread (4 KiB), and the pool (the addon's writeSerial: 128 KiB, 2 MiB).
    for (const length of [4096, 128 * 1024, 2 * 1024 * 1024]) {
      await assert.rejects(s.write(new Uint8Array(length).fill(1), 8192), (e: unknown) => {
        assert.ok(e instanceof QcowError);
        assert.equal(e.message, "Could not write to '/dev/full' at offset 8192: No space left on device");
        assert.equal((e.cause as NodeJS.ErrnoException).code, "ENOSPC"); // what an NBD client is told
        return true;
      });
    }
  } finally {
    await s.close();
  }
});

test("FileStorage: large writes in flight together all land", async () => {
  const file = path.join(dir, "large-together.bin");
  const s = await FileStorage.open(file, { readOnly: false, create: true, locking: "none" });
  const mib = 1024 * 1024;
  const data = noise(8 * mib, 21);
  try {
    // Out of order, all at once: one at a time per file inside, each whole.
    await Promise.all([5, 0, 7, 2, 1, 6, 3, 4].map((i) => s.write(data.subarray(i * mib, (i + 1) * mib), i * mib)));
  } finally {
    await s.close();
  }
  assert.ok(Buffer.compare(readFileSync(file), data) === 0);
});

test("FileStorage: a second close, and reads and writes after close, do not touch a descriptor reused by another open", async () => {
  const file = path.join(dir, "close.bin");
  writeFileSync(file, noise(8192, 3));
  const a = await FileStorage.open(file);
  await a.close();
  const b = await FileStorage.open(file); // may get a's descriptor number
  try {
    await a.close();
    // Nor do reads and writes of the closed storage reach b's file.
    await assert.rejects(a.read(new Uint8Array(16), 0), /Could not read from/);
    const other = path.join(dir, "close-w.bin");
    writeFileSync(other, new Uint8Array(16));
    const w = await FileStorage.open(other, { readOnly: false });
    await w.close();
    await assert.rejects(w.write(new Uint8Array(16).fill(0xaa), 0), /Could not write to/);
    const dst = new Uint8Array(8192);
    assert.equal(await b.read(dst, 0), 8192);
    assert.deepEqual(dst, new Uint8Array(readFileSync(file)));
    assert.equal(await b.size(), 8192);
  } finally {
    await b.close();
  }
});

test("FileStorage: size, truncate and flush on the descriptor; a missing file is a clear error", async () => {
  const file = path.join(dir, "trunc.bin");
  writeFileSync(file, noise(10000, 4));
  const s = await FileStorage.open(file, { readOnly: false });
  try {
    assert.equal(await s.size(), 10000);
    await s.truncate(1 << 20);
    await s.flush();
    assert.equal(await s.size(), 1 << 20);
    assert.equal(statSync(file).size, 1 << 20);
    assert.ok((await s.allocatedSize()) < 1 << 20, "the grown part is a hole");
  } finally {
    await s.close();
  }
  await assert.rejects(FileStorage.open(path.join(dir, "none.bin")), (e: unknown) => {
    assert.ok(e instanceof QcowError);
    assert.equal(e.message, `Could not open '${path.join(dir, "none.bin")}': No such file or directory`);
    return true;
  });
});

test("tuneMalloc: glibc takes both settings (in a child process, not the test runner's)", () => {
  const file = new URL("../../src/io/file.js", import.meta.url).href;
  const code = `import(${JSON.stringify(file)}).then((m) => {
    const ok = [m.tuneMalloc({ arenaMax: 2 }), m.tuneMalloc({ mmapThreshold: 131072 }), m.tuneMalloc({})];
    const refused = [{ arenaMax: 0 }, { mmapThreshold: -1 }].map((o) => {
      try { m.tuneMalloc(o); return false; } catch (e) { return e instanceof TypeError; }
    });
    console.log(JSON.stringify({ ok, refused }));
  });`;
  const r = spawnSync(process.execPath, ["-e", code], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  // This machine and CI run glibc with the addon built; elsewhere the calls report false.
  assert.deepEqual(JSON.parse(r.stdout), { ok: [true, true, true], refused: [true, true] });
});

test("setV8FlagNatively: the flag takes effect (in a child process, not the test runner's)", () => {
  const file = new URL("../../src/io/file.js", import.meta.url).href;
  // V8's natives syntax compiles only once --allow-natives-syntax is set.
  const code = (set: boolean) => `import(${JSON.stringify(file)}).then((m) => {
    const set = ${set} ? m.setV8FlagNatively("--allow-natives-syntax") : false;
    let compiled = true;
    try { new Function("return %IsBeingInterpreted()"); } catch { compiled = false; }
    console.log(JSON.stringify({ set, compiled }));
  });`;
  const run = (set: boolean) => {
    const r = spawnSync(process.execPath, ["-e", code(set)], { encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout);
  };
  assert.deepEqual(run(false), { set: false, compiled: false });
  assert.deepEqual(run(true), { set: true, compiled: true });
});

test("tuneMalloc: with a fixed mmap threshold, freed megabyte buffers leave the process", () => {
  // glibc's default: once a 1 MiB block was freed, the next ones come from its heap, and what is
  // freed there stays resident. With the threshold fixed, each is unmapped when freed.
  const addon = new URL("../../../build/Release/qcowkit_seek.node", import.meta.url).pathname;
  const code = (fixed: boolean) => `
    const m = require(${JSON.stringify(addon)});
    if (${fixed} && !m.mallocOption("mmapThreshold", 131072)) throw new Error("not taken");
    const rss = () => Number(/VmRSS:\\s+(\\d+)/.exec(require("fs").readFileSync("/proc/self/status", "utf8"))[1]);
    globalThis.gc();
    const base = rss();
    (async () => {
      for (let round = 0; round < 4; round++) {
        // 16 buffers of 1 MiB, written so that their pages are resident, then dropped.
        let keep = [];
        for (let i = 0; i < 16; i++) keep.push(new Uint8Array(1 << 20).fill(round + 1));
        keep = null;
        globalThis.gc();
        await new Promise((r) => setTimeout(r, 10));
      }
      console.log(rss() - base);
    })();`;
  const stayed = (fixed: boolean): number => {
    const r = spawnSync(
      process.execPath,
      // Backing stores freed by the collection itself, not by a sweeper thread some time after.
      ["--expose-gc", "--no-concurrent-array-buffer-sweeping", "-e", code(fixed)],
      { encoding: "utf8" },
    );
    assert.equal(r.status, 0, r.stderr);
    return Number(r.stdout);
  };
  // KiB still resident after the buffers were freed: glibc's default keeps most of the 16 MiB.
  const byDefault = stayed(false);
  const fixed = stayed(true);
  assert.ok(byDefault > 8192, `default threshold: only ${byDefault} KiB stayed`);
  assert.ok(fixed < 4096, `fixed threshold: ${fixed} KiB stayed`);
});

test("FileStorage.sendCached: a header and a file range reach the socket whole, the rest handed back in order", {
  timeout: 30_000,
}, async () => {
  const file = path.join(dir, "send.bin");
  const bytes = Buffer.from(noise(24 * 1024 * 1024, 5));
  writeFileSync(file, bytes); // just written: in the page cache
  const s = await FileStorage.open(file);
  const sockPath = path.join(dir, "send.sock");
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(sockPath, r));
  const accepted = new Promise<net.Socket>((r) => server.once("connection", r));
  const client = net.connect(sockPath);
  const ours = await accepted;
  const fd = (ours as unknown as { _handle: { fd: number } })._handle.fd;
  const received: Buffer[] = [];
  client.on("data", (d) => received.push(d));
  const take = async (n: number): Promise<Buffer> => {
    while (received.reduce((t, b) => t + b.length, 0) < n) await new Promise((r) => setTimeout(r, 5));
    const all = Buffer.concat(received.splice(0));
    if (all.length > n) received.push(all.subarray(n));
    return all.subarray(0, n);
  };
  try {
    const header = Buffer.from("HEADER--");
    if (!pageCacheVisible()) {
      // A kernel that cannot tell what is cached (before Linux 6.5): nothing is ever sent so.
      assert.equal(s.sendCached(fd, header, 1000, 5000), undefined);
      return;
    }
    // Small: all of it goes at once.
    assert.deepEqual(s.sendCached(fd, header, 1000, 5000), []);
    assert.ok((await take(8 + 5000)).equals(Buffer.concat([header, bytes.subarray(1000, 6000)])));
    // Past the end of the file: no pages in memory, nothing sent.
    assert.equal(s.sendCached(fd, header, bytes.length, 4096), undefined);
    // More than the socket holds while the client does not read: the rest comes back, to be sent
    // next; together they are the range.
    client.pause();
    const rest = s.sendCached(fd, header, 4096, 20 * 1024 * 1024) ?? assert.fail("nothing sent");
    assert.ok(rest.length > 0, "the socket took all of 20 MiB");
    for (const part of rest) ours.write(part);
    client.resume();
    assert.ok(
      (await take(8 + 20 * 1024 * 1024)).equals(Buffer.concat([header, bytes.subarray(4096, 4096 + 20 * 1024 * 1024)])),
    );
  } finally {
    client.destroy();
    ours.destroy();
    server.close();
    await s.close();
  }
});
