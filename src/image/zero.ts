/**
 * Zero detection in bulk. Under Node.js, Buffer.compare against a block of zeros (a native
 * memcmp, ~10x faster than a loop in JavaScript); elsewhere four bytes at a time where
 * alignment allows.
 */
type Compare = (a: Uint8Array, b: Uint8Array) => number;

/**
 * Node's Buffer where the code runs under Node, for its native helpers that do in bulk what a
 * loop does a byte at a time; undefined in browsers (the bundles carry no Buffer).
 */
export const NodeBuffer = (globalThis as { Buffer?: { compare: Compare; from(b: ArrayBuffer): { swap16(): unknown } } })
  .Buffer;
const compare = NodeBuffer?.compare;

export const isZero: (buf: Uint8Array) => boolean = compare ? isZeroBy(compare) : isZeroPortable;

/** Zero detection with a native memcmp: the buffer against a block of zeros, 64 KiB at a time. */
function isZeroBy(cmp: Compare): (buf: Uint8Array) => boolean {
  const zeros = new Uint8Array(64 * 1024);
  return (buf) => {
    if (buf.length > 0 && buf[0] !== 0) return false;
    for (let i = 0; i < buf.length; i += zeros.length) {
      const part = buf.subarray(i, Math.min(buf.length, i + zeros.length));
      if (cmp(part, zeros.subarray(0, part.length)) !== 0) return false;
    }
    return true;
  };
}

/** The JavaScript loop (browsers); exported for its tests. */
export function isZeroPortable(buf: Uint8Array): boolean {
  const n = buf.length;
  const head = Math.min(n, (4 - (buf.byteOffset % 4)) % 4);
  let i = 0;
  for (; i < head; i++) if (buf[i] !== 0) return false;
  const words = (n - i) >>> 2;
  if (words > 0) {
    const w = new Uint32Array(buf.buffer, buf.byteOffset + i, words);
    for (let k = 0; k < words; k++) if (w[k] !== 0) return false;
    i += words * 4;
  }
  for (; i < n; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * How many `unit`-byte entries of `buf` remain once its trailing all-zero entries are left out:
 * a table's used length (refcount tables are mostly zeros past their first entries). Looks
 * back 4 KiB at a time with `isZero`, then byte by byte in the last block that is not zero.
 */
export function entriesInUse(buf: Uint8Array, unit: number): number {
  const step = 4096 - (4096 % unit);
  let end = buf.length;
  while (end > 0) {
    const from = Math.max(0, end - step);
    if (!isZero(buf.subarray(from, end))) break;
    end = from;
  }
  let i = end - 1;
  while (i >= 0 && buf[i] === 0) i--;
  return Math.ceil((i + 1) / unit);
}

/** Whether `a` and `b` hold the same bytes (a native memcmp under Node.js). */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  if (compare) return compare(a, b) === 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Entries checked per native comparison by zeroEntriesEnd. */
const ZERO_BLOCK_ENTRIES = 64;

/**
 * Past the all-zero entries of `table` (entries of `unit` bytes, a multiple of 4) from entry `i`:
 * the first entry below `end` with a byte set, or `end`. Runs of 64 entries and more are
 * checked 64 at a time with `isZero` (natively under Node.js): the empty parts of a sparse
 * image's L2 tables, which a loop over entries walked at ~25 ns each, mostly before V8
 * optimised it.
 */
export function zeroEntriesEnd(table: DataView, i: number, end: number, unit: number): number {
  if (end - i >= 2 * ZERO_BLOCK_ENTRIES) {
    const bytes = new Uint8Array(table.buffer, table.byteOffset, table.byteLength);
    while (end - i >= ZERO_BLOCK_ENTRIES && isZero(bytes.subarray(i * unit, (i + ZERO_BLOCK_ENTRIES) * unit))) {
      i += ZERO_BLOCK_ENTRIES;
    }
  }
  for (; i < end; i++) {
    const at = i * unit;
    for (let k = 0; k < unit; k += 4) if (table.getInt32(at + k) !== 0) return i;
  }
  return i;
}
