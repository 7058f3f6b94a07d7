/**
 * QEMU's QDict key order and pretty JSON (qobject/qdict.c, qobject/json-writer.c), and the
 * human dumps built on them, against what qemu-img 7.2 really prints for real images.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { humanInfo } from "../../src/cli/human.js";
import { dumpHuman, type QObject, type QValue, qdictKeys, toQemuJson } from "../../src/cli/qobject.js";
import type { ImageInfo } from "../../src/ops/info.js";
import { qemuImg, withTempDir } from "./build-image.js";

/** QAPI field order (qapi/block-core.json, QEMU 7.2): the order the output visitor adds keys. */
const QAPI_ORDER: Record<string, string[]> = {
  ImageInfo: [
    "filename",
    "format",
    "dirty-flag",
    "actual-size",
    "virtual-size",
    "cluster-size",
    "encrypted",
    "compressed",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "backing-image",
    "format-specific",
  ],
  SnapshotInfo: ["id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "icount"],
  ImageInfoSpecific: ["type", "data"],
  ImageInfoSpecificQCow2: [
    "compat",
    "data-file",
    "data-file-raw",
    "extended-l2",
    "lazy-refcounts",
    "corrupt",
    "refcount-bits",
    "encrypt",
    "bitmaps",
    "compression-type",
  ],
  Qcow2BitmapInfo: ["name", "granularity", "flags"],
};

function qapiType(o: QObject): string {
  if ("virtual-size" in o) return "ImageInfo";
  if ("vm-clock-nsec" in o) return "SnapshotInfo";
  if ("type" in o && "data" in o) return "ImageInfoSpecific";
  if ("compat" in o) return "ImageInfoSpecificQCow2";
  if ("granularity" in o) return "Qcow2BitmapInfo";
  throw new Error(`unknown object with keys ${Object.keys(o).join(", ")}`);
}

/** The same value with every object's keys inserted in QAPI order, as QEMU builds it. */
function inQapiOrder(v: QValue): QValue {
  if (Array.isArray(v)) return v.map(inQapiOrder);
  if (typeof v !== "object") return v;
  const order = QAPI_ORDER[qapiType(v)];
  const keys = Object.keys(v);
  const unknown = keys.filter((k) => !order.includes(k));
  assert.deepEqual(unknown, [], "keys missing from the QAPI order table");
  const out: QObject = {};
  for (const k of order) if (k in v) out[k] = inQapiOrder(v[k] as QValue);
  return out;
}

/** Every object in a parsed value, with the key order of the text it was parsed from. */
function objects(v: QValue, path = "$"): { path: string; keys: string[]; value: QObject }[] {
  if (Array.isArray(v)) return v.flatMap((x, i) => objects(x, `${path}[${i}]`));
  if (typeof v !== "object") return [];
  return [
    { path, keys: Object.keys(v), value: v },
    ...Object.entries(v).flatMap(([k, x]) => objects(x as QValue, `${path}.${k}`)),
  ];
}

interface QemuInfo {
  json: string;
  human: string;
}

/**
 * Real images made by qemu-img: a v3 overlay with a backing file, a snapshot and two bitmaps
 * (one with no flags: an empty list), a v2 image, and a raw file.
 */
function qemuInfos(dir: string): Record<string, QemuInfo> {
  const run = (...args: string[]): string => {
    const r = qemuImg(args, dir);
    assert.equal(r.code, 0, `qemu-img ${args.join(" ")}: ${r.stderr}`);
    return r.stdout;
  };
  run("create", "-q", "-f", "qcow2", "base.qcow2", "1M");
  run("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2");
  run("snapshot", "-c", "snap1", "top.qcow2");
  run("bitmap", "--add", "--disable", "top.qcow2", "b0");
  run("bitmap", "--add", "top.qcow2", "b1");
  run("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "v2.qcow2", "3M");
  run(
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "extended_l2=on,cluster_size=128k,refcount_bits=64,lazy_refcounts=on",
    "ext.qcow2",
    "20M",
  );
  run("create", "-q", "-f", "raw", "r.raw", "1000k");
  const out: Record<string, QemuInfo> = {};
  for (const f of ["top.qcow2", "v2.qcow2", "ext.qcow2", "r.raw"]) {
    out[f] = { json: run("info", "--output=json", f), human: run("info", f) };
  }
  out["top.qcow2 --backing-chain"] = { json: run("info", "--output=json", "--backing-chain", "top.qcow2"), human: "" };
  return out;
}

test("qdictKeys: key order of every object in qemu-img info --output=json", async () => {
  await withTempDir((dir) => {
    const wrong: string[] = [];
    for (const [name, info] of Object.entries(qemuInfos(dir))) {
      const parsed = JSON.parse(info.json) as QValue;
      const rebuilt = inQapiOrder(parsed);
      const theirs = objects(parsed);
      const ours = objects(rebuilt);
      theirs.forEach((o, i) => {
        const got = qdictKeys(ours[i].value);
        if (JSON.stringify(got) !== JSON.stringify(o.keys))
          wrong.push(`${name} ${o.path}: ${got.join(",")} / qemu-img: ${o.keys.join(",")}`);
      });
    }
    assert.deepEqual(wrong, []);
  });
});

test("toQemuJson: byte for byte what qemu-img info --output=json prints", async () => {
  await withTempDir((dir) => {
    for (const [name, info] of Object.entries(qemuInfos(dir))) {
      const rebuilt = inQapiOrder(JSON.parse(info.json) as QValue);
      assert.equal(`${toQemuJson(rebuilt)}\n`, info.json, name);
    }
  });
});

test("humanInfo and dumpHuman: byte for byte what qemu-img info prints", async () => {
  await withTempDir((dir) => {
    for (const [name, info] of Object.entries(qemuInfos(dir))) {
      if (info.human === "") continue;
      const parsed = inQapiOrder(JSON.parse(info.json) as QValue) as unknown as ImageInfo;
      assert.equal(humanInfo(parsed), info.human, name);
    }
  });
});

test("toQemuJson: empty lists and objects at every depth", () => {
  assert.equal(toQemuJson([]), "[\n]");
  assert.equal(toQemuJson({}), "{\n}");
  assert.equal(toQemuJson({ a: [] }), '{\n    "a": [\n    ]\n}');
  const inner = qdictKeys({ flags: [], o: {} })
    .map((k) => (k === "o" ? '        "o": {\n        }' : '        "flags": [\n        ]'))
    .join(",\n");
  assert.equal(toQemuJson([{ flags: [], o: {} }]), `[\n    {\n${inner}\n    }\n]`);
  assert.equal(toQemuJson([1, [2, []]]), "[\n    1,\n    [\n        2,\n        [\n        ]\n    ]\n]");
});

test("toQemuJson: scalars", () => {
  assert.equal(toQemuJson(0), "0");
  assert.equal(toQemuJson(9007199254740991), "9007199254740991");
  assert.equal(toQemuJson(-1), "-1");
  assert.equal(toQemuJson(true), "true");
  assert.equal(toQemuJson(false), "false");
  assert.equal(toQemuJson('a "b" \\ c'), '"a \\"b\\" \\\\ c"');
});

test("toQemuJson: strings escaped as QEMU's json-writer escapes them", () => {
  // qemu-img info --output=json on a file named "é😀<TAB>x.qcow2" prints
  // "filename": "\u00E9\uD83D\uDE00\tx.qcow2": everything outside printable ASCII as \uXXXX
  // (upper-case hex, surrogate pairs beyond the BMP), and the short escapes for \b \f \n \r \t.
  assert.equal(toQemuJson("é😀\tx.qcow2"), '"\\u00E9\\uD83D\\uDE00\\tx.qcow2"');
  assert.equal(toQemuJson("a\u0001b\u007fc/d"), '"a\\u0001b\\u007Fc/d"');
  assert.equal(toQemuJson("\b\f\n\r"), '"\\b\\f\\n\\r"');
});

test("dumpHuman: nested lists and objects, keys with spaces", () => {
  const v: QObject = {
    "lazy-refcounts": false,
    bitmaps: [
      { name: "b0", flags: [] },
      { name: "b1", flags: ["auto", "in-use"] },
    ],
  };
  const keys = qdictKeys(v);
  const bitmapKeys = qdictKeys({ name: "b0", flags: [] });
  const bitmap = (name: string, flags: string[]): string =>
    bitmapKeys
      .map((k) =>
        k === "name"
          ? `            name: ${name}\n`
          : `            flags:\n${flags.map((f, i) => `                [${i}]: ${f}\n`).join("")}`,
      )
      .join("");
  const parts: Record<string, string> = {
    "lazy-refcounts": "    lazy refcounts: false\n",
    bitmaps: `    bitmaps:\n        [0]:\n${bitmap("b0", [])}        [1]:\n${bitmap("b1", ["auto", "in-use"])}`,
  };
  assert.equal(dumpHuman(v, 1), keys.map((k) => parts[k]).join(""));
});

test("qdictKeys: keys without a value are left out", () => {
  assert.deepEqual(qdictKeys({ a: 1, b: undefined }), ["a"]);
});
