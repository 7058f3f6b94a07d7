/**
 * `convert -c` in Node: compresses chunks of whole clusters without worker threads.
 *  - zlib with the native addon (native/zlib.c): chunks deflate on libuv's thread pool, one per
 *    core at most, each thread with one deflate stream it resets per cluster, the results
 *    straight into a reused buffer;
 *  - zstd (zstd-napi is synchronous), and zlib without the addon: on the calling thread.
 * Worker threads cost a V8 isolate each (~10–20 MiB); QEMU's own `convert -c` compresses on one
 * thread, and zstd on one core is faster than qemu-img's.
 */
import { availableParallelism } from "node:os";
import type { CompressedClusters, Compressor } from "../ops/convert.js";
import { compressZlibInto, compressZstdInto, nativeZlib } from "./node.js";

/** libuv's thread pool: reads and writes need some of it while chunks are being deflated. */
const POOL_THREADS = Number(process.env.UV_THREADPOOL_SIZE) || 4;

export class ClusterCompressor implements Compressor {
  readonly threads: number;
  /** Result buffers, reused once their results are written. */
  private readonly spare: Uint8Array[] = [];
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(
    private readonly type: "zlib" | "zstd",
    threads = availableParallelism(),
  ) {
    const offThread = type === "zlib" && nativeZlib()?.deflateClusters !== undefined;
    this.threads = offThread ? Math.max(1, Math.min(threads, POOL_THREADS - 1)) : 1;
  }

  async compress(clusters: Uint8Array, clusterSize: number): Promise<CompressedClusters> {
    const out = this.take(clusters.length);
    const count = Math.ceil(clusters.length / clusterSize);
    const sizes = new Int32Array(count);
    const deflateClusters = this.type === "zlib" ? nativeZlib()?.deflateClusters : undefined;
    if (deflateClusters) {
      // At most `threads` chunks on the pool at once: the others would hold back reads and writes.
      if (this.running >= this.threads) await new Promise<void>((r) => this.waiting.push(r));
      this.running++;
      try {
        await deflateClusters(clusters, clusterSize, out, sizes);
      } finally {
        this.running--;
        this.waiting.shift()?.();
      }
    } else {
      const into = this.type === "zstd" ? compressZstdInto : compressZlibInto;
      let at = 0;
      for (let i = 0; i < count; i++) {
        const cluster = clusters.subarray(i * clusterSize, (i + 1) * clusterSize);
        // Only a result shorter than its cluster is kept, so `out` (as long as the chunk) holds them.
        if (cluster.length === clusterSize) sizes[i] = into(cluster, out.subarray(at, at + clusterSize - 1));
        at += sizes[i];
      }
    }
    const results: (Uint8Array | undefined)[] = [];
    let at = 0;
    for (const n of sizes) {
      results.push(n > 0 ? out.subarray(at, at + n) : undefined);
      at += n;
    }
    return { clusters: results, release: () => this.spare.push(out) };
  }

  /** A buffer of at least `n` bytes. */
  private take(n: number): Uint8Array {
    const i = this.spare.findIndex((b) => b.length >= n);
    return i >= 0 ? (this.spare.splice(i, 1)[0] as Uint8Array) : new Uint8Array(n);
  }
}
