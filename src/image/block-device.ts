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
