/** qcowkit: the core, free of Node.js modules so that it also runs in browsers. */
export * from "./errors.js";
export type { Storage } from "./io/storage.js";
export { MemoryStorage } from "./io/memory.js";
export type { BlockDevice, Extent } from "./image/block-device.js";
export { Qcow2Image, type Qcow2OpenOptions } from "./image/qcow2.js";
export { RawImage } from "./image/raw.js";
export { openImage, probeFormat, type Image, type ImageFormat, type StorageOpener, type OpenImageOptions } from "./image/open.js";
export type { Codec, Codecs } from "./codec/codec.js";
export * as format from "./format/index.js";
