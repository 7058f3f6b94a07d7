/**
 * Sizes as qemu-img prints and parses them. sizeToStr is pinned to QEMU's size_to_str (its C
 * compiled and run on these values: frexp, then printf("%0.3g")); parseSize to what
 * `qemu-img create -f raw x SIZE` accepts and makes of each text (qemu_strtosz, qemu-img 7.2).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { sizeToStr } from "../../src/cli/human.js";
import { parseSize } from "../../src/cli/size.js";
import { QcowError } from "../../src/errors.js";

/** Output of QEMU's size_to_str for each value. */
const SIZE_TO_STR: [number, string][] = [
  [0, "0 B"],
  [1, "1 B"],
  [512, "512 B"],
  [999, "999 B"],
  // size_to_str moves to the next unit once the value reaches 1000 of the lower one.
  [1000, "0.977 KiB"],
  [1023, "0.999 KiB"],
  [1024, "1 KiB"],
  [1025, "1 KiB"],
  [1535, "1.5 KiB"],
  [1536, "1.5 KiB"],
  [10240, "10 KiB"],
  [12345, "12.1 KiB"],
  [65536, "64 KiB"],
  [200704, "196 KiB"],
  [1022976, "999 KiB"],
  [1023487, "999 KiB"],
  // %0.3g of 999.5 and above rounds to 1e+03.
  [1023488, "1e+03 KiB"],
  [1023999, "1e+03 KiB"],
  [1024000, "0.977 MiB"],
  [1048575, "1 MiB"],
  [1048576, "1 MiB"],
  [1335296, "1.27 MiB"],
  [5000000, "4.77 MiB"],
  [20971520, "20 MiB"],
  [123456789, "118 MiB"],
  [1048575999, "1e+03 MiB"],
  [1073741824, "1 GiB"],
  [1610612736, "1.5 GiB"],
  [2147483648, "2 GiB"],
  [1099511627776, "1 TiB"],
  [4398046511104, "4 TiB"],
  [1125899906842624, "1 PiB"],
  [9007199254740991, "8 PiB"],
];

test("sizeToStr: QEMU's size_to_str, value by value", () => {
  const wrong = SIZE_TO_STR.filter(([v, s]) => sizeToStr(v) !== s).map(
    ([v, s]) => `${v}: "${sizeToStr(v)}", want "${s}"`,
  );
  assert.deepEqual(wrong, []);
});

/** What qemu-img create makes of each size text. */
const ACCEPTED: [string, number][] = [
  ["0", 0],
  ["512", 512],
  ["512b", 512],
  ["512B", 512],
  ["1k", 1024],
  ["1K", 1024],
  ["1m", 1048576],
  ["1M", 1048576],
  ["1g", 1073741824],
  ["1G", 1073741824],
  ["1t", 1099511627776],
  ["1T", 1099511627776],
  ["2p", 2 * 1125899906842624],
  ["1.5M", 1572864],
  ["1.5k", 1536],
  ["0.5k", 512],
  ["1.25k", 1280],
  [" 1k", 1024], // leading white space is skipped (strtoull)
];

/** qemu_strtosz details qemu-img 7.2 also has: rounding, hex, a bare point. */
const ACCEPTED_DETAILS: [string, number][] = [
  ["1.7k", 1741], // 1740.8 rounds half up, not down
  ["0x10", 16], // hexadecimal, without fraction or suffix
  ["1.", 1],
];

const REFUSED = ["", "k", "-1", "1e3", "1KiB", "1k ", "1 k", "abc", "1.5", "1.5b", "1.5B", "0x1.8", "1x"];

test("parseSize: suffixes and fractions that qemu-img accepts", () => {
  const wrong: string[] = [];
  for (const [text, want] of ACCEPTED) {
    try {
      const got = parseSize(text);
      if (got !== want) wrong.push(`"${text}": ${got}, want ${want}`);
    } catch (e) {
      wrong.push(`"${text}": ${(e as Error).message}`);
    }
  }
  assert.deepEqual(wrong, []);
});

test("parseSize: qemu_strtosz's rounding, hexadecimal and bare decimal point", () => {
  const wrong: string[] = [];
  for (const [text, want] of ACCEPTED_DETAILS) {
    try {
      const got = parseSize(text);
      if (got !== want) wrong.push(`"${text}": ${got}, want ${want}`);
    } catch (e) {
      wrong.push(`"${text}": ${(e as Error).message}`);
    }
  }
  assert.deepEqual(wrong, []);
});

test("parseSize: what qemu-img refuses is refused, with qemu-img's message", () => {
  const wrong: string[] = [];
  for (const text of REFUSED) {
    try {
      wrong.push(`"${text}" accepted as ${parseSize(text)}`);
    } catch (e) {
      if (!(e instanceof QcowError) || e.code !== "invalid-argument") wrong.push(`"${text}": ${String(e)}`);
      else if (!/^Invalid size specified\. You may use k, M, G, T, P or E suffixes for/.test(e.message)) {
        wrong.push(`"${text}": message "${e.message}"`);
      }
    }
  }
  assert.deepEqual(wrong, []);
});

test("parseSize: the name of the value appears in the message", () => {
  assert.throws(
    () => parseSize("x", "offset"),
    (e: unknown) => e instanceof QcowError && /^Invalid offset specified\./.test(e.message),
  );
});

test("parseSize: sizes past 2^53 are refused rather than rounded", () => {
  assert.throws(
    () => parseSize("16E"),
    (e: unknown) => e instanceof QcowError && e.code === "invalid-argument",
  );
  assert.throws(
    () => parseSize("9007199254740993"),
    (e: unknown) => e instanceof QcowError,
  );
  assert.equal(parseSize("9007199254740991"), 9007199254740991);
});
