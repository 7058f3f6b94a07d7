/** The persistent bitmap directory and bitmap tables (docs/interop/qcow2.rst, "Bitmaps"). */
import { corrupt, hex } from "../errors.js";
import { concatBytes, getU64, setU64, textDecoder, textEncoder, view } from "./bytes.js";

/** QEMU's limits (block/qcow2.h). */
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
export const MAX_BITMAP_NAME = 1023;
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
export const BITMAP_TYPE_DIRTY_TRACKING = 1;
const ENTRY_FIXED = 24;

export interface BitmapDirectoryEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  extra: Uint8Array;
}

export function decodeBitmapDirectory(buf: Uint8Array, count: number, base: number): BitmapDirectoryEntry[] {
  const dv = view(buf);
  const out: BitmapDirectoryEntry[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    const where = `bitmap directory entry ${i} at ${hex(base + at)}`;
    if (at + ENTRY_FIXED > buf.length) throw corrupt(`Bitmap directory truncated: ${where}`);
    const nameLen = dv.getUint16(at + 18);
    const extraLen = dv.getUint32(at + 20);
    const total = ENTRY_FIXED + extraLen + nameLen;
    if (at + total > buf.length) throw corrupt(`Bitmap directory truncated: ${where} needs ${total} bytes`);
    if (nameLen === 0 || nameLen > MAX_BITMAP_NAME) throw corrupt(`Invalid bitmap name length ${nameLen} in ${where}`);
    const flags = dv.getUint32(at + 12);
    if (flags & ~7) throw corrupt(`Reserved bitmap flags set (0x${flags.toString(16)}) in ${where}`);
    const e = at + ENTRY_FIXED;
    out.push({
      tableOffset: getU64(dv, at, `${where}: bitmap_table_offset`),
      tableSize: dv.getUint32(at + 8),
      flags,
      type: dv.getUint8(at + 16),
      granularityBits: dv.getUint8(at + 17),
      extra: buf.slice(e, e + extraLen),
      name: textDecoder.decode(buf.subarray(e + extraLen, e + extraLen + nameLen)),
    });
    at += Math.ceil(total / 8) * 8;
  }
  return out;
}

export function encodeBitmapDirectory(entries: BitmapDirectoryEntry[]): Uint8Array {
  const parts = entries.map((b) => {
    const name = textEncoder.encode(b.name);
    const b8 = new Uint8Array(Math.ceil((ENTRY_FIXED + b.extra.length + name.length) / 8) * 8);
    const dv = view(b8);
    setU64(dv, 0, b.tableOffset);
    dv.setUint32(8, b.tableSize);
    dv.setUint32(12, b.flags);
    dv.setUint8(16, b.type);
    dv.setUint8(17, b.granularityBits);
    dv.setUint16(18, name.length);
    dv.setUint32(20, b.extra.length);
    b8.set(b.extra, ENTRY_FIXED);
    b8.set(name, ENTRY_FIXED + b.extra.length);
    return b8;
  });
  return concatBytes(parts);
}

/** A bitmap table entry: a data cluster offset, or (offset 0) all zeros / all ones. */
export function decodeBitmapTableEntry(
  hi: number,
  lo: number,
  clusterSize: number,
): { offset: number; allOnes: boolean } {
  if ((hi & 0xff00_0000) !== 0 || (lo & 0x1fe) !== 0) throw corrupt("Bitmap table entry has reserved bits set");
  const offset = (hi & 0x00ff_ffff) * 0x1_0000_0000 + ((lo & 0xffff_fe00) >>> 0);
  if (offset > Number.MAX_SAFE_INTEGER) throw corrupt(`Bitmap data offset ${hex(offset)} is beyond 2^53`);
  if (offset !== 0 && (lo & 1) !== 0) throw corrupt("Bitmap table entry has bit 0 set with a non-zero offset");
  if (offset % clusterSize !== 0) throw corrupt(`Bitmap data offset ${hex(offset)} unaligned`);
  return { offset, allOnes: offset === 0 && (lo & 1) === 1 };
}
