#!/usr/bin/env node
// npm run build:bundles (also part of npm run build): the bundles, with esbuild.
//   dist/browser/qcowkit.js  the library (src/browser.ts) as one ES module, and zstd.wasm beside it
//   dist/inspector/          the image inspector page: index.html, inspector.js, zstd.wasm
//   dist/src/cli/qcowkit-bundle.cjs
//                            the command line as one CommonJS file, beside the modules it was
//                            built from so that its relative paths still hold; package.json's
//                            bin (dist/src/cli/qcowkit.cjs, from src/cli/qcowkit.cts) runs it
//   dist/src/cli/code-cache/ V8's code cache of one run of each short subcommand, which that
//                            loader hands to V8 (info starts in ~30 ms instead of ~50)
// Fails when anything in the browser bundles reaches for a Node module. Prints the sizes
// (raw, gzip) with --sizes.
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const require = createRequire(import.meta.url);
const zstdWasm = join(dirname(require.resolve("@bokuweb/zstd-wasm")), "../web/zstd.wasm");

const common = {
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  minify: true,
  sourcemap: "linked",
  legalComments: "none",
  logLevel: "warning",
  absWorkingDir: root,
};

const outputs = [
  { entry: "src/browser.ts", dir: "dist/browser", file: "qcowkit.js" },
  { entry: "src/inspector/page.ts", dir: "dist/inspector", file: "inspector.js" },
];
for (const o of outputs) {
  mkdirSync(join(root, o.dir), { recursive: true });
  await build({ ...common, entryPoints: [o.entry], outfile: join(root, o.dir, o.file) });
  copyFileSync(zstdWasm, join(root, o.dir, "zstd.wasm"));
}
copyFileSync(join(root, "inspector/index.html"), join(root, "dist/inspector/index.html"));

// The command: npm packages and Node's own modules stay requires (the native addons load as they
// do unbundled); only qcowkit's sources are joined. CommonJS, for V8's code cache (see
// src/cli/qcowkit.cts); import.meta.url becomes the loader's __qcowkitUrl.
await build({
  entryPoints: ["src/cli/main.ts"],
  outfile: join(root, "dist/src/cli/qcowkit-bundle.cjs"),
  bundle: true,
  format: "cjs",
  platform: "node",
  target: "node20",
  charset: "ascii",
  packages: "external",
  define: { "import.meta.url": "__qcowkitUrl" },
  sourcemap: "linked",
  legalComments: "none",
  logLevel: "warning",
  absWorkingDir: root,
});
makeCodeCaches();

/**
 * One code cache per short subcommand: each is run once on small images, and the loader writes
 * what V8 compiled. The long-running ones (serve, inspect) have none.
 */
function makeCodeCaches() {
  const cli = join(root, "dist/src/cli/qcowkit.cjs");
  chmodSync(cli, 0o755);
  const cacheDir = join(root, "dist/src/cli/code-cache");
  rmSync(cacheDir, { recursive: true, force: true });
  mkdirSync(cacheDir, { recursive: true });
  const dir = mkdtempSync(join(tmpdir(), "qcowkit-cache-"));
  try {
    const raw = join(dir, "disk.raw");
    const data = new Uint8Array(4 << 20);
    for (let i = 0; i < data.length; i += 512) data.fill((i >> 9) % 251, i, i + 256);
    writeFileSync(raw, data);
    const a = join(dir, "a.qcow2");
    const b = join(dir, "b.qcow2");
    const runs = [
      ["create", "-q", "-f", "qcow2", join(dir, "new.qcow2"), "64M"],
      ["convert", "-O", "qcow2", raw, a],
      ["info", a],
      ["map", a],
      ["check", a],
      ["compare", raw, a],
      ["measure", "-O", "qcow2", raw],
      ["snapshot", "-c", "s1", a],
      ["resize", a, "+1M"],
      ["amend", "-o", "lazy_refcounts=on", a],
      ["bitmap", "--add", a, "b1"],
      ["create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", b],
      ["rebase", "-u", "-b", a, "-F", "qcow2", b],
      ["commit", "-q", b],
    ];
    const done = new Set();
    for (const args of runs) {
      const out = done.has(args[0]) ? undefined : join(cacheDir, `${args[0]}.bin`);
      const env = { ...process.env };
      if (out) env.QCOWKIT_CODE_CACHE_OUT = out;
      const r = spawnSync(process.execPath, [cli, ...args], { env, encoding: "utf8" });
      if (r.status !== 0) throw new Error(`qcowkit ${args.join(" ")} (making code caches): ${r.stderr || r.error}`);
      done.add(args[0]);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const size = (file) => {
  const bytes = readFileSync(join(root, file));
  return `${(bytes.length / 1024).toFixed(1)} KiB (gzip ${(gzipSync(bytes, { level: 9 }).length / 1024).toFixed(1)} KiB)`;
};
if (process.argv.includes("--sizes")) {
  for (const f of [
    "dist/browser/qcowkit.js",
    "dist/browser/zstd.wasm",
    "dist/inspector/inspector.js",
    "dist/src/cli/qcowkit-bundle.cjs",
  ]) {
    console.log(`${f}: ${size(f)}`);
  }
}
