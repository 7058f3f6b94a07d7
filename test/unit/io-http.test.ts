/**
 * HttpStorage against a local server: bytes, request counts (coalescing and caching), the
 * server that ignores ranges, retries, permanent errors and files that change underneath.
 */
import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, beforeEach, test } from "node:test";
import { QcowError } from "../../src/errors.js";
import { openImage } from "../../src/image/open.js";
import { HttpStorage, type HttpStorageOptions, httpOpener } from "../../src/io/http.js";
import { type HttpFixture, startHttpServer } from "../http-server.js";
import { BASE_SEED, Prng } from "../prng.js";
import { buildImage, pattern, readAll } from "./build-image.js";

const KiB = 1024;
const MiB = 1024 * KiB;

let http: HttpFixture;
const file = new Prng(BASE_SEED).bytes(3 * MiB + 1234);
const big = new Uint8Array(32 * MiB).fill(7);

before(async () => {
  http = await startHttpServer();
  http.put("disk.img", file);
  http.put("big.img", big);
  http.put("empty.img", new Uint8Array(0));
});
after(() => http.close());
beforeEach(() => {
  http.requests.length = 0;
  Object.assign(http, {
    ignoreRanges: false,
    advertiseRanges: false,
    refuseHead: false,
    failures: 0,
    failStatus: 503,
    forceStatus: undefined,
    version: 0,
    sendEtag: true,
    honourIfMatch: true,
    abortedBodies: 0,
  });
});

const fast: HttpStorageOptions = { retryDelayMs: 1 };

async function rejectsWith(p: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof QcowError, `a QcowError, not ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, pattern);
    return true;
  });
}

test("http: opening learns the size with one HEAD; reads return the file's bytes, short past the end", async () => {
  const s = await HttpStorage.open(http.url("disk.img"), fast);
  assert.equal(await s.size(), file.length);
  assert.deepEqual(
    http.requests.map((r) => r.method),
    ["HEAD"],
  );
  const rng = new Prng(BASE_SEED + 1);
  for (let i = 0; i < 40; i++) {
    const len = 1 + rng.int(300 * KiB);
    const at = rng.int(file.length - len);
    const dst = new Uint8Array(len);
    assert.equal(await s.read(dst, at), len);
    assert.deepEqual(dst, file.subarray(at, at + len), `seed ${BASE_SEED}: ${len} bytes at ${at}`);
  }
  const tail = new Uint8Array(5000);
  assert.equal(await s.read(tail, file.length - 1000), 1000);
  assert.deepEqual(tail.subarray(0, 1000), file.subarray(file.length - 1000));
  assert.equal(await s.read(new Uint8Array(10), file.length), 0);
  assert.equal(await s.read(new Uint8Array(10), file.length + 99), 0);
  assert.equal(s.name, http.url("disk.img"));
  await s.close();
});

test("http: a server that refuses HEAD is probed with a one-byte ranged GET", async () => {
  http.refuseHead = true;
  const s = await HttpStorage.open(http.url("disk.img"), fast);
  assert.equal(await s.size(), file.length);
  assert.deepEqual(
    http.requests.map((r) => [r.method, r.status, r.range]),
    [
      ["HEAD", 405, undefined],
      ["GET", 206, "bytes=0-0"],
    ],
  );
  const dst = new Uint8Array(100);
  await s.read(dst, 70000);
  assert.deepEqual(dst, file.subarray(70000, 70100));
  await s.close();
});

test("http: an empty file opens with size 0", async () => {
  for (const refuseHead of [false, true]) {
    http.refuseHead = refuseHead;
    const s = await HttpStorage.open(http.url("empty.img"), fast);
    assert.equal(await s.size(), 0);
    assert.equal(await s.read(new Uint8Array(8), 0), 0);
    await s.close();
  }
});

test("http: concurrent adjacent reads are one request; cached blocks are not fetched again", async () => {
  const s = await HttpStorage.open(http.url("disk.img"), fast);
  // 32 reads of 4 KiB spread over two adjacent 64 KiB blocks, all at once: one GET of 128 KiB.
  const dsts = Array.from({ length: 32 }, () => new Uint8Array(4 * KiB));
  await Promise.all(dsts.map((d, i) => s.read(d, 1 * MiB + i * 4 * KiB)));
  dsts.forEach((d, i) => {
    assert.deepEqual(d, file.subarray(1 * MiB + i * 4 * KiB, 1 * MiB + (i + 1) * 4 * KiB));
  });
  assert.deepEqual(
    http.requests.filter((r) => r.method === "GET").map((r) => r.range),
    [`bytes=${1 * MiB}-${1 * MiB + 128 * KiB - 1}`],
  );
  // The same bytes again, and metadata-sized reads inside them: no request.
  for (let i = 0; i < 50; i++) await s.read(new Uint8Array(512), 1 * MiB + i * 512);
  assert.equal(http.count("GET"), 1);
  // Reads wanted in the same turn but not adjacent: one request per run of blocks.
  await Promise.all([s.read(new Uint8Array(10), 0), s.read(new Uint8Array(10), 2 * MiB)]);
  assert.equal(http.count("GET"), 3);
  // One 1 MiB read over blocks 8-23, of which 16 and 17 are cached: a request each side of them.
  const one = new Uint8Array(MiB);
  await s.read(one, 512 * KiB);
  assert.deepEqual(one, file.subarray(512 * KiB, 1536 * KiB));
  assert.deepEqual(
    http.requests.slice(-2).map((r) => r.range),
    [`bytes=${512 * KiB}-${1 * MiB - 1}`, `bytes=${1 * MiB + 128 * KiB}-${1536 * KiB - 1}`],
  );
  await s.close();
});

test("http: the block cache is bounded (LRU) and requests are split at maxRequestBytes", async () => {
  const s = await HttpStorage.open(http.url("disk.img"), {
    ...fast,
    blockSize: 16 * KiB,
    cacheBytes: 64 * KiB,
    maxRequestBytes: 32 * KiB,
  });
  // 128 KiB in blocks of 16 KiB, at most two blocks a request: four requests.
  const dst = new Uint8Array(128 * KiB);
  await s.read(dst, 0);
  assert.deepEqual(dst, file.subarray(0, 128 * KiB));
  assert.deepEqual(
    http.requests.filter((r) => r.method === "GET").map((r) => r.range),
    [0, 1, 2, 3].map((i) => `bytes=${i * 32 * KiB}-${(i + 1) * 32 * KiB - 1}`),
  );
  // Only the last 64 KiB stayed cached.
  await s.read(new Uint8Array(100), 100 * KiB);
  assert.equal(http.count("GET"), 4);
  await s.read(new Uint8Array(100), 0);
  assert.equal(http.count("GET"), 5);
  // Block 0 is now the most recent; the oldest (block 4) went to make room.
  await s.read(new Uint8Array(100), 10);
  assert.equal(http.count("GET"), 5);
  await s.read(new Uint8Array(100), 64 * KiB + 10);
  assert.equal(http.count("GET"), 6);
  await s.close();
});

test("http: a server that ignores ranges is a clear error, and its whole body is not downloaded", async () => {
  http.ignoreRanges = true;
  await rejectsWith(
    HttpStorage.open(http.url("big.img"), fast),
    "unsupported",
    new RegExp(`^server does not support range requests: ${http.url("big.img")}$`),
  );
  assert.deepEqual(
    http.requests.map((r) => [r.method, r.status]),
    [
      ["HEAD", 200],
      ["GET", 200],
    ],
  );
  // One that says it takes ranges but does not: the first read fails the same way.
  http.advertiseRanges = true;
  const s = await HttpStorage.open(http.url("big.img"), fast);
  await rejectsWith(s.read(new Uint8Array(10), 0), "unsupported", /server does not support range requests/);
  await s.close();
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(http.abortedBodies, 2, "both 32 MiB bodies were cut short");
});

test("http: transient failures are retried with backoff and the read succeeds", async () => {
  for (const failStatus of [503, 429, 408, 500, "reset"] as const) {
    http.requests.length = 0;
    http.failStatus = failStatus;
    http.failures = 2;
    const s = await HttpStorage.open(http.url("disk.img"), fast);
    assert.equal(http.count("HEAD"), 3, `${failStatus}: HEAD tried three times`);
    http.failures = 3;
    const dst = new Uint8Array(1000);
    await s.read(dst, 5000);
    assert.deepEqual(dst, file.subarray(5000, 6000));
    assert.equal(http.count("GET"), 4, `${failStatus}: GET tried four times`);
    await s.close();
  }
});

test("http: a request with no answer times out and is retried", async () => {
  const s = await HttpStorage.open(http.url("disk.img"), { ...fast, timeoutMs: 200 });
  http.failStatus = "hang";
  http.failures = 1;
  const dst = new Uint8Array(1000);
  await s.read(dst, 0);
  assert.deepEqual(dst, file.subarray(0, 1000));
  assert.equal(http.count("GET"), 2);
  await s.close();
});

test("http: retries are bounded; the error names the URL, the status and the attempts", async () => {
  const s = await HttpStorage.open(http.url("disk.img"), { ...fast, retries: 2 });
  http.failures = 100;
  await rejectsWith(
    s.read(new Uint8Array(10), 0),
    "io",
    new RegExp(
      `^Could not read '${http.url("disk.img")}' \\(bytes 0-65535\\): HTTP 503 Service Unavailable \\(after 3 attempts\\)$`,
    ),
  );
  assert.equal(http.count("GET"), 3);
  http.failures = 0;
  // A failed read is not remembered: the next one tries again.
  const dst = new Uint8Array(10);
  await s.read(dst, 0);
  assert.deepEqual(dst, file.subarray(0, 10));
  await s.close();
  // Nothing listening at all (a port that was free a moment ago).
  const closed = createServer();
  await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${(closed.address() as AddressInfo).port}/x.qcow2`;
  await new Promise((r) => closed.close(r));
  await rejectsWith(
    HttpStorage.open(url, { retries: 1, retryDelayMs: 1 }),
    "io",
    /^Could not open 'http:\/\/127\.0\.0\.1:\d+\/x\.qcow2': fetch failed \(ECONNREFUSED\) \(after 2 attempts\)$/,
  );
});

test("http: permanent errors are not retried and name the URL and status", async () => {
  await rejectsWith(
    HttpStorage.open(http.url("missing.img"), fast),
    "not-found",
    new RegExp(`^Could not open '${http.url("missing.img")}': HTTP 404 Not Found$`),
  );
  // HEAD's 404 leaves the decision to the GET, which gets the same answer: no retries.
  assert.deepEqual(
    http.requests.map((r) => [r.method, r.status]),
    [
      ["HEAD", 404],
      ["GET", 404],
    ],
  );
  const s = await HttpStorage.open(http.url("disk.img"), fast);
  http.requests.length = 0;
  http.forceStatus = 403;
  await rejectsWith(
    s.read(new Uint8Array(10), 0),
    "io",
    /^Could not read '.*disk\.img' \(bytes 0-65535\): HTTP 403 Forbidden$/,
  );
  assert.equal(http.count("GET"), 1);
  await s.close();
});

test("http: a file that changes on the server is an error, whether the server checks If-Match or not", async () => {
  const s = await HttpStorage.open(http.url("disk.img"), fast);
  await s.read(new Uint8Array(10), 0);
  assert.match(http.requests[1].ifMatch ?? "", /^"[0-9a-f]+-[0-9a-f]+-0"$/, "reads send If-Match with the ETag");
  http.version = 1;
  // Cached bytes are still served; uncached ones are refused.
  await s.read(new Uint8Array(10), 100);
  await rejectsWith(
    s.read(new Uint8Array(10), 2 * MiB),
    "io",
    /^Could not read '.*disk\.img': the file changed on the server \(HTTP 412 Precondition Failed\)$/,
  );
  http.honourIfMatch = false;
  await rejectsWith(
    s.read(new Uint8Array(10), 2 * MiB),
    "io",
    /the file changed on the server \(ETag "[0-9a-f]+-[0-9a-f]+-0", now "[0-9a-f]+-[0-9a-f]+-1"\)$/,
  );
  await s.close();
  // Without ETags, Last-Modified tells.
  http.sendEtag = false;
  http.version = 0;
  const t = await HttpStorage.open(http.url("disk.img"), fast);
  await t.read(new Uint8Array(10), 0);
  assert.equal(http.requests.at(-1)?.ifMatch, undefined);
  http.version = 5;
  await rejectsWith(
    t.read(new Uint8Array(10), 2 * MiB),
    "io",
    /the file changed on the server \(Last-Modified .* GMT, now .* GMT\)$/,
  );
  await t.close();
  // A file whose size changed.
  http.sendEtag = true;
  http.honourIfMatch = false;
  http.put("grows.img", file.subarray(0, MiB));
  const u = await HttpStorage.open(http.url("grows.img"), fast);
  http.put("grows.img", file.subarray(0, 2 * MiB));
  await rejectsWith(u.read(new Uint8Array(10), 0), "io", /changed on the server/);
  await u.close();
});

test("http: read-only; headers and the injected fetch are used for every request", async () => {
  const seen: string[] = [];
  const s = await HttpStorage.open(http.url("disk.img"), {
    ...fast,
    headers: { Authorization: "Bearer xyz" },
    fetch: (input, init) => {
      seen.push(`${init?.method} ${new Headers(init?.headers).get("authorization")}`);
      return fetch(input, init);
    },
  });
  await s.read(new Uint8Array(10), 0);
  assert.deepEqual(seen, ["HEAD Bearer xyz", "GET Bearer xyz"]);
  assert.equal(s.readOnly, true);
  await rejectsWith(s.write(new Uint8Array(1), 0), "read-only", /is read-only/);
  await rejectsWith(s.truncate(0), "read-only", /is read-only/);
  await s.close();
  await rejectsWith(s.read(new Uint8Array(1), 0), "io", /closed/);
  await rejectsWith(HttpStorage.open("ftp://example.com/x", fast), "invalid-argument", /not an http\(s\) URL/);
});

test("httpOpener: a backing chain over HTTP, relative names resolved against the URL; no read-write", async () => {
  const base = buildImage({ size: 4 * 65536, clusters: [{ guestCluster: 1, kind: "data", data: pattern(65536, 3) }] });
  const top = buildImage({
    size: 4 * 65536,
    backingFile: "../base.qcow2",
    backingFormat: "qcow2",
    clusters: [{ guestCluster: 2, kind: "data", data: pattern(65536, 4) }],
  });
  http.put("vm/base.qcow2", base.bytes);
  http.put("vm/disks/top.qcow2", top.bytes);
  const img = await openImage(http.url("vm/disks/top.qcow2"), { opener: httpOpener });
  assert.equal(img.format === "qcow2" && img.backingFilename, `${http.origin}/vm/disks/../base.qcow2`);
  assert.deepEqual(await readAll(img), top.expected(base.expected()));
  await img.close();
  assert.deepEqual(
    http.requests.filter((r) => r.method === "HEAD").map((r) => r.path),
    ["vm/disks/top.qcow2", "vm/base.qcow2"],
  );
  assert.equal(httpOpener.resolve("http://h/a/b.qcow2", "c.qcow2"), "http://h/a/c.qcow2");
  assert.equal(httpOpener.resolve("http://h/a/b.qcow2", "https://x/y"), "https://x/y");
  assert.equal(await httpOpener.identity("HTTP://H:80/a/../b"), "http://h/b");
  await rejectsWith(
    httpOpener.open(http.url("vm/base.qcow2"), { readOnly: false }),
    "read-only",
    /^Could not open '.*\/vm\/base\.qcow2': the http driver does not support writes$/,
  );
  await rejectsWith(httpOpener.open("/etc/passwd", { readOnly: true }), "invalid-argument", /not an http\(s\) URL/);
});
