/**
 * lazy_refcounts (DESIGN.md, "Write ordering"): the dirty bit stands in for the refcount
 * ordering, and opening a dirty image read-write repairs it first. A dirty image is made the way
 * one happens: QEMU writes with lazy refcounts and is killed before it writes them back
 * (`qemu-io ... -c "sigraise 9"`), which leaves refcounts lower than the references.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { describe, test } from "node:test";
import type { Qcow2Image } from "../../src/image/qcow2.js";
import { openImageFile } from "../../src/node.js";
import { qemuImg, qemuImgOk, qemuIo, useTempDir } from "./util.js";

interface CheckReport {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
  "dirty-flag"?: boolean;
}

async function check(file: string): Promise<{ code: number | null; report: CheckReport; text: string }> {
  const r = await qemuImg(["check", "--output=json", file]);
  return { code: r.code, report: JSON.parse(r.stdout) as CheckReport, text: r.stdout + r.stderr };
}

async function readRaw(file: string, dir: string): Promise<Buffer> {
  const out = path.join(dir, `read-${Math.random().toString(36).slice(2)}.raw`);
  await qemuImgOk(["convert", "-O", "raw", file, out]);
  const b = await fs.readFile(out);
  await fs.rm(out);
  return b;
}

/** An image QEMU wrote with lazy refcounts and never closed: dirty bit set, refcounts behind. */
async function dirtyImage(dir: string): Promise<string> {
  const file = path.join(dir, "lazy.qcow2");
  await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", file, "4M"]);
  await qemuIo(["-f", "qcow2", "-c", "write -P 0x5a 0 128k", "-c", "write -P 0x6b 1M 64k", "-c", "sigraise 9", file]);
  const info = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout) as { "dirty-flag"?: boolean };
  assert.equal(info["dirty-flag"], true, "fixture: the killed qemu-io leaves the dirty bit set");
  const c = await check(file);
  assert.ok((c.report.corruptions ?? 0) > 0, `fixture: the dirty image has refcounts behind its references: ${c.text}`);
  return file;
}

describe("lazy_refcounts", () => {
  const tmp = useTempDir("write-lazy");

  test("writes to a clean lazy_refcounts image leave it clean", async () => {
    const file = tmp.file("clean.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", file, "4M"]);
    const img = (await openImageFile(file, { readOnly: false })) as Qcow2Image;
    await img.write(new Uint8Array(100_000).fill(3), 5000);
    await img.writeZeroes(65536, 65536, { unmap: true });
    await img.close();
    const c = await check(file);
    assert.equal(c.code, 0, c.text);
    const raw = await readRaw(file, tmp.dir());
    const expected = Buffer.alloc(4 * 1024 * 1024);
    expected.fill(3, 5000, 105_000);
    expected.fill(0, 65536, 131072);
    assert.ok(raw.equals(expected));
  });

  test("opening a dirty image read-write repairs its refcounts first", async () => {
    const dir = tmp.file("dirty");
    await fs.mkdir(dir);
    const file = await dirtyImage(dir);
    const before = await readRaw(file, dir);
    const img = (await openImageFile(file, { readOnly: false })) as Qcow2Image;
    await img.write(new Uint8Array(4096).fill(0x7c), 2 * 1024 * 1024);
    await img.close();
    const c = await check(file);
    assert.equal(c.code, 0, `after qcowkit opened it read-write and closed it: ${c.text}`);
    const info = JSON.parse((await qemuImgOk(["info", "--output=json", file])).stdout) as { "dirty-flag"?: boolean };
    assert.equal(info["dirty-flag"], false, "the dirty bit is cleared");
    const after = await readRaw(file, dir);
    before.fill(0x7c, 2 * 1024 * 1024, 2 * 1024 * 1024 + 4096);
    assert.ok(after.equals(before), "QEMU's writes and qcowkit's are all there");
  });

  test("a dirty image opened read-only reads as QEMU reads it, and stays as it is", async () => {
    const dir = tmp.file("dirty-ro");
    await fs.mkdir(dir);
    const file = await dirtyImage(dir);
    const bytes = await fs.readFile(file);
    const img = await openImageFile(file, { readOnly: true });
    const got = new Uint8Array(img.size);
    await img.read(got, 0);
    await img.close();
    assert.ok(Buffer.from(got).equals(await readRaw(file, dir)));
    assert.ok((await fs.readFile(file)).equals(bytes), "the file is unchanged");
  });
});
