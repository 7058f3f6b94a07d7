/** `qcowkit bitmap`: qemu-img bitmap's actions, run in the order given, with its messages. */
import { parseArgs } from "node:util";
import { QcowError } from "../errors.js";
import { addBitmap, clearBitmap, mergeBitmap, removeBitmap, setBitmapEnabled } from "../image/bitmap-ops.js";
import type { Image } from "../image/open.js";
import type { Qcow2Image } from "../image/qcow2.js";
import { openImageFile } from "../node.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { parseSize } from "./size.js";

type Action = { op: "add" | "remove" | "clear" | "enable" | "disable" } | { op: "merge"; source: string };

const ACTIONS = new Set(["add", "remove", "clear", "enable", "disable", "merge"]);

const options: Command["options"] = {
  add: { type: "boolean", multiple: true },
  remove: { type: "boolean", multiple: true },
  clear: { type: "boolean", multiple: true },
  enable: { type: "boolean", multiple: true },
  disable: { type: "boolean", multiple: true },
  merge: { type: "string", multiple: true },
  g: { type: "string", short: "g" },
  granularity: { type: "string" },
  b: { type: "string", short: "b" },
  "source-file": { type: "string" },
  F: { type: "string", short: "F" },
  "source-format": { type: "string" },
  f: { type: "string", short: "f" },
  q: { type: "boolean", short: "q" },
};

/** The actions in the order they were given (qemu-img runs them in that order). */
function actionsOf(args: string[]): { actions: Action[]; values: Record<string, string | undefined> } {
  const { tokens } = parseArgs({ args, options, allowPositionals: true, strict: true, tokens: true });
  const actions: Action[] = [];
  // Later occurrences of -g, -b, -F win, as with getopt.
  const values: Record<string, string | undefined> = {};
  const alias: Record<string, string> = { granularity: "g", "source-file": "b", "source-format": "F" };
  for (const t of tokens) {
    if (t.kind !== "option") continue;
    if (ACTIONS.has(t.name)) {
      actions.push(t.name === "merge" ? { op: "merge", source: t.value as string } : ({ op: t.name } as Action));
    } else if (typeof t.value === "string") {
      values[alias[t.name] ?? t.name] = t.value;
    }
  }
  return { actions, values };
}

export const bitmap: Command = {
  name: "bitmap",
  synopsis:
    "qcowkit bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] [-q] FILE BITMAP",
  help: [
    "Changes the persistent dirty bitmap BITMAP of a qcow2 image; several actions run in the order given.",
    "  --add            create BITMAP, enabled (recording writes); with -g GRANULARITY bytes per bit",
    "                   (a power of two, 512 to 2G; default: the cluster size within 4k..64k)",
    "  --remove         delete BITMAP",
    "  --clear          reset every bit of BITMAP",
    "  --enable         writes mark BITMAP dirty (the 'auto' flag)",
    "  --disable        writes no longer mark BITMAP ('--add --disable' creates it disabled)",
    "  --merge SOURCE   set in BITMAP the bits of bitmap SOURCE, from this image or from -b SOURCE_FILE",
    "  -F SOURCE_FMT    the format of SOURCE_FILE",
    "  -f FMT           the format of FILE",
    "  -q               accepted for symmetry with other commands (bitmap prints nothing)",
    "A bitmap left in-use by a crash can only be removed, as with qemu-img.",
  ].join("\n"),
  options,
  async run(_v, p, args) {
    const { actions, values } = actionsOf(args);
    // qemu-img parses the granularity while reading the options, before any other check.
    const g = values.g !== undefined ? parseSize(values.g, "granularity") : 0;
    if (actions.length === 0) {
      throw new ExitError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if (g !== 0 && !actions.some((a) => a.op === "add")) throw new ExitError("granularity only supported with --add");
    if (values.F !== undefined && values.b === undefined) throw new ExitError("-F only supported with -b");
    if (values.b !== undefined && !actions.some((a) => a.op === "merge")) {
      throw new ExitError("Merge bitmap source file only supported with --merge");
    }
    if (p.length !== 2) throw new ExitError("Expecting filename and bitmap name");
    const [file, name] = p;
    const img = await openImageFile(file, { format: formatOption(values.f), readOnly: false });
    let source: Image | undefined;
    try {
      if (values.b !== undefined) source = await openImageFile(values.b, { format: formatOption(values.F) });
      for (const a of actions) {
        try {
          await runAction(img, name, a, g, source ?? img);
        } catch (e) {
          if (!(e instanceof QcowError)) throw e;
          throw new ExitError(`Operation ${a.op} on bitmap ${name} failed: ${e.message}`);
        }
      }
    } finally {
      await source?.close();
      await img.close();
    }
    return 0;
  },
};

async function runAction(img: Image, name: string, a: Action, g: number, source: Image): Promise<void> {
  if (img.format !== "qcow2") {
    // Only qcow2 stores bitmaps: there is none to find, and none can be added.
    if (a.op === "add") {
      throw new QcowError("unsupported", `Can't store persistent bitmaps to ${img.filename}: Operation not supported`);
    }
    throw new QcowError("not-found", `Dirty bitmap '${name}' not found`);
  }
  switch (a.op) {
    case "add":
      // qemu-img hands the granularity to QEMU as a 32-bit number.
      return addBitmap(img, name, { granularity: g !== 0 ? g % 2 ** 32 : undefined });
    case "remove":
      return removeBitmap(img, name);
    case "clear":
      return clearBitmap(img, name);
    case "enable":
      return setBitmapEnabled(img, name, true);
    case "disable":
      return setBitmapEnabled(img, name, false);
    case "merge":
      if (source.format !== "qcow2") {
        if (!img.bitmaps.some((b) => b.name === name))
          throw new QcowError("not-found", `Dirty bitmap '${name}' not found`);
        throw new QcowError("not-found", `Dirty bitmap '${a.source}' not found`);
      }
      return mergeBitmap(img, name, a.source, source as Qcow2Image);
  }
}
