/**
 * Headless Chromium for the browser tests: Debian's `chromium` package driven by playwright-core
 * (which downloads no browser of its own). Missing either is a failure that says how to install it.
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import type { Browser } from "playwright-core";
import { QCOWKIT_MAIN } from "../interop/util.js";

const CHROMIUM = process.env.QCOWKIT_CHROMIUM ?? "/usr/bin/chromium";

export async function launchChromium(): Promise<Browser> {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `chromium not found at ${CHROMIUM}: install it with \`apt-get install -y chromium\` (or set QCOWKIT_CHROMIUM)`,
    );
  }
  let pw: typeof import("playwright-core");
  try {
    pw = await import("playwright-core");
  } catch {
    throw new Error("playwright-core not found: install it with `npm install` (it is a devDependency)");
  }
  return pw.chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

export interface InspectProcess {
  /** The page's own URL. */
  page: string;
  /** The URL that opens each file given (by the name given). */
  urls: Map<string, string>;
  origin: string;
  stop(): Promise<number | null>;
}

/** Runs `qcowkit inspect --port 0 FILE...` and reads the URLs it prints. */
export async function startInspect(files: string[]): Promise<InspectProcess> {
  const child = spawn(process.execPath, [QCOWKIT_MAIN, "inspect", "--port", "0", ...files], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stderr.on("data", (d: Buffer) => {
    err += d.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`qcowkit inspect printed no URLs in 20 s: ${out}${err}`)), 20_000);
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.split("\n").length > files.length + 1) {
        clearTimeout(timer);
        resolve();
      }
    });
    exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`qcowkit inspect exited (${code}): ${out}${err}`));
    });
  });
  const lines = out.trimEnd().split("\n");
  const page = (/^qcowkit inspector: (\S+)$/.exec(lines[0]) ?? [])[1];
  if (!page) throw new Error(`unexpected output of qcowkit inspect: ${out}`);
  const urls = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const at = line.lastIndexOf(": ");
    urls.set(line.slice(0, at), line.slice(at + 2));
  }
  return {
    page,
    urls,
    origin: new URL(page).origin,
    async stop() {
      child.kill("SIGTERM");
      return exited;
    },
  };
}
