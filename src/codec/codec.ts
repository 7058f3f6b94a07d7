/**
 * Compression codecs for compressed clusters. QEMU stores deflate as a raw stream (no zlib
 * header, window 2^12) and zstd as one or more frames; the compressed bytes are followed by
 * whatever else shares their last sector, so a decompressor must stop once the cluster is full.
 */
export interface Codec {
  readonly name: "zlib" | "zstd";
  /** Fills `dst` exactly from the stream at the start of `src`, or throws. */
  decompress(src: Uint8Array, dst: Uint8Array): Promise<void>;
  /** The compressed form of `src`, or undefined when it would not be smaller. */
  compress?(src: Uint8Array): Promise<Uint8Array | undefined>;
}

export interface Codecs {
  zlib?: Codec;
  zstd?: Codec;
}
