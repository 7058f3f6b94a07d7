/** `map`: the guest address space as qemu-img map lists it. */
import type { BlockDevice, Extent } from "../image/block-device.js";

/** Two extents are listed as one when qemu-img's entry_mergeable would merge them. */
function mergeable(a: Extent, b: Extent): boolean {
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (a.offset !== undefined && (a.offset + a.length !== b.offset || a.file !== b.file)) return false;
  return true;
}

/** The merged extents of the whole device (or of [start, start+length)). */
export async function* mapExtents(dev: BlockDevice, start = 0, length = dev.size - start): AsyncIterable<Extent> {
  let cur: Extent | undefined;
  for await (const e of dev.blockStatus(start, length)) {
    if (cur && mergeable(cur, e)) {
      cur.length += e.length;
      continue;
    }
    if (cur) yield cur;
    cur = { ...e };
  }
  if (cur) yield cur;
}
