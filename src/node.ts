/**
 * qcowkit/node: the Node.js parts — local files as Storage, the native codecs, and opening
 * images by path.
 */
import { realpath } from "node:fs/promises";
import { nodeCodecs } from "./codec/node.js";
import { type Image, type OpenImageOptions, openImage } from "./image/open.js";
import { FileStorage } from "./io/file.js";
import { httpOpener, isHttpUrl } from "./io/http.js";
import { combinePath, type StorageOpener } from "./io/storage.js";

export { nodeCodecs, nodeZlib, nodeZstd } from "./codec/node.js";
export { FileStorage } from "./io/file.js";
export { combinePath } from "./io/storage.js";
export { type NbdExport, NbdServer, type NbdServerOptions } from "./nbd/server.js";

/** Local files with FileStorage, http:// and https:// URLs with HttpStorage (read-only). */
export const fileOpener: StorageOpener = {
  open: (name, opts) => (isHttpUrl(name) ? httpOpener.open(name, opts) : FileStorage.open(name, opts)),
  resolve: combinePath,
  async identity(name) {
    if (isHttpUrl(name)) return httpOpener.identity(name);
    try {
      return await realpath(name);
    } catch {
      return name;
    }
  },
};

/** A file opener whose writable files do not sync on flush (qemu-img's cache=unsafe). */
export const unsafeFileOpener: StorageOpener = {
  ...fileOpener,
  open: (name, opts) =>
    isHttpUrl(name) ? httpOpener.open(name, opts) : FileStorage.open(name, { ...opts, unsafe: true }),
};

/**
 * Opens an image file or URL (and its backing chain) with Node's file system, fetch and codecs.
 * `cache: "unsafe"` skips syncing to disk on flush, as qemu-img's convert does by default.
 */
export function openImageFile(
  path: string,
  opts: Partial<OpenImageOptions> & { cache?: "unsafe" | "writeback" } = {},
): Promise<Image> {
  const { cache, ...rest } = opts;
  return openImage(path, { opener: cache === "unsafe" ? unsafeFileOpener : fileOpener, codecs: nodeCodecs, ...rest });
}
