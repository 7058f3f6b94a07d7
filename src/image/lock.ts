/** Async mutual exclusion: one holder at a time, waiters served in arrival order. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => {
      release = r;
    });
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * Locks on ranges of guest clusters (QEMU's allocation dependencies): a request that changes
 * the mapping of clusters waits for every earlier request holding an overlapping range.
 */
export class RangeLocks {
  private readonly held: { start: number; end: number; done: Promise<void> }[] = [];

  async run<T>(start: number, end: number, fn: () => Promise<T>): Promise<T> {
    for (;;) {
      const overlap = this.held.filter((h) => h.start < end && start < h.end);
      if (overlap.length === 0) break;
      await Promise.all(overlap.map((h) => h.done));
    }
    let release!: () => void;
    const entry = { start, end, done: new Promise<void>((r) => (release = r)) };
    this.held.push(entry);
    try {
      return await fn();
    } finally {
      this.held.splice(this.held.indexOf(entry), 1);
      release();
    }
  }
}
