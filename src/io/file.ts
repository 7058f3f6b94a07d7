/** Storage on a local file, with positional reads and writes on one file handle (Node only). */
import { type FileHandle, open } from "node:fs/promises";
import { QcowError } from "../errors.js";
import type { Storage } from "./storage.js";

export class FileStorage implements Storage {
  readonly name: string;
  readonly readOnly: boolean;
  private readonly fh: FileHandle;

  private constructor(fh: FileHandle, name: string, readOnly: boolean) {
    this.fh = fh;
    this.name = name;
    this.readOnly = readOnly;
  }

  static async open(path: string, opts: { readOnly?: boolean; create?: boolean } = {}): Promise<FileStorage> {
    const readOnly = opts.readOnly ?? true;
    const flags = readOnly ? "r" : opts.create ? "w+" : "r+";
    try {
      return new FileStorage(await open(path, flags), path, readOnly);
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

  async read(dst: Uint8Array, offset: number): Promise<number> {
    let done = 0;
    while (done < dst.length) {
      const { bytesRead } = await this.fh.read(dst, done, dst.length - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new QcowError("read-only", `${this.name} is open read-only`);
    let done = 0;
    while (done < src.length) {
      const { bytesWritten } = await this.fh.write(src, done, src.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.fh.datasync();
  }

  async truncate(size: number): Promise<void> {
    await this.fh.truncate(size);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** Turns a Node system error into a QcowError that names the file, as qemu-img words it. */
export function ioError(e: unknown, path: string): QcowError {
  const err = e as NodeJS.ErrnoException;
  const reason =
    err.code === "ENOENT"
      ? "No such file or directory"
      : err.code === "EACCES"
        ? "Permission denied"
        : err.code === "EISDIR"
          ? "Is a directory"
          : (err.message ?? String(e));
  return new QcowError(err.code === "ENOENT" ? "not-found" : "io", `Could not open '${path}': ${reason}`, { cause: e });
}
