/**
 * `qcowkit compare` against `qemu-img compare`: same exit code (0 identical, 1 different, 2 error)
 * and the same stdout, including the offset qemu-img reports and its size-mismatch handling.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { before, describe, test } from "node:test";
import { assertSameAsQemu, qemuImgOk, qemuIoOk, sizes, useTempDir } from "./util.js";

const { MiB } = sizes;

describe("compare", () => {
  const tmp = useTempDir("compare");
  const f = (name: string): string => tmp.file(name);

  async function create(name: string, size: string, commands: string[], options: string[] = []): Promise<string> {
    const img = f(name);
    const o = options.length > 0 ? ["-o", options.join(",")] : [];
    await qemuImgOk(["create", "-q", "-f", "qcow2", ...o, img, size], { cwd: tmp.dir() });
    if (commands.length > 0) await qemuIoOk(img, commands);
    return img;
  }

  before(async () => {
    const data = ["write -P 0xaa 0 1M", "write -P 0x17 2M 64k", "write -z 3M 64k"];
    await create("a.qcow2", "4M", data);
    await create("a-copy.qcow2", "4M", data);
    await create("byte-differs.qcow2", "4M", [...data, "write -P 0xab 123457 1"]);
    await create("zero-differs.qcow2", "4M", [...data, `write -z ${2 * MiB + 4096 + 100} 1`]);
    await create("bigger-zero-tail.qcow2", "8M", data);
    await create("bigger-data-tail.qcow2", "8M", [...data, "write -P 1 7000001 3"]);
    await qemuImgOk(["convert", "-q", "-O", "raw", f("a.qcow2"), f("a.raw")]);
    await create("compressed-src.qcow2", "4M", data);
    await qemuImgOk(["convert", "-q", "-c", "-O", "qcow2", f("compressed-src.qcow2"), f("compressed.qcow2")]);
    await create("base.qcow2", "4M", ["write -P 0x31 0 4M"]);
    await create(
      "overlay.qcow2",
      "4M",
      ["write -P 0x32 1M 4k", "write -z 2M 64k"],
      ["backing_file=base.qcow2", "backing_fmt=qcow2"],
    );
    await qemuImgOk(["convert", "-q", "-O", "qcow2", f("overlay.qcow2"), f("overlay-flat.qcow2")]);
    await create(
      "overlay-differs.qcow2",
      "4M",
      ["write -P 0x32 1M 4k", "write -z 2M 64k", "write -P 0x30 3M 1"],
      ["backing_file=base.qcow2", "backing_fmt=qcow2"],
    );
    await fs.writeFile(f("not-qcow2.bin"), Buffer.alloc(1 * MiB, 0x5a));
  });

  const cases: Array<{ name: string; args: (f: (n: string) => string) => string[]; code: number }> = [
    { name: "identical qcow2 images", args: (f) => [f("a.qcow2"), f("a-copy.qcow2")], code: 0 },
    { name: "qcow2 vs its raw conversion", args: (f) => [f("a.qcow2"), f("a.raw")], code: 0 },
    { name: "-f qcow2 -F raw", args: (f) => ["-f", "qcow2", "-F", "raw", f("a.qcow2"), f("a.raw")], code: 0 },
    {
      name: "one byte differs (offset reported per 512-byte sector)",
      args: (f) => [f("a.qcow2"), f("byte-differs.qcow2")],
      code: 1,
    },
    { name: "zero write over data differs", args: (f) => [f("zero-differs.qcow2"), f("a.qcow2")], code: 1 },
    { name: "strict: identical allocation", args: (f) => ["-s", f("a.qcow2"), f("a-copy.qcow2")], code: 0 },
    {
      name: "strict: same content, different allocation (qcow2 vs raw)",
      args: (f) => ["-s", f("a.qcow2"), f("a.raw")],
      code: 1,
    },
    { name: "sizes differ, extra tail is zero", args: (f) => [f("a.qcow2"), f("bigger-zero-tail.qcow2")], code: 0 },
    {
      name: "sizes differ, extra tail is zero (larger image first)",
      args: (f) => [f("bigger-zero-tail.qcow2"), f("a.qcow2")],
      code: 0,
    },
    {
      name: "sizes differ, extra tail has data",
      args: (f) => [f("a.qcow2"), f("bigger-data-tail.qcow2")],
      code: 1,
    },
    {
      name: "sizes differ, extra tail has data (larger image first)",
      args: (f) => [f("bigger-data-tail.qcow2"), f("a.qcow2")],
      code: 1,
    },
    { name: "strict: sizes differ", args: (f) => ["-s", f("a.qcow2"), f("bigger-zero-tail.qcow2")], code: 1 },
    { name: "compressed vs uncompressed", args: (f) => [f("compressed.qcow2"), f("a.qcow2")], code: 0 },
    { name: "overlay vs its flattened copy", args: (f) => [f("overlay.qcow2"), f("overlay-flat.qcow2")], code: 0 },
    {
      name: "overlays of one backing file differing in one byte",
      args: (f) => [f("overlay.qcow2"), f("overlay-differs.qcow2")],
      code: 1,
    },
    { name: "error: missing file", args: (f) => [f("a.qcow2"), f("missing.qcow2")], code: 2 },
    { name: "error: missing first file", args: (f) => [f("missing.qcow2"), f("a.qcow2")], code: 2 },
    {
      name: "error: -f qcow2 on a file that is not qcow2",
      args: (f) => ["-f", "qcow2", f("not-qcow2.bin"), f("a.qcow2")],
      code: 2,
    },
  ];

  for (const c of cases) {
    test(`${c.name} -> exit ${c.code}`, async () => {
      await assertSameAsQemu(["compare", ...c.args(f)], { qemuCode: c.code, cwd: tmp.dir() });
    });
  }

  test("relative paths resolve against the working directory", async () => {
    await assertSameAsQemu(["compare", "a.qcow2", path.join(".", "byte-differs.qcow2")], {
      qemuCode: 1,
      cwd: tmp.dir(),
    });
  });
});
