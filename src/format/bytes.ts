import { corrupt, hex } from "../errors.js";

/** Largest value a JS number holds exactly; 64-bit fields above it are refused. */
export const MAX_SAFE = Number.MAX_SAFE_INTEGER;

export function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** Reads a big-endian u64 as a number, refusing values that do not fit in 2^53. */
export function getU64(dv: DataView, at: number, what: string): number {
  const hi = dv.getUint32(at);
  const lo = dv.getUint32(at + 4);
  if (hi > 0x1fffff)
    throw corrupt(`${what} at ${hex(at)} is too large (0x${hi.toString(16)}${lo.toString(16).padStart(8, "0")})`);
  return hi * 0x1_0000_0000 + lo;
}

export function setU64(dv: DataView, at: number, value: number): void {
  dv.setUint32(at, Math.floor(value / 0x1_0000_0000));
  dv.setUint32(at + 4, value >>> 0);
}

/** A 64-bit bit mask kept as a bigint: feature bits are few and never on a hot path. */
export function getMask(dv: DataView, at: number): bigint {
  return dv.getBigUint64(at);
}

export const textDecoder = new TextDecoder("utf-8", { fatal: false });
export const textEncoder = new TextEncoder();

export const alignUp = (n: number, a: number): number => Math.ceil(n / a) * a;
export const isAligned = (n: number, a: number): boolean => n % a === 0;

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
