/** `qcowkit create`: qemu-img create's options, its "Formatting ..." line and its refusals. */
import { rmSync } from "node:fs";
import { invalidArgument, QcowError } from "../errors.js";
import { OpenError } from "../image/open.js";
import type { Qcow2Image } from "../image/qcow2.js";
import { FileStorage } from "../io/file.js";
import { combinePath, openImageFile } from "../node.js";
import { type Preallocation, type Qcow2CreateOptions, validateCreateOptions, writeEmptyQcow2 } from "../ops/create.js";
import { formatOption } from "./exit.js";
import { stdout } from "./output.js";
import { parseSize } from "./size.js";

/** Splits qemu's `-o a=b,c=d` (",," is a literal comma) into ordered pairs. */
export function parseOptionList(lists: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const list of lists) {
    const parts: string[] = [];
    let cur = "";
    for (let i = 0; i < list.length; i++) {
      if (list[i] === "," && list[i + 1] === ",") {
        cur += ",";
        i++;
      } else if (list[i] === ",") {
        parts.push(cur);
        cur = "";
      } else {
        cur += list[i];
      }
    }
    parts.push(cur);
    for (const p of parts) {
      if (p === "") continue;
      const eq = p.indexOf("=");
      out.set(eq < 0 ? p : p.slice(0, eq), eq < 0 ? "on" : p.slice(eq + 1));
    }
  }
  return out;
}

function parseBool(name: string, v: string): boolean {
  if (["on", "yes", "true", "y"].includes(v)) return true;
  if (["off", "no", "false", "n"].includes(v)) return false;
  throw invalidArgument(`Parameter '${name}' expects 'on' or 'off'`);
}

const QCOW2_OPTIONS = [
  "compat",
  "cluster_size",
  "refcount_bits",
  "lazy_refcounts",
  "compression_type",
  "extended_l2",
  "preallocation",
  "backing_file",
  "backing_fmt",
  "data_file",
  "data_file_raw",
  "size",
];

/** The create options of a -o list (plus -b/-F); `defaults` fill what the list leaves out. */
export function qcow2OptionsFrom(
  o: Map<string, string>,
  size: number | undefined,
): Qcow2CreateOptions & { size: number } {
  for (const k of o.keys()) if (!QCOW2_OPTIONS.includes(k)) throw invalidArgument(`Invalid parameter '${k}'`);
  const opts: Qcow2CreateOptions & { size: number } = { size: size ?? 0 };
  const compat = o.get("compat");
  if (compat !== undefined) {
    if (compat === "0.10" || compat === "v2") opts.version = 2;
    else if (compat === "1.1" || compat === "v3") opts.version = 3;
    else throw invalidArgument(`Parameter 'version' does not accept value '${compat}'`);
  }
  const num = (k: string): number | undefined => (o.has(k) ? parseSize(o.get(k) as string, k) : undefined);
  opts.clusterSize = num("cluster_size");
  if (o.has("refcount_bits")) {
    const r = Number(o.get("refcount_bits"));
    if (!Number.isInteger(r)) throw invalidArgument("Refcount width must be a power of two and may not exceed 64 bits");
    opts.refcountBits = r;
  }
  if (o.has("lazy_refcounts")) opts.lazyRefcounts = parseBool("lazy_refcounts", o.get("lazy_refcounts") as string);
  if (o.has("extended_l2")) opts.extendedL2 = parseBool("extended_l2", o.get("extended_l2") as string);
  if (o.has("data_file_raw")) opts.dataFileRaw = parseBool("data_file_raw", o.get("data_file_raw") as string);
  const ct = o.get("compression_type");
  if (ct !== undefined) {
    if (ct !== "zlib" && ct !== "zstd")
      throw invalidArgument(`Parameter 'compression-type' does not accept value '${ct}'`);
    opts.compressionType = ct;
  }
  const pre = o.get("preallocation");
  if (pre !== undefined) {
    if (!["off", "metadata", "falloc", "full"].includes(pre))
      throw invalidArgument(`Parameter 'preallocation' does not accept value '${pre}'`);
    opts.preallocation = pre as Preallocation;
  }
  if (o.has("backing_file")) opts.backingFile = o.get("backing_file");
  if (o.has("backing_fmt")) opts.backingFormat = o.get("backing_fmt");
  if (o.has("data_file")) opts.dataFile = o.get("data_file");
  if (o.has("size")) opts.size = parseSize(o.get("size") as string, "image size");
  return opts;
}

/** qemu-img's "Formatting 'FILE', fmt=qcow2 ..." line, options in its order. */
export function formattingLine(file: string, fmt: string, o: Map<string, string>, opts: Qcow2CreateOptions): string {
  if (fmt === "raw") {
    const pre = o.has("preallocation") ? ` preallocation=${o.get("preallocation")}` : "";
    return `Formatting '${file}', fmt=raw size=${opts.size}${pre}`;
  }
  const parts = [`cluster_size=${opts.clusterSize ?? 65536}`, `extended_l2=${o.get("extended_l2") ?? "off"}`];
  if (o.has("preallocation")) parts.push(`preallocation=${o.get("preallocation")}`);
  parts.push(`compression_type=${o.get("compression_type") ?? "zlib"}`, `size=${opts.size}`);
  if (o.has("compat")) parts.push(`compat=${o.get("compat")}`);
  if (opts.backingFile !== undefined) parts.push(`backing_file=${opts.backingFile}`);
  if (opts.backingFormat !== undefined) parts.push(`backing_fmt=${opts.backingFormat}`);
  if (opts.dataFile !== undefined) parts.push(`data_file=${opts.dataFile}`);
  if (o.has("data_file_raw")) parts.push(`data_file_raw=${o.get("data_file_raw")}`);
  parts.push(`lazy_refcounts=${o.get("lazy_refcounts") ?? "off"}`, `refcount_bits=${o.get("refcount_bits") ?? 16}`);
  return `Formatting '${file}', fmt=qcow2 ${parts.join(" ")}`;
}

export interface CreateArgs {
  file: string;
  format: "qcow2" | "raw";
  options: Map<string, string>;
  size?: number;
  backing?: string;
  backingFormat?: string;
  /** -u: do not open the backing file (SIZE is then required). */
  unsafe?: boolean;
  quiet?: boolean;
}

export async function createImage(a: CreateArgs): Promise<void> {
  const o = new Map(a.options);
  if (a.backing !== undefined) o.set("backing_file", a.backing);
  if (a.backingFormat !== undefined) o.set("backing_fmt", a.backingFormat);
  // As qemu-img's bdrv_img_create: what goes wrong is reported as "FILE: message".
  const named = (e: unknown): unknown =>
    e instanceof QcowError ? new QcowError(e.code, `${a.file}: ${e.message}`, { cause: e }) : e;
  // qemu-img rejects unknown options before it prints its "Formatting" line, and bad values after.
  let opts: Qcow2CreateOptions & { size: number };
  try {
    const known = a.format === "qcow2" ? QCOW2_OPTIONS : ["preallocation", "size"];
    for (const k of o.keys()) if (!known.includes(k)) throw invalidArgument(`Invalid parameter '${k}'`);
    opts = { size: a.size ?? 0 };
    if (o.has("size")) opts.size = parseSize(o.get("size") as string, "image size");
    if (o.has("cluster_size")) opts.clusterSize = parseSize(o.get("cluster_size") as string, "cluster size");
    if (o.has("backing_file")) opts.backingFile = o.get("backing_file");
    if (o.has("backing_fmt")) opts.backingFormat = o.get("backing_fmt");
    if (o.has("data_file")) opts.dataFile = o.get("data_file");
    // Booleans are typed options: QemuOpts refuses a bad value while parsing, before printing.
    for (const k of ["lazy_refcounts", "extended_l2", "data_file_raw"]) if (o.has(k)) parseBool(k, o.get(k) as string);
    if (opts.backingFile !== undefined && opts.backingFormat === undefined) {
      throw invalidArgument("Backing file specified without backing format");
    }
    if (a.size === undefined && !o.has("size")) {
      if (opts.backingFile === undefined || a.unsafe) throw invalidArgument("Image creation needs a size parameter");
      // As qemu-img: the size of the backing file, found from the new image's directory.
      const backing = await openImageFile(combinePath(a.file, opts.backingFile), {
        format: formatOption(opts.backingFormat),
        noBacking: true,
      }).catch((e: unknown) => {
        // qemu-img names the new image, then the file's own error (without a second "Could not open").
        throw e instanceof OpenError ? new QcowError(e.code, e.reason, { cause: e }) : e;
      });
      opts.size = backing.size;
      await backing.close();
    }
  } catch (e) {
    throw named(e);
  }
  if (!a.quiet) stdout(`${formattingLine(a.file, a.format, o, opts)}\n`);
  // Both drivers round the size up to whole 512-byte sectors.
  const size = Math.ceil(opts.size / 512) * 512;
  try {
    if (a.format === "raw") {
      await createRaw(a.file, size, o.get("preallocation") ?? "off");
      return;
    }
    await createQcow2(a.file, validateCreateOptions({ ...qcow2OptionsFrom(o, opts.size), size }));
  } catch (e) {
    throw named(e);
  }
}

async function createQcow2(
  file: string,
  checked: Qcow2CreateOptions & { size: number; preallocation: Preallocation },
): Promise<void> {
  const storage = await FileStorage.open(file, { readOnly: false, create: true });
  try {
    await writeEmptyQcow2(storage, checked);
  } catch (e) {
    await storage.close();
    rmSync(file, { force: true });
    throw e;
  }
  await storage.close();
  if (checked.dataFile !== undefined) {
    // QEMU creates the data file at the image's size.
    const data = await FileStorage.open(combinePath(file, checked.dataFile), { readOnly: false, create: true });
    await data.truncate(checked.size);
    await data.close();
  }
  if (checked.preallocation !== "off") {
    const img = (await openImageFile(file, { readOnly: false, noBacking: true })) as Qcow2Image;
    try {
      await img.writer?.preallocate(checked.preallocation !== "metadata");
    } finally {
      await img.close();
    }
  }
}

async function createRaw(file: string, size: number, prealloc: string): Promise<void> {
  if (!["off", "falloc", "full"].includes(prealloc)) {
    // qemu-img creates the (empty) file before it looks at the mode.
    await (await FileStorage.open(file, { readOnly: false, create: true })).close();
    throw invalidArgument(`Unsupported preallocation mode: ${prealloc}`);
  }
  const s = await FileStorage.open(file, { readOnly: false, create: true });
  try {
    await s.truncate(size);
    if (prealloc !== "off") {
      const zeros = new Uint8Array(Math.min(size, 4 * 1024 * 1024));
      for (let at = 0; at < size; at += zeros.length)
        await s.write(zeros.subarray(0, Math.min(zeros.length, size - at)), at);
    }
    await s.flush();
  } finally {
    await s.close();
  }
}
