/** Error codes shared by every layer; the CLI maps them to qemu-img's exit codes. */
export type ErrorCode =
  | "corrupt"
  | "unsupported"
  | "invalid-argument"
  | "io"
  | "read-only"
  | "not-found";

export class QcowError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = "QcowError";
  }
}

export const corrupt = (message: string): QcowError => new QcowError("corrupt", message);
export const unsupported = (message: string): QcowError => new QcowError("unsupported", message);
export const invalidArgument = (message: string): QcowError =>
  new QcowError("invalid-argument", message);

/** Formats an offset the way error messages name places in a file. */
export const hex = (n: number): string => `0x${n.toString(16)}`;
