/**
 * qcowkit/node: the Node.js parts — local files as Storage, the native codecs, and opening
 * images by path.
 */
import { realpath } from "node:fs/promises";
import { nodeCodecs } from "./codec/node.js";
import { QcowError } from "./errors.js";
import { type Image, type OpenImageOptions, openImage, type StorageOpener } from "./image/open.js";
import { FileStorage } from "./io/file.js";

export { nodeCodecs, nodeZlib, nodeZstd } from "./codec/node.js";
export { FileStorage } from "./io/file.js";
export { type NbdExport, NbdServer, type NbdServerOptions } from "./nbd/server.js";

/** QEMU's path_combine: a relative name is taken from the directory of the image naming it. */
export function combinePath(base: string, relative: string): string {
  if (relative.startsWith("/") || /^[a-z][a-z0-9+.-]*:/i.test(relative)) return relative;
  const slash = base.lastIndexOf("/");
  return slash < 0 ? relative : base.slice(0, slash + 1) + relative;
}

export const fileOpener: StorageOpener = {
  open: (name, { readOnly }) => FileStorage.open(name, { readOnly }),
  resolve: combinePath,
  async identity(name) {
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
  open: (name, { readOnly }) => FileStorage.open(name, { readOnly, unsafe: true }),
};

/** A file opener whose read-only files share every permission (qemu-img's -U, force-share). */
export const sharedFileOpener: StorageOpener = {
  ...fileOpener,
  open: (name, { readOnly }) => FileStorage.open(name, { readOnly, locking: readOnly ? "shared" : "write" }),
};

/**
 * Opens an image file (and its backing chain) with Node's file system and codecs.
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
