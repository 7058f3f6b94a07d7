/** Zero detection in bulk: four bytes at a time where alignment allows. */
export function isZero(buf: Uint8Array): boolean {
  const n = buf.length;
  const head = Math.min(n, (4 - (buf.byteOffset % 4)) % 4);
  let i = 0;
  for (; i < head; i++) if (buf[i] !== 0) return false;
  const words = (n - i) >>> 2;
  if (words > 0) {
    const w = new Uint32Array(buf.buffer, buf.byteOffset + i, words);
    for (let k = 0; k < words; k++) if (w[k] !== 0) return false;
    i += words * 4;
  }
  for (; i < n; i++) if (buf[i] !== 0) return false;
  return true;
}
