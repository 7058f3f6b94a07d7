/**
 * Copy-on-write overlays: a writable qcow2 image on any writable Storage (memory, a file, OPFS)
 * whose backing file is an image already open, typically read-only (a remote image over HTTP, a
 * Blob). Writes go to the overlay only; what it does not hold reads from the backing image.
 * The overlay's header names its backing file and format, as `qemu-img create -b NAME -F FMT`
 * writes them, so that QEMU (or openImage) can open the overlay later by itself.
 */
import type { Codecs } from "../codec/codec.js";
import { invalidArgument, QcowError } from "../errors.js";
import type { Image } from "../image/open.js";
import { Qcow2Image } from "../image/qcow2.js";
import type { Storage } from "../io/storage.js";
import { type Qcow2CreateOptions, writeEmptyQcow2 } from "./create.js";

export interface OverlayOptions {
  /** The backing file name written in the header (default: the backing image's name, its URL). */
  backingName?: string;
  codecs?: Codecs;
  /** The overlay's name, for messages and `info` (default: the storage's name). */
  filename?: string;
}

/** The creation options an overlay takes: its size, backing file and format come from the backing image. */
export type OverlayCreateOptions = Omit<
  Qcow2CreateOptions,
  "size" | "backingFile" | "backingFormat" | "dataFile" | "dataFileRaw" | "preallocation"
>;

/**
 * Writes a new qcow2 overlay of `backing` into `storage` (which should be empty) and opens it
 * for writing. The overlay takes ownership of `backing`: closing the overlay closes it.
 */
export async function createOverlay(
  backing: Image,
  storage: Storage,
  opts: OverlayOptions & { create?: OverlayCreateOptions } = {},
): Promise<Qcow2Image> {
  if (storage.readOnly) throw new QcowError("read-only", `${storage.name} is read-only: an overlay must be writable`);
  const backingName = opts.backingName ?? backing.filename;
  if (backingName === "") throw invalidArgument("An overlay needs a backing file name");
  await writeEmptyQcow2(storage, {
    ...opts.create,
    // As qemu-img create: the backing image's size, in whole 512-byte sectors.
    size: Math.ceil(backing.size / 512) * 512,
    backingFile: backingName,
    backingFormat: backing.format,
  });
  return openOverlay(storage, backing, opts);
}

/**
 * Opens an existing overlay (made by createOverlay or `qemu-img create -b`) for writing (for
 * reading only if `storage` is read-only), on top
 * of `backing`, opened by the caller (its name in the overlay's header is not looked up: the
 * caller knows where the backing image is, such as a URL that needs headers). Closing the
 * overlay closes `backing`.
 */
export async function openOverlay(storage: Storage, backing: Image, opts: OverlayOptions = {}): Promise<Qcow2Image> {
  const { backingName } = await Qcow2Image.readHeader(storage);
  if (backingName === undefined) {
    throw invalidArgument(`${opts.filename ?? storage.name} has no backing file: it is not an overlay`);
  }
  return Qcow2Image.open(storage, {
    readOnly: storage.readOnly,
    backing,
    codecs: opts.codecs,
    filename: opts.filename ?? storage.name,
    backingFilename: backing.filename,
  });
}
