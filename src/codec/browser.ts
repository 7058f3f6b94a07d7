/**
 * Codecs that run in browsers (and anywhere else): deflate from fflate (plain JavaScript),
 * zstd from @bokuweb/zstd-wasm (libzstd compiled to WebAssembly, loaded on first use).
 *
 * Why not DecompressionStream('deflate-raw'): QEMU's compressed clusters carry unrelated bytes
 * after the deflate stream, and Chromium's stream then fails with "Junk found after end of
 * compressed data", dropping output it has not yet handed over (a 2 MiB cluster comes back
 * short). fflate's streaming inflater stops at the final block and ignores what follows, as
 * QEMU's inflate does.
 */
import { compress as zstdCompress, decompress as zstdDecompress, init as zstdInit } from "@bokuweb/zstd-wasm";
import { Inflate } from "fflate";
import { corrupt } from "../errors.js";
import type { Codec, Codecs } from "./codec.js";
import { zstdFrameAt } from "./zstd-frame.js";

export const browserZlib: Codec = {
  name: "zlib",
  async decompress(src, dst) {
    let filled = 0;
    const inflater = new Inflate((chunk) => {
      const n = Math.min(chunk.length, dst.length - filled);
      dst.set(chunk.subarray(0, n), filled);
      filled += n;
    });
    try {
      // Not the final push: a stream cut at the end of its last sector still yields what it holds.
      inflater.push(src, false);
    } catch (e) {
      if (filled < dst.length) throw corrupt(`Compressed cluster does not inflate: ${(e as Error).message}`);
    }
    if (filled < dst.length) throw corrupt(`Compressed cluster inflates to ${filled} bytes, expected ${dst.length}`);
  },
};

/** Where zstd.wasm comes from: a URL, or its bytes. */
export type WasmSource = string | URL | ArrayBuffer | Uint8Array;

export interface BrowserCodecOptions {
  /**
   * zstd.wasm (shipped in @bokuweb/zstd-wasm and copied next to the qcowkit bundle). Default:
   * `zstd.wasm` beside the module that holds this code. In Node the package finds it itself.
   */
  zstdWasm?: WasmSource;
}

let zstdReady: Promise<void> | undefined;

function loadZstd(source: WasmSource | undefined): Promise<void> {
  zstdReady ??= (async () => {
    let arg: string | ArrayBuffer | Uint8Array;
    if (source === undefined) arg = new URL("./zstd.wasm", import.meta.url).href;
    else if (source instanceof URL) arg = source.href;
    else arg = source;
    await (zstdInit as (src?: string | ArrayBuffer | Uint8Array) => Promise<void>)(arg);
  })();
  zstdReady.catch(() => {
    zstdReady = undefined; // a later call may retry (the page may have been offline)
  });
  return zstdReady;
}

/** zstd: the cluster's frames one at a time until it is full, trailing bytes ignored (as QEMU). */
export function browserZstd(opts: BrowserCodecOptions = {}): Codec {
  return {
    name: "zstd",
    async decompress(src, dst) {
      await loadZstd(opts.zstdWasm);
      let inAt = 0;
      let outAt = 0;
      while (outAt < dst.length && inAt < src.length) {
        const frame = zstdFrameAt(src, inAt);
        if (!frame.skippable) {
          // Checked before decompressing: the one-shot decompressor allocates what the frame declares.
          if (frame.contentSize !== undefined && frame.contentSize > dst.length - outAt) {
            throw corrupt(`Compressed cluster decompresses to more than ${dst.length} bytes (zstd)`);
          }
          let out: Uint8Array;
          try {
            out = zstdDecompress(src.subarray(inAt, inAt + frame.length), { defaultHeapSize: dst.length - outAt });
          } catch (e) {
            throw corrupt(`Compressed cluster does not decompress (zstd): ${(e as Error).message}`);
          }
          if (out.length > dst.length - outAt) {
            throw corrupt(`Compressed cluster decompresses to more than ${dst.length} bytes (zstd)`);
          }
          dst.set(out, outAt);
          outAt += out.length;
        }
        inAt += frame.length;
      }
      if (outAt < dst.length) {
        throw corrupt(`Compressed cluster decompresses to ${outAt} bytes, expected ${dst.length} (zstd)`);
      }
    },
    async compress(src) {
      await loadZstd(opts.zstdWasm);
      const out = zstdCompress(src, 3);
      return out.length < src.length ? out : undefined;
    },
  };
}

/** Codecs for browsers: deflate (decompression) and zstd (both ways). */
export function browserCodecs(opts: BrowserCodecOptions = {}): Codecs {
  return { zlib: browserZlib, zstd: browserZstd(opts) };
}
