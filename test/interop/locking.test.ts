/**
 * Image locking (issue 6): qcowkit takes QEMU's locks (file-posix's byte-range locks at bytes
 * 100+ and 200+, as open file description locks), so two writers never open one image, a reader
 * without -U does not open an image someone writes, and QEMU and qcowkit see each other's locks:
 * qemu-nbd, qemu-img and qemu-io against `qcowkit serve`, and the other way round, with QEMU's
 * messages. A killed process leaves no lock behind.
 */
import assert from "node:assert/strict";
import path from "node:path";
import { after, describe, test } from "node:test";
import { openImageFile } from "../../src/node.js";
import { killServers, startServer } from "./serve-util.js";
import { qcowkit, qemuImg, qemuImgOk, qemuIo, useTempDir } from "./util.js";

const tmp = useTempDir("locking");
after(killServers);

const WRITE_LOCK = (file: string) => `Failed to get "write" lock\nIs another process using the image [${file}]?`;
const SHARED_WRITE_LOCK = (file: string) =>
  `Failed to get shared "write" lock\nIs another process using the image [${file}]?`;

async function image(name: string): Promise<string> {
  const file = tmp.file(name);
  await qemuImgOk(["create", "-q", "-f", "qcow2", file, "1M"]);
  return file;
}

/** Opening fails with qemu-img's words: "Could not open 'FILE': " and the lock message. */
async function rejectsWith(p: Promise<unknown>, file: string, message: string, what: string): Promise<void> {
  await assert.rejects(p, (e: Error) => {
    assert.equal(e.message, `Could not open '${file}': ${message}`, what);
    return true;
  });
}

describe("image locking", () => {
  test("in one process: one writer at a time; readers only without a writer; -U reads anyway", async () => {
    const file = await image("one.qcow2");
    const w = await openImageFile(file, { readOnly: false });
    try {
      await rejectsWith(openImageFile(file, { readOnly: false }), file, WRITE_LOCK(file), "a second writer");
      await rejectsWith(openImageFile(file), file, SHARED_WRITE_LOCK(file), "a reader while a writer");
      const shared = await openImageFile(file, { forceShare: true });
      await shared.close();
    } finally {
      await w.close();
    }
    // Readers share; a writer waits for them to go.
    const r1 = await openImageFile(file);
    const r2 = await openImageFile(file);
    await rejectsWith(openImageFile(file, { readOnly: false }), file, WRITE_LOCK(file), "a writer while readers");
    await r1.close();
    await r2.close();
    const w2 = await openImageFile(file, { readOnly: false });
    await w2.close();
    await rejectsWith(
      openImageFile(file, { readOnly: false, forceShare: true }),
      file,
      "force-share=on can only be used with read-only images",
      "-U with a writer",
    );
  });

  test("a backing file is locked for reading: it cannot be written while its overlay is open", async () => {
    const base = await image("base.qcow2");
    const top = tmp.file("top.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
    const img = await openImageFile(top, { readOnly: false });
    try {
      await rejectsWith(openImageFile(base, { readOnly: false }), base, WRITE_LOCK(base), "writing the backing file");
      const r = await qemuIo(["-f", "qcow2", "-c", "write 0 512", base]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `qemu-io: can't open device ${base}: ${WRITE_LOCK(base)}\n`);
    } finally {
      await img.close();
    }
  });

  test("qcowkit serve holds the image: QEMU's tools and qcowkit are refused, -U reads", async () => {
    const file = await image("served.qcow2");
    const name = path.basename(file);
    const server = await startServer("qcowkit", tmp.file("served.sock"), ["-f", "qcow2", name], { cwd: tmp.dir() });
    try {
      const info = await qemuImg(["info", name], { cwd: tmp.dir() });
      assert.equal(info.code, 1);
      assert.equal(info.stderr, `qemu-img: Could not open '${name}': ${SHARED_WRITE_LOCK(name)}\n`);
      const io = await qemuIo(["-f", "qcow2", "-c", "write 0 512", name], { cwd: tmp.dir() });
      assert.equal(io.code, 1);
      assert.equal(io.stderr, `qemu-io: can't open device ${name}: ${WRITE_LOCK(name)}\n`);
      assert.equal((await qemuImg(["info", "-U", name], { cwd: tmp.dir() })).code, 0);
      const mine = await qcowkit(["info", name], { cwd: tmp.dir() });
      assert.equal(mine.code, 1);
      assert.match(mine.stderr, new RegExp(SHARED_WRITE_LOCK(name).replace(/[[\]?.]/g, "\\$&")));
      const resize = await qcowkit(["resize", name, "2M"], { cwd: tmp.dir() });
      assert.equal(resize.code, 1);
      assert.ok(resize.stderr.includes(WRITE_LOCK(name)), resize.stderr);
      assert.equal((await qcowkit(["info", "-U", name], { cwd: tmp.dir() })).code, 0);
      assert.equal((await qcowkit(["check", "-U", name], { cwd: tmp.dir() })).code, 0);
    } finally {
      // kill -9: the locks go with the process.
      await server.stop("SIGKILL");
    }
    const w = await openImageFile(file, { readOnly: false });
    await w.close();
  });

  test("qemu-nbd holds the image: qcowkit is refused with QEMU's words, -U reads", async () => {
    const file = await image("qemu.qcow2");
    const name = path.basename(file);
    const server = await startServer("qemu-nbd", tmp.file("qemu.sock"), ["-f", "qcow2", name], { cwd: tmp.dir() });
    try {
      for (const args of [["info"], ["map"], ["check"], ["convert", "-O", "raw"]]) {
        const extra = args[0] === "convert" ? [tmp.file("out.raw")] : [];
        const r = await qcowkit([...args, name, ...extra], { cwd: tmp.dir() });
        assert.equal(r.code, 1, `${args[0]}: ${r.stderr}`);
        assert.ok(r.stderr.includes(SHARED_WRITE_LOCK(name)), `${args[0]}: ${r.stderr}`);
        const u = await qcowkit([args[0], "-U", ...args.slice(1), name, ...extra], { cwd: tmp.dir() });
        assert.equal(u.code, 0, `${args[0]} -U: ${u.stderr}`);
      }
      for (const args of [
        ["resize", name, "2M"],
        ["snapshot", "-c", "s", name],
        ["check", "-r", "all", name],
      ]) {
        const r = await qcowkit(args, { cwd: tmp.dir() });
        assert.equal(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
        assert.ok(r.stderr.includes(WRITE_LOCK(name)), `${args.join(" ")}: ${r.stderr}`);
      }
    } finally {
      await server.stop();
    }
    // qemu-nbd -r (a reader): qcowkit reads along, but does not write.
    const reader = await startServer("qemu-nbd", tmp.file("qemu-r.sock"), ["-r", "-f", "qcow2", name], {
      cwd: tmp.dir(),
    });
    try {
      assert.equal((await qcowkit(["info", name], { cwd: tmp.dir() })).code, 0);
      const r = await qcowkit(["resize", name, "2M"], { cwd: tmp.dir() });
      assert.equal(r.code, 1);
      assert.ok(r.stderr.includes(WRITE_LOCK(name)), r.stderr);
    } finally {
      await reader.stop();
    }
  });
});
