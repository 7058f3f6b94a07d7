/** `qcowkit measure`: qemu-img measure's figures, flags, output and refusals. */
import { QcowError, unsupported } from "../errors.js";
import type { Image } from "../image/open.js";
import { openImageFile } from "../node.js";
import { type MeasureInfo, type MeasureOptions, measure } from "../ops/measure.js";
import type { Command } from "./commands.js";
import { parseOptionList } from "./create.js";
import { ExitError, formatOption } from "./exit.js";
import { stdout } from "./output.js";
import { qdictKeys } from "./qobject.js";

type Values = Parameters<Command["run"]>[0];
const str = (v: Values, k: string): string | undefined => v[k] as string | undefined;

/** Formats QEMU knows that can create images but not measure them. */
const NO_MEASURE = ["vmdk", "vdi", "vpc", "vhdx", "qcow", "qed", "parallels", "file", "nbd", "host_device"];
/** Formats QEMU knows that cannot create images at all. */
const NO_CREATE = ["bochs", "cloop", "dmg", "vvfat", "blkdebug", "null-co", "throttle"];

const SIZE_HINT =
  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/**
 * QEMU's size syntax (qemu_strtosz) in BigInt, for sizes past 2^53: a decimal or 0x-hex
 * integer, an optional fraction with a unit, a suffix B/K/M/G/T/P/E. Undefined when invalid.
 */
export function parseSizeBig(text: string): bigint | undefined {
  const m = /^(0[xX][0-9a-fA-F]+|\d+)(\.\d*)?([bBkKmMgGtTpPeE]?)$/.exec(text.trimStart());
  if (!m) return undefined;
  const hex = /^0[xX]/.test(m[1]);
  if (hex && m[2] !== undefined) return undefined;
  const unit = 1024n ** BigInt(m[3] ? "BKMGTPE".indexOf(m[3].toUpperCase()) : 0);
  const digits = m[2] && m[2].length > 1 ? m[2].slice(1) : "";
  if (digits !== "" && unit === 1n) return undefined;
  // The fraction rounds to the nearest byte.
  const scale = 10n ** BigInt(digits.length);
  const fraction = digits === "" ? 0n : (BigInt(digits) * unit * 2n + scale) / (2n * scale);
  const value = BigInt(m[1]) * unit + fraction;
  return value < 2n ** 64n ? value : undefined;
}

/** qemu-img's cvtnum for --size: a size below 2^63, or its two-line error. */
function parseImageSize(text: string): bigint {
  const v = text.trimStart().startsWith("-") ? undefined : parseSizeBig(text);
  if (v === undefined) {
    throw new ExitError(
      "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nqcowkit: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
    );
  }
  if (v >= 2n ** 63n) throw new ExitError("Invalid image size specified. Must be between 0 and 9223372036854775807.");
  return v;
}

const QCOW2_KEYS = [
  "size",
  "compat",
  "backing_file",
  "backing_fmt",
  "data_file",
  "data_file_raw",
  "encryption",
  "encrypt.format",
  "cluster_size",
  "preallocation",
  "lazy_refcounts",
  "refcount_bits",
  "compression_type",
  "extended_l2",
];
/** The file protocol's creation options, which qemu-img measure also accepts. */
const FILE_KEYS = ["size", "preallocation", "nocow", "extent_size_hint"];
const BOOL_KEYS = ["data_file_raw", "encryption", "lazy_refcounts", "extended_l2", "nocow"];
const SIZE_KEYS = ["size", "cluster_size", "extent_size_hint"];

/**
 * The -o list as QEMU's option parser takes it: unknown names and badly typed values are
 * refused (with "Invalid options for file format"); then the format's own checks.
 */
export function measureOptionsFrom(lists: string[], format: "raw" | "qcow2"): MeasureOptions {
  const o = parseOptionList(lists);
  const invalid = (message: string): ExitError =>
    new ExitError(`${message}\nqcowkit: Invalid options for file format '${format}'`);
  const known = format === "qcow2" ? [...QCOW2_KEYS, ...FILE_KEYS] : FILE_KEYS;
  const sizes = new Map<string, bigint>();
  for (const [k, v] of o) {
    if (!known.includes(k) && !(format === "qcow2" && k.startsWith("encrypt."))) {
      throw invalid(`Invalid parameter '${k}'`);
    }
    if (BOOL_KEYS.includes(k) && !["on", "off", "yes", "no", "true", "false", "y", "n"].includes(v))
      throw invalid(`Parameter '${k}' expects 'on' or 'off'`);
    if (SIZE_KEYS.includes(k)) {
      const n = v.startsWith("-") ? undefined : parseSizeBig(v);
      if (n === undefined) throw invalid(`Parameter '${k}' expects a non-negative number below 2^64\n${SIZE_HINT}`);
      sizes.set(k, n);
    }
    if (k === "refcount_bits" && !/^(0[xX][0-9a-fA-F]+|\d+)$/.test(v))
      throw invalid(`Parameter '${k}' expects a number`);
  }
  const opts: MeasureOptions = { format, size: sizes.get("size") };
  if (format === "raw") return opts;
  if (o.has("extended_l2")) opts.extendedL2 = ["on", "yes", "true", "y"].includes(o.get("extended_l2") as string);
  const cluster = sizes.get("cluster_size");
  // A value too large for a number is refused by the cluster size check all the same.
  if (cluster !== undefined) opts.clusterSize = cluster > 2n ** 32n ? 3 : Number(cluster);
  opts.compat = o.get("compat");
  if (o.has("refcount_bits")) opts.refcountBits = Number(o.get("refcount_bits"));
  opts.preallocation = o.get("preallocation");
  opts.backingFile = o.has("backing_file");
  // A LUKS header would add its payload size (QEMU needs the key to compute it): not supported.
  if (o.get("encrypt.format") === "luks") throw unsupported("LUKS-encrypted qcow2 images are not supported");
  return opts;
}

function printInfo(info: MeasureInfo, json: boolean): void {
  if (!json) {
    let out = `required size: ${info.required}\nfully allocated size: ${info.fullyAllocated}\n`;
    if (info.bitmaps !== undefined) out += `bitmaps size: ${info.bitmaps}\n`;
    stdout(out);
    return;
  }
  // BlockMeasureInfo as QEMU prints it, keys in QDict order (values may exceed 2^53).
  const fields: Record<string, bigint | undefined> = {
    required: info.required,
    "fully-allocated": info.fullyAllocated,
    bitmaps: info.bitmaps,
  };
  const keys = qdictKeys(fields as unknown as Record<string, number | undefined>);
  stdout(`{\n${keys.map((k) => `    "${k}": ${fields[k]}`).join(",\n")}\n}\n`);
}

/** -l snapshot.name=NAME, -l snapshot.id=ID, or -l ID_OR_NAME. */
function snapshotOption(l: string | undefined): string | undefined {
  if (l === undefined) return undefined;
  const m = /^snapshot\.(name|id)=(.*)$/.exec(l);
  return m ? m[2] : l;
}

export const measureCommand: Command = {
  name: "measure",
  synopsis: "qcowkit measure [--output human|json] [-O FMT] [-o OPTIONS] [-l SNAPSHOT] [-f FMT] (--size SIZE | FILE)",
  help: [
    "Calculates the file size a new image needs: for a source FILE's contents, or for a disk of SIZE bytes.",
    "  -O FMT       output format: raw (default) or qcow2",
    "  -o OPTIONS   qcow2 creation options: cluster_size, refcount_bits, extended_l2, preallocation, compat, backing_file",
    "  -l SNAPSHOT  measure an internal snapshot of FILE (snapshot.name=NAME, snapshot.id=ID, or ID_OR_NAME)",
    "  --size SIZE  measure an empty image of SIZE bytes (k, M, G, T, P, E suffixes)",
    "Prints the required size, the fully allocated size and, for a qcow2 v3 source and target, the bitmaps size.",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    O: { type: "string", short: "O" },
    o: { type: "string", short: "o", multiple: true },
    l: { type: "string", short: "l" },
    output: { type: "string" },
    size: { type: "string" },
    U: { type: "boolean", short: "U" },
    "force-share": { type: "boolean" },
  },
  async run(v, p) {
    const output = str(v, "output") ?? "human";
    if (output !== "human" && output !== "json")
      throw new ExitError("--output must be used with human or json as argument.");
    const size = str(v, "size") !== undefined ? parseImageSize(str(v, "size") as string) : undefined;
    if (p.length > 1) throw new ExitError("At most one filename argument is allowed.");
    const file = p[0];
    const snapshot = snapshotOption(str(v, "l"));
    if (file === undefined && (str(v, "f") !== undefined || snapshot !== undefined))
      throw new ExitError("--image-opts, -f, and -l require a filename argument.");
    if (file !== undefined && size !== undefined)
      throw new ExitError("--size N cannot be used together with a filename.");
    if (file === undefined && size === undefined)
      throw new ExitError("Either --size N or one filename must be specified.");
    let source: Image | undefined;
    if (file !== undefined)
      source = await openSource(file, formatOption(str(v, "f")), snapshot, v.U === true || v["force-share"] === true);
    try {
      const outFmt = str(v, "O") ?? "raw";
      if (NO_MEASURE.includes(outFmt))
        throw new ExitError(`Block driver '${outFmt}' does not support size measurement`);
      if (NO_CREATE.includes(outFmt)) throw new ExitError(`Format driver '${outFmt}' does not support image creation`);
      if (outFmt !== "raw" && outFmt !== "qcow2") throw new ExitError(`Unknown file format '${outFmt}'`);
      const opts = measureOptionsFrom((v.o as string[] | undefined) ?? [], outFmt);
      if (size !== undefined) opts.size = size;
      printInfo(await measure(opts, source), output === "json");
    } finally {
      await source?.close();
    }
    return 0;
  },
};

/** Opens the source with its backing chain, naming it in errors as qemu-img does. */
async function openSource(
  file: string,
  format: Image["format"] | undefined,
  snapshot: string | undefined,
  forceShare: boolean,
): Promise<Image> {
  const img: Image = await openImageFile(file, { format, forceShare });
  if (snapshot === undefined) return img;
  await img.close();
  try {
    return await openImageFile(file, { format, snapshot, forceShare });
  } catch (e) {
    if (e instanceof QcowError && e.code === "not-found")
      throw new ExitError("Failed to load snapshot: Can't find snapshot");
    throw e;
  }
}
