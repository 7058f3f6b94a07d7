import type { BlockDevice, Extent } from "../image/block-device.js";

/**
 * Walks a device's extents while the caller chooses how far to advance: `at(offset)` returns
 * the extent covering `offset`, trimmed to start there. Offsets must not go backwards.
 */
export class ExtentCursor {
  private readonly it: AsyncIterator<Extent>;
  private cur: Extent | undefined;

  constructor(dev: BlockDevice, start: number, end: number) {
    this.it = dev.blockStatus(start, end - start)[Symbol.asyncIterator]();
  }

  async at(offset: number): Promise<Extent> {
    while (!this.cur || this.cur.start + this.cur.length <= offset) {
      const n = await this.it.next();
      if (n.done) throw new Error(`no block status at offset ${offset}`);
      this.cur = n.value;
    }
    const e = this.cur;
    const skip = offset - e.start;
    return {
      ...e,
      start: offset,
      length: e.length - skip,
      offset: e.offset === undefined ? undefined : e.offset + skip,
    };
  }
}
