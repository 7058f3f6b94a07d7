/** Error codes shared by every layer; the CLI maps them to qemu-img's exit codes. */
export type ErrorCode = "corrupt" | "unsupported" | "invalid-argument" | "io" | "read-only" | "not-found";

export class QcowError extends Error {
  readonly code: ErrorCode;
  /** A structure ran past the bytes given to its decoder (more may be read and retried). */
  readonly truncated: boolean;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; truncated?: boolean }) {
    super(message, options);
    this.code = code;
    this.truncated = options?.truncated ?? false;
    this.name = "QcowError";
  }
}

export const corrupt = (message: string): QcowError => new QcowError("corrupt", message);
export const truncated = (message: string): QcowError => new QcowError("corrupt", message, { truncated: true });
export const unsupported = (message: string): QcowError => new QcowError("unsupported", message);
export const invalidArgument = (message: string): QcowError => new QcowError("invalid-argument", message);

/** Formats an offset the way error messages name places in a file. */
export const hex = (n: number): string => `0x${n.toString(16)}`;

/** A number as QEMU's `%#x` prints it in its messages: `0` for zero, else `0x...`. */
export const qemuHex = (n: number): string => (n === 0 ? "0" : hex(n));
