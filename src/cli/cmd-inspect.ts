/**
 * qcowkit inspect: serves the image inspector page (dist/inspector) over HTTP on 127.0.0.1.
 * Image files named on the command line are served too — each with its backing chain and data
 * file, at their absolute paths, with range requests — and printed as links that open them.
 */
import { createReadStream } from "node:fs";
import type * as FsPromises from "node:fs/promises";
import type * as Http from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { QcowError } from "../errors.js";
import { Qcow2Image } from "../image/qcow2.js";
import { FileStorage } from "../io/file.js";
import { combinePath } from "../io/storage.js";
import { lazyBuiltin } from "../lazy-builtin.js";
import type { Command } from "./commands.js";
import { ExitError } from "./exit.js";
import { stdout } from "./output.js";

const http = lazyBuiltin<typeof Http>("node:http");
const fsp = lazyBuiltin<typeof FsPromises>("node:fs/promises");
const stat = (file: string) => fsp().stat(file);

const DIST = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** Static files of the page, by URL path prefix. */
const STATIC_ROOTS: [string, string][] = [
  ["/browser/", path.join(DIST, "browser")],
  ["/", path.join(DIST, "inspector")],
];

const MIME: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".map": "application/json",
  ".wasm": "application/wasm",
};

export interface InspectorServer {
  /** http://host:port */
  readonly origin: string;
  /** The page's URL opening `file` (one of the files given), or the bare page. */
  pageUrl(file?: string): string;
  close(): Promise<void>;
}

/**
 * The files an image needs, absolute: itself, its backing chain and data files. A file that
 * cannot be read is left out (the page then says which backing file it could not open).
 */
async function chainFiles(file: string): Promise<string[]> {
  const out: string[] = [];
  const todo = [path.resolve(file)];
  while (todo.length > 0 && out.length < 256) {
    const f = todo.shift() as string;
    if (out.includes(f)) continue;
    let storage: FileStorage;
    try {
      storage = await FileStorage.open(f, { readOnly: true });
    } catch {
      continue;
    }
    out.push(f);
    try {
      const { backingName, extensions } = await Qcow2Image.readHeader(storage, true);
      for (const name of [backingName, extensions.dataFile]) {
        if (name !== undefined && !/^[a-z][a-z0-9+.-]*:/i.test(name)) todo.push(path.resolve(combinePath(f, name)));
      }
    } catch {
      // raw, or not an image qcowkit can read: served as it is
    } finally {
      await storage.close();
    }
  }
  return out;
}

export async function startInspectorServer(opts: {
  host: string;
  port: number;
  files: string[];
}): Promise<InspectorServer> {
  const pageFile = path.join(DIST, "inspector", "index.html");
  if (!(await stat(pageFile).catch(() => undefined))?.isFile()) {
    throw new ExitError(`The inspector page is not built (${pageFile} is missing): run 'npm run build'`);
  }
  const served = new Set<string>();
  for (const f of opts.files) {
    if (!(await stat(f).catch(() => undefined))?.isFile()) throw new ExitError(`Could not open '${f}': No such file`);
    for (const c of await chainFiles(f)) served.add(c);
  }

  const server = http().createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      if (!res.headersSent) send(res, 500, (e as Error).message);
      else res.destroy();
    });
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { Allow: "GET, HEAD" }).end();
      return;
    }
    let urlPath: string;
    try {
      urlPath = decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname);
    } catch {
      send(res, 400, "Bad request");
      return;
    }
    if (served.has(urlPath)) {
      await sendFile(req, res, urlPath, "application/octet-stream");
      return;
    }
    for (const [prefix, dir] of STATIC_ROOTS) {
      if (!urlPath.startsWith(prefix)) continue;
      const rel = urlPath.slice(prefix.length) || "index.html";
      const file = path.join(dir, rel);
      if (!file.startsWith(dir + path.sep) || !(await stat(file).catch(() => undefined))?.isFile()) break;
      await sendFile(req, res, file, MIME[path.extname(file)] ?? "application/octet-stream");
      return;
    }
    send(res, 404, "Not found");
  }

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.host, () => resolve());
  });
  const address = server.address() as AddressInfo;
  const host = address.family === "IPv6" ? `[${address.address}]` : address.address;
  const origin = `http://${host}:${address.port}`;
  return {
    origin,
    pageUrl: (file) => (file === undefined ? `${origin}/` : `${origin}/?url=${encodeURIComponent(path.resolve(file))}`),
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function send(res: ServerResponse, status: number, text: string): void {
  res.writeHead(status, { "Content-Type": "text/plain; charset=utf-8" }).end(`${text}\n`);
}

/** A file with HEAD, ranges (one range per request), ETag and Last-Modified. */
async function sendFile(req: IncomingMessage, res: ServerResponse, file: string, type: string): Promise<void> {
  const st = await stat(file);
  const size = st.size;
  const headers: Record<string, string | number> = {
    "Content-Type": type,
    "Accept-Ranges": "bytes",
    ETag: `"${size.toString(16)}-${Math.floor(st.mtimeMs).toString(16)}"`,
    "Last-Modified": st.mtime.toUTCString(),
    "Cache-Control": "no-cache",
  };
  let first = 0;
  let last = size - 1;
  let status = 200;
  const range = req.headers.range;
  if (range !== undefined) {
    const m = /^bytes=(\d*)-(\d*)$/.exec(range.trim());
    if (m && (m[1] !== "" || m[2] !== "")) {
      if (m[1] === "") first = Math.max(0, size - Number(m[2]));
      else {
        first = Number(m[1]);
        if (m[2] !== "") last = Math.min(last, Number(m[2]));
      }
      if (first >= size || first > last) {
        res.writeHead(416, { ...headers, "Content-Range": `bytes */${size}` }).end();
        return;
      }
      status = 206;
      headers["Content-Range"] = `bytes ${first}-${last}/${size}`;
    }
  }
  headers["Content-Length"] = Math.max(0, last - first + 1);
  res.writeHead(status, headers);
  if (req.method === "HEAD" || last < first) {
    res.end();
    return;
  }
  const stream = createReadStream(file, { start: first, end: last });
  stream.on("error", () => res.destroy());
  res.on("close", () => stream.destroy());
  stream.pipe(res);
}

export const inspect: Command = {
  name: "inspect",
  synopsis: "qcowkit inspect [--port N] [--bind ADDR] [FILE...]",
  help: [
    "Serves the image inspector, a web page that shows an image's info, backing chain, snapshots,",
    "bitmaps, check result and a map of its guest address space, all computed in the browser.",
    "Open the printed URL; pick a local image file in the page, or give it the URL of an image.",
    "",
    "Each FILE is served too, with its backing chain and data file (at their absolute paths, with",
    "HTTP range requests; nothing else on the disk is served), and a URL that opens it is printed.",
    "",
    "  --port N       TCP port (default 8080; 0 picks a free one)",
    "  --bind ADDR    address to listen on (default 127.0.0.1)",
    "",
    "Runs until interrupted (SIGINT/SIGTERM).",
  ].join("\n"),
  options: {
    port: { type: "string", short: "p" },
    bind: { type: "string", short: "b" },
  },
  async run(v, p) {
    const portText = (v.port as string | undefined) ?? "8080";
    if (!/^\d+$/.test(portText) || Number(portText) > 65535) throw new ExitError(`Invalid port '${portText}'`);
    let server: InspectorServer;
    try {
      server = await startInspectorServer({
        host: (v.bind as string | undefined) ?? "127.0.0.1",
        port: Number(portText),
        files: p,
      });
    } catch (e) {
      if (e instanceof ExitError || e instanceof QcowError) throw e;
      throw new ExitError(`Failed to listen: ${(e as Error).message}`);
    }
    stdout(`qcowkit inspector: ${server.pageUrl()}\n`);
    for (const f of p) stdout(`${f}: ${server.pageUrl(f)}\n`);
    await new Promise<void>((resolve) => {
      process.once("SIGINT", resolve);
      process.once("SIGTERM", resolve);
    });
    await server.close();
    return 0;
  },
};
