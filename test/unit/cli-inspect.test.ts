/**
 * The server of `qcowkit inspect`: the page and the library bundle with their content types,
 * the named images with their backing chain (and nothing else), range requests, and the
 * command's refusals.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { after, before, test } from "node:test";
import { type InspectorServer, startInspectorServer } from "../../src/cli/cmd-inspect.js";
import { FileStorage } from "../../src/io/file.js";
import { writeEmptyQcow2 } from "../../src/ops/create.js";
import { qcowkit } from "../interop/util.js";

let dir: string;
let server: InspectorServer;

async function qcow2(file: string, backingFile?: string): Promise<void> {
  const s = await FileStorage.open(file, { readOnly: false, create: true });
  await writeEmptyQcow2(s, { size: 1024 * 1024, backingFile, backingFormat: backingFile && "qcow2" });
  await s.close();
}

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "qcowkit-inspect-"));
  await qcow2(path.join(dir, "base.qcow2"));
  await qcow2(path.join(dir, "top.qcow2"), "base.qcow2");
  await writeFile(path.join(dir, "secret.txt"), "not for the page");
  server = await startInspectorServer({ host: "127.0.0.1", port: 0, files: [path.join(dir, "top.qcow2")] });
});

after(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

test("the page, its script and zstd.wasm, and the library bundle, with their types", async () => {
  for (const [p, type] of [
    ["/", "text/html"],
    ["/inspector.js", "text/javascript"],
    ["/zstd.wasm", "application/wasm"],
    ["/browser/qcowkit.js", "text/javascript"],
  ]) {
    const r = await fetch(server.origin + p);
    assert.equal(r.status, 200, p);
    assert.match(r.headers.get("content-type") ?? "", new RegExp(`^${type}`), p);
    await r.arrayBuffer();
  }
  assert.equal(
    server.pageUrl(path.join(dir, "top.qcow2")),
    `${server.origin}/?url=${encodeURIComponent(path.join(dir, "top.qcow2"))}`,
  );
});

test("an image and its backing file are served at their absolute paths; nothing else is", async () => {
  for (const name of ["top.qcow2", "base.qcow2"]) {
    const r = await fetch(server.origin + path.join(dir, name), { headers: { Range: "bytes=0-3" } });
    assert.equal(r.status, 206);
    assert.equal(r.headers.get("content-range")?.replace(/\/\d+$/, ""), "bytes 0-3");
    assert.deepEqual([...new Uint8Array(await r.arrayBuffer())], [0x51, 0x46, 0x49, 0xfb]);
  }
  for (const p of [path.join(dir, "secret.txt"), "/etc/passwd", "/../../etc/passwd", "/browser/../../package.json"]) {
    const r = await fetch(server.origin + p);
    assert.equal(r.status, 404, p);
    await r.arrayBuffer();
  }
});

test("ranges: suffix, open-ended, unsatisfiable; HEAD", async () => {
  const url = server.origin + path.join(dir, "base.qcow2");
  const head = await fetch(url, { method: "HEAD" });
  const size = Number(head.headers.get("content-length"));
  assert.ok(size > 0);
  assert.equal(head.headers.get("accept-ranges"), "bytes");
  assert.ok(head.headers.get("etag"));
  const suffix = await fetch(url, { headers: { Range: "bytes=-10" } });
  assert.equal(suffix.headers.get("content-range"), `bytes ${size - 10}-${size - 1}/${size}`);
  assert.equal((await suffix.arrayBuffer()).byteLength, 10);
  const open = await fetch(url, { headers: { Range: `bytes=${size - 3}-` } });
  assert.equal((await open.arrayBuffer()).byteLength, 3);
  const beyond = await fetch(url, { headers: { Range: `bytes=${size}-` } });
  assert.equal(beyond.status, 416);
  await beyond.arrayBuffer();
});

test("qcowkit inspect refuses a bad port and a missing file, with a message", async () => {
  const bad = await qcowkit(["inspect", "--port", "http"]);
  assert.equal(bad.code, 1);
  assert.equal(bad.stderr, "qcowkit: Invalid port 'http'\n");
  const missing = await qcowkit(["inspect", "--port", "0", path.join(dir, "nope.qcow2")]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^qcowkit: Could not open '.*nope\.qcow2': No such file\n$/);
  const help = await qcowkit(["inspect", "--help"]);
  assert.match(help.stdout, /^usage: qcowkit inspect \[--port N\] \[--bind ADDR\] \[FILE\.\.\.\]/);
});
