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
  /**
   * Optional (local files): sends `header`, then bytes [offset, offset+length) of the storage,
   * to the non-blocking socket descriptor `socket`, from memory the kernel already holds, without
   * copying them through this process. Returns what the socket did not take at once, to be
   * queued on it before anything else; undefined where it sent nothing (the caller sends as
   * usual).
   */
  sendCached?(socket: number, header: Uint8Array, offset: number, length: number): Uint8Array[] | undefined;
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

/** How names become storage: files in Node, URLs (HttpStorage) anywhere. */
export interface StorageOpener {
  open(name: string, opts: { readOnly: boolean }): Promise<Storage>;
  /** The name of `relative` as seen from the image called `base` (QEMU's path_combine). */
  resolve(base: string, relative: string): string;
  /** A key that is equal for two names of the same file (for loop detection). */
  identity(name: string): Promise<string>;
}

/**
 * QEMU's path_combine: a relative name is taken from the directory of the image naming it (for
 * a URL, relative to its last "/"); absolute paths and names with a protocol stay as they are.
 */
export function combinePath(base: string, relative: string): string {
  if (relative.startsWith("/") || /^[a-z][a-z0-9+.-]*:/i.test(relative)) return relative;
  const slash = base.lastIndexOf("/");
  return slash < 0 ? relative : base.slice(0, slash + 1) + relative;
}
