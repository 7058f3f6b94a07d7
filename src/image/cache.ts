/**
 * A least-recently-used cache of metadata tables (L2 tables, refcount blocks) with a byte
 * budget, so memory stays bounded whatever the image size (QEMU's docs/qcow2-cache.txt).
 * Concurrent loads of the same key share one read. Entries marked dirty are never evicted:
 * their owner writes them back (and marks them clean) when `overBudget` says so, or on flush.
 */
export class TableCache<V extends { byteLength: number }> {
  private readonly entries = new Map<number, V>();
  private readonly loading = new Map<number, Promise<V>>();
  private readonly dirty = new Set<number>();
  private bytes = 0;
  /** The most recent key (the map's last) where known: using it again moves nothing. */
  private newest: number | undefined;

  constructor(private readonly budget: number) {}

  async get(key: number, load: () => Promise<V>): Promise<V> {
    const hit = this.use(key);
    if (hit !== undefined) return hit;
    let pending = this.loading.get(key);
    if (pending === undefined) {
      pending = load().then(
        (v) => {
          this.loading.delete(key);
          // A put() while loading (a freshly made table) wins over what was read.
          const current = this.entries.get(key);
          if (current !== undefined) return current;
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

  /** The cached value for `key`, marked most recently used as by `get`, or undefined: no load. */
  use(key: number): V | undefined {
    const hit = this.entries.get(key);
    if (hit !== undefined && key !== this.newest) {
      // Map iteration order is insertion order: re-inserting marks the entry most recent.
      this.entries.delete(key);
      this.entries.set(key, hit);
      this.newest = key;
    }
    return hit;
  }

  put(key: number, v: V): void {
    const old = this.entries.get(key);
    if (old !== undefined) {
      this.bytes -= old.byteLength;
      this.entries.delete(key);
    }
    this.entries.set(key, v);
    this.newest = key;
    this.bytes += v.byteLength;
    this.evict();
  }

  /** Marks `key` dirty, putting `value` back first if it was evicted meanwhile. */
  markDirty(key: number, value?: V): void {
    if (!this.entries.has(key)) {
      if (value === undefined) return;
      this.put(key, value);
    }
    this.dirty.add(key);
  }

  markClean(key: number): void {
    this.dirty.delete(key);
    this.evict();
  }

  /** Dirty entries in key order (file offset order, so write-back is sequential). */
  dirtyEntries(): [number, V][] {
    return [...this.dirty].sort((a, b) => a - b).map((k) => [k, this.entries.get(k) as V]);
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** True when dirty entries alone hold more than the budget: time to write them back. */
  get overBudget(): boolean {
    return this.bytes > this.budget && this.dirty.size > 0;
  }

  delete(key: number): void {
    const old = this.entries.get(key);
    if (old === undefined) return;
    this.bytes -= old.byteLength;
    this.entries.delete(key);
    this.dirty.delete(key);
    if (key === this.newest) this.newest = undefined;
  }

  clear(): void {
    this.entries.clear();
    this.dirty.clear();
    this.bytes = 0;
    this.newest = undefined;
  }

  /**
   * Drops least recently used clean entries until the budget holds. The most recent entry always
   * stays: its caller is about to use it (and perhaps mark it dirty).
   */
  private evict(): void {
    if (this.bytes <= this.budget) return;
    let newest: number | undefined;
    for (const k of this.entries.keys()) newest = k;
    for (const [k, e] of this.entries) {
      if (this.bytes <= this.budget || k === newest) break;
      if (this.dirty.has(k)) continue;
      this.entries.delete(k);
      this.bytes -= e.byteLength;
    }
  }
}
