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

/**
 * Turns taken in call order: `wait(t)` resolves once every earlier turn is `done`. Turns may be
 * done in any order (a write with nothing to allocate is done at once).
 *
 * The turns done ahead of the lowest open one are kept in a small array, not a Set: a Set that
 * lives long (in V8's old generation) gets each table it grows or shrinks into allocated there
 * too, and its churn (an add and a delete per write) left ~3 MiB of old-generation garbage under
 * fio's 32k random writes, most of the server's growth in V8's heap.
 */
export class Turns {
  private next = 0;
  /** Every turn below this one is done. */
  private lowest = 0;
  /** Turns above `lowest` that are done, in no order (at most the requests in flight). */
  private readonly ahead: number[] = [];
  /** Waiters by turn: the groups of one write all wait on the same turn. */
  private readonly waiting: { turn: number; resolve: () => void }[] = [];

  take(): number {
    return this.next++;
  }

  async wait(turn: number): Promise<void> {
    if (turn <= this.lowest) return;
    await new Promise<void>((resolve) => this.waiting.push({ turn, resolve }));
  }

  done(turn: number): void {
    if (turn < this.lowest) return;
    if (turn > this.lowest) {
      if (!this.ahead.includes(turn)) this.ahead.push(turn);
      return;
    }
    this.lowest++;
    for (let i = this.ahead.indexOf(this.lowest); i >= 0; i = this.ahead.indexOf(this.lowest)) {
      this.ahead[i] = this.ahead[this.ahead.length - 1];
      this.ahead.pop();
      this.lowest++;
    }
    for (let i = this.waiting.length - 1; i >= 0; i--) {
      const w = this.waiting[i];
      if (w.turn <= this.lowest) {
        this.waiting.splice(i, 1);
        w.resolve();
      }
    }
  }
}

/**
 * Waits for every one of `jobs`, then throws the first failure: nothing started keeps running
 * after the caller has seen an error. One job is awaited as it is (most writes have one part).
 */
export async function allDone(jobs: Promise<unknown>[]): Promise<void> {
  if (jobs.length === 1) {
    await jobs[0];
    return;
  }
  const failed = (await Promise.allSettled(jobs)).find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
}
