/** qcowkit: the core, free of Node.js modules so that it also runs in browsers. */

export type { Codec, Codecs } from "./codec/codec.js";
export * from "./errors.js";
export * as format from "./format/index.js";
export { type AmendOptions, amendImage } from "./image/amend.js";
export type { BlockDevice, Extent } from "./image/block-device.js";
export {
  type Image,
  type ImageFormat,
  type OpenImageOptions,
  openImage,
  probeFormat,
  type StorageOpener,
} from "./image/open.js";
export { Qcow2Image, type Qcow2OpenOptions } from "./image/qcow2.js";
export { RawImage } from "./image/raw.js";
export { MemoryStorage } from "./io/memory.js";
export type { Storage } from "./io/storage.js";
