/**
 * Where a zstd frame ends (RFC 8878, section 3.1). QEMU's compressed clusters hold one or
 * more frames followed by unrelated bytes (the rest of the last sector); a one-shot
 * decompressor must be handed exactly the frames, so their length is read from the frame and
 * block headers without decompressing anything.
 */
import { corrupt } from "../errors.js";

const ZSTD_MAGIC = 0xfd2fb528;
const SKIPPABLE_MAGIC_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;

export interface ZstdFrame {
  /** Bytes from the frame's magic number to its end (checksum included). */
  length: number;
  /** True for a skippable frame (no content). */
  skippable: boolean;
  /** The decompressed size the frame header declares, when it declares one. */
  contentSize?: number;
}

/** The frame starting at `at` in `src`; throws a corrupt error when it is malformed or cut. */
export function zstdFrameAt(src: Uint8Array, at: number): ZstdFrame {
  const need = (n: number): void => {
    if (n > src.length) throw corrupt(`zstd frame at byte ${at} of a compressed cluster is cut short`);
  };
  need(at + 4);
  const dv = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const magic = dv.getUint32(at, true);
  if ((magic & SKIPPABLE_MAGIC_MASK) >>> 0 === SKIPPABLE_MAGIC) {
    need(at + 8);
    const length = 8 + dv.getUint32(at + 4, true);
    need(at + length);
    return { length, skippable: true };
  }
  if (magic !== ZSTD_MAGIC) throw corrupt(`No zstd frame at byte ${at} of a compressed cluster`);
  need(at + 5);
  const descriptor = src[at + 4];
  const contentSizeFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const checksum = (descriptor >> 2) & 1;
  const dictionaryIdFlag = descriptor & 3;
  if (descriptor & 0x08) throw corrupt(`zstd frame at byte ${at} sets the reserved descriptor bit`);
  const headerLength =
    5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictionaryIdFlag] + [singleSegment ? 1 : 0, 2, 4, 8][contentSizeFlag];
  need(at + headerLength);
  const contentSize = declaredContentSize(dv, at + headerLength, contentSizeFlag, singleSegment);
  let pos = at + headerLength;
  for (;;) {
    need(pos + 3);
    const blockHeader = src[pos] | (src[pos + 1] << 8) | (src[pos + 2] << 16);
    const last = blockHeader & 1;
    const type = (blockHeader >> 1) & 3;
    const size = blockHeader >>> 3;
    if (type === 3) throw corrupt(`zstd block at byte ${pos} of a compressed cluster has the reserved type`);
    pos += 3 + (type === 1 ? 1 : size); // an RLE block stores its one byte
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  need(pos);
  return { length: pos - at, skippable: false, contentSize };
}

/** Frame_Content_Size, the last field of the frame header (ending at `end`). */
function declaredContentSize(dv: DataView, end: number, flag: number, singleSegment: number): number | undefined {
  switch (flag) {
    case 0:
      return singleSegment ? dv.getUint8(end - 1) : undefined;
    case 1:
      return dv.getUint16(end - 2, true) + 256;
    case 2:
      return dv.getUint32(end - 4, true);
    default:
      return dv.getUint32(end - 8, true) + dv.getUint32(end - 4, true) * 2 ** 32;
  }
}
