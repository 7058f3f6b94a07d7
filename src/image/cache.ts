/**
 * A least-recently-used cache of metadata tables (L2 tables, refcount blocks) with a byte
 * budget, so memory stays bounded whatever the image size (QEMU's docs/qcow2-cache.txt).
 * Concurrent loads of the same key share one read.
 */
export class TableCache<V extends { byteLength: number }> {
  private readonly entries = new Map<number, V>();
  private readonly loading = new Map<number, Promise<V>>();
  private bytes = 0;

  constructor(private readonly budget: number) {}

  async get(key: number, load: () => Promise<V>): Promise<V> {
    const hit = this.entries.get(key);
    if (hit !== undefined) {
      // Map iteration order is insertion order: re-inserting marks the entry most recent.
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit;
    }
    let pending = this.loading.get(key);
    if (pending === undefined) {
      pending = load().then(
        (v) => {
          this.loading.delete(key);
          this.put(key, v);
          return v;
        },
        (e: unknown) => {
          this.loading.delete(key);
          throw e;
        },
      );
      this.loading.set(key, pending);
    }
    return pending;
  }

  peek(key: number): V | undefined {
    return this.entries.get(key);
  }

  put(key: number, v: V): void {
    const old = this.entries.get(key);
    if (old !== undefined) {
      this.bytes -= old.byteLength;
      this.entries.delete(key);
    }
    this.entries.set(key, v);
    this.bytes += v.byteLength;
    for (const [k, e] of this.entries) {
      if (this.bytes <= this.budget || this.entries.size <= 1) break;
      this.entries.delete(k);
      this.bytes -= e.byteLength;
    }
  }

  delete(key: number): void {
    const old = this.entries.get(key);
    if (old === undefined) return;
    this.bytes -= old.byteLength;
    this.entries.delete(key);
  }

  clear(): void {
    this.entries.clear();
    this.bytes = 0;
  }
}
