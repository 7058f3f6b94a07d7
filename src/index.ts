/** qcowkit: the core, free of Node.js modules so that it also runs in browsers. */

export type { Codec, Codecs } from "./codec/codec.js";
export * from "./errors.js";
export * as format from "./format/index.js";
export { type AmendOptions, amendImage } from "./image/amend.js";
export {
  type AddBitmapOptions,
  addBitmap,
  clearBitmap,
  defaultBitmapGranularity,
  mergeBitmap,
  removeBitmap,
  setBitmapEnabled,
} from "./image/bitmap-ops.js";
export { type BlockDevice, type Extent, readSparse } from "./image/block-device.js";
export {
  CheckFailed,
  type CheckOptions,
  type CheckResult,
  checkQcow2,
  FIX_ERRORS,
  FIX_LEAKS,
} from "./image/check.js";
export {
  type Image,
  type ImageFormat,
  type OpenImageOptions,
  openImage,
  probeFormat,
} from "./image/open.js";
export { Qcow2Image, type Qcow2OpenOptions } from "./image/qcow2.js";
export { RawImage } from "./image/raw.js";
export { type ResizeOptions, type ResizePreallocation, resizeImage } from "./image/resize.js";
export {
  applySnapshot,
  type CreateSnapshotOptions,
  createSnapshot,
  deleteSnapshot,
  lookupSnapshot,
  nextSnapshotId,
  SnapshotError,
  type SnapshotRef,
} from "./image/snapshots.js";
export {
  createHttpOpener,
  HttpStorage,
  type HttpStorageOptions,
  httpOpener,
  isHttpUrl,
} from "./io/http.js";
export { MemoryStorage } from "./io/memory.js";
export { combinePath, type Storage, type StorageOpener } from "./io/storage.js";
export { backingChain, type CommitOptions, commit, findBackingImage } from "./ops/commit.js";
export { type MeasureInfo, type MeasureOptions, measure } from "./ops/measure.js";
export {
  createOverlay,
  type OverlayCreateOptions,
  type OverlayOptions,
  openOverlay,
} from "./ops/overlay.js";
export { type RebaseOptions, rebase } from "./ops/rebase.js";
