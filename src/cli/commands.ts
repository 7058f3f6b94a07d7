/** The subcommands: each parses qemu-img's flags and prints qemu-img's output. */
import { rmSync } from "node:fs";
import type { ParseArgsConfig } from "node:util";
import { ClusterCompressor } from "../codec/compressor.js";
import { invalidArgument } from "../errors.js";
import type { Image, ImageFormat } from "../image/open.js";
import { RawImage } from "../image/raw.js";
import { FileStorage } from "../io/file.js";
import { openImageFile } from "../node.js";
import { compareImages } from "../ops/compare.js";
import { convert } from "../ops/convert.js";
import { validateCreateOptions, writeEmptyQcow2 } from "../ops/create.js";
import { type ImageInfo, imageInfo } from "../ops/info.js";
import { mapExtents } from "../ops/map.js";
import { amend } from "./cmd-amend.js";
import { bitmap } from "./cmd-bitmap.js";
import { check } from "./cmd-check.js";
import { commitCommand } from "./cmd-commit.js";
import { inspect } from "./cmd-inspect.js";
import { measureCommand } from "./cmd-measure.js";
import { rebaseCommand } from "./cmd-rebase.js";
import { resize } from "./cmd-resize.js";
import { serve } from "./cmd-serve.js";
import { snapshotCommand } from "./cmd-snapshot.js";
import { createImage, parseOptionList, qcow2OptionsFrom } from "./create.js";
import { ExitError, formatOption } from "./exit.js";
import { humanInfo, humanMapEntry, humanMapHeader, jsonMapEntry } from "./human.js";
import { stdout } from "./output.js";
import { Progress } from "./progress.js";
import { type QValue, toQemuJson } from "./qobject.js";
import { parseSize } from "./size.js";
import { setV8Flags } from "./v8-flags.js";

type Values = Record<string, string | boolean | string[] | undefined>;
type Options = NonNullable<ParseArgsConfig["options"]>;

export interface Command {
  name: string;
  synopsis: string;
  help: string;
  options: Options;
  /**
   * Takes operands off the arguments before options are parsed (qemu-img resize takes SIZE
   * first, so that "-1G" is a size); they are appended to the positionals.
   */
  takeOperands?(args: string[]): string[];
  /** `args` are the command's arguments as given, for commands where their order matters. */
  run(values: Values, positionals: string[], args: string[]): Promise<number>;
}

const str = (v: Values, k: string): string | undefined => v[k] as string | undefined;

function outputFormat(v: Values): "human" | "json" {
  const o = str(v, "output") ?? "human";
  if (o !== "human" && o !== "json") throw invalidArgument(`--output must be used with human or json as argument.`);
  return o;
}

function onePositional(p: string[], what: string): string {
  if (p.length !== 1) throw new ExitError(`Expecting one image file name${what ? ` (${what})` : ""}`);
  return p[0];
}

/** -l snapshot.name=NAME, -l snapshot.id=ID, -l NAME, or -s NAME: the snapshot to read. */
function snapshotOption(v: Values): string | undefined {
  const l = str(v, "l");
  if (l !== undefined) {
    const m = /^snapshot\.(name|id)=(.*)$/.exec(l);
    return m ? m[2] : l;
  }
  return str(v, "s");
}

/** -U / --force-share: read an image even while another process writes it (no lock refused). */
const SHARE_OPTIONS: Options = {
  U: { type: "boolean", short: "U" },
  "force-share": { type: "boolean" },
};

export const forceShare = (v: Values): boolean => v.U === true || v["force-share"] === true;

const info: Command = {
  name: "info",
  synopsis: "qcowkit info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE",
  help: [
    "Shows what an image is: format, sizes, backing file, snapshots and format details.",
    "FILE may be an http:// or https:// URL (its disk size is then unavailable).",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    output: { type: "string" },
    "backing-chain": { type: "boolean" },
    ...SHARE_OPTIONS,
  },
  async run(v, p) {
    const file = onePositional(p, "");
    const json = outputFormat(v) === "json";
    // As qemu-img: each image is opened without its backing file; --backing-chain walks the
    // names one by one, so a missing or looping backing file is reported, not fatal to the rest.
    const infos: ImageInfo[] = [];
    const seen = new Set<string>();
    let name: string | undefined = file;
    let format = formatOption(str(v, "f"));
    while (name !== undefined) {
      if (seen.has(name)) throw new ExitError(`Backing file '${name}' creates an infinite loop.`);
      seen.add(name);
      const img = await openImageFile(name, { format, noBacking: true, metadataOnly: true, forceShare: forceShare(v) });
      try {
        const i = await imageInfo(img);
        infos.push(i);
        name = v["backing-chain"] ? i["full-backing-filename"] : undefined;
        format = formatOption(i["backing-filename-format"]);
      } finally {
        await img.close();
      }
    }
    if (json) {
      const value = (v["backing-chain"] ? infos : infos[0]) as unknown as QValue;
      stdout(`${toQemuJson(value)}\n`);
    } else {
      stdout(infos.map(humanInfo).join("\n"));
    }
    return 0;
  },
};

const map: Command = {
  name: "map",
  synopsis: "qcowkit map [-f FMT] [--output human|json] [--start-offset OFFSET] [--max-length LEN] [-U] FILE",
  help: [
    "Lists the guest address space: where data, zeros and holes are, and which layer holds them.",
    "FILE may be an http:// or https:// URL.",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    output: { type: "string" },
    "start-offset": { type: "string" },
    "max-length": { type: "string" },
    ...SHARE_OPTIONS,
  },
  async run(v, p) {
    const file = onePositional(p, "");
    const json = outputFormat(v) === "json";
    const img = await openImageFile(file, { format: formatOption(str(v, "f")), forceShare: forceShare(v) });
    try {
      const start = str(v, "start-offset") !== undefined ? parseSize(str(v, "start-offset") as string, "offset") : 0;
      const maxLength =
        str(v, "max-length") !== undefined ? parseSize(str(v, "max-length") as string, "length") : img.size;
      const end = Math.min(img.size, start + maxLength);
      const out: string[] = [];
      const write = (s: string): void => {
        out.push(s);
        if (out.length >= 256) stdout(out.splice(0).join(""));
      };
      write(json ? "[" : humanMapHeader());
      let first = true;
      try {
        if (start < end) {
          for await (const e of mapExtents(img, start, end - start)) {
            if (json) {
              write(`${first ? "" : ",\n"}${jsonMapEntry(e)}`);
              first = false;
            } else {
              write(humanMapEntry(e));
            }
          }
        }
        if (json) write("]\n");
      } finally {
        stdout(out.join(""));
      }
    } finally {
      await img.close();
    }
    return 0;
  },
};

async function openSources(
  files: string[],
  fmt: ImageFormat | undefined,
  snapshot: string | undefined,
  share: boolean,
): Promise<Image[]> {
  const opened: Image[] = [];
  try {
    for (const f of files) opened.push(await openImageFile(f, { format: fmt, snapshot, forceShare: share }));
  } catch (e) {
    await Promise.all(opened.map((i) => i.close()));
    throw e;
  }
  return opened;
}

const convertCmd: Command = {
  name: "convert",
  synopsis:
    "qcowkit convert [-f FMT] [-O qcow2|raw] [-o OPTIONS] [-c] [-B BACKING [-F FMT]] [-n] [-l snapshot.name=NAME | -s NAME] [-S SIZE] [-m N] [-W] [-t CACHE] [-p] [-q] SRC... DST",
  help: [
    "Copies the guest contents of SRC (several are concatenated) into DST. SRC may be an http:// or https:// URL.",
    "  -O FMT       output format: raw (default) or qcow2",
    "  -o OPTIONS   qcow2 creation options, as for create (compat, cluster_size, compression_type, ...)",
    "  -c           compress the output clusters (qcow2; zlib or zstd per compression_type)",
    "  -B BACKING   make DST an overlay of BACKING and copy only what the sources' top layers hold",
    "  -n           DST exists already: write into it, do not create it",
    "  -l snapshot.name=NAME, -s NAME   read an internal snapshot of SRC",
    "  -S SIZE      zero runs of at least SIZE bytes become holes (default 4k; 0 disables)",
    "  -m N         requests in flight (1-16, default 8)",
    "  -W           allow out-of-order writes",
    "  -t CACHE     target cache mode: unsafe (default: no sync to disk), writeback, none, ... (sync at the end)",
    "  -p           show progress",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    O: { type: "string", short: "O" },
    o: { type: "string", short: "o", multiple: true },
    c: { type: "boolean", short: "c" },
    B: { type: "string", short: "B" },
    F: { type: "string", short: "F" },
    n: { type: "boolean", short: "n" },
    l: { type: "string", short: "l" },
    s: { type: "string", short: "s" },
    S: { type: "string", short: "S" },
    m: { type: "string", short: "m" },
    W: { type: "boolean", short: "W" },
    t: { type: "string", short: "t" },
    T: { type: "string", short: "T" },
    p: { type: "boolean", short: "p" },
    q: { type: "boolean", short: "q" },
    ...SHARE_OPTIONS,
  },
  async run(v, p) {
    if (p.length < 2) throw new ExitError("Expecting image file name(s) and a target");
    const cacheMode = str(v, "t") ?? "unsafe";
    if (!["unsafe", "writeback", "none", "writethrough", "directsync"].includes(cacheMode)) {
      throw invalidArgument(`Invalid cache option: ${cacheMode}`);
    }
    const cache = cacheMode === "unsafe" ? "unsafe" : "writeback";
    const target = p[p.length - 1];
    const outFmt = str(v, "O") ?? "raw";
    if (outFmt !== "raw" && outFmt !== "qcow2") throw invalidArgument(`Unknown file format '${outFmt}'`);
    if (v.c && outFmt !== "qcow2") throw invalidArgument("Compression not supported for this file format");
    if (str(v, "B") !== undefined && outFmt !== "qcow2")
      throw invalidArgument("Backing file not supported for file format 'raw'");
    if (v.n && (str(v, "o") !== undefined || str(v, "B") !== undefined)) {
      throw invalidArgument("-n cannot be combined with -o or -B");
    }
    const minSparse = str(v, "S") !== undefined ? parseSize(str(v, "S") as string, "sparse size") : 4096;
    const parallel = str(v, "m") !== undefined ? Number(str(v, "m")) : 8;
    if (!Number.isInteger(parallel) || parallel < 1 || parallel > 16) {
      throw invalidArgument("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
    }
    // No optimising compiler (TurboFan): convert's JavaScript runs per chunk or per cluster, and
    // its baseline code (Sparkplug) is quick enough, while TurboFan spent ~110 ms of CPU compiling
    // it on a 2 GiB raw -> qcow2 copy, on the cores the copy's reads and writes need: 377 -> 317 ms
    // (qemu-img: ~275 ms), and the peaks 4-13 MiB lower. The other convert cases of the bench
    // were unchanged within noise (qcow2 -> raw +2 % over 20 alternated runs). check keeps it.
    setV8Flags("--max-opt=1");
    const sources = await openSources(p.slice(0, -1), formatOption(str(v, "f")), snapshotOption(v), forceShare(v));
    const progress = new Progress(Boolean(v.p) && !v.q);
    let out: Image | undefined;
    let compressor: ClusterCompressor | undefined;
    const created = !v.n;
    try {
      const total = sources.reduce((n, s) => n + s.size, 0);
      if (v.n) {
        out = await openImageFile(target, { format: outFmt, readOnly: false, cache });
      } else if (outFmt === "raw") {
        const storage = await FileStorage.open(target, { readOnly: false, create: true, unsafe: cache === "unsafe" });
        await storage.truncate(total);
        out = await RawImage.open(storage, target);
      } else {
        const o = parseOptionList((v.o as string[] | undefined) ?? []);
        if (str(v, "B") !== undefined) o.set("backing_file", str(v, "B") as string);
        if (str(v, "F") !== undefined) o.set("backing_fmt", str(v, "F") as string);
        const opts = validateCreateOptions(qcow2OptionsFrom(o, total));
        const storage = await FileStorage.open(target, { readOnly: false, create: true });
        try {
          await writeEmptyQcow2(storage, opts);
        } finally {
          await storage.close();
        }
        out = await openImageFile(target, { format: "qcow2", readOnly: false, cache });
        if (opts.preallocation !== "off" && out.format === "qcow2")
          await out.writer?.preallocate(opts.preallocation !== "metadata");
      }
      if (v.c && out.format === "qcow2") {
        compressor = new ClusterCompressor(out.header.compressionType === 1 ? "zstd" : "zlib");
      }
      const targetZeroed = created && !(out.format === "qcow2" && out.backing);
      await convert(sources, out, {
        minSparse,
        parallel,
        targetZeroed,
        // In order unless -W, as qemu-img: one writer at a time, clusters allocated in guest order.
        outOfOrder: Boolean(v.W),
        topLayerOnly: str(v, "B") !== undefined,
        compressor,
        onProgress: (f) => progress.update(f),
      });
      await out.close();
      out = undefined;
    } catch (e) {
      await out?.close().catch(() => {});
      if (created) {
        try {
          rmSync(target, { force: true });
        } catch {
          // The error that stopped the command is the one to report.
        }
      }
      throw e;
    } finally {
      await Promise.all(sources.map((s) => s.close()));
    }
    progress.end();
    return 0;
  },
};

const compare: Command = {
  name: "compare",
  synopsis: "qcowkit compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2",
  help: [
    "Compares the guest contents of two images: exit 0 identical, 1 different, 2 on error.",
    "FILE1 and FILE2 may be http:// or https:// URLs.",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    F: { type: "string", short: "F" },
    p: { type: "boolean", short: "p" },
    q: { type: "boolean", short: "q" },
    s: { type: "boolean", short: "s" },
    ...SHARE_OPTIONS,
  },
  async run(v, p) {
    if (p.length !== 2) throw new ExitError("Expecting two image file names", 2);
    let a: Image | undefined;
    let b: Image | undefined;
    try {
      a = await openImageFile(p[0], { format: formatOption(str(v, "f")), forceShare: forceShare(v) });
      b = await openImageFile(p[1], { format: formatOption(str(v, "F")), forceShare: forceShare(v) });
    } catch (e) {
      await a?.close();
      throw new ExitError((e as Error).message, 2);
    }
    const quiet = Boolean(v.q);
    const progress = new Progress(Boolean(v.p) && !quiet);
    try {
      const r = await compareImages(a, b, { strict: Boolean(v.s), onProgress: (f) => progress.update(f) });
      progress.end();
      if (!quiet) stdout(r.messages.map((m) => `${m}\n`).join(""));
      return r.identical ? 0 : 1;
    } catch (e) {
      throw new ExitError((e as Error).message, 4);
    } finally {
      await a.close();
      await b.close();
    }
  },
};

const create: Command = {
  name: "create",
  synopsis: "qcowkit create [-f qcow2|raw] [-o OPTIONS] [-b BACKING [-F FMT]] [-u] [-q] FILE [SIZE]",
  help: [
    "Creates a new image. SIZE takes k, M, G, T, P, E suffixes; with -b it defaults to the backing file's size.",
    "BACKING may be an http:// or https:// URL: FILE is then a local overlay on the remote image.",
    "qcow2 options (-o a=b,c=d): compat=0.10|1.1, cluster_size, refcount_bits=1..64, lazy_refcounts=on|off,",
    "  compression_type=zlib|zstd, extended_l2=on|off, preallocation=off|metadata|falloc|full,",
    "  backing_file, backing_fmt, data_file, data_file_raw=on|off",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    o: { type: "string", short: "o", multiple: true },
    b: { type: "string", short: "b" },
    F: { type: "string", short: "F" },
    u: { type: "boolean", short: "u" },
    q: { type: "boolean", short: "q" },
  },
  async run(v, p) {
    if (p.length < 1 || p.length > 2) throw new ExitError("Expecting image file name");
    const fmt = str(v, "f") ?? "raw";
    if (fmt !== "qcow2" && fmt !== "raw") throw invalidArgument(`Unknown file format '${fmt}'`);
    await createImage({
      file: p[0],
      format: fmt,
      options: parseOptionList((v.o as string[] | undefined) ?? []),
      size: p[1] !== undefined ? parseSize(p[1], "image size") : undefined,
      backing: str(v, "b"),
      backingFormat: str(v, "F"),
      unsafe: Boolean(v.u),
      quiet: Boolean(v.q),
    });
    return 0;
  },
};

export const commands: Command[] = [
  create,
  info,
  map,
  check,
  convertCmd,
  compare,
  measureCommand,
  commitCommand,
  rebaseCommand,
  snapshotCommand,
  resize,
  amend,
  bitmap,
  serve,
  inspect,
];

export function usage(): string {
  return [
    "qcowkit: QCOW2 disk images without QEMU (a drop-in for qemu-img's subcommands)",
    "",
    "usage: qcowkit COMMAND [options]",
    "",
    "Commands:",
    ...commands.map((c) => `  ${c.synopsis}`),
    "",
    "Image names may be http:// or https:// URLs where qemu-img's curl driver takes them (read-only).",
    "Run 'qcowkit COMMAND --help' for a command's options. Set QCOWKIT_DEBUG=1 for stack traces.",
    "",
  ].join("\n");
}
