/**
 * Seeded randomness for the randomized tests: mulberry32, with a base seed from QCOWKIT_SEED
 * (to repeat a failing run) or from the clock.
 */
export const BASE_SEED =
  process.env.QCOWKIT_SEED !== undefined
    ? Number(process.env.QCOWKIT_SEED) >>> 0
    : (Date.now() ^ (process.pid << 10)) >>> 0;

export class Prng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  int(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.next() / 0x1_0000_0000) * n);
  }
  chance(p: number): boolean {
    return this.next() / 0x1_0000_0000 < p;
  }
  /** Random non-zero bytes (so that data never looks like a hole). */
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = 1 + (this.next() % 255);
    return b;
  }
}
