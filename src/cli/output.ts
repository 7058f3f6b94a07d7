/**
 * Standard output for the command's results, written synchronously as qemu-img's printf is:
 * process.stdout would first load Node's stream machinery (~2 ms of a 35 ms `info`), and a
 * synchronous write is complete before the process exits, whatever follows.
 */
import { writeSync } from "node:fs";

/** Writes `text` to standard output. A reader that went away (EPIPE) ends the command quietly. */
export function stdout(text: string): void {
  const bytes = Buffer.from(text);
  let at = 0;
  while (at < bytes.length) {
    try {
      at += writeSync(1, bytes, at);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === "EAGAIN") {
        // A non-blocking descriptor (inherited so): Node's stream waits for it.
        process.stdout.write(bytes.subarray(at));
        return;
      }
      // As qemu-img, which SIGPIPE ends (the shell reports 128 + 13).
      if (code === "EPIPE") process.exit(141);
      throw e;
    }
  }
}
