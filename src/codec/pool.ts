/**
 * Compression on worker threads (Node): `convert -c` compresses clusters on every core while
 * the main thread reads and writes.
 */
import { availableParallelism } from "node:os";
import type * as WorkerThreads from "node:worker_threads";
import type { Worker } from "node:worker_threads";
import { lazyBuiltin } from "../lazy-builtin.js";
import type { CompressedClusters, Compressor } from "../ops/convert.js";
import type { CompressReply, CompressRequest } from "./compress-worker.js";

const workerThreads = lazyBuiltin<typeof WorkerThreads>("node:worker_threads");

/** Buffers kept for reuse: chunks in flight need two each. */
const MAX_SPARE = 32;

export class CompressionPool implements Compressor {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly pending = new Map<
    number,
    { resolve: (r: CompressedClusters) => void; reject: (e: unknown) => void; worker: number }
  >();
  private nextId = 0;
  /**
   * Buffers that went to a worker and came back: a chunk's copy and its results travel in them,
   * so that converting allocates nothing per chunk (a fresh copy and a Buffer per cluster each
   * time made the main thread hold ~90 MiB of them between collections).
   */
  private readonly spare: ArrayBuffer[] = [];
  readonly threads: number;

  constructor(
    private readonly type: "zlib" | "zstd",
    threads = availableParallelism(),
  ) {
    this.threads = Math.max(1, threads);
    for (let i = 0; i < this.threads; i++) {
      const worker = new (workerThreads().Worker)(new URL("../codec/compress-worker.js", import.meta.url));
      worker.on("message", (reply: CompressReply) => {
        const p = this.pending.get(reply.id);
        if (!p) return;
        this.pending.delete(reply.id);
        this.workers[p.worker].busy--;
        this.give(reply.data);
        const clusters: (Uint8Array | undefined)[] = [];
        let at = 0;
        for (const n of reply.sizes) {
          clusters.push(n > 0 ? reply.out.subarray(at, at + n) : undefined);
          at += n;
        }
        p.resolve({ clusters, release: () => this.give(reply.out) });
      });
      worker.on("error", (e) => {
        for (const [id, p] of this.pending) {
          if (p.worker === i) {
            this.pending.delete(id);
            p.reject(e);
          }
        }
      });
      this.workers.push({ worker, busy: 0 });
    }
  }

  compress(clusters: Uint8Array, clusterSize: number): Promise<CompressedClusters> {
    let w = 0;
    for (let i = 1; i < this.workers.length; i++) if (this.workers[i].busy < this.workers[w].busy) w = i;
    const id = this.nextId++;
    this.workers[w].busy++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, worker: w });
      const data = this.take(clusters.length);
      data.set(clusters);
      const req: CompressRequest = { id, type: this.type, clusterSize, data, out: this.take(clusters.length) };
      this.workers[w].worker.postMessage(req, [req.data.buffer as ArrayBuffer, req.out.buffer as ArrayBuffer]);
    });
  }

  /** A buffer of `n` bytes, reused where one is spare (its ArrayBuffer goes to a worker whole). */
  private take(n: number): Uint8Array {
    const i = this.spare.findIndex((b) => b.byteLength >= n);
    const buffer = i >= 0 ? this.spare.splice(i, 1)[0] : new ArrayBuffer(n);
    return new Uint8Array(buffer, 0, n);
  }

  private give(b: Uint8Array): void {
    if (this.spare.length < MAX_SPARE) this.spare.push(b.buffer as ArrayBuffer);
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}
