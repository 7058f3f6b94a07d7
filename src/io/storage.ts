/** Where bytes live: a flat, resizable byte array (a file, memory, an HTTP resource, ...). */
export interface Storage {
  readonly readOnly: boolean;
  /** A name for messages (a path, a URL). */
  readonly name: string;
  size(): Promise<number>;
  /** Reads up to dst.length bytes; returns fewer only at the end of the storage. */
  read(dst: Uint8Array, offset: number): Promise<number>;
  write(src: Uint8Array, offset: number): Promise<void>;
  /** Resolves once everything written before it is durable. */
  flush(): Promise<void>;
  truncate(size: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Optional: the number of bytes the storage really occupies (a sparse file's allocated
   * blocks), as qemu-img's "disk size" reports it.
   */
  allocatedSize?(): Promise<number>;
  /**
   * Optional: which parts of [offset, offset+length) hold data and which are holes (as
   * lseek's SEEK_DATA/SEEK_HOLE tell). Storage without holes leaves this out.
   */
  dataRuns?(offset: number, length: number): AsyncIterable<DataRun>;
}

export interface DataRun {
  start: number;
  length: number;
  data: boolean;
}

/** Reads exactly dst.length bytes, filling with zeros past the end of the storage. */
export async function readFull(s: Storage, dst: Uint8Array, offset: number): Promise<void> {
  const n = await s.read(dst, offset);
  if (n < dst.length) dst.fill(0, n);
}
