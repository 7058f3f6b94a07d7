/** qcowkit check: qemu-img check's findings, summary, JSON and exit codes (0/1/2/3/63). */
import { QcowError } from "../errors.js";
import { CheckFailed, type CheckResult, checkQcow2, FIX_ERRORS, FIX_LEAKS } from "../image/check.js";
import { OpenError, parseFormat, probeFormat } from "../image/open.js";
import { Qcow2Image } from "../image/qcow2.js";
import type { Storage } from "../io/storage.js";
import { combinePath, fileOpener, openImageFile, sharedFileOpener } from "../node.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { humanCheck } from "./human.js";
import { stdout } from "./output.js";
import { toQemuJson } from "./qobject.js";

function fixMode(r: string | undefined): number {
  if (r === undefined) return 0;
  if (r === "leaks") return FIX_LEAKS;
  if (r === "all") return FIX_LEAKS | FIX_ERRORS;
  throw new ExitError(
    `Unknown option value for -r (expecting 'leaks' or 'all'): ${r}\nTry 'qcowkit --help' for more information`,
  );
}

/** The ImageCheck QAPI object: fields in its schema order, optional ones only when non-zero. */
function json(c: CheckResult, filename: string): string {
  const opt = (n: number): number | undefined => (n !== 0 ? n : undefined);
  return toQemuJson({
    filename,
    format: "qcow2",
    "check-errors": c.checkErrors,
    "image-end-offset": opt(c.imageEndOffset),
    corruptions: opt(c.corruptions),
    leaks: opt(c.leaks),
    "corruptions-fixed": opt(c.corruptionsFixed),
    "leaks-fixed": opt(c.leaksFixed),
    "total-clusters": opt(c.totalClusters),
    "allocated-clusters": opt(c.allocatedClusters),
    "fragmented-clusters": opt(c.fragmentedClusters),
    "compressed-clusters": opt(c.compressedClusters),
  });
}

/** As qemu-img, which opens the whole image: a backing file or data file that is missing fails the check. */
async function openDependencies(storage: Storage, file: string): Promise<void> {
  let header: Awaited<ReturnType<typeof Qcow2Image.readHeader>>;
  try {
    header = await Qcow2Image.readHeader(storage, true, true);
  } catch (e) {
    if (e instanceof QcowError) throw new ExitError(`Could not open '${file}': ${e.message}`);
    throw e;
  }
  const { backingName, extensions } = header;
  try {
    if (backingName !== undefined) {
      const format = extensions.backingFormat !== undefined ? parseFormat(extensions.backingFormat) : undefined;
      const backing = await openImageFile(combinePath(file, backingName), { format, metadataOnly: true }).catch(
        (e: unknown) => {
          throw new Error(`Could not open backing file: ${e instanceof OpenError ? e.reason : (e as Error).message}`);
        },
      );
      await backing.close();
    }
    if (extensions.dataFile !== undefined) {
      await (await fileOpener.open(combinePath(file, extensions.dataFile), { readOnly: true })).close();
    }
  } catch (e) {
    throw new ExitError(`Could not open '${file}': ${(e as Error).message}`);
  }
}

export const check: Command = {
  name: "check",
  synopsis: "qcowkit check [-q] [-f FMT] [--output human|json] [-r leaks|all] [-U] FILE",
  help: [
    "Checks a qcow2 image for consistency, as qemu-img check does: every reference to every host",
    "cluster is counted and compared with the refcounts, and the COPIED flags with them.",
    "FILE may be an http:// or https:// URL (read-only: not with -r).",
    "",
    "  -r leaks   free leaked clusters",
    "  -r all     also repair refcounts, COPIED flags and broken refcount structures",
    "  --output   human (default) or json",
    "  -q         print nothing on stdout",
    "",
    "Exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format without checks.",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    output: { type: "string" },
    r: { type: "string", short: "r" },
    q: { type: "boolean", short: "q" },
    T: { type: "string", short: "T" },
    U: { type: "boolean", short: "U" },
    "force-share": { type: "boolean" },
  },
  async run(v, p) {
    if (p.length !== 1) throw new ExitError("Expecting one image file name");
    const file = p[0];
    const output = (v.output as string | undefined) ?? "human";
    if (output !== "human" && output !== "json")
      throw new ExitError("--output must be used with human or json as argument.");
    const fix = fixMode(v.r as string | undefined);
    const quiet = v.q === true;
    const say = (s: string): void => {
      if (!quiet) stdout(s);
    };
    const opener = v.U || v["force-share"] ? sharedFileOpener : fileOpener;
    const storage = await opener.open(file, { readOnly: fix === 0 });
    try {
      const given = formatOption(v.f as string | undefined);
      const format = given ?? (await probeFormat(storage));
      if (format !== "qcow2") {
        if (given === undefined && fix) {
          process.stderr.write(
            `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
              "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
              "         Specify the 'raw' format explicitly to remove the restrictions.\n",
          );
        }
        throw new ExitError("This image format does not support checks", 63);
      }
      await openDependencies(storage, file);
      const log = (line: string): void => {
        process.stderr.write(`${line}\n`);
      };
      const report = (message: string): void => {
        process.stderr.write(`qcowkit: ${message}\n`);
      };
      const run = async (mode: number): Promise<CheckResult> => {
        try {
          return await checkQcow2(storage, { fix: mode, log, report });
        } catch (e) {
          if (e instanceof CheckFailed) throw new ExitError(`Check failed: ${e.message}`);
          if (e instanceof QcowError) throw new ExitError(`Could not open '${file}': ${e.message}`);
          throw e;
        }
      };
      let result = await run(fix);
      if (result.corruptionsFixed || result.leaksFixed) {
        if (output === "human") {
          say(
            `The following inconsistencies were found and repaired:\n\n    ${result.leaksFixed} leaked clusters\n    ${result.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`,
          );
        }
        const { leaksFixed, corruptionsFixed } = result;
        result = { ...(await run(0)), leaksFixed, corruptionsFixed };
      }
      say(output === "human" ? humanCheck(result) : `${json(result, file)}\n`);
      if (result.checkErrors) throw new ExitError("Check failed");
      return result.corruptions ? 2 : result.leaks ? 3 : 0;
    } finally {
      await storage.close();
    }
  },
};
