#!/usr/bin/env node
// npm run build:browser (also part of npm run build): the browser bundles, with esbuild.
//   dist/browser/qcowkit.js  the library (src/browser.ts) as one ES module, and zstd.wasm beside it
//   dist/inspector/          the image inspector page: index.html, inspector.js, zstd.wasm
// Fails when anything in the bundles reaches for a Node module. Prints the sizes (raw, gzip).
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
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

const size = (file) => {
  const bytes = readFileSync(join(root, file));
  return `${(bytes.length / 1024).toFixed(1)} KiB (gzip ${(gzipSync(bytes, { level: 9 }).length / 1024).toFixed(1)} KiB)`;
};
if (process.argv.includes("--sizes")) {
  for (const f of ["dist/browser/qcowkit.js", "dist/browser/zstd.wasm", "dist/inspector/inspector.js"]) {
    console.log(`${f}: ${size(f)}`);
  }
}
