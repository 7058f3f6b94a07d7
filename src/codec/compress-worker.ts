/** A compression worker: compresses each cluster of a chunk (see CompressionPool). */
import { parentPort } from "node:worker_threads";
import { compressZlib, compressZstd } from "./node.js";

export interface CompressRequest {
  id: number;
  type: "zlib" | "zstd";
  clusterSize: number;
  data: Uint8Array;
}

export interface CompressReply {
  id: number;
  results: (Uint8Array | null)[];
}

parentPort?.on("message", (req: CompressRequest) => {
  const fn = req.type === "zstd" ? compressZstd : compressZlib;
  const results: (Uint8Array | null)[] = [];
  for (let at = 0; at < req.data.length; at += req.clusterSize) {
    const cluster = req.data.subarray(at, at + req.clusterSize);
    results.push(cluster.length === req.clusterSize ? (fn(cluster) ?? null) : null);
  }
  parentPort?.postMessage({ id: req.id, results } satisfies CompressReply);
});
