/**
 * Damage to a qcow2 image's metadata, aimed where the bugs live: header fields at boundary
 * values, header extension lengths, L1/L2 entries, refcount table and block entries, the snapshot
 * table and the bitmap directory, plus plain bit flips and truncation. Deterministic for a seed.
 */
import type { Prng } from "../test/prng.js";

export interface Mutation {
  /** What was damaged, for the report (e.g. "L2 entry 3 = 0x8000000000050200"). */
  what: string;
  bytes: Uint8Array;
}

const u32 = (b: Uint8Array, at: number): number => new DataView(b.buffer, b.byteOffset).getUint32(at);
const u64 = (b: Uint8Array, at: number): bigint => new DataView(b.buffer, b.byteOffset).getBigUint64(at);
const setU32 = (b: Uint8Array, at: number, v: number): void =>
  new DataView(b.buffer, b.byteOffset).setUint32(at, v >>> 0);
const setU64 = (b: Uint8Array, at: number, v: bigint): void =>
  new DataView(b.buffer, b.byteOffset).setBigUint64(at, BigInt.asUintN(64, v));
const hex = (v: bigint | number): string => `0x${v.toString(16)}`;

/** Header fields: offset, width in bytes, name. */
const HEADER_FIELDS: [number, 4 | 8, string][] = [
  [4, 4, "version"],
  [8, 8, "backing_file_offset"],
  [16, 4, "backing_file_size"],
  [20, 4, "cluster_bits"],
  [24, 8, "size"],
  [32, 4, "crypt_method"],
  [36, 4, "l1_size"],
  [40, 8, "l1_table_offset"],
  [48, 8, "refcount_table_offset"],
  [56, 4, "refcount_table_clusters"],
  [60, 4, "nb_snapshots"],
  [64, 8, "snapshots_offset"],
  [72, 8, "incompatible_features"],
  [80, 8, "compatible_features"],
  [88, 8, "autoclear_features"],
  [96, 4, "refcount_order"],
  [100, 4, "header_length"],
];

/** Values at the edges: zero, one, all ones, powers of two and their neighbours, the old value ± a little. */
function boundary(r: Prng, old: bigint, bits: number): bigint {
  const max = (1n << BigInt(bits)) - 1n;
  const p = BigInt(r.int(bits));
  const choices = [
    0n,
    1n,
    max,
    max >> 1n,
    1n << p,
    (1n << p) - 1n,
    (1n << p) + 1n,
    old + 1n,
    old - 1n,
    old + 512n,
    old ^ (1n << p),
    old * 2n,
    BigInt(r.next()) * 0x1_0000_0000n + BigInt(r.next()),
  ];
  return BigInt.asUintN(bits, choices[r.int(choices.length)]);
}

interface Layout {
  cs: number;
  l1: number;
  l1Size: number;
  rt: number;
  rtBytes: number;
  snapshots: number;
  nbSnapshots: number;
  headerLength: number;
  l2s: number[];
  refblocks: number[];
  entryBytes: number;
}

function layout(b: Uint8Array): Layout | undefined {
  if (b.length < 104) return undefined;
  const bits = u32(b, 20);
  if (bits < 9 || bits > 21) return undefined;
  const cs = 2 ** bits;
  const l1 = Number(u64(b, 40));
  const l1Size = u32(b, 36);
  const rt = Number(u64(b, 48));
  const rtBytes = u32(b, 56) * cs;
  const ext = u32(b, 4) >= 3 && Number(u64(b, 72)) & 16 ? 16 : 8;
  if (l1 + 8 > b.length || rt + 8 > b.length) return undefined;
  const l2s: number[] = [];
  for (let i = 0; i < l1Size && l1 + i * 8 + 8 <= b.length; i++) {
    const o = Number(u64(b, l1 + i * 8) & 0x00ff_ffff_ffff_fe00n);
    if (o !== 0 && o + cs <= b.length) l2s.push(o);
  }
  const refblocks: number[] = [];
  for (let i = 0; i * 8 < rtBytes && rt + i * 8 + 8 <= b.length; i++) {
    const o = Number(u64(b, rt + i * 8) & ~0x1ffn);
    if (o !== 0 && o + cs <= b.length) refblocks.push(o);
  }
  return {
    cs,
    l1,
    l1Size,
    rt,
    rtBytes,
    snapshots: Number(u64(b, 64)),
    nbSnapshots: u32(b, 60),
    headerLength: u32(b, 4) >= 3 ? u32(b, 100) : 72,
    l2s,
    refblocks,
    entryBytes: ext,
  };
}

/** One random mutation of `image` (a copy is returned). */
export function mutate(image: Uint8Array, r: Prng): Mutation {
  const b = new Uint8Array(image); // a copy (Buffer.slice would share the seed's memory)
  const lay = layout(b);
  const kind = lay ? r.int(10) : 9;
  switch (kind) {
    case 0:
    case 1: {
      const [at, width, name] = HEADER_FIELDS[r.int(HEADER_FIELDS.length)];
      const old = width === 4 ? BigInt(u32(b, at)) : u64(b, at);
      const v = boundary(r, old, width * 8);
      if (width === 4) setU32(b, at, Number(v));
      else setU64(b, at, v);
      return { what: `header ${name} = ${hex(v)} (was ${hex(old)})`, bytes: b };
    }
    case 2: {
      // Header extensions: a length or type field somewhere after the fixed header.
      const l = lay as Layout;
      let at = l.headerLength;
      const steps = r.int(4);
      for (let i = 0; i < steps && at + 8 <= Math.min(b.length, l.cs); i++) at += 8 + Math.ceil(u32(b, at + 4) / 8) * 8;
      if (at + 8 > b.length) at = l.headerLength;
      const field = r.int(2) * 4;
      const v = Number(boundary(r, BigInt(u32(b, at + field)), 32));
      setU32(b, at + field, v);
      return { what: `header extension ${field ? "length" : "type"} at ${hex(at)} = ${hex(v)}`, bytes: b };
    }
    case 3:
    case 4: {
      const l = lay as Layout;
      const inL2 = kind === 4 && l.l2s.length > 0;
      const table = inL2 ? l.l2s[r.int(l.l2s.length)] : l.l1;
      const entries = inL2 ? l.cs / l.entryBytes : l.l1Size;
      if (entries === 0 || table + 8 > b.length) break;
      const i = r.int(Math.min(entries, 64));
      const at = table + i * (inL2 ? l.entryBytes : 8);
      if (at + 8 > b.length) break;
      const old = u64(b, at);
      const v = r.chance(0.5) ? boundary(r, old, 64) : old ^ (1n << BigInt(r.int(64)));
      setU64(b, at, v);
      return { what: `${inL2 ? "L2" : "L1"} entry ${i} at ${hex(at)} = ${hex(v)} (was ${hex(old)})`, bytes: b };
    }
    case 5: {
      const l = lay as Layout;
      const onTable = r.chance(0.4) || l.refblocks.length === 0;
      const base = onTable ? l.rt : l.refblocks[r.int(l.refblocks.length)];
      const at = base + r.int(onTable ? Math.min(8, l.rtBytes / 8) : 64) * (onTable ? 8 : 2);
      if (at + 8 > b.length) break;
      const old = u64(b, at);
      const v = boundary(r, old, 64);
      setU64(b, at, v);
      return { what: `refcount ${onTable ? "table" : "block"} bytes at ${hex(at)} = ${hex(v)}`, bytes: b };
    }
    case 6: {
      const l = lay as Layout;
      if (l.nbSnapshots === 0 || l.snapshots + 64 > b.length) break;
      const at = l.snapshots + r.int(64);
      const old = b[at];
      b[at] = r.chance(0.5) ? 0xff : old ^ (1 << r.int(8));
      return { what: `snapshot table byte at ${hex(at)} = ${hex(b[at])} (was ${hex(old)})`, bytes: b };
    }
    case 7: {
      // Bit flips anywhere in the metadata clusters (header, L1, refcount table, L2 tables).
      const l = lay as Layout;
      const areas = [0, l.l1, l.rt, ...l.l2s, ...l.refblocks].filter((o) => o + l.cs <= b.length);
      const flips: string[] = [];
      for (let k = 1 + r.int(4); k > 0; k--) {
        const at = areas[r.int(areas.length)] + r.int(l.cs);
        b[at] ^= 1 << r.int(8);
        flips.push(hex(at));
      }
      return { what: `bit flips at ${flips.join(", ")}`, bytes: b };
    }
    case 8: {
      const at = r.int(Math.min(b.length, 4096));
      for (let k = 0; k < 8 && at + k < b.length; k++) b[at + k] = r.int(256);
      return { what: `8 random bytes at ${hex(at)}`, bytes: b };
    }
    default:
      break;
  }
  // Truncation: the file ends early (or the structure that was to be damaged was not there).
  const to = r.chance(0.5) ? r.int(b.length) : Math.floor(b.length / 2);
  return { what: `truncated to ${to} bytes`, bytes: b.slice(0, to) };
}
