/**
 * `rebase`: give an image another backing file (or none) while what a guest reads from it stays
 * the same (QEMU's safe rebase): wherever the image has no data of its own and the old and the
 * new backing file differ, the old contents are copied into the image; then the header names
 * the new backing file. `unsafe` only rewrites the name.
 *
 * Crash safety: the copies change nothing a guest reads (they write what the old backing file
 * shows there), and they are durable before the header switches to the new backing file.
 */
import { QcowError } from "../errors.js";
import type { BlockDevice } from "../image/block-device.js";
import type { Qcow2Image } from "../image/qcow2.js";
import { ioBuffer } from "../io/buffer.js";
import { ExtentCursor } from "./extents.js";
import { mapExtents } from "./map.js";

/** qemu-img's buffer: at most this much is compared per step. */
const REBASE_CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

export interface RebaseOptions {
  /** Only rewrite the backing file name (qemu-img rebase -u): no data is compared or copied. */
  unsafe?: boolean;
  /**
   * The new backing file is the layer at this depth of the image's current chain: only what
   * the layers above it allocate can differ (QEMU's prefix_chain_bs).
   */
  newBackingDepth?: number;
  onProgress?: (fraction: number) => void;
}

/**
 * Rebases `image` (open for writing, with its current backing chain unless `unsafe`) onto
 * `newBacking` — the opened new backing file, or undefined for none — to be named `name`
 * (undefined: no backing file) with format `format` in the header.
 */
export async function rebase(
  image: Qcow2Image,
  newBacking: BlockDevice | undefined,
  name: string | undefined,
  format: string | undefined,
  opts: RebaseOptions = {},
): Promise<void> {
  const writer = image.writer;
  if (!writer) throw new QcowError("read-only", `${image.filename} is open read-only`);
  // Refuse a name the header cannot hold before anything is written.
  writer.backingHeader(name, format);
  if (!opts.unsafe) await copyDifferences(image, newBacking, opts);
  await writer.changeBackingFile(name, format);
  opts.onProgress?.(1);
}

async function copyDifferences(
  image: Qcow2Image,
  newBacking: BlockDevice | undefined,
  opts: RebaseOptions,
): Promise<void> {
  const size = image.size;
  const oldSize = image.backing?.size ?? 0;
  const newSize = newBacking?.size ?? 0;
  const prefix = opts.newBackingDepth;
  const cursor = newBacking && newSize > 0 ? new ExtentCursor(newBacking, 0, newSize) : undefined;
  const bufOld = ioBuffer(REBASE_CHUNK);
  const bufNew = ioBuffer(REBASE_CHUNK);
  for await (const e of mapExtents(image)) {
    opts.onProgress?.(size === 0 ? 1 : e.start / size);
    // The image's own clusters stay; so does what no layer above the new backing file holds.
    if (e.present && e.depth === 0) continue;
    if (prefix !== undefined && e.present && e.depth >= prefix) continue;
    const end = e.start + e.length;
    for (let at = e.start; at < end; ) {
      // Steps stop at the ends of the old and new backing files, as qemu-img's do.
      let n = end - at;
      if (at < oldSize) n = Math.min(n, oldSize - at);
      if (at < newSize) n = Math.min(n, newSize - at);
      let newZero = !cursor || at >= newSize;
      if (!newZero) {
        const ne = await (cursor as ExtentCursor).at(at);
        n = Math.min(n, ne.length);
        newZero = ne.zero;
      }
      // Both read as zeros: nothing can differ (a sparse 4 TiB image costs no reads).
      if (!(e.zero && newZero)) {
        n = Math.min(n, REBASE_CHUNK);
        await copyStep(image, newBacking, at, n, at >= oldSize, newZero, bufOld, bufNew);
      }
      at += n;
    }
  }
  await image.flush();
}

/** Compares one step sector by sector and writes the old contents where they differ. */
async function copyStep(
  image: Qcow2Image,
  newBacking: BlockDevice | undefined,
  at: number,
  n: number,
  oldIsZero: boolean,
  newZero: boolean,
  bufOld: Uint8Array,
  bufNew: Uint8Array,
): Promise<void> {
  const oldData = bufOld.subarray(0, n);
  const newData = bufNew.subarray(0, n);
  // Where the image has no cluster of its own, reading it reads the old backing file.
  if (oldIsZero) oldData.fill(0);
  else await image.read(oldData, at);
  if (newZero) newData.fill(0);
  else await (newBacking as BlockDevice).read(newData, at);
  for (let i = 0; i < n; ) {
    const differs = !sameSector(oldData, newData, i);
    let j = Math.min(n, i + SECTOR);
    while (j < n && !sameSector(oldData, newData, j) === differs) j = Math.min(n, j + SECTOR);
    if (differs) {
      if (oldIsZero) await image.writeZeroes(at + i, j - i);
      else await image.write(oldData.subarray(i, j), at + i);
    }
    i = j;
  }
}

function sameSector(a: Uint8Array, b: Uint8Array, i: number): boolean {
  const end = Math.min(a.length, i + SECTOR);
  for (let k = i; k < end; k++) if (a[k] !== b[k]) return false;
  return true;
}
