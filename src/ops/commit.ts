/**
 * `commit`: write what the layers above a base image hold into that base (QEMU's active
 * commit, as qemu-img commit runs it), then empty the top image unless asked to keep it.
 *
 * Order (what keeps a crash harmless): the base is written and flushed before the top is
 * emptied, so at every moment the top's guest contents are intact — first through the top's
 * own clusters, then through the base.
 */
import { invalidArgument, QcowError } from "../errors.js";
import type { Image, StorageOpener } from "../image/open.js";
import { Qcow2Image } from "../image/qcow2.js";
import { resizeImage } from "../image/resize.js";
import { ioBuffer } from "../io/buffer.js";
import { mapExtents } from "./map.js";

/** Data is copied at most this much per request, with a few requests in flight. */
const COMMIT_CHUNK = 2 * 1024 * 1024;
const IN_FLIGHT = 4;

export interface CommitOptions {
  /** Keep the top image's contents (qemu-img commit -d; implied by -b). */
  drop?: boolean;
  onProgress?: (fraction: number) => void;
}

/** The layers of an image's backing chain, top first. */
export function backingChain(top: Image): Image[] {
  const chain: Image[] = [top];
  for (let l: Image | undefined = top; l?.format === "qcow2" && l.backing; l = l.backing) chain.push(l.backing);
  return chain;
}

/**
 * The layer of `top`'s chain that `name` designates, as QEMU's bdrv_find_backing_image finds
 * it: for each overlay, `name` is taken relative to that overlay's directory and compared
 * (as the same file) with the overlay's backing file. Returns its depth (1: the backing file
 * of `top`), or undefined when no layer matches (the top itself never does).
 */
export async function findBackingImage(top: Image, name: string, opener: StorageOpener): Promise<number | undefined> {
  const chain = backingChain(top);
  for (let depth = 1; depth < chain.length; depth++) {
    const overlay = chain[depth - 1];
    const candidate = await opener.identity(opener.resolve(overlay.filename, name));
    if (candidate === (await opener.identity(chain[depth].filename))) return depth;
  }
  return undefined;
}

/**
 * Writes into `base` — a writable handle on the layer at `depth` of `top`'s chain — every
 * guest range that a layer above it allocates: data is copied, zero runs become zero writes.
 * A base shorter than the top is grown to the top's size first (as QEMU's commit grows it).
 * Then, unless `drop`, the top image is emptied (every cluster unallocated).
 */
export async function commit(top: Image, base: Image, depth: number, opts: CommitOptions = {}): Promise<void> {
  if (depth < 1 || depth >= backingChain(top).length) {
    throw invalidArgument(`Depth ${depth} is not a backing layer of ${top.filename}`);
  }
  if (base.readOnly) throw new QcowError("read-only", `${base.filename} is open read-only`);
  if (base.size < top.size) await grow(base, top.size);

  const total = top.size;
  let done = 0;
  const running = new Set<Promise<void>>();
  let failure: unknown;
  const start = (task: Promise<void>): void => {
    const p = task.then(
      () => {
        running.delete(p);
      },
      (e: unknown) => {
        running.delete(p);
        failure ??= e;
      },
    );
    running.add(p);
  };
  const buffers: Uint8Array[] = [];
  const copy = async (offset: number, length: number): Promise<void> => {
    const buf = (buffers.pop() ?? ioBuffer(COMMIT_CHUNK)).subarray(0, length);
    try {
      await top.read(buf, offset);
      await base.write(buf, offset);
    } finally {
      buffers.push(new Uint8Array(buf.buffer, buf.byteOffset, COMMIT_CHUNK));
    }
  };
  for await (const e of mapExtents(top)) {
    // Allocated in a layer above the base; what is unallocated there, or past the end of an
    // intermediate layer, is not committed (QEMU's bdrv_is_allocated_above).
    if (e.present && e.depth < depth) {
      if (e.zero) {
        start(base.writeZeroes(e.start, e.length, { unmap: true }));
      } else {
        for (let at = e.start; at < e.start + e.length; ) {
          const n = Math.min(COMMIT_CHUNK - (at % COMMIT_CHUNK), e.start + e.length - at);
          while (running.size >= IN_FLIGHT) await Promise.race(running);
          if (failure !== undefined) break;
          start(copy(at, n));
          at += n;
        }
      }
    }
    while (running.size >= IN_FLIGHT) await Promise.race(running);
    if (failure !== undefined) break;
    done += e.length;
    opts.onProgress?.(total === 0 ? 1 : done / total);
  }
  await Promise.all(running);
  if (failure !== undefined) throw failure;
  await base.flush();
  if (!opts.drop && top instanceof Qcow2Image && top.writer) await top.writer.makeEmpty();
  opts.onProgress?.(1);
}

/** Grows the base to `size` bytes (the new part reads as zeros), as qemu-img resize would. */
function grow(base: Image, size: number): Promise<void> {
  return resizeImage(base, size);
}
