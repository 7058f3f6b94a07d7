import { invalidArgument } from "../errors.js";

const SUFFIXES = "BKMGTPE";

/**
 * qemu-img's size syntax (QEMU's qemu_strtosz): a decimal or 0x-hex integer, an optional
 * decimal fraction (not with hex, and only with a unit above bytes), and an optional suffix
 * B, K, M, G, T, P or E (either case, powers of 1024). Fractions round to the nearest byte.
 */
export function parseSize(text: string, what = "size"): number {
  const bad = (): Error =>
    invalidArgument(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    );
  const m = /^(0[xX][0-9a-fA-F]+|\d+)(\.\d*)?([bBkKmMgGtTpPeE]?)$/.exec(text.trimStart());
  if (!m) throw bad();
  const hex = /^0[xX]/.test(m[1]);
  const fraction = m[2] && m[2].length > 1 ? Number(`0${m[2]}`) : 0;
  if (hex && m[2] !== undefined) throw bad();
  const unit = 1024 ** (m[3] ? SUFFIXES.indexOf(m[3].toUpperCase()) : 0);
  if (fraction > 0 && unit === 1) throw bad();
  const whole = hex ? Number.parseInt(m[1], 16) : Number(m[1]);
  const value = whole * unit + Math.round(fraction * unit);
  if (!Number.isSafeInteger(value))
    throw invalidArgument(`Invalid ${what} specified. Must be between 0 and 9223372036854775807.`);
  return value;
}
