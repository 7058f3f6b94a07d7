/** Node codecs: zlib from Node itself, zstd from zstd-napi (native libzstd). */

import { createRequire } from "node:module";
import type * as Zlib from "node:zlib";
import type * as ZstdBinding from "zstd-napi/binding.js";
import { corrupt } from "../errors.js";
import { lazyBuiltin } from "../lazy-builtin.js";
import type { Codec, Codecs } from "./codec.js";

const zlib = lazyBuiltin<typeof Zlib>("node:zlib");

export const nodeZlib: Codec = {
  name: "zlib",
  async decompress(src, dst) {
    let out: Buffer;
    try {
      // Z_SYNC_FLUSH: a stream cut at the end of its last sector still yields what it holds.
      out = zlib().inflateRawSync(src, {
        finishFlush: zlib().constants.Z_SYNC_FLUSH,
        maxOutputLength: dst.length + 1,
        chunkSize: Math.max(16384, dst.length + 1024),
      });
    } catch (e) {
      throw corrupt(`Compressed cluster does not inflate: ${(e as Error).message}`);
    }
    if (out.length < dst.length)
      throw corrupt(`Compressed cluster inflates to ${out.length} bytes, expected ${dst.length}`);
    dst.set(out.subarray(0, dst.length));
  },
  async compress(src) {
    return compressZlib(src);
  },
};

// The native binding is CommonJS that assigns a .node module; load it the CommonJS way.
// Loaded on first use: most commands never meet a zstd cluster, and start-up time counts.
let binding: typeof ZstdBinding | undefined;
function zstdBinding(): typeof ZstdBinding {
  binding ??= createRequire(import.meta.url)("zstd-napi/binding.js") as typeof ZstdBinding;
  return binding;
}
let dctx: ZstdBinding.DCtx | undefined;

export const nodeZstd: Codec = {
  name: "zstd",
  async decompress(src, dst) {
    const zstd = zstdBinding();
    dctx ??= new zstd.DCtx();
    // As QEMU does: stream frames until the cluster is full; trailing bytes are ignored.
    let inAt = 0;
    let outAt = 0;
    try {
      while (outAt < dst.length && inAt < src.length) {
        const [, produced, consumed] = dctx.decompressStream(dst.subarray(outAt), src.subarray(inAt));
        if (produced === 0 && consumed === 0) break;
        outAt += produced;
        inAt += consumed;
      }
    } catch (e) {
      dctx = undefined;
      throw corrupt(`Compressed cluster does not decompress (zstd): ${(e as Error).message}`);
    }
    if (outAt < dst.length) {
      dctx = undefined;
      throw corrupt(`Compressed cluster decompresses to ${outAt} bytes, expected ${dst.length} (zstd)`);
    }
    dctx.reset(zstd.ResetDirective.sessionOnly);
  },
  async compress(src) {
    return compressZstd(src);
  },
};

/**
 * Deflate as QEMU's qcow2_zlib_compress: raw stream, window 2^12, memLevel 9, default level.
 * Undefined when the result would not be smaller than the cluster (QEMU then stores it plain).
 */
export function compressZlib(src: Uint8Array): Uint8Array | undefined {
  const z = zlib();
  const out = z.deflateRawSync(src, { windowBits: 12, memLevel: 9, level: z.constants.Z_DEFAULT_COMPRESSION });
  return out.length < src.length ? out : undefined;
}

let cctx: ZstdBinding.CCtx | undefined;
let zstdOut: Uint8Array | undefined;

/** zstd at its default level 3, as QEMU's qcow2_zstd_compress. */
export function compressZstd(src: Uint8Array): Uint8Array | undefined {
  const zstd = zstdBinding();
  cctx ??= new zstd.CCtx();
  const bound = zstd.compressBound(src.length);
  if (!zstdOut || zstdOut.length < bound) zstdOut = new Uint8Array(bound);
  const n = cctx.compress(zstdOut, src, 3);
  return n < src.length ? zstdOut.slice(0, n) : undefined;
}

export const nodeCodecs: Codecs = { zlib: nodeZlib, zstd: nodeZstd };
