/** `qcowkit amend`: qemu-img amend's options, its option help and its refusals. */
import { invalidArgument } from "../errors.js";
import { type AmendOptions, amendImage } from "../image/amend.js";
import { openImageFile } from "../node.js";
import type { Command } from "./commands.js";
import { parseOptionList } from "./create.js";
import { ExitError, formatOption } from "./exit.js";
import { stdout } from "./output.js";
import { Progress } from "./progress.js";
import { parseSize } from "./size.js";

/** What `qemu-img amend -o help` prints for qcow2 (qemu-img 7.2), byte for byte. */
const QCOW2_AMEND_HELP = `Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`;

type OptionType = "str" | "bool" | "num" | "size";

/** The amend options and their QemuOpts types, in QEMU's order. */
const AMEND_OPTIONS: [string, OptionType][] = [
  ["encrypt.state", "str"],
  ["encrypt.keyslot", "num"],
  ["encrypt.old-secret", "str"],
  ["encrypt.new-secret", "str"],
  ["encrypt.iter-time", "num"],
  ["size", "size"],
  ["compat", "str"],
  ["backing_file", "str"],
  ["backing_fmt", "str"],
  ["data_file", "str"],
  ["data_file_raw", "bool"],
  ["lazy_refcounts", "bool"],
  ["refcount_bits", "num"],
];

/** Options qcow2 takes only at creation: qemu-img names them as such. */
const CREATE_ONLY: [string, OptionType][] = [
  ["cluster_size", "size"],
  ["preallocation", "str"],
  ["compression_type", "str"],
  ["extended_l2", "bool"],
  ["encryption", "bool"],
  ["encrypt.format", "str"],
  ["encrypt.key-secret", "str"],
  ["encrypt.cipher-alg", "str"],
  ["encrypt.cipher-mode", "str"],
  ["encrypt.ivgen-alg", "str"],
  ["encrypt.ivgen-hash-alg", "str"],
  ["encrypt.hash-alg", "str"],
];

/** QemuOpts' type check of one value; undefined when it parses. */
function typeError(name: string, type: OptionType, value: string): string | undefined {
  switch (type) {
    case "bool":
      return ["on", "off", "yes", "no", "true", "false", "y", "n"].includes(value)
        ? undefined
        : `Parameter '${name}' expects 'on' or 'off'`;
    case "num":
      return /^(0[xX][0-9a-fA-F]+|\d+)$/.test(value) ? undefined : `Parameter '${name}' expects a number`;
    case "size":
      try {
        parseSize(value, name);
        return undefined;
      } catch {
        return (
          `Parameter '${name}' expects a non-negative number below 2^64\n` +
          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
          "and exabytes, respectively."
        );
      }
    default:
      return undefined;
  }
}

/** Parses the -o list as qemu-img does (unknown names, then types), into amend options. */
export function amendOptionsFrom(o: Map<string, string>): AmendOptions {
  const known = new Map(AMEND_OPTIONS);
  for (const [k, v] of o) {
    const type = known.get(k);
    if (type === undefined) {
      const createOnly = new Map(CREATE_ONLY);
      // The hint only when the whole list would parse as creation options.
      const all = [...o].every(([n, val]) => {
        const t = known.get(n) ?? createOnly.get(n);
        return t !== undefined && typeError(n, t, val) === undefined;
      });
      throw invalidArgument(
        `Invalid parameter '${k}'${all ? "\nThis option is only supported for image creation" : ""}`,
      );
    }
    const err = typeError(k, type, v);
    if (err) throw invalidArgument(err);
  }
  const out: AmendOptions = {};
  const bool = (v: string): boolean => ["on", "yes", "true", "y"].includes(v);
  const compat = o.get("compat");
  if (compat !== undefined) {
    if (compat === "0.10" || compat === "v2") out.version = 2;
    else if (compat === "1.1" || compat === "v3") out.version = 3;
    else throw invalidArgument(`Unknown compatibility level ${compat}`);
  }
  if (o.has("refcount_bits")) out.refcountBits = Number(o.get("refcount_bits"));
  if (o.has("lazy_refcounts")) out.lazyRefcounts = bool(o.get("lazy_refcounts") as string);
  if (o.has("backing_file")) out.backingFile = o.get("backing_file");
  if (o.has("backing_fmt")) out.backingFormat = o.get("backing_fmt");
  if (o.has("data_file")) out.dataFile = o.get("data_file");
  if (o.has("data_file_raw")) out.dataFileRaw = bool(o.get("data_file_raw") as string);
  if (o.has("size")) out.size = parseSize(o.get("size") as string, "size");
  if ([...o.keys()].some((k) => k.startsWith("encrypt."))) out.encryption = true;
  return out;
}

function printAmendHelp(fmt: string): number {
  if (fmt === "qcow2") {
    stdout(QCOW2_AMEND_HELP);
    return 0;
  }
  if (fmt === "raw") throw new ExitError("Format driver 'raw' does not support option amendment");
  throw new ExitError(`Unknown file format '${fmt}'`);
}

export const amend: Command = {
  name: "amend",
  synopsis: "qcowkit amend [-f FMT] [-t CACHE] [-p] [-q] [--force] -o OPTIONS FILE",
  help: [
    "Changes options of an existing qcow2 image in place (-o a=b,c=d; '-o help' lists them):",
    "  compat=0.10|1.1   downgrade to v2 (zero clusters are expanded; refused while the image uses",
    "                    v3-only features) or upgrade to v3",
    "  refcount_bits=N   rewrite the refcount structures with N-bit entries (1..64; other than 16 needs v3)",
    "  size=SIZE         grow the virtual disk (shrinking is refused)",
    "  lazy_refcounts=on|off (v3), data_file=NAME (images with a data file), data_file_raw=off",
    "  backing_file, backing_fmt: only their current values (use rebase to change them)",
    "  -p  show progress    -q  quiet    -t CACHE  writeback (default), unsafe, none, ...",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    o: { type: "string", short: "o", multiple: true },
    t: { type: "string", short: "t" },
    p: { type: "boolean", short: "p" },
    q: { type: "boolean", short: "q" },
    force: { type: "boolean" },
  },
  async run(v, p) {
    const lists = (v.o as string[] | undefined) ?? [];
    if (lists.length === 0)
      throw new ExitError("Must specify options (-o)\nTry 'qcowkit amend --help' for more information");
    for (const l of lists) if (l === "" || /(^|[^,]),$/.test(l)) throw invalidArgument(`Invalid option list: ${l}`);
    const o = parseOptionList(lists);
    const help = o.has("help") || o.has("?");
    const fmt = v.f as string | undefined;
    if (fmt !== undefined && help) return printAmendHelp(fmt);
    if (p.length !== 1) throw new ExitError("Expecting one image file name");
    const cacheMode = (v.t as string | undefined) ?? "writeback";
    if (!["unsafe", "writeback", "none", "writethrough", "directsync"].includes(cacheMode)) {
      throw invalidArgument(`Invalid cache option: ${cacheMode}`);
    }
    const img = await openImageFile(p[0], {
      format: formatOption(fmt),
      readOnly: false,
      cache: cacheMode === "unsafe" ? "unsafe" : "writeback",
    });
    if (img.format !== "qcow2") {
      await img.close();
      return printAmendHelp("raw");
    }
    let opts: AmendOptions = {};
    try {
      if (!help) opts = amendOptionsFrom(o);
    } catch (e) {
      await img.close();
      throw e;
    }
    if (help) {
      await img.close();
      return printAmendHelp("qcow2");
    }
    const progress = new Progress(Boolean(v.p) && !v.q);
    await amendImage(img, { ...opts, onProgress: (f) => progress.update(f) });
    progress.end();
    return 0;
  },
};
