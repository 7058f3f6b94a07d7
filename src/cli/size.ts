import { invalidArgument } from "../errors.js";

const SUFFIXES = "bkmgtpe";

/**
 * qemu-img's size syntax: a number with an optional suffix k, M, G, T, P, E (powers of 1024;
 * b or no suffix for bytes, `defaultUnit` when given as for -S).
 */
export function parseSize(text: string, what = "size"): number {
  const m = /^(\d+(?:\.\d+)?)([bkKmMgGtTpPeE]?)$/.exec(text.trim());
  if (!m) throw invalidArgument(`Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
  const unit = m[2] ? 1024 ** SUFFIXES.indexOf(m[2].toLowerCase()) : 1;
  const value = Number(m[1]) * unit;
  if (!Number.isSafeInteger(Math.floor(value))) throw invalidArgument(`${what} too large: ${text}`);
  return Math.floor(value);
}
