/** Storage on a local file, with positional reads and writes on one file handle (Node only). */
import { read as fsRead, write as fsWrite } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { createRequire } from "node:module";
import { QcowError } from "../errors.js";
import type { DataRun, Storage } from "./storage.js";

type SeekFn = (fd: number, offset: number, which: 0 | 1) => number;

/** The native lseek(SEEK_DATA/SEEK_HOLE) binding built at install (native/seek.c). */
const seek: SeekFn | undefined = (() => {
  try {
    const require = createRequire(import.meta.url);
    return (require("../../../build/Release/qcowkit_seek.node") as { seek: SeekFn }).seek;
  } catch {
    return undefined;
  }
})();

export class FileStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  private readonly fh: FileHandle;
  private readonly sync: boolean;

  private constructor(fh: FileHandle, name: string, readOnly: boolean, sync: boolean) {
    this.fh = fh;
    this.name = name;
    this.readOnly = readOnly;
    this.sync = sync;
  }

  /**
   * `unsafe`: flush does not sync to the disk (qemu-img's cache=unsafe, its default for the
   * target of convert): fast, and durable only once the kernel writes the pages back.
   */
  static async open(
    path: string,
    opts: { readOnly?: boolean; create?: boolean; unsafe?: boolean } = {},
  ): Promise<FileStorage> {
    const readOnly = opts.readOnly ?? true;
    const flags = readOnly ? "r" : opts.create ? "w+" : "r+";
    try {
      return new FileStorage(await open(path, flags), path, readOnly, !opts.unsafe);
    } catch (e) {
      throw ioError(e, path);
    }
  }

  async size(): Promise<number> {
    return (await this.fh.stat()).size;
  }

  async allocatedSize(): Promise<number> {
    return (await this.fh.stat()).blocks * 512;
  }

  async *dataRuns(offset: number, length: number): AsyncIterable<DataRun> {
    const end = offset + length;
    if (!seek) {
      yield { start: offset, length, data: true };
      return;
    }
    for (let pos = offset; pos < end; ) {
      const data = seek(this.fh.fd, pos, 0);
      if (data < 0 || data >= end) {
        yield { start: pos, length: end - pos, data: false };
        return;
      }
      if (data > pos) yield { start: pos, length: data - pos, data: false };
      const hole = Math.min(end, seek(this.fh.fd, data, 1));
      yield { start: data, length: hole - data, data: true };
      pos = hole;
    }
  }

  // Positional I/O through fs.read/fs.write on the handle's descriptor: the callback API costs
  // less per call than FileHandle's promise API, and convert makes many calls.
  async read(dst: Uint8Array, offset: number): Promise<number> {
    let done = 0;
    try {
      while (done < dst.length) {
        const n = await new Promise<number>((resolve, reject) =>
          fsRead(this.fh.fd, dst, done, dst.length - done, offset + done, (e, bytes) =>
            e ? reject(e) : resolve(bytes),
          ),
        );
        if (n === 0) break;
        done += n;
      }
    } catch (e) {
      throw failed(e, "read from", this.name, offset);
    }
    return done;
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new QcowError("read-only", `${this.name} is open read-only`);
    let done = 0;
    try {
      while (done < src.length) {
        done += await new Promise<number>((resolve, reject) =>
          fsWrite(this.fh.fd, src, done, src.length - done, offset + done, (e, bytes) =>
            e ? reject(e) : resolve(bytes),
          ),
        );
      }
    } catch (e) {
      throw failed(e, "write to", this.name, offset);
    }
  }

  async flush(): Promise<void> {
    try {
      if (!this.readOnly && this.sync) await this.fh.datasync();
    } catch (e) {
      throw failed(e, "flush", this.name);
    }
  }

  async truncate(size: number): Promise<void> {
    try {
      await this.fh.truncate(size);
    } catch (e) {
      throw failed(e, "resize", this.name, size);
    }
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** strerror's words for the system errors a user meets, as qemu-img prints them. */
const REASONS: Record<string, string> = {
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  EISDIR: "Is a directory",
  ENOSPC: "No space left on device",
  EFBIG: "File too large",
  EIO: "Input/output error",
  EROFS: "Read-only file system",
  EDQUOT: "Disk quota exceeded",
};

/**
 * A failed read, write, flush or resize as a QcowError ("io"); the system error stays as its
 * `cause` (its `code`, such as ENOSPC, is what an NBD client is told).
 */
function failed(e: unknown, what: string, name: string, offset?: number): QcowError {
  const err = e as NodeJS.ErrnoException;
  const reason = (err.code && REASONS[err.code]) ?? err.message ?? String(e);
  const at = offset === undefined ? "" : ` at offset ${offset}`;
  return new QcowError("io", `Could not ${what} '${name}'${at}: ${reason}`, { cause: e });
}

/** Turns a Node system error into a QcowError that names the file, as qemu-img words it. */
export function ioError(e: unknown, path: string): QcowError {
  const err = e as NodeJS.ErrnoException;
  const reason = (err.code && REASONS[err.code]) ?? err.message ?? String(e);
  return new QcowError(err.code === "ENOENT" ? "not-found" : "io", `Could not open '${path}': ${reason}`, { cause: e });
}
