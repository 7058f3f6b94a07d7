/**
 * A file in the browser's Origin Private File System (OPFS) as Storage.
 *
 * Two ways in, picked when the file is opened:
 * - In a dedicated worker, `createSyncAccessHandle()`: reads and writes go to the file in
 *   place, `flush()` makes them durable. Fast; the handle locks the file while it is open.
 * - Anywhere else (a page's main thread), sync access handles do not exist, and a
 *   `createWritable()` stream only shows its writes once it is closed, when they replace the
 *   file at once. Writes are therefore kept in memory, in pages, and `flush()` commits them in
 *   one writable stream; reads see the pages over the file's last committed contents. The
 *   pages held are bounded: past 16 MiB of them a commit happens on its own. Each commit
 *   replaces the file atomically, so a crash keeps the state of the last commit whole — an
 *   earlier point of the same write sequence, which the qcow2 write ordering is built to
 *   survive. Cost: the browser copies the file into a swap file per commit, so this suits
 *   overlays and small images; big writable images belong in a worker.
 *
 * Opened read-only, the file is read as a File snapshot (no lock, either context).
 */
import { QcowError } from "../errors.js";
import { Mutex } from "../image/lock.js";
import type { Storage } from "./storage.js";

/** The parts of FileSystemFileHandle used here (some are not in every TypeScript DOM library). */
export interface OpfsFileHandle {
  readonly name: string;
  getFile(): Promise<File>;
  createWritable?(opts?: { keepExistingData?: boolean }): Promise<OpfsWritableStream>;
  createSyncAccessHandle?(): Promise<OpfsSyncAccessHandle>;
}

interface OpfsWritableStream {
  write(cmd: { type: "write"; position: number; data: Uint8Array }): Promise<void>;
  truncate(size: number): Promise<void>;
  close(): Promise<void>;
  abort(): Promise<void>;
}

interface OpfsSyncAccessHandle {
  read(buf: Uint8Array, opts: { at: number }): number;
  write(buf: Uint8Array, opts: { at: number }): number;
  truncate(size: number): void;
  getSize(): number;
  flush(): void;
  close(): void;
}

export interface OpfsOpenOptions {
  readOnly?: boolean;
  /** Force one way in (default: a sync access handle where it exists, else a writable stream). */
  mode?: "sync" | "writable";
}

/** The handle of `path` ("dir/sub/file.qcow2") under the origin's OPFS root. */
export async function opfsFileHandle(path: string, opts: { create?: boolean } = {}): Promise<OpfsFileHandle> {
  const parts = path.split("/").filter((p) => p !== "");
  const fileName = parts.pop();
  if (fileName === undefined) throw new QcowError("invalid-argument", `'${path}' is not an OPFS file name`);
  try {
    let dir = await navigator.storage.getDirectory();
    for (const p of parts) dir = await dir.getDirectoryHandle(p, { create: opts.create });
    return (await dir.getFileHandle(fileName, { create: opts.create })) as unknown as OpfsFileHandle;
  } catch (e) {
    const code = (e as DOMException).name === "NotFoundError" ? "not-found" : "io";
    throw new QcowError(code, `Could not open OPFS file '${path}': ${(e as Error).message}`);
  }
}

type Backend = Omit<Storage, "name" | "readOnly">;

export class OpfsStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  /** "sync", "writable" or "read": how the file is reached. */
  readonly mode: "sync" | "writable" | "read";

  private constructor(
    name: string,
    mode: "sync" | "writable" | "read",
    private readonly backend: Backend,
  ) {
    this.name = name;
    this.mode = mode;
    this.readOnly = mode === "read";
  }

  /** Opens a file handle (from `opfsFileHandle`, or a directory listing). */
  static async open(handle: OpfsFileHandle, opts: OpfsOpenOptions = {}): Promise<OpfsStorage> {
    const name = handle.name;
    try {
      if (opts.readOnly) return new OpfsStorage(name, "read", await ReadBackend.open(handle));
      const canSync = typeof handle.createSyncAccessHandle === "function";
      if (opts.mode === "sync" || (opts.mode === undefined && canSync)) {
        if (!canSync) throw new Error("sync access handles exist only in dedicated workers");
        try {
          return new OpfsStorage(name, "sync", new SyncBackend(await handle.createSyncAccessHandle?.()));
        } catch (e) {
          if (opts.mode === "sync") throw e;
        }
      }
      if (typeof handle.createWritable !== "function") throw new Error("this browser cannot write OPFS files");
      return new OpfsStorage(name, "writable", await WritableBackend.open(handle));
    } catch (e) {
      if (e instanceof QcowError) throw e;
      throw new QcowError("io", `Could not open OPFS file '${name}': ${(e as Error).message}`);
    }
  }

  /** Opens (or with `create`, creates) `path` under the origin's OPFS root. */
  static async openPath(path: string, opts: OpfsOpenOptions & { create?: boolean } = {}): Promise<OpfsStorage> {
    return OpfsStorage.open(await opfsFileHandle(path, { create: opts.create }), opts);
  }

  size(): Promise<number> {
    return this.backend.size();
  }
  read(dst: Uint8Array, offset: number): Promise<number> {
    return this.io("read", offset, () => this.backend.read(dst, offset));
  }
  write(src: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new QcowError("read-only", `${this.name} is read-only`));
    return this.io("write", offset, () => this.backend.write(src, offset));
  }
  flush(): Promise<void> {
    return this.io("flush", 0, () => this.backend.flush());
  }
  truncate(size: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new QcowError("read-only", `${this.name} is read-only`));
    return this.io("truncate", size, () => this.backend.truncate(size));
  }
  close(): Promise<void> {
    return this.io("close", 0, () => this.backend.close());
  }

  private async io<T>(what: string, offset: number, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof QcowError) throw e;
      throw new QcowError("io", `OPFS ${what} of ${this.name} at ${offset} failed: ${(e as Error).message}`);
    }
  }
}

class ReadBackend implements Backend {
  private constructor(private readonly file: File) {}
  static async open(handle: OpfsFileHandle): Promise<ReadBackend> {
    return new ReadBackend(await handle.getFile());
  }
  async size(): Promise<number> {
    return this.file.size;
  }
  async read(dst: Uint8Array, offset: number): Promise<number> {
    const end = Math.min(this.file.size, offset + dst.length);
    if (end <= offset) return 0;
    const bytes = new Uint8Array(await this.file.slice(offset, end).arrayBuffer());
    dst.set(bytes);
    return bytes.length;
  }
  async write(): Promise<void> {}
  async truncate(): Promise<void> {}
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}

class SyncBackend implements Backend {
  private closed = false;
  constructor(private readonly h: OpfsSyncAccessHandle | undefined) {
    if (!h) throw new Error("no sync access handle");
  }
  private get handle(): OpfsSyncAccessHandle {
    if (this.closed) throw new QcowError("io", "OPFS file is closed");
    return this.h as OpfsSyncAccessHandle;
  }
  async size(): Promise<number> {
    return this.handle.getSize();
  }
  async read(dst: Uint8Array, offset: number): Promise<number> {
    let done = 0;
    while (done < dst.length) {
      const n = this.handle.read(dst.subarray(done), { at: offset + done });
      if (n === 0) break;
      done += n;
    }
    return done;
  }
  async write(src: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < src.length) {
      const n = this.handle.write(src.subarray(done), { at: offset + done });
      if (n === 0) throw new Error("no space left");
      done += n;
    }
  }
  async truncate(size: number): Promise<void> {
    this.handle.truncate(size);
  }
  async flush(): Promise<void> {
    this.handle.flush();
  }
  async close(): Promise<void> {
    if (this.closed) return;
    this.handle.flush();
    this.handle.close();
    this.closed = true;
  }
}

const PAGE = 64 * 1024;
/** Pages held before a commit happens on its own. */
const MAX_DIRTY_PAGES = 256;

/** Main-thread writes: pages in memory over the committed file, committed by flush(). */
class WritableBackend implements Backend {
  private readonly mutex = new Mutex();
  private readonly dirty = new Map<number, Uint8Array>();
  /** The logical size (writes and truncations included). */
  private length: number;
  /** Bytes of `base` still valid: a truncation below makes the rest read as zeros. */
  private baseLimit: number;
  private activeReads = 0;
  private readsDrained: (() => void) | undefined;
  private commitGate: Promise<void> | undefined;

  private constructor(
    private readonly handle: OpfsFileHandle,
    private base: File,
  ) {
    this.length = base.size;
    this.baseLimit = base.size;
  }

  static async open(handle: OpfsFileHandle): Promise<WritableBackend> {
    return new WritableBackend(handle, await handle.getFile());
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(dst: Uint8Array, offset: number): Promise<number> {
    // A commit replaces the file that `base` reads; reads wait for it, and it for them.
    while (this.commitGate) await this.commitGate;
    this.activeReads++;
    try {
      const end = Math.min(offset + dst.length, this.length);
      let pos = offset;
      const jobs: Promise<void>[] = [];
      while (pos < end) {
        const page = Math.floor(pos / PAGE);
        const pageEnd = Math.min((page + 1) * PAGE, end);
        const held = this.dirty.get(page);
        if (held) {
          dst.set(held.subarray(pos - page * PAGE, pageEnd - page * PAGE), pos - offset);
          pos = pageEnd;
          continue;
        }
        // A run of pages not held: one read of the committed file.
        let runEnd = pageEnd;
        while (runEnd < end && !this.dirty.has(Math.floor(runEnd / PAGE))) runEnd = Math.min(runEnd + PAGE, end);
        jobs.push(this.readBase(dst.subarray(pos - offset, runEnd - offset), pos));
        pos = runEnd;
      }
      await Promise.all(jobs);
      return Math.max(0, end - offset);
    } finally {
      if (--this.activeReads === 0) this.readsDrained?.();
    }
  }

  /** Fills `dst` from the committed file, zeros past what is valid of it. */
  private async readBase(dst: Uint8Array, offset: number): Promise<void> {
    const end = Math.min(offset + dst.length, this.baseLimit, this.base.size);
    let n = 0;
    if (end > offset) {
      const bytes = new Uint8Array(await this.base.slice(offset, end).arrayBuffer());
      dst.set(bytes);
      n = bytes.length;
    }
    dst.fill(0, n);
  }

  write(src: Uint8Array, offset: number): Promise<void> {
    return this.mutex.run(async () => {
      const first = Math.floor(offset / PAGE);
      const last = Math.floor((offset + src.length - 1) / PAGE);
      const pages = new Map<number, Uint8Array>();
      for (let p = first; p <= last && src.length > 0; p++) {
        let page = this.dirty.get(p);
        if (!page) {
          page = new Uint8Array(PAGE);
          await this.readBase(page, p * PAGE);
        }
        pages.set(p, page);
      }
      // Applied at once, so a concurrent read sees all of this write or none of it.
      for (const [p, page] of pages) {
        const from = Math.max(offset, p * PAGE);
        const to = Math.min(offset + src.length, (p + 1) * PAGE);
        page.set(src.subarray(from - offset, to - offset), from - p * PAGE);
        this.dirty.set(p, page);
      }
      this.length = Math.max(this.length, offset + src.length);
      if (this.dirty.size > MAX_DIRTY_PAGES) await this.commit();
    });
  }

  truncate(size: number): Promise<void> {
    return this.mutex.run(async () => {
      for (const [p, page] of this.dirty) {
        if (p * PAGE >= size) this.dirty.delete(p);
        else if ((p + 1) * PAGE > size) page.fill(0, size - p * PAGE);
      }
      this.baseLimit = Math.min(this.baseLimit, size);
      this.length = size;
    });
  }

  flush(): Promise<void> {
    return this.mutex.run(() => this.commit());
  }

  async close(): Promise<void> {
    await this.flush();
  }

  /** Writes the held pages (and a truncation) in one writable stream; the file changes at its close. */
  private async commit(): Promise<void> {
    if (this.dirty.size === 0 && this.length === this.base.size && this.baseLimit === this.base.size) return;
    let open!: () => void;
    this.commitGate = new Promise((resolve) => {
      open = resolve;
    });
    try {
      if (this.activeReads > 0) {
        await new Promise<void>((resolve) => {
          this.readsDrained = resolve;
        });
      }
      this.readsDrained = undefined;
      const w = await (this.handle.createWritable as NonNullable<OpfsFileHandle["createWritable"]>)({
        keepExistingData: true,
      });
      try {
        // What a truncation cut off reads as zeros, even where the file grew again since.
        if (this.baseLimit < this.base.size) await w.truncate(this.baseLimit);
        for (const [p, page] of [...this.dirty].sort((a, b) => a[0] - b[0])) {
          const n = Math.min(PAGE, this.length - p * PAGE);
          if (n > 0) await w.write({ type: "write", position: p * PAGE, data: page.subarray(0, n) });
        }
        await w.truncate(this.length);
      } catch (e) {
        await w.abort().catch(() => {});
        throw e;
      }
      await w.close();
      this.base = await this.handle.getFile();
      this.baseLimit = this.base.size;
      this.dirty.clear();
    } finally {
      this.commitGate = undefined;
      open();
    }
  }
}
