/** A compression worker: compresses each cluster of a chunk (see CompressionPool). */
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { parentPort } from "node:worker_threads";
import { compressZlib, compressZstd } from "./node.js";

// The compressors return one new Buffer per cluster: small objects on V8's heap whose bytes
// are outside it, so V8 would let ~64 MiB of them pile up per worker before collecting. A
// young-generation collection after each chunk (~0.1 ms, against milliseconds of compression)
// keeps a worker at one chunk's worth.
setFlagsFromString("--expose-gc");
const collect = runInNewContext("gc") as (opts: { type: "minor" | "major" }) => void;

/** A chunk of whole clusters (`data`) and a buffer at least as long for the results (`out`). */
export interface CompressRequest {
  id: number;
  type: "zlib" | "zstd";
  clusterSize: number;
  data: Uint8Array;
  out: Uint8Array;
}

/**
 * Both buffers come back (transferred, for reuse): `out` holds the compressed clusters back to
 * back, `sizes[i]` the length of cluster i's (0 where it does not shrink or is not whole).
 */
export interface CompressReply {
  id: number;
  data: Uint8Array;
  out: Uint8Array;
  sizes: number[];
}

parentPort?.on("message", (req: CompressRequest) => {
  const fn = req.type === "zstd" ? compressZstd : compressZlib;
  const sizes: number[] = [];
  let at = 0;
  for (let from = 0; from < req.data.length; from += req.clusterSize) {
    const cluster = req.data.subarray(from, from + req.clusterSize);
    // A result is shorter than its cluster, so `out` (as long as `data`) holds them all.
    const packed = cluster.length === req.clusterSize ? fn(cluster) : undefined;
    if (packed) req.out.set(packed, at);
    sizes.push(packed?.length ?? 0);
    at += packed?.length ?? 0;
  }
  const reply: CompressReply = { id: req.id, data: req.data, out: req.out, sizes };
  parentPort?.postMessage(reply, [req.data.buffer as ArrayBuffer, req.out.buffer as ArrayBuffer]);
  collect({ type: "minor" });
});
