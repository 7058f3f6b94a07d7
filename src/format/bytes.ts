import { corrupt, hex } from "../errors.js";

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

export const textDecoder = new TextDecoder("utf-8", { fatal: false });
export const textEncoder = new TextEncoder();

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
