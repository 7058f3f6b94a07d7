/** qcowkit serve: an NBD server for one image, with qemu-nbd's flags and lifetime rules. */
import { lstatSync, unlinkSync } from "node:fs";
import { QcowError } from "../errors.js";
import { Qcow2Image } from "../image/qcow2.js";
import { tuneMalloc } from "../io/file.js";
import { isHttpUrl } from "../io/http.js";
import { NbdServer } from "../nbd/server.js";
import { openImageFile } from "../node.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { setV8Flags } from "./v8-flags.js";

/** Whether `path` is a socket (false where it cannot be looked at). */
function isSocket(path: string): boolean {
  try {
    return lstatSync(path).isSocket();
  } catch {
    return false;
  }
}

const str = (v: Record<string, unknown>, k: string): string | undefined => v[k] as string | undefined;

export const serve: Command = {
  name: "serve",
  synopsis:
    "qcowkit serve [-b ADDR] [-p PORT | -k SOCKET] [-x NAME] [-D TEXT] [-r] [-e N] [-t] [-f FMT] [-l SNAPSHOT] FILE",
  help: [
    "Serves an image over NBD, as qemu-nbd does (qcow2 with its backing chain, or raw).",
    "FILE may be an http:// or https:// URL (read-only: give --read-only).",
    "",
    "  -b, --bind ADDR         address to listen on (default 127.0.0.1)",
    "  -p, --port N            TCP port (default 10809)",
    "  -k, --socket PATH       listen on a Unix socket instead",
    '  -x, --export-name NAME  the export\'s name (default "")',
    "  -D, --description TEXT  the export's description",
    "  -r, --read-only         refuse writes",
    "  -e, --shared N          clients served at once (default 1)",
    "  -t, --persistent        keep serving after the last client leaves",
    "  -f, --format FMT        qcow2 or raw (default: probed)",
    "  -l, --load-snapshot S   serve internal snapshot S (snapshot.name=NAME, snapshot.id=ID or NAME; read-only)",
    "",
    "SIGTERM or SIGINT: stop accepting, finish requests in flight, flush, close the image, exit 0.",
  ].join("\n"),
  options: {
    bind: { type: "string", short: "b" },
    port: { type: "string", short: "p" },
    socket: { type: "string", short: "k" },
    "export-name": { type: "string", short: "x" },
    description: { type: "string", short: "D" },
    "read-only": { type: "boolean", short: "r" },
    shared: { type: "string", short: "e" },
    persistent: { type: "boolean", short: "t" },
    format: { type: "string", short: "f" },
    "load-snapshot": { type: "string", short: "l" },
  },
  async run(v, p) {
    if (p.length !== 1) throw new ExitError("Expecting one image file name");
    // A server allocates short-lived objects per request, which make V8 grow its young
    // generation (heap 12 -> 18 MiB under fio's random reads); at its first size the server's
    // peak memory is ~7 MiB lower for ~3 % more time in the scavenger.
    setV8Flags("--semi-space-growth-factor=1");
    // Less inlining into each optimised function (V8's cumulative budget: 920 bytes of bytecode
    // by default): the request path's largest compiles took 40-60 ms each and their memory, on
    // V8's compiler threads, showed as a 3 MiB spike of the server's peak. At 400, fio's random
    // writes, reads and nbdcopy each ran 2-4 % faster and peaked 1-2 MiB lower.
    setV8Flags("--max-inlined-bytecode-size-cumulative=400");
    // No optimised code for functions of more than 2000 bytes of bytecode (V8's limit: 60 KiB):
    // the write path's largest async functions took TurboFan 13-33 ms each to compile, and their
    // compiler zones were ~6 MiB of the server's malloc peak under fio's random writes. Left to
    // baseline code, they ran as fast (random writes 1.06 -> 1.02 s, random reads and nbdcopy
    // within noise) and the peak went 56-58 -> 53-54 MiB.
    setV8Flags("--max-optimized-bytecode-size=2000");
    // One malloc arena for the main thread, one shared by all others (see tuneMalloc).
    tuneMalloc({ arenaMax: 2 });
    const file = p[0];
    const port = str(v, "port") ?? "10809";
    if (!/^\d+$/.test(port) || Number(port) > 65535) throw new ExitError(`Invalid port '${port}'`);
    const sharedText = str(v, "shared") ?? "1";
    const shared = Number(sharedText);
    if (!/^\d+$/.test(sharedText) || shared < 1) throw new ExitError(`Invalid shared device number '${sharedText}'`);
    if (str(v, "socket") !== undefined && str(v, "bind") !== undefined) {
      throw new ExitError("--bind and --socket are mutually exclusive");
    }
    const l = str(v, "load-snapshot");
    const snapshot = l === undefined ? undefined : (/^snapshot\.(?:name|id)=(.*)$/.exec(l)?.[1] ?? l);
    const readOnly = v["read-only"] === true || snapshot !== undefined;
    if (isHttpUrl(file) && !readOnly) {
      throw new ExitError(
        `Could not open '${file}': the http driver does not support writes (serve it with --read-only)`,
      );
    }
    const img = await openImageFile(file, { format: formatOption(str(v, "format")), readOnly, snapshot });
    const fastZero = img instanceof Qcow2Image && img.header.version >= 3 && !img.dataFile;
    const server = new NbdServer({
      export: {
        name: str(v, "export-name") ?? "",
        description: str(v, "description"),
        device: img,
        readOnly,
        fastZero,
        multiConn: shared > 1,
      },
      shared,
      log: (line) => process.stderr.write(`qcowkit: ${line}\n`),
    });
    const socketPath = str(v, "socket");
    try {
      // As QEMU: a socket file left behind by an earlier server is replaced.
      if (socketPath !== undefined && isSocket(socketPath)) {
        unlinkSync(socketPath);
      }
      await server.listen(
        socketPath !== undefined ? { path: socketPath } : { host: str(v, "bind") ?? "127.0.0.1", port: Number(port) },
      );
    } catch (e) {
      await img.close();
      throw new ExitError(`Failed to listen: ${(e as Error).message}`);
    }
    let finishing: Promise<number> | undefined;
    const finish = (): Promise<number> => {
      finishing ??= (async () => {
        await server.close();
        await img.flush().catch(() => {});
        await img.close();
        return 0;
      })();
      return finishing;
    };
    return await new Promise<number>((resolve, reject) => {
      const end = (): void => {
        finish().then(resolve, (e: unknown) =>
          reject(e instanceof QcowError ? e : new ExitError(`Failed to close the image: ${(e as Error).message}`)),
        );
      };
      process.once("SIGTERM", end);
      process.once("SIGINT", end);
      if (v.persistent !== true) server.on("idle", end);
    });
  },
};
