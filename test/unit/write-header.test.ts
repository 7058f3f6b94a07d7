/**
 * The header when an image is written (DESIGN.md, "Feature bits"): unknown autoclear bits are
 * cleared when an image is opened for writing; unknown header extensions, the backing file name
 * and its format are kept byte for byte whenever the header is rewritten (clearing autoclear
 * bits, moving the refcount table).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { decodeBackingName, decodeExtensions, decodeHeader, encodeHeader } from "../../src/format/header.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { type Qcow2CreateOptions, writeEmptyQcow2 } from "../../src/ops/create.js";
import { buildImage, qemuImg } from "./build-image.js";

const UNKNOWN_EXT = { type: 0x7a7a_0001, data: new TextEncoder().encode("kept byte for byte") };
const UNKNOWN_AUTOCLEAR = 1n << 40n;

/** A new image whose header also holds an unknown extension and an unknown autoclear bit. */
async function imageWithUnknowns(opts: Qcow2CreateOptions): Promise<MemoryStorage> {
  const s = new MemoryStorage(undefined, { name: "image.qcow2" });
  await writeEmptyQcow2(s, opts);
  const bytes = s.bytes();
  const cs = opts.clusterSize ?? 65536;
  const first = bytes.subarray(0, cs);
  const h = decodeHeader(first);
  const ext = decodeExtensions(first, h);
  h.autoclearFeatures |= UNKNOWN_AUTOCLEAR;
  ext.unknown.push(UNKNOWN_EXT);
  await s.write(encodeHeader(h, ext, decodeBackingName(first, h)), 0);
  return s;
}

function headerOf(bytes: Uint8Array) {
  const h = decodeHeader(bytes.subarray(0, 2 ** 21));
  const first = bytes.subarray(0, 2 ** h.clusterBits);
  return { h, ext: decodeExtensions(first, h), backing: decodeBackingName(first, h) };
}

function qemuCheck(bytes: Uint8Array, files: Record<string, Uint8Array> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), "qcowkit-unit-"));
  try {
    for (const [name, b] of Object.entries(files)) writeFileSync(join(dir, name), b);
    writeFileSync(join(dir, "image.qcow2"), bytes);
    const r = qemuImg(["check", join(dir, "image.qcow2")]);
    assert.equal(r.code, 0, `qemu-img check: ${r.stdout}${r.stderr}`);
    return r.stdout;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe("the header of an image being written", () => {
  test("unknown autoclear bits are cleared on opening read-write; unknown extensions stay", async () => {
    const s = await imageWithUnknowns({ size: 1 << 20 });
    qemuCheck(s.bytes());
    const ro = await Qcow2Image.open(new MemoryStorage(s.bytes()), { readOnly: true });
    assert.equal(ro.header.autoclearFeatures & UNKNOWN_AUTOCLEAR, UNKNOWN_AUTOCLEAR, "read-only: left alone");
    await ro.close();
    const img = await Qcow2Image.open(s, { readOnly: false });
    await img.close();
    const { h, ext } = headerOf(s.bytes());
    assert.equal(h.autoclearFeatures & UNKNOWN_AUTOCLEAR, 0n, "the unknown autoclear bit is cleared");
    assert.deepEqual(ext.unknown, [UNKNOWN_EXT], "the unknown extension is kept");
    qemuCheck(s.bytes());
  });

  test("a refcount-table move keeps the backing file, its format and unknown extensions", async () => {
    const backing = buildImage({ size: 4 << 20, clusterBits: 16 });
    const s = await imageWithUnknowns({
      size: 4 << 20,
      clusterSize: 512,
      refcountBits: 64,
      backingFile: "backing.qcow2",
      backingFormat: "qcow2",
    });
    const before = headerOf(s.bytes());
    const img = await Qcow2Image.open(s, {
      readOnly: false,
      backing: await Qcow2Image.open(backing.storage("backing.qcow2")),
    });
    // One refcount table cluster covers 64 blocks of 64 clusters (2 MiB): write 3 MiB (in
    // requests of fewer clusters than a refcount block covers, see write-regressions).
    const data = new Uint8Array(16 * 1024).fill(9);
    for (let off = 0; off < 3 << 20; off += data.length) await img.write(data, off);
    await img.close();
    const after = headerOf(s.bytes());
    assert.notEqual(after.h.refcountTableOffset, before.h.refcountTableOffset, "the refcount table moved");
    assert.equal(after.backing, "backing.qcow2");
    assert.equal(after.ext.backingFormat, "qcow2");
    assert.deepEqual(after.ext.unknown, [UNKNOWN_EXT]);
    const out = qemuCheck(s.bytes(), { "backing.qcow2": backing.bytes });
    assert.match(out, /No errors were found/);
    const check = await Qcow2Image.open(new MemoryStorage(s.bytes()), { readOnly: true });
    const got = new Uint8Array(3 << 20);
    await check.read(got, 0);
    await check.close();
    assert.ok(got.every((b) => b === 9));
  });
});
