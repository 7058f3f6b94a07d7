/**
 * compareImages: qemu-img compare's verdicts and messages, word for word. qemu-img reports a
 * mismatch at the start of the first differing 512-byte sector (compare_buffers when both sides
 * are allocated, find_nonzero when only one is, and in the tail of the larger image).
 * The last test runs qemu-img compare on the same pairs and checks the messages agree.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import type { BlockDevice } from "../../src/image/block-device.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { RawImage } from "../../src/image/raw.js";
import { MemoryStorage } from "../../src/io/memory.js";
import { compareImages } from "../../src/ops/compare.js";
import {
  buildImage,
  type ClusterSpec,
  type ImageSpec,
  pattern,
  qemuImg,
  withTempDir,
  writeFiles,
} from "./build-image.js";

const CS = 4096;

function withByte(data: Uint8Array, at: number, value: number): Uint8Array {
  const out = data.slice();
  out[at] = value;
  return out;
}

function spec(clusters: ClusterSpec[], size = 8 * CS): ImageSpec {
  return { size, clusterBits: 12, clusters };
}

interface Pair {
  name: string;
  a: ImageSpec;
  b: ImageSpec;
  strict?: boolean;
  messages: string[];
}

const P = pattern(CS, 1);
const Q = pattern(CS, 2);

const pairs: Pair[] = [
  {
    name: "same contents in different layouts",
    a: spec([
      { guestCluster: 0, kind: "data", data: P },
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 3, kind: "compressed", data: Q },
      { guestCluster: 4, kind: "zero-alloc", data: P },
    ]),
    b: spec([
      { guestCluster: 0, kind: "compressed", data: P },
      { guestCluster: 2, kind: "data", data: new Uint8Array(CS) },
      { guestCluster: 3, kind: "data", data: Q },
      { guestCluster: 5, kind: "zero" },
    ]),
    messages: ["Images are identical."],
  },
  {
    name: "both allocated, differing at byte 700 of a cluster",
    a: spec([{ guestCluster: 2, kind: "data", data: P }]),
    b: spec([{ guestCluster: 2, kind: "data", data: withByte(P, 700, 0) }]),
    messages: [`Content mismatch at offset ${2 * CS + 512}!`],
  },
  {
    name: "both allocated, differing in the first sector of a cluster",
    a: spec([{ guestCluster: 3, kind: "data", data: P }]),
    b: spec([{ guestCluster: 3, kind: "compressed", data: withByte(P, 5, 0) }]),
    messages: [`Content mismatch at offset ${3 * CS}!`],
  },
  {
    name: "one side unallocated, the other with a non-zero byte at 700",
    a: spec([]),
    b: spec([{ guestCluster: 2, kind: "data", data: withByte(new Uint8Array(CS), 700, 1) }]),
    messages: [`Content mismatch at offset ${2 * CS + 512}!`],
  },
  {
    name: "one side a zero cluster, the other with a non-zero byte at 1500",
    a: spec([{ guestCluster: 1, kind: "data", data: withByte(new Uint8Array(CS), 1500, 9) }]),
    b: spec([{ guestCluster: 1, kind: "zero" }]),
    messages: [`Content mismatch at offset ${CS + 1024}!`],
  },
  {
    name: "different sizes, the tail of the larger one reads as zeros",
    a: spec([{ guestCluster: 0, kind: "data", data: P }], 8 * CS),
    b: spec(
      [
        { guestCluster: 0, kind: "data", data: P },
        { guestCluster: 9, kind: "data", data: new Uint8Array(CS) },
        { guestCluster: 10, kind: "zero" },
      ],
      12 * CS,
    ),
    messages: ["Warning: Image size mismatch!", "Images are identical."],
  },
  {
    name: "different sizes, data in the tail of the larger (first) image",
    a: spec([{ guestCluster: 9, kind: "data", data: withByte(new Uint8Array(CS), 1000, 3) }], 12 * CS),
    b: spec([], 8 * CS),
    messages: ["Warning: Image size mismatch!", `Content mismatch at offset ${9 * CS + 512}!`],
  },
  {
    name: "different sizes, a difference before the end of the smaller one wins",
    a: spec([{ guestCluster: 1, kind: "data", data: P }], 8 * CS),
    b: spec([{ guestCluster: 9, kind: "data", data: P }], 12 * CS),
    messages: [`Content mismatch at offset ${CS}!`],
  },
  {
    name: "strict: different sizes",
    a: spec([], 8 * CS),
    b: spec([], 12 * CS),
    strict: true,
    messages: ["Strict mode: Image size mismatch!"],
  },
  {
    name: "strict: same bytes, different allocation",
    a: spec([
      { guestCluster: 0, kind: "data", data: P },
      { guestCluster: 7, kind: "data", data: P },
    ]),
    b: spec([
      { guestCluster: 0, kind: "data", data: P },
      { guestCluster: 2, kind: "data", data: new Uint8Array(CS) },
      { guestCluster: 7, kind: "data", data: P },
    ]),
    strict: true,
    messages: [`Strict mode: Offset ${2 * CS} block status mismatch!`],
  },
  {
    // qemu-img compares the whole block status, BDRV_BLOCK_EOF included: at offset 4096 one
    // image is unallocated up to its end and the other only up to 8192.
    name: "strict: an unallocated run reaching the end of one image but not the other's",
    a: spec([{ guestCluster: 0, kind: "data", data: P }]),
    b: spec([
      { guestCluster: 0, kind: "data", data: P },
      { guestCluster: 2, kind: "data", data: new Uint8Array(CS) },
    ]),
    strict: true,
    messages: [`Strict mode: Offset ${CS} block status mismatch!`],
  },
  {
    // ... and BDRV_BLOCK_OFFSET_VALID: a zero cluster with a host cluster is not a plain one.
    name: "strict: a zero cluster against a preallocated zero cluster",
    a: spec([
      { guestCluster: 1, kind: "zero" },
      { guestCluster: 7, kind: "data", data: P },
    ]),
    b: spec([
      { guestCluster: 1, kind: "zero-alloc" },
      { guestCluster: 7, kind: "data", data: P },
    ]),
    strict: true,
    messages: [`Strict mode: Offset ${CS} block status mismatch!`],
  },
  {
    name: "strict: a data cluster against a compressed one",
    a: spec([
      { guestCluster: 1, kind: "data", data: P },
      { guestCluster: 7, kind: "data", data: P },
    ]),
    b: spec([
      { guestCluster: 1, kind: "compressed", data: P },
      { guestCluster: 7, kind: "data", data: P },
    ]),
    strict: true,
    messages: [`Strict mode: Offset ${CS} block status mismatch!`],
  },
  {
    name: "strict: same bytes, same allocation",
    a: spec([{ guestCluster: 0, kind: "data", data: P }]),
    b: spec([{ guestCluster: 0, kind: "data", data: P }]),
    strict: true,
    messages: ["Images are identical."],
  },
];

async function open(s: ImageSpec): Promise<Qcow2Image> {
  return Qcow2Image.open(buildImage(s).storage(), { codecs: nodeCodecs });
}

for (const p of pairs) {
  test(`compare: ${p.name}`, async () => {
    const r = await compareImages(await open(p.a), await open(p.b), { strict: p.strict });
    assert.deepEqual(r.messages, p.messages);
    assert.equal(r.identical, p.messages[p.messages.length - 1] === "Images are identical.");
  });
}

test("compare: the verdict does not depend on the order of the images", async () => {
  for (const p of pairs.filter((x) => !x.strict)) {
    const r = await compareImages(await open(p.b), await open(p.a));
    assert.deepEqual(r.messages, p.messages, p.name);
  }
});

test("compare: a raw image against a qcow2 image", async () => {
  const q = await open(spec([{ guestCluster: 1, kind: "data", data: P }]));
  const bytes = new Uint8Array(8 * CS);
  bytes.set(P, CS);
  const raw = await RawImage.open(new MemoryStorage(bytes, { name: "r.raw" }));
  assert.deepEqual((await compareImages(raw, q)).messages, ["Images are identical."]);
  bytes[CS + 4000] ^= 1;
  const raw2 = await RawImage.open(new MemoryStorage(bytes, { name: "r.raw" }));
  assert.deepEqual((await compareImages(q, raw2)).messages, [`Content mismatch at offset ${CS + 3584}!`]);
});

test("compare: progress moves forward and ends at 1", async () => {
  const p = pairs[5];
  const seen: number[] = [];
  await compareImages(await open(p.a), await open(p.b), { onProgress: (f) => seen.push(f) });
  assert.ok(seen.length > 0);
  assert.ok(seen.every((f, i) => f >= 0 && f <= 1 && (i === 0 || f >= seen[i - 1])));
  assert.equal(seen[seen.length - 1], 1);
});

test("compare: empty images are identical", async () => {
  const empty = async (): Promise<BlockDevice> => RawImage.open(new MemoryStorage(new Uint8Array(0)));
  assert.deepEqual((await compareImages(await empty(), await empty())).messages, ["Images are identical."]);
});

test("compare: qemu-img compare prints the same messages for the same pairs", async () => {
  const disagreements: string[] = [];
  await withTempDir(async (dir) => {
    for (const p of pairs) {
      writeFiles(dir, { "a.qcow2": buildImage(p.a).bytes, "b.qcow2": buildImage(p.b).bytes });
      const r = qemuImg(
        ["compare", ...(p.strict ? ["-s"] : []), "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2"],
        dir,
      );
      assert.ok(r.code === 0 || r.code === 1, r.stderr);
      const theirs = r.stdout.trimEnd().split("\n");
      const ours = await compareImages(await open(p.a), await open(p.b), { strict: p.strict });
      if (JSON.stringify(ours.messages) !== JSON.stringify(theirs) || (ours.identical ? 0 : 1) !== r.code) {
        disagreements.push(
          `${p.name}: qemu-img ${JSON.stringify(theirs)} (exit ${r.code}), qcowkit ${JSON.stringify(ours.messages)}`,
        );
      }
    }
  });
  assert.deepEqual(disagreements, []);
});
