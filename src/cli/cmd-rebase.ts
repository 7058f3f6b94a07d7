/** `qcowkit rebase`: qemu-img rebase's flags, messages and exit codes. */
import { QcowError } from "../errors.js";
import { type Image, OpenError } from "../image/open.js";
import { combinePath, fileOpener, openImageFile } from "../node.js";
import { backingChain, findBackingImage } from "../ops/commit.js";
import { rebase } from "../ops/rebase.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { Progress } from "./progress.js";

type Values = Parameters<Command["run"]>[0];
const str = (v: Values, k: string): string | undefined => v[k] as string | undefined;

const CACHE_MODES = ["unsafe", "writeback", "none", "writethrough", "directsync"];
/** Format names QEMU knows (a backing format qcowkit cannot read may still be named with -u). */
const QEMU_FORMATS = [
  "raw",
  "qcow2",
  "qcow",
  "vmdk",
  "vdi",
  "vpc",
  "vhdx",
  "qed",
  "parallels",
  "luks",
  "bochs",
  "cloop",
  "dmg",
  "vvfat",
  "file",
  "host_device",
  "nbd",
  "blkdebug",
  "null-co",
  "throttle",
];

export const rebaseCommand: Command = {
  name: "rebase",
  synopsis: "qcowkit rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-q] [-u] [-U] -b BACKING [-F BACKING_FMT] FILE",
  help: [
    "Changes the backing file of FILE. Safe mode (the default) keeps what a guest reads from FILE the same:",
    "where FILE has no data of its own and the old and new backing files differ, the old contents are copied into FILE.",
    '  -b BACKING  the new backing file (relative names are taken from FILE\'s directory); -b "" removes it',
    "  -F FMT      the new backing file's format (required with a backing file, as in qemu-img 7.2)",
    "  -u          unsafe: only rewrite the name in the header (nothing is read or copied)",
    "  -t CACHE, -T SRC_CACHE  cache modes of FILE and of the backing files",
    "  -p          show progress; -q: quiet; -U: accepted for compatibility",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    F: { type: "string", short: "F" },
    b: { type: "string", short: "b" },
    u: { type: "boolean", short: "u" },
    p: { type: "boolean", short: "p" },
    t: { type: "string", short: "t" },
    T: { type: "string", short: "T" },
    q: { type: "boolean", short: "q" },
    U: { type: "boolean", short: "U" },
    "force-share": { type: "boolean" },
  },
  async run(v, p) {
    const unsafe = Boolean(v.u);
    const name = str(v, "b");
    const backingFormat = str(v, "F");
    if (p.length !== 1) throw new ExitError("Expecting one image file name\nTry 'qcowkit --help' for more information");
    if (!unsafe && name === undefined) {
      throw new ExitError(
        "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'qcowkit --help' for more information",
      );
    }
    const file = p[0];
    const cache = str(v, "t") ?? "writeback";
    if (!CACHE_MODES.includes(cache)) throw new ExitError(`Invalid cache option: ${cache}`);
    const srcCache = str(v, "T") ?? "writeback";
    if (!CACHE_MODES.includes(srcCache)) throw new ExitError(`Invalid source cache option: ${srcCache}`);
    const quiet = Boolean(v.q);
    const progress = new Progress(Boolean(v.p) && !quiet);
    const image: Image = await openImageFile(file, {
      format: formatOption(str(v, "f")),
      readOnly: false,
      noBacking: unsafe,
      cache: cache === "unsafe" ? "unsafe" : "writeback",
    });
    let opened: Image | undefined;
    try {
      if (backingFormat !== undefined && !QEMU_FORMATS.includes(backingFormat)) {
        throw new ExitError(`Invalid format name: '${backingFormat}'`);
      }
      const newName = name === "" ? undefined : name;
      let newBacking: Image | undefined;
      let depth: number | undefined;
      if (!unsafe && newName !== undefined) {
        // The new backing file may already be in the chain (then only the layers above it differ).
        depth = await findBackingImage(image, newName, fileOpener);
        if (depth !== undefined) {
          newBacking = backingChain(image)[depth];
        } else {
          try {
            opened = await openImageFile(combinePath(file, newName), { format: formatOption(backingFormat) });
          } catch (e) {
            if (e instanceof QcowError) {
              const reason = e instanceof OpenError ? e.reason : e.message;
              throw new QcowError(e.code, `Could not open new backing file '${name}': ${reason}`, { cause: e });
            }
            throw e;
          }
          newBacking = opened;
        }
      }
      // qemu-img 7.2 finds these only after copying; qcowkit refuses before, with its messages.
      const cannot = (why: string): ExitError =>
        new ExitError(`Could not change the backing file to '${name}': ${why}`);
      if (image.format !== "qcow2") throw cannot("Operation not supported");
      if (newName !== undefined && backingFormat === undefined) throw cannot("backing format must be specified");
      try {
        image.writer?.backingHeader(newName, backingFormat);
      } catch (e) {
        if (e instanceof QcowError) throw cannot(e.message.split(":")[0]);
        throw e;
      }
      await rebase(image, newBacking, newName, backingFormat, {
        unsafe,
        newBackingDepth: depth,
        onProgress: (f) => progress.update(f),
      });
    } finally {
      progress.end();
      await opened?.close().catch(() => {});
      await image.close();
    }
    return 0;
  },
};
