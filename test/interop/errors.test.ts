/**
 * Bad input through the CLI: a clear "qcowkit: ..." message, qemu-img's exit code, no stack trace,
 * no hang, and no output file full of garbage (design invariant 4).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import {
  assertConvertMatches,
  assertInfoJsonMatches,
  assertNoStackTrace,
  assertSameAsQemu,
  CLI_PREFIX,
  EXT_FEATURE_NAME_TABLE,
  patchFile,
  qcowkit,
  qemuImg,
  qemuImgOk,
  qemuIo,
  qemuIoOk,
  type RunResult,
  readHeaderExtensions,
  sizes,
  useTempDir,
} from "./util.js";

const { MiB } = sizes;

/** qemu-img's exit code per command when it cannot open an image. */
const OPEN_FAILURE_CODE = { info: 1, map: 1, convert: 1, compare: 2 } as const;

describe("error cases", () => {
  const tmp = useTempDir("errors");
  const f = (name: string): string => tmp.file(name);

  function assertRefused(r: RunResult, code: number, what: string, message?: RegExp): void {
    assertNoStackTrace(r.stderr, what);
    assert.ok(!r.killed, `${what}: did not finish (hang?)\n${r.stderr}`);
    assert.equal(
      r.code,
      code,
      `${what}: exit ${r.code}${r.signal ? ` (signal ${r.signal})` : ""}, expected ${code}\n  stderr: ${r.stderr}`,
    );
    assert.ok(r.stderr.startsWith(CLI_PREFIX), `${what}: stderr should start with "${CLI_PREFIX}": ${r.stderr}`);
    if (message !== undefined) assert.match(r.stderr, message, `${what}: error message`);
  }

  /**
   * Every read-only command on `image`: same exit code and stdout as qemu-img (info, map, convert,
   * compare), stderr "qcowkit: ...", and convert leaves no output file behind.
   */
  async function assertAllRefusedLikeQemu(image: string, opts: { format?: string; message?: RegExp } = {}) {
    const fmt = opts.format !== undefined ? ["-f", opts.format] : [];
    for (const args of [
      ["info", ...fmt, image],
      ["info", ...fmt, "--output", "json", image],
      ["map", ...fmt, image],
      ["map", ...fmt, "--output", "json", image],
      ["compare", ...fmt, image, f("good.qcow2")],
    ]) {
      const sub = args[0] as keyof typeof OPEN_FAILURE_CODE;
      await assertSameAsQemu(args, { qemuCode: OPEN_FAILURE_CODE[sub] });
      if (opts.message !== undefined) {
        const r = await qcowkit(args);
        assert.match(r.stderr, opts.message, `qcowkit ${args.join(" ")}: error message`);
      }
    }
    const dst = f(`out-${path.basename(image)}.raw`);
    const args = ["convert", ...fmt, "-O", "raw", image, dst];
    await assertSameAsQemu(args, { qemuCode: OPEN_FAILURE_CODE.convert });
    await fs.rm(dst, { force: true });
    const r = await qcowkit(args);
    if (opts.message !== undefined) assert.match(r.stderr, opts.message, `qcowkit ${args.join(" ")}: error message`);
    assert.ok(!existsSync(dst), `qcowkit ${args.join(" ")} failed but left ${dst} behind`);
  }

  before(async () => {
    await qemuImgOk(["create", "-q", "-f", "qcow2", f("good.qcow2"), "1M"]);
  });

  test("missing file", async () => {
    await assertAllRefusedLikeQemu(f("does-not-exist.qcow2"));
  });

  test("-f qcow2 on a file that is not qcow2", async () => {
    await fs.writeFile(f("plain.bin"), Buffer.alloc(MiB, 0x5a));
    await assertAllRefusedLikeQemu(f("plain.bin"), { format: "qcow2" });
  });

  test("qcow2 header cut short", async () => {
    const img = await fs.readFile(f("good.qcow2"));
    await fs.writeFile(f("short.qcow2"), img.subarray(0, 60));
    await assertAllRefusedLikeQemu(f("short.qcow2"));
  });

  test("unknown incompatible feature bit 5, no name in the feature table", async () => {
    const img = f("incompat.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "1M"]);
    await qemuIoOk(img, ["write -P 0x11 0 64k"]);
    await patchFile(img, 79, Uint8Array.of(0x20)); // incompatible_features, bit 5
    // qemu-img: "Unsupported qcow2 feature(s): Unknown incompatible feature: 20" (a hex mask).
    await assertAllRefusedLikeQemu(img, { message: /incompatible feature.*(bit 5|0x0*20|\b20\b)/i });
  });

  test("unknown incompatible feature bit 5, named in the image's feature table", async () => {
    const img = f("incompat-named.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "1M"]);
    await patchFile(img, 79, Uint8Array.of(0x20));
    // Re-label the table's entry for incompatible bit 4 (extended L2, not set here) as bit 5.
    const table = (await readHeaderExtensions(img)).find((e) => e.type === EXT_FEATURE_NAME_TABLE);
    if (table === undefined) throw new Error("fixture: no feature name table");
    const raw = Buffer.alloc(table.length);
    const fh = await fs.open(img, "r");
    await fh.read(raw, 0, raw.length, table.dataOffset);
    await fh.close();
    let entry = -1;
    for (let i = 0; i + 48 <= raw.length; i += 48) if (raw[i] === 0 && raw[i + 1] === 4) entry = i;
    if (entry < 0) throw new Error("fixture: no feature table entry for incompatible bit 4");
    const renamed = Buffer.alloc(47);
    renamed[0] = 5;
    renamed.write("fancy-frobnication", 1, "ascii");
    await patchFile(img, table.dataOffset + entry + 1, renamed);
    await assertAllRefusedLikeQemu(img, { message: /fancy-frobnication/ });
  });

  test("backing chain loop (a -> b -> a)", async (t) => {
    await qemuImgOk(["create", "-q", "-f", "qcow2", f("loop-a.qcow2"), "1M"]);
    await qemuImgOk(["create", "-q", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", f("loop-b.qcow2")], {
      cwd: tmp.dir(),
    });
    await qemuImgOk(["rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", f("loop-a.qcow2")], { cwd: tmp.dir() });
    const a = f("loop-a.qcow2");
    await t.test("info without --backing-chain does not open the backing file: as qemu-img", async () => {
      await assertInfoJsonMatches(a);
      await assertSameAsQemu(["info", a]);
    });
    await t.test("info --backing-chain: refused as qemu-img refuses it", async () => {
      // qemu-img: "Backing file 'loop-a.qcow2' creates an infinite loop."
      await assertSameAsQemu(["info", "--backing-chain", a], { qemuCode: 1, timeoutMs: 10_000 });
      const chain = await qcowkit(["info", "--backing-chain", a], { timeoutMs: 10_000 });
      assertRefused(chain, 1, "qcowkit info --backing-chain", /loop/i);
    });
    await t.test("map, convert, compare refuse promptly (qemu-img 7.2 hangs)", async () => {
      // Run side by side: a hang costs one timeout, not four.
      const cases = [
        [["map", a], 1],
        [["map", "--output", "json", a], 1],
        [["convert", "-O", "raw", a, f("loop.raw")], 1],
        [["compare", a, f("good.qcow2")], 2],
      ] as const;
      const results = await Promise.all(cases.map(([args]) => qcowkit(args, { timeoutMs: 10_000 })));
      for (const [i, [args, code]] of cases.entries()) {
        assertRefused(results[i] as RunResult, code, `qcowkit ${args.join(" ")}`, /loop/i);
      }
      assert.ok(!existsSync(f("loop.raw")), "convert of a looping chain left an output file behind");
    });
  });

  test("encrypted image (LUKS) is refused, never decrypted to ciphertext", async () => {
    const img = await createEncrypted(f("enc.qcow2"));
    // qemu-img needs the key for everything but info; without it, it refuses.
    await assertSameAsQemu(["map", img], { qemuCode: 1 });
    await assertSameAsQemu(["map", "--output", "json", img], { qemuCode: 1 });
    await assertSameAsQemu(["compare", img, f("good.qcow2")], { qemuCode: 2 });
    const dst = f("enc.raw");
    const r = await qcowkit(["convert", "-O", "raw", img, dst]);
    assertRefused(r, 1, `qcowkit convert -O raw ${img} ${dst}`);
    assert.match(r.stderr, /encrypt|secret|key/i, "the message should say the image is encrypted");
    if (existsSync(dst)) {
      const out = await fs.readFile(dst);
      assert.ok(
        out.every((b) => b === 0),
        "convert of an encrypted image wrote ciphertext to its output",
      );
    }
  });

  test("encrypted image (LUKS): info matches qemu-img's, which needs no key", async () => {
    const img = existsSync(f("enc.qcow2")) ? f("enc.qcow2") : await createEncrypted(f("enc.qcow2"));
    await assertSameAsQemu(["info", "--output", "json", img], { json: true });
    await assertSameAsQemu(["info", img]);
  });

  test("image marked corrupt (incompatible bit 1): read-only commands work as qemu-img's", async () => {
    const img = f("corrupt-bit.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "1M"]);
    await qemuIoOk(img, ["write -P 0x42 0 100k"]);
    await patchFile(img, 79, Uint8Array.of(0x02));
    await assertSameAsQemu(["info", "--output", "json", img], { json: true });
    await assertSameAsQemu(["info", img]);
    await assertSameAsQemu(["map", "--output", "json", img], { json: true });
    await assertConvertMatches(img, { dir: tmp.dir() });
  });

  /** LUKS-encrypted qcow2 holding one written cluster. */
  async function createEncrypted(img: string): Promise<string> {
    const secret = "secret,id=s0,data=interop-secret";
    // qemu's PBKDF benchmark at create time sometimes fails in VMs ("Unable to get accurate CPU
    // usage"); a short iter-time keeps opening the image fast, a few tries get past the flake.
    let last: RunResult | undefined;
    for (let attempt = 0; attempt < 5; attempt++) {
      last = await qemuImg([
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
        img,
        "1M",
      ]);
      if (last.code === 0) break;
    }
    if (last?.code !== 0) throw new Error(`fixture: cannot create a LUKS image: ${last?.stderr}`);
    const w = await qemuIo([
      "--object",
      secret,
      "--image-opts",
      "-c",
      "write -P 0xab 0 64k",
      `driver=qcow2,file.filename=${img},encrypt.key-secret=s0`,
    ]);
    if (w.code !== 0 || !w.stdout.includes("wrote")) throw new Error(`fixture: qemu-io write: ${w.stderr}`);
    return img;
  }
});
