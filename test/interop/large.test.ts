/**
 * A 4 TiB sparse image with a few writes far apart: offsets beyond 2^32 and 2^40, a large L1
 * table, and a convert that must stay sparse (its raw output is compared with qemu-img compare,
 * never read in full).
 */
import * as path from "node:path";
import { describe, test } from "node:test";
import { assertAllMatch, qemuImgOk, qemuIoOk, sizes, useTempDir } from "./util.js";

const { MiB, GiB, TiB } = sizes;

describe("large sparse images", () => {
  const tmp = useTempDir("large");

  test("4 TiB image with writes far apart", async (t) => {
    const dir = tmp.dir();
    const img = path.join(dir, "huge.qcow2");
    await qemuImgOk(["create", "-q", "-f", "qcow2", img, "4T"]);
    await qemuIoOk(img, [
      "write -P 0x01 0 64k",
      `write -P 0x02 ${4 * GiB - 512} 1024`, // across 2^32
      `write -P 0x03 ${TiB + 12345} 100000`, // past 2^40, unaligned
      `write -z ${2 * TiB} 1M`,
      `write -P 0x04 ${3 * TiB + 7 * GiB} 2M`,
      `write -P 0x05 ${4 * TiB - 4096} 4096`, // the last cluster
    ]);
    await assertAllMatch(t, img, { dir, hugeMaxAllocated: 64 * MiB, timeoutMs: 90_000 });
  });
});
