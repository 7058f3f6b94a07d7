/**
 * qcowkit/node: the Node.js parts — local files as Storage, the native codecs, and opening
 * images by path.
 */
import { realpathSync } from "node:fs";
import { nodeCodecs } from "./codec/node.js";
import { QcowError } from "./errors.js";
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
      return realpathSync.native(name);
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

/** A file opener whose read-only files share every permission (qemu-img's -U, force-share). */
export const sharedFileOpener: StorageOpener = {
  ...fileOpener,
  open: (name, opts) =>
    isHttpUrl(name)
      ? httpOpener.open(name, opts)
      : FileStorage.open(name, { ...opts, locking: opts.readOnly ? "shared" : "write" }),
};

/**
 * Opens an image file or URL (and its backing chain) with Node's file system, fetch and codecs.
 * `cache: "unsafe"` skips syncing to disk on flush, as qemu-img's convert does by default.
 * `forceShare` (qemu-img's -U) opens read-only files even while another process writes them.
 */
export function openImageFile(
  path: string,
  opts: Partial<OpenImageOptions> & { cache?: "unsafe" | "writeback"; forceShare?: boolean } = {},
): Promise<Image> {
  const { cache, forceShare, ...rest } = opts;
  if (forceShare && rest.readOnly === false) {
    return Promise.reject(
      new QcowError(
        "invalid-argument",
        `Could not open '${path}': force-share=on can only be used with read-only images`,
      ),
    );
  }
  const opener = forceShare ? sharedFileOpener : cache === "unsafe" ? unsafeFileOpener : fileOpener;
  return openImage(path, { opener, codecs: nodeCodecs, ...rest });
}
