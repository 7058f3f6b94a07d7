import { type ImageFormat, parseFormat } from "../image/open.js";

/** An error that ends a command with a given exit status (qemu-img exits 1; compare uses 2). */
export class ExitError extends Error {
  constructor(
    message: string,
    readonly status = 1,
  ) {
    super(message);
  }
}

export function formatOption(v: string | undefined): ImageFormat | undefined {
  return v === undefined ? undefined : parseFormat(v);
}
