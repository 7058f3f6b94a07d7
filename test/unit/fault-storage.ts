/**
 * Fault injection for the write path (issue 6; QEMU's blkdebug-driven iotest 026): a Storage
 * that fails the n-th request of chosen kinds with an I/O error, either once (the device
 * recovers) or for good (a power cut: nothing after it reaches the disk).
 */
import { QcowError } from "../../src/errors.js";
import type { Storage } from "../../src/io/storage.js";

export type OpKind = "read" | "write" | "flush" | "truncate";

export interface FaultPlan {
  /** The index, among the requests of `kinds`, of the first one that fails. */
  at: number;
  kinds: readonly OpKind[];
  errno: "EIO" | "ENOSPC";
  /** Every later request (of any kind but read) fails too. */
  persistent: boolean;
  /** A failing write first writes this many of its bytes (a short write, as ENOSPC leaves). */
  tornBytes?: (length: number) => number;
}

const REASONS = { EIO: "Input/output error", ENOSPC: "No space left on device" } as const;

export class FaultStorage implements Storage {
  /** Requests of the plan's kinds seen so far. */
  count = 0;
  /** The count at which the fault fired, if it did. */
  firedAt: number | undefined;
  /** Requests that failed. */
  failures = 0;

  constructor(
    private readonly inner: Storage,
    private readonly plan?: FaultPlan,
  ) {}

  get name(): string {
    return this.inner.name;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  /**
   * Whether this request fails: "first" for the injected fault, "again" for a request after a
   * persistent one (counting the request when it is of the plan's kinds).
   */
  private fails(kind: OpKind): "first" | "again" | undefined {
    const p = this.plan;
    if (!p) return undefined;
    if (this.firedAt !== undefined && p.persistent && kind !== "read") return "again";
    if (!p.kinds.includes(kind)) return undefined;
    const n = this.count++;
    if (n !== p.at) return undefined;
    this.firedAt = n;
    return "first";
  }

  private error(what: string, offset?: number): QcowError {
    const errno = this.plan?.errno ?? "EIO";
    this.failures++;
    const cause = Object.assign(new Error(REASONS[errno]), { code: errno });
    const at = offset === undefined ? "" : ` at offset ${offset}`;
    return new QcowError("io", `Could not ${what} '${this.name}'${at}: ${REASONS[errno]}`, { cause });
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  async read(dst: Uint8Array, offset: number): Promise<number> {
    if (this.fails("read")) throw this.error("read", offset);
    return this.inner.read(dst, offset);
  }

  async write(src: Uint8Array, offset: number): Promise<void> {
    const fault = this.fails("write");
    if (fault) {
      const torn = fault === "first" ? (this.plan?.tornBytes?.(src.length) ?? 0) : 0;
      if (torn > 0) await this.inner.write(src.subarray(0, torn), offset);
      throw this.error("write", offset);
    }
    await this.inner.write(src, offset);
  }

  async flush(): Promise<void> {
    if (this.fails("flush")) throw this.error("flush");
    await this.inner.flush();
  }

  async truncate(size: number): Promise<void> {
    if (this.fails("truncate")) throw this.error("truncate");
    await this.inner.truncate(size);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
