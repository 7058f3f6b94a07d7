/** `qcowkit resize`: qemu-img resize's arguments, checks, messages and exit codes (7.2). */
import { invalidArgument } from "../errors.js";
import type { Image } from "../image/open.js";
import { type ResizePreallocation, resizeImage } from "../image/resize.js";
import { openImageFile } from "../node.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { stdout } from "./output.js";

const PREALLOCATION_MODES = ["off", "metadata", "falloc", "full"];

/** QEMU's BDRV_MAX_LENGTH: the largest size the block layer truncates to. */
const BDRV_MAX_LENGTH = 9223372035781033984n;

const SIZE_HINT =
  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/**
 * A size as qemu-img resize reads it (QEMU 7.2's qemu_strtosz for a QEMU_OPT_SIZE option):
 * decimal, or 0x-hex without fraction (a suffix on hex is deprecated: `warn` is told); a
 * fraction needs a suffix; suffixes B K M G T P E (powers of 1024, either case); leading white
 * space and one '+' allowed. The result is unsigned 64-bit.
 */
export function parseQemuSize(text: string, warn: (message: string) => void = () => {}): bigint {
  const invalid = (): Error =>
    invalidArgument(`Parameter 'size' expects a non-negative number below 2^64\n${SIZE_HINT}`);
  const outOfRange = (): Error => invalidArgument(`Value '${text}' is out of range for parameter 'size'`);
  const max = 2n ** 64n;
  const m = /^[ \t\n\v\f\r]*\+?/.exec(text) as RegExpExecArray;
  let rest = text.slice(m[0].length);
  const digits = /^\d+/.exec(rest);
  if (!digits) throw invalid();
  let value = BigInt(digits[0]);
  if (value >= max) throw outOfRange();
  rest = rest.slice(digits[0].length);
  let fraction = "";
  let hex = false;
  if (digits[0] === "0" && /^[xX]/.test(rest)) {
    const hexDigits = /^[xX]([0-9a-fA-F]+)/.exec(rest);
    if (!hexDigits) throw invalid();
    value = BigInt(`0x${hexDigits[1]}`);
    if (value >= max) throw outOfRange();
    rest = rest.slice(hexDigits[0].length);
    if (rest.startsWith(".")) throw invalid();
    hex = true;
  } else if (rest.startsWith(".")) {
    const f = /^\.(\d*)/.exec(rest) as RegExpExecArray;
    if (/^[eE][+-]?\d/.test(rest.slice(f[0].length)) && f[1] !== "") throw invalid();
    fraction = f[1];
    rest = rest.slice(f[0].length);
  }
  const power = suffixPower(rest[0]);
  if (power >= 0) {
    if (hex) warn(`Using a multiplier suffix on hex numbers is deprecated: ${text}`);
    rest = rest.slice(1);
  }
  if (rest !== "") throw invalid();
  const mul = 1024n ** BigInt(Math.max(power, 0));
  // QEMU keeps the fraction as a 64-bit binary fixed-point number taken from a double.
  const valf = fraction === "" ? 0n : BigInt(Math.min(Math.floor(Number(`0.${fraction}`) * 2 ** 64), 2 ** 64 - 1));
  if (mul === 1n) {
    if (valf !== 0n) throw invalid();
    return value;
  }
  const tmp = valf * mul;
  const result = value * mul + (tmp >> 64n) + ((tmp & (max - 1n)) >> 63n);
  if (result >= max) throw outOfRange();
  return result;
}

function suffixPower(c: string | undefined): number {
  return c === undefined ? -1 : "BKMGTPE".indexOf(c.toUpperCase());
}

export const resize: Command = {
  name: "resize",
  synopsis: "qcowkit resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+|-]SIZE",
  help: [
    "Changes the virtual size of an image to SIZE, or by +SIZE / -SIZE (k, M, G, T, P, E suffixes).",
    "  --shrink             allow making the image smaller (everything past the new end is lost)",
    "  --preallocation=MODE allocate the new area of a grown image: off (default), metadata,",
    "                       falloc, full (qcow2; raw takes off, falloc, full)",
    "  -f FMT               the image format (qcow2 or raw; probed when absent)",
    "  -q                   quiet: no 'Image resized.'",
  ].join("\n"),
  options: {
    f: { type: "string", short: "f" },
    q: { type: "boolean", short: "q" },
    shrink: { type: "boolean" },
    preallocation: { type: "string" },
  },
  // As qemu-img: SIZE is taken off the end before the options are parsed, so "-1G" is a size.
  takeOperands(args) {
    if (args.length < 2) throw new ExitError("Not enough arguments\nTry 'qcowkit --help' for more information");
    return [args.pop() as string];
  },
  async run(v, p) {
    const mode = (v.preallocation as string | undefined) ?? "off";
    if (!PREALLOCATION_MODES.includes(mode)) throw invalidArgument(`Invalid preallocation mode '${mode}'`);
    if (p.length !== 2)
      throw new ExitError("Expecting image file name and size\nTry 'qcowkit --help' for more information");
    const [file, sizeArg] = p;
    const relative = sizeArg.startsWith("+") ? 1n : sizeArg.startsWith("-") ? -1n : 0n;
    const n = BigInt.asIntN(
      64,
      parseQemuSize(relative === 0n ? sizeArg : sizeArg.slice(1), (w) =>
        process.stderr.write(`qcowkit: warning: ${w}\n`),
      ),
    );
    const format = formatOption(v.f as string | undefined);
    const img: Image = await openImageFile(file, { format, readOnly: false });
    try {
      if (format === undefined && img.format === "raw") {
        process.stderr.write(
          `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
            "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
            "         Specify the 'raw' format explicitly to remove the restrictions.\n",
        );
      }
      const current = BigInt(img.size);
      const total = relative === 0n ? n : BigInt.asIntN(64, current + n * relative);
      if (total <= 0n) throw invalidArgument("New image size must be positive");
      if (total <= current && mode !== "off")
        throw invalidArgument("Preallocation can only be used for growing images");
      if (total < current && !v.shrink) {
        process.stderr.write(
          "qcowkit: Use the --shrink option to perform a shrink operation.\n" +
            "qcowkit: warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
            "Before performing such an operation, make sure there is no important data there.\n",
        );
        return 1;
      }
      if (total > BDRV_MAX_LENGTH) throw invalidArgument(`offset(${total}) exceeds maximum(${BDRV_MAX_LENGTH})`);
      if (img.format === "qcow2" && total % 512n !== 0n)
        throw invalidArgument("The new size must be a multiple of 512");
      await resizeImage(img, Number(total), { preallocation: mode as ResizePreallocation, shrink: true });
      await img.flush();
    } finally {
      await img.close();
    }
    if (!v.q) stdout("Image resized.\n");
    return 0;
  },
};
