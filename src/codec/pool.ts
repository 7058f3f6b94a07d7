/**
 * Compression on worker threads (Node): `convert -c` compresses clusters on every core while
 * the main thread reads and writes.
 */
import { availableParallelism } from "node:os";
import type * as WorkerThreads from "node:worker_threads";
import type { Worker } from "node:worker_threads";
import { lazyBuiltin } from "../lazy-builtin.js";
import type { Compressor } from "../ops/convert.js";
import type { CompressReply, CompressRequest } from "./compress-worker.js";

const workerThreads = lazyBuiltin<typeof WorkerThreads>("node:worker_threads");

export class CompressionPool implements Compressor {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly pending = new Map<
    number,
    { resolve: (r: (Uint8Array | undefined)[]) => void; reject: (e: unknown) => void; worker: number }
  >();
  private nextId = 0;

  constructor(
    private readonly type: "zlib" | "zstd",
    threads = availableParallelism(),
  ) {
    for (let i = 0; i < Math.max(1, threads); i++) {
      const worker = new (workerThreads().Worker)(new URL("../codec/compress-worker.js", import.meta.url));
      worker.on("message", (reply: CompressReply) => {
        const p = this.pending.get(reply.id);
        if (!p) return;
        this.pending.delete(reply.id);
        this.workers[p.worker].busy--;
        p.resolve(reply.results.map((r) => r ?? undefined));
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

  compress(clusters: Uint8Array, clusterSize: number): Promise<(Uint8Array | undefined)[]> {
    let w = 0;
    for (let i = 1; i < this.workers.length; i++) if (this.workers[i].busy < this.workers[w].busy) w = i;
    const id = this.nextId++;
    this.workers[w].busy++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, worker: w });
      const req: CompressRequest = { id, type: this.type, clusterSize, data: clusters.slice() };
      this.workers[w].worker.postMessage(req, [req.data.buffer as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}
