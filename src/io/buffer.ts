/**
 * Buffers for large reads and writes, starting on a memory page as QEMU's I/O buffers do
 * (qemu_blockalign). The kernel's copies into and out of user memory run at full speed only
 * from and to cache-line-aligned addresses: on the 2-core EPYC VM this was measured on, 2 MiB
 * preads into a buffer 16 bytes past a cache line (where malloc puts a large ArrayBuffer) took
 * 25 % longer, 8 bytes past one three times longer.
 *
 * JavaScript cannot see addresses, so where a platform can (Node with the native addon: file.ts
 * installs its probe) the buffer is cut from a slightly larger one at the first page boundary;
 * elsewhere it is a plain Uint8Array.
 */

const PAGE = 4096;

let pageOffsetOf: ((b: Uint8Array) => number) | undefined;

/** Installs the function that tells where a buffer's first byte lies within its page. */
export function setPageOffsetProbe(probe: ((b: Uint8Array) => number) | undefined): void {
  pageOffsetOf = probe;
}

/**
 * A zero-filled buffer of `size` bytes that starts on a page where the platform can arrange it.
 * It may be a view into a larger ArrayBuffer: use its byteOffset, never offset 0 of its buffer.
 */
export function ioBuffer(size: number): Uint8Array {
  if (pageOffsetOf === undefined || size < PAGE) return new Uint8Array(size);
  const raw = new Uint8Array(size + PAGE);
  const skip = (PAGE - pageOffsetOf(raw)) % PAGE;
  return raw.subarray(skip, skip + size);
}
