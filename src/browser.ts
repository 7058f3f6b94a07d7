/**
 * qcowkit/browser: the core plus what runs only in browsers — codecs without Node (deflate in
 * JavaScript, zstd in WebAssembly), picked files (Blob/File) and the Origin Private File System
 * as Storage. Bundled as dist/browser/qcowkit.js by `npm run build:bundles`.
 */
import { browserCodecs } from "./codec/browser.js";
import { type Image, type OpenImageOptions, openImage } from "./image/open.js";
import { blobOpener } from "./io/blob.js";

export {
  type BrowserCodecOptions,
  browserCodecs,
  browserZlib,
  browserZstd,
  type WasmSource,
} from "./codec/browser.js";
export * from "./index.js";
export { BlobStorage, blobOpener } from "./io/blob.js";
export { type OpfsFileHandle, type OpfsOpenOptions, OpfsStorage, opfsFileHandle } from "./io/opfs.js";

/**
 * Opens a picked file read-only (`files` may hold its backing files too, found by name), with
 * the browser codecs.
 */
export function openImageFiles(
  file: Blob & { name?: string },
  files: Iterable<Blob> = [file],
  opts: Partial<OpenImageOptions> = {},
): Promise<Image> {
  const all = new Set([file, ...files]);
  return openImage(file.name ?? "blob", {
    opener: blobOpener(all),
    codecs: browserCodecs(),
    readOnly: true,
    ...opts,
  });
}
