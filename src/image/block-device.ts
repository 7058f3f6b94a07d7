/** What a guest sees: a qcow2 image, a raw image, a backing chain. */
export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  read(dst: Uint8Array, offset: number): Promise<void>;
  write(src: Uint8Array, offset: number): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: { unmap?: boolean }): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
  /** Extents covering [offset, offset+length), merged as `qemu-img map` merges them. */
  blockStatus(offset: number, length: number): AsyncIterable<Extent>;
  /**
   * A read that leaves out the runs reading as zeros without stored data (block status: zero,
   * not data), in one pass over the tables; see readSparse(). Optional: readSparse() does it
   * for any device from blockStatus() and read().
   */
  readSparse?(dst: Uint8Array, offset: number): Promise<number[]>;
  /**
   * Optional: `header`, then guest bytes [offset, offset+length), sent to a socket as
   * Storage.sendCached does, where the range is stored data in one piece of a local file whose
   * pages are all in memory; undefined (nothing sent) otherwise.
   */
  sendCached?(socket: number, header: Uint8Array, offset: number, length: number): Uint8Array[] | undefined;
}

/**
 * Reads [offset, offset + dst.length) as `read` does, except the runs that read as zeros
 * without stored data ("holes": zero and not data in block status), which are returned as
 * ascending, merged [start, length] pairs of guest offsets, flattened; their bytes in `dst` are
 * left as they were. An NBD structured read sends those runs as holes.
 */
export function readSparse(dev: BlockDevice, dst: Uint8Array, offset: number): Promise<number[]> {
  return dev.readSparse ? dev.readSparse(dst, offset) : readSparseByStatus(dev, dst, offset);
}

/** readSparse from block status and a read of each data run. */
export async function readSparseByStatus(dev: BlockDevice, dst: Uint8Array, offset: number): Promise<number[]> {
  const holes: number[] = [];
  const reads: Promise<void>[] = [];
  const end = offset + dst.length;
  for await (const e of dev.blockStatus(offset, dst.length)) {
    const start = Math.max(e.start, offset);
    const stop = Math.min(e.start + e.length, end);
    if (stop <= start) continue;
    if (e.zero && !e.data) addHole(holes, start, stop - start);
    else reads.push(dev.read(dst.subarray(start - offset, stop - offset), start));
  }
  await Promise.all(reads);
  return holes;
}

/** Appends [start, length] to a readSparse list, merged with the last pair where they touch. */
export function addHole(holes: number[], start: number, length: number): void {
  const n = holes.length;
  if (n > 0 && holes[n - 2] + holes[n - 1] === start) holes[n - 1] += length;
  else holes.push(start, length);
}

/**
 * One run of guest bytes with the same status. `depth` is the layer of the backing chain that
 * supplies them (0 = this image); unallocated runs have depth one past the last layer.
 */
export interface Extent {
  start: number;
  length: number;
  /** Guest reads see data from some layer (false: reads fall through the whole chain). */
  present: boolean;
  zero: boolean;
  data: boolean;
  depth: number;
  /** Host offset in the layer's file (or data file), for data that maps 1:1. */
  offset?: number;
  /** Data that is stored compressed. */
  compressed?: boolean;
  /** The file that `offset` points into (the layer's image or its external data file). */
  file?: string;
}

/** Merges further readSparse lists into `holes`, in order of start. */
export function mergeHoles(holes: number[], more: number[][]): void {
  const pairs: [number, number][] = [];
  for (const list of [holes, ...more]) for (let i = 0; i < list.length; i += 2) pairs.push([list[i], list[i + 1]]);
  pairs.sort((a, b) => a[0] - b[0]);
  holes.length = 0;
  for (const [start, length] of pairs) addHole(holes, start, length);
}
