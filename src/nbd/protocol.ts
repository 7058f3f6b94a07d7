/**
 * The Network Block Device protocol, fixed newstyle (doc/proto.md of NetworkBlockDevice/nbd):
 * the constants of the handshake and of transmission, and encoders for what a server sends.
 * No I/O here.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;

// Option replies.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 2 ** 31;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_UNKNOWN = REP_ERR + 6;
export const REP_ERR_TOO_BIG = REP_ERR + 9;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Transmission flags.
export const FLAG_HAS_FLAGS = 1 << 0;
export const FLAG_READ_ONLY = 1 << 1;
export const FLAG_SEND_FLUSH = 1 << 2;
export const FLAG_SEND_FUA = 1 << 3;
export const FLAG_SEND_TRIM = 1 << 5;
export const FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const FLAG_SEND_DF = 1 << 7;
export const FLAG_CAN_MULTI_CONN = 1 << 8;
export const FLAG_SEND_CACHE = 1 << 10;
export const FLAG_SEND_FAST_ZERO = 1 << 11;

// Commands and their flags.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply chunks.
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = 2 ** 15 + 1;

// base:allocation status bits.
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

// Errors (errno values the protocol names).
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

/** The largest payload of one request (as qemu-nbd: 32 MiB). */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** The longest option the server reads (names and queries are at most 4 KiB each). */
export const MAX_OPTION_LENGTH = 64 * 1024;
export const MAX_STRING = 4096;

export const REQUEST_HEADER_BYTES = 28;

export interface Request {
  flags: number;
  type: number;
  /** The client's cookie (handle), echoed in the reply: its two 32-bit halves. */
  handleHi: number;
  handleLo: number;
  offset: number;
  length: number;
}

/** The big-endian 32-bit value at `at`. */
function get32(b: Uint8Array, at: number): number {
  return b[at] * 0x100_0000 + ((b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]);
}

/**
 * Stores `v` (0 to 2^32 - 1) big-endian at `at`. Byte stores rather than Buffer's
 * writeUInt32BE / writeBigUInt64BE, whose range checks V8 inlined into the server's reply path
 * (and the cookie as two halves: no BigInt per request).
 */
export function put32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = v >>> 16;
  b[at + 2] = v >>> 8;
  b[at + 3] = v;
}

/** Decodes a request header; undefined when the magic is wrong. */
export function decodeRequest(b: Buffer): Request | undefined {
  if (get32(b, 0) !== REQUEST_MAGIC) return undefined;
  return {
    flags: (b[4] << 8) | b[5],
    type: (b[6] << 8) | b[7],
    handleHi: get32(b, 8),
    handleLo: get32(b, 12),
    // Two halves, not a BigInt: offsets past 2^53 come out inexact, and are refused as past the end.
    offset: get32(b, 16) * 0x1_0000_0000 + get32(b, 20),
    length: get32(b, 24),
  };
}

export function handshake(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

export function optionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

/** The cookie of the request a reply answers. */
export type Cookie = Pick<Request, "handleHi" | "handleLo">;

export function simpleReply(error: number, req: Cookie): Buffer {
  const b = Buffer.allocUnsafe(16); // every byte is written
  put32(b, 0, SIMPLE_REPLY_MAGIC);
  put32(b, 4, error);
  put32(b, 8, req.handleHi);
  put32(b, 12, req.handleLo);
  return b;
}

/** A structured reply chunk header for a payload of `length` bytes. */
export function chunkHeader(flags: number, type: number, req: Cookie, length: number): Buffer {
  const b = Buffer.allocUnsafe(20); // every byte is written
  writeChunkHeader(b, flags, type, req, length);
  return b;
}

/** Writes a structured reply chunk header into the first 20 bytes of `b`. */
export function writeChunkHeader(b: Uint8Array, flags: number, type: number, req: Cookie, length: number): void {
  put32(b, 0, STRUCTURED_REPLY_MAGIC);
  b[4] = flags >>> 8;
  b[5] = flags;
  b[6] = type >>> 8;
  b[7] = type;
  put32(b, 8, req.handleHi);
  put32(b, 12, req.handleLo);
  put32(b, 16, length);
}

/**
 * Writes the header of an OFFSET_DATA or OFFSET_HOLE chunk for the run [offset, offset+length)
 * into `b`: the chunk header and the offset (28 bytes), and for a hole its length (32 bytes).
 */
export function writeOffsetChunk(
  b: Uint8Array,
  flags: number,
  type: number,
  req: Cookie,
  offset: number,
  length: number,
): void {
  const hole = type === REPLY_TYPE_OFFSET_HOLE;
  writeChunkHeader(b, flags, type, req, hole ? 12 : 8 + length);
  put32(b, 20, Math.floor(offset / 0x1_0000_0000));
  put32(b, 24, offset >>> 0);
  if (hole) put32(b, 28, length);
}

export function errorChunk(req: Cookie, error: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 1024), "utf8");
  const b = Buffer.alloc(6 + msg.length);
  b.writeUInt32BE(error, 0);
  b.writeUInt16BE(msg.length, 4);
  msg.copy(b, 6);
  return Buffer.concat([chunkHeader(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req, b.length), b]);
}
