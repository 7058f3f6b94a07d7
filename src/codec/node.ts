/**
 * Node codecs: zlib from Node itself (through the addon native/zlib.c where it is built, else
 * Node's zlib module), zstd from zstd-napi (native libzstd).
 */

import { createRequire } from "node:module";
import type * as Zlib from "node:zlib";
import type * as ZstdBinding from "zstd-napi/binding.js";
import { corrupt } from "../errors.js";
import { lazyBuiltin } from "../lazy-builtin.js";
import type { Codec, Codecs } from "./codec.js";

const zlib = lazyBuiltin<typeof Zlib>("node:zlib");

/** The addon's zlib functions (native/zlib.c), with the zlib Node carries. */
export interface NativeZlib {
  /** Raw deflate of src into dst with QEMU's parameters: the length, 0 when it does not fit. */
  deflate(src: Uint8Array, dst: Uint8Array): number;
  /** Raw inflate of src into dst until dst is full or the stream ends: bytes written, -1 if not deflate. */
  inflate(src: Uint8Array, dst: Uint8Array): number;
  /** Each whole cluster of src deflated on the thread pool, results back to back in out. */
  deflateClusters(src: Uint8Array, clusterSize: number, out: Uint8Array, sizes: Int32Array): Promise<void>;
}

let nativeZlibLoaded: NativeZlib | null | undefined;
/**
 * The addon's zlib, loaded on first use (most commands meet no compressed cluster, and start-up
 * time counts); undefined where the addon is not built, or this Node does not export zlib.
 */
export function nativeZlib(): NativeZlib | undefined {
  if (nativeZlibLoaded === undefined) {
    try {
      nativeZlibLoaded = createRequire(import.meta.url)("../../../build/Release/qcowkit_zlib.node") as NativeZlib;
    } catch {
      nativeZlibLoaded = null;
    }
  }
  return nativeZlibLoaded ?? undefined;
}

export const nodeZlib: Codec = {
  name: "zlib",
  async decompress(src, dst) {
    const native = nativeZlib();
    if (native) {
      const n = native.inflate(src, dst);
      if (n < 0) throw corrupt("Compressed cluster does not inflate: invalid deflate data");
      if (n < dst.length) throw corrupt(`Compressed cluster inflates to ${n} bytes, expected ${dst.length}`);
      return;
    }
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
 * Deflate as QEMU's qcow2_zlib_compress (raw stream, window 2^12, memLevel 9, default level)
 * into `dst`: the compressed length, or 0 when it does not fit.
 */
export function compressZlibInto(src: Uint8Array, dst: Uint8Array): number {
  const native = nativeZlib();
  if (native) return native.deflate(src, dst);
  const z = zlib();
  const out = z.deflateRawSync(src, { windowBits: 12, memLevel: 9, level: z.constants.Z_DEFAULT_COMPRESSION });
  if (out.length > dst.length) return 0;
  dst.set(out);
  return out.length;
}

let cctx: ZstdBinding.CCtx | undefined;
let zstdOut: Uint8Array | undefined;

/** zstd at its default level 3, as QEMU's qcow2_zstd_compress, into `dst`: as compressZlibInto. */
export function compressZstdInto(src: Uint8Array, dst: Uint8Array): number {
  const zstd = zstdBinding();
  cctx ??= new zstd.CCtx();
  const bound = zstd.compressBound(src.length);
  if (!zstdOut || zstdOut.length < bound) zstdOut = new Uint8Array(bound);
  const n = cctx.compress(zstdOut, src, 3);
  if (n > dst.length) return 0;
  dst.set(zstdOut.subarray(0, n));
  return n;
}

/** `src` compressed by `into`, or undefined when it would not be smaller (QEMU then stores it plain). */
function smaller(src: Uint8Array, into: (src: Uint8Array, dst: Uint8Array) => number): Uint8Array | undefined {
  if (src.length === 0) return undefined;
  const out = new Uint8Array(src.length - 1);
  const n = into(src, out);
  return n > 0 ? out.slice(0, n) : undefined;
}

export const compressZlib = (src: Uint8Array): Uint8Array | undefined => smaller(src, compressZlibInto);
export const compressZstd = (src: Uint8Array): Uint8Array | undefined => smaller(src, compressZstdInto);

export const nodeCodecs: Codecs = { zlib: nodeZlib, zstd: nodeZstd };
