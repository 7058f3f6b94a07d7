/**
 * A local HTTP server for the HTTP storage tests: serves files from a directory (and in-memory
 * files) with Range, ETag, Last-Modified and If-Match support, plus switches that make it
 * misbehave the ways real servers do.
 */
import { open, stat } from "node:fs/promises";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import * as path from "node:path";

export interface RequestRecord {
  method: string;
  path: string;
  range: string | undefined;
  ifMatch: string | undefined;
  status: number;
}

export interface HttpFixture {
  /** The URL of `name` (a path below the root, or an in-memory file). */
  url(name: string): string;
  readonly origin: string;
  /** Every request answered, in order. */
  readonly requests: RequestRecord[];
  /** Requests of a method (GET, HEAD) so far. */
  count(method?: string): number;
  /** Adds or replaces an in-memory file. */
  put(name: string, bytes: Uint8Array): void;
  /** Answer ranged GETs with 200 and the whole body (and say nothing of ranges on HEAD). */
  ignoreRanges: boolean;
  /** Advertise Accept-Ranges on HEAD even while ignoring ranges (a lying server). */
  advertiseRanges: boolean;
  /** Refuse HEAD with 405 (the client must fall back to a ranged GET). */
  refuseHead: boolean;
  /** The next `failures` requests fail: with `failStatus`, by resetting the connection, or by hanging. */
  failures: number;
  failStatus: number | "reset" | "hang";
  /** Answer every request with this status (404, 403, ...), when set. */
  forceStatus: number | undefined;
  /** Bumping it changes every file's ETag and Last-Modified (the file "changed on the server"). */
  version: number;
  /** Send ETags (off: Last-Modified only). */
  sendEtag: boolean;
  /** Honour If-Match (412 on mismatch). */
  honourIfMatch: boolean;
  /** Bytes of bodies written for GETs that were cut short because the client went away. */
  abortedBodies: number;
  close(): Promise<void>;
}

export async function startHttpServer(root?: string): Promise<HttpFixture> {
  const base = root === undefined ? undefined : path.resolve(root);
  const memory = new Map<string, Uint8Array>();
  const hanging = new Set<ServerResponse>();
  const fixture: HttpFixture = {
    url: (name) => `${fixture.origin}/${name}`,
    origin: "",
    requests: [],
    count: (method) => fixture.requests.filter((r) => method === undefined || r.method === method).length,
    put: (name, bytes) => memory.set(name, bytes),
    ignoreRanges: false,
    advertiseRanges: false,
    refuseHead: false,
    failures: 0,
    failStatus: 503,
    forceStatus: undefined,
    version: 0,
    sendEtag: true,
    honourIfMatch: true,
    abortedBodies: 0,
    close: async () => {
      for (const r of hanging) r.destroy();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };

  async function load(
    name: string,
  ): Promise<{ size: number; mtime: number; read(a: number, b: number): Promise<Uint8Array> } | undefined> {
    const mem = memory.get(name);
    if (mem !== undefined)
      return { size: mem.length, mtime: 1_700_000_000_000, read: async (a, b) => mem.subarray(a, b) };
    if (base === undefined) return undefined;
    const file = path.join(base, name);
    if (!file.startsWith(`${base}${path.sep}`)) return undefined;
    const st = await stat(file).catch(() => undefined);
    if (!st?.isFile()) return undefined;
    return {
      size: st.size,
      mtime: Math.floor(st.mtimeMs / 1000) * 1000,
      read: async (a, b) => {
        const fh = await open(file, "r");
        try {
          const buf = new Uint8Array(b - a);
          await fh.read(buf, 0, buf.length, a);
          return buf;
        } finally {
          await fh.close();
        }
      },
    };
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const name = decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname.slice(1));
    const record: RequestRecord = {
      method: req.method ?? "",
      path: name,
      range: req.headers.range,
      ifMatch: req.headers["if-match"],
      status: 0,
    };
    fixture.requests.push(record);
    const answer = (status: number, headers: Record<string, string | number> = {}, body?: Uint8Array): void => {
      record.status = status;
      res.writeHead(status, headers);
      if (body === undefined || req.method === "HEAD") {
        res.end();
        return;
      }
      // Written in pieces, so that a client that stops reading leaves the rest unsent.
      let at = 0;
      const more = (): void => {
        while (at < body.length) {
          const piece = body.subarray(at, at + 64 * 1024);
          at += piece.length;
          if (!res.write(piece)) {
            res.once("drain", more);
            return;
          }
        }
        res.end();
      };
      res.on("close", () => {
        if (at < body.length) fixture.abortedBodies++;
      });
      more();
    };
    if (fixture.failures > 0) {
      fixture.failures--;
      if (fixture.failStatus === "reset") {
        record.status = -1;
        req.socket.destroy();
        return;
      }
      if (fixture.failStatus === "hang") {
        record.status = -2;
        hanging.add(res);
        return;
      }
      answer(fixture.failStatus);
      return;
    }
    if (fixture.forceStatus !== undefined) {
      answer(fixture.forceStatus);
      return;
    }
    const file = await load(name);
    if (file === undefined) {
      answer(404);
      return;
    }
    if (req.method === "HEAD" && fixture.refuseHead) {
      answer(405, { Allow: "GET" });
      return;
    }
    if (req.method !== "GET" && req.method !== "HEAD") {
      answer(405, { Allow: "GET, HEAD" });
      return;
    }
    const etag = `"${file.size.toString(16)}-${file.mtime.toString(16)}-${fixture.version}"`;
    const headers: Record<string, string | number> = {
      "Last-Modified": new Date(file.mtime + fixture.version * 1000).toUTCString(),
      "Content-Type": "application/octet-stream",
    };
    if (fixture.sendEtag) headers.ETag = etag;
    if (!fixture.ignoreRanges || fixture.advertiseRanges) headers["Accept-Ranges"] = "bytes";
    const ifMatch = req.headers["if-match"];
    if (fixture.honourIfMatch && fixture.sendEtag && ifMatch !== undefined && ifMatch !== "*" && ifMatch !== etag) {
      answer(412, headers);
      return;
    }
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (m === null || fixture.ignoreRanges) {
      answer(200, { ...headers, "Content-Length": file.size }, await file.read(0, file.size));
      return;
    }
    const first = Number(m[1]);
    const last = Math.min(file.size - 1, m[2] === "" ? file.size - 1 : Number(m[2]));
    if (first >= file.size || last < first) {
      answer(416, { ...headers, "Content-Range": `bytes */${file.size}` });
      return;
    }
    answer(
      206,
      { ...headers, "Content-Range": `bytes ${first}-${last}/${file.size}`, "Content-Length": last - first + 1 },
      await file.read(first, last + 1),
    );
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      res.destroy(e as Error);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  (fixture as { origin: string }).origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return fixture;
}
