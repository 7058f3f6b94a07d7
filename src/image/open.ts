/**
 * Opening an image by name: format probing, the backing chain (resolved as QEMU resolves
 * relative names), external data files, loops and a depth limit.
 */
import type { Codecs } from "../codec/codec.js";
import { invalidArgument, QcowError } from "../errors.js";
import { QCOW2_MAGIC } from "../format/header.js";
import type { Storage, StorageOpener } from "../io/storage.js";
import { Qcow2Image } from "./qcow2.js";
import { RawImage } from "./raw.js";

export type { StorageOpener } from "../io/storage.js";

export type ImageFormat = "qcow2" | "raw";
export type Image = Qcow2Image | RawImage;

/** An error about the backing chain, already naming where it went wrong. */
class ChainError extends QcowError {}

/** QEMU refuses deeper chains than this in practice; qcowkit makes it a firm limit. */
export const MAX_BACKING_DEPTH = 64;

export interface OpenImageOptions {
  opener: StorageOpener;
  format?: ImageFormat;
  readOnly?: boolean;
  codecs?: Codecs;
  /** Read an internal snapshot of the top image (by id or name). */
  snapshot?: string;
  /** Do not open backing files (qemu-img's -u for some commands). */
  noBacking?: boolean;
  /** Open to describe only (qemu-img info): encrypted images open, their data stays unread. */
  metadataOnly?: boolean;
}

export async function probeFormat(storage: Storage): Promise<ImageFormat> {
  const magic = new Uint8Array(4);
  const n = await storage.read(magic, 0);
  return n === 4 && new DataView(magic.buffer).getUint32(0) === QCOW2_MAGIC ? "qcow2" : "raw";
}

export function parseFormat(name: string): ImageFormat {
  if (name === "qcow2" || name === "raw") return name;
  throw invalidArgument(`Unknown file format '${name}'`);
}

export async function openImage(name: string, opts: OpenImageOptions): Promise<Image> {
  return openLayer(name, opts, opts.format, [], opts.readOnly ?? true, opts.snapshot);
}

async function openLayer(
  name: string,
  opts: OpenImageOptions,
  format: ImageFormat | undefined,
  seen: string[],
  readOnly: boolean,
  snapshot: string | undefined,
): Promise<Image> {
  const id = await opts.opener.identity(name);
  if (seen.includes(id)) throw new ChainError("invalid-argument", `Backing file '${name}' creates an infinite loop`);
  if (seen.length > MAX_BACKING_DEPTH) {
    throw new ChainError("invalid-argument", `Backing chain of '${name}' is deeper than ${MAX_BACKING_DEPTH} images`);
  }
  const storage = await opts.opener.open(name, { readOnly });
  try {
    const fmt = format ?? (await probeFormat(storage));
    if (fmt === "raw") {
      if (snapshot !== undefined) throw invalidArgument(`Raw image '${name}' has no snapshot '${snapshot}'`);
      return await RawImage.open(storage, name);
    }
    const { extensions, backingName } = await Qcow2Image.readHeader(storage, opts.metadataOnly && readOnly);
    let backing: Image | undefined;
    let dataFile: Storage | undefined;
    try {
      if (backingName !== undefined && !opts.noBacking) {
        const backingPath = opts.opener.resolve(name, backingName);
        const backingFormat =
          extensions.backingFormat !== undefined ? parseFormat(extensions.backingFormat) : undefined;
        backing = await openLayer(backingPath, opts, backingFormat, [...seen, id], true, undefined).catch(
          (e: unknown) => {
            // Name the failing backing file once, at the level where it failed.
            if (e instanceof ChainError) throw e;
            const reason = e instanceof Error ? e.message : String(e);
            throw new ChainError(e instanceof QcowError ? e.code : "io", `Could not open backing file: ${reason}`, {
              cause: e,
            });
          },
        );
      }
      if (extensions.dataFile !== undefined) {
        dataFile = await opts.opener.open(opts.opener.resolve(name, extensions.dataFile), { readOnly });
      }
      return await Qcow2Image.open(storage, {
        readOnly,
        codecs: opts.codecs,
        backing,
        dataFile,
        snapshot,
        metadataOnly: opts.metadataOnly,
        filename: name,
        backingFilename: backingName !== undefined ? opts.opener.resolve(name, backingName) : undefined,
      });
    } catch (e) {
      await backing?.close();
      await dataFile?.close();
      throw e;
    }
  } catch (e) {
    await storage.close();
    throw e;
  }
}
