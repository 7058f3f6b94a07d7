/** A Blob or File (a file the user picked in a page) as read-only Storage. */
import { QcowError } from "../errors.js";
import type { StorageOpener } from "../image/open.js";
import type { Storage } from "./storage.js";

export class BlobStorage implements Storage {
  readonly readOnly = true;
  readonly name: string;

  constructor(
    private readonly blob: Blob,
    name?: string,
  ) {
    this.name = name ?? blobName(blob);
  }

  async size(): Promise<number> {
    return this.blob.size;
  }

  async read(dst: Uint8Array, offset: number): Promise<number> {
    const end = Math.min(this.blob.size, offset + dst.length);
    if (end <= offset) return 0;
    let bytes: ArrayBuffer;
    try {
      bytes = await this.blob.slice(offset, end).arrayBuffer();
    } catch (e) {
      // A File whose underlying file changed or vanished since it was picked.
      throw new QcowError("io", `Could not read ${this.name} at ${offset}: ${(e as Error).message}`);
    }
    dst.set(new Uint8Array(bytes));
    return bytes.byteLength;
  }

  async write(): Promise<void> {
    throw new QcowError("read-only", `${this.name} is read-only`);
  }

  async truncate(): Promise<void> {
    throw new QcowError("read-only", `${this.name} is read-only`);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}
}

/**
 * Names to Blobs: a set of files the user picked (an image and, if they chose them too, its
 * backing files). A backing file name is looked up by its last path component, since picked
 * files carry no directory.
 */
export function blobOpener(files: Iterable<Blob> | ReadonlyMap<string, Blob>): StorageOpener {
  const byName = new Map<string, Blob>();
  if (files instanceof Map) for (const [name, blob] of files) byName.set(name, blob);
  else for (const blob of files as Iterable<Blob>) byName.set(blobName(blob), blob);
  return {
    async open(name, { readOnly }) {
      const blob = byName.get(name);
      if (!blob) throw new QcowError("not-found", `Could not open '${name}': no such file was picked`);
      if (!readOnly) throw new QcowError("read-only", `${name} is a picked file and can only be read`);
      return new BlobStorage(blob, name);
    },
    resolve: (_base, relative) => relative.slice(relative.lastIndexOf("/") + 1),
    identity: async (name) => name,
  };
}

function blobName(blob: Blob): string {
  return "name" in blob && typeof blob.name === "string" ? blob.name : "blob";
}
