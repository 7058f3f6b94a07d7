/** `qcowkit commit`: qemu-img commit's flags, messages and exit codes. */
import type { Image } from "../image/open.js";
import { fileOpener, openImageFile } from "../node.js";
import { backingChain, commit, findBackingImage } from "../ops/commit.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { stdout } from "./output.js";
import { Progress } from "./progress.js";
import { parseSize } from "./size.js";

type Values = Parameters<Command["run"]>[0];
const str = (v: Values, k: string): string | undefined => v[k] as string | undefined;

const CACHE_MODES = ["unsafe", "writeback", "none", "writethrough", "directsync"];

/** Opens an image read-write with its backing chain (errors name it as qemu-img does). */
export function openWritable(file: string, format: Image["format"] | undefined, cache: string): Promise<Image> {
  return openImageFile(file, { format, readOnly: false, cache: cache === "unsafe" ? "unsafe" : "writeback" });
}

export const commitCommand: Command = {
  name: "commit",
  synopsis: "qcowkit commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] [-r RATE] FILE",
  help: [
    "Writes what FILE holds into its backing file, then empties FILE (its clusters become unallocated).",
    "  -b BASE   commit into BASE, further down the backing chain (every layer above it is written); implies -d",
    "  -d        keep FILE's contents (do not empty it)",
    "  -t CACHE  cache mode: writeback (default), unsafe (no sync to disk), none, writethrough, directsync",
    "  -r RATE   accepted for compatibility (qcowkit does not limit the rate)",
    "  -p        show progress; -q: quiet",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    t: { type: "string", short: "t" },
    b: { type: "string", short: "b" },
    d: { type: "boolean", short: "d" },
    p: { type: "boolean", short: "p" },
    q: { type: "boolean", short: "q" },
    r: { type: "string", short: "r" },
  },
  async run(v, p) {
    const r = str(v, "r");
    if (r !== undefined) {
      try {
        parseSize(r, "rate limit");
      } catch {
        throw new ExitError(
          "Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\nqcowkit: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
        );
      }
    }
    if (p.length !== 1) throw new ExitError("Expecting one image file name\nTry 'qcowkit --help' for more information");
    const file = p[0];
    const cache = str(v, "t") ?? "writeback";
    if (!CACHE_MODES.includes(cache)) throw new ExitError(`Invalid cache option: ${cache}`);
    const baseName = str(v, "b");
    const quiet = Boolean(v.q);
    const top = await openWritable(file, formatOption(str(v, "f")), cache);
    const progress = new Progress(Boolean(v.p) && !quiet);
    try {
      let depth: number | undefined = 1;
      if (baseName !== undefined) {
        depth = await findBackingImage(top, baseName, fileOpener);
        if (depth === undefined) throw new ExitError(`Did not find '${baseName}' in the backing chain of '${file}'`);
      } else if (backingChain(top).length < 2) {
        throw new ExitError("Image does not have a backing file");
      }
      const chain = backingChain(top);
      const layer = chain[depth];
      const above = chain[depth - 1];
      if (above.format !== "qcow2") throw new ExitError("Image does not have a backing file");
      // The base is reopened read-write in the chain (one handle and one lock per file, as
      // QEMU's reopen): the read-only handle goes first.
      await above.replaceBacking(undefined);
      const base = await openWritable(layer.filename, layer.format, cache);
      await above.replaceBacking(base);
      await commit(top, base, depth, {
        drop: Boolean(v.d) || baseName !== undefined,
        onProgress: (f) => progress.update(f),
      });
      await top.close();
    } catch (e) {
      progress.end();
      await top.close().catch(() => {});
      throw e;
    }
    progress.end();
    if (!quiet) stdout("Image committed.\n");
    return 0;
  },
};
