#!/usr/bin/env node
/**
 * The qcowkit command (package.json's bin). It runs the command line's one-file bundle
 * (qcowkit-bundle.cjs beside it, made by scripts/build-bundles.mjs) with V8's code cache, so
 * that a short command such as `info` does not spend its time compiling:
 *  - CommonJS, because Node starts an ES module entry ~6 ms slower and has no code cache for ES
 *    modules;
 *  - the cache holds the bytecode of every function one run of a subcommand compiled. The build
 *    makes one per subcommand (code-cache/<subcommand>.bin) by running it once with
 *    QCOWKIT_CODE_CACHE_OUT set; V8 checks that a cache fits this Node and this bundle, and
 *    compiles as usual when it does not (or when there is none).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Script } from "node:vm";

const bundle = join(__dirname, "qcowkit-bundle.cjs");
const subcommand = process.argv[2] ?? "";

let cachedData: Buffer | undefined;
if (/^[a-z]+$/.test(subcommand)) {
  try {
    cachedData = readFileSync(join(__dirname, "code-cache", `${subcommand}.bin`));
  } catch {
    // No cache for this subcommand: V8 compiles as it goes.
  }
}

// The bundle as a CommonJS module; its import.meta.url was replaced with __qcowkitUrl.
const source = `(function (exports, require, module, __filename, __dirname, __qcowkitUrl) {${readFileSync(bundle, "latin1")}\n})`;
const script = new Script(source, { filename: bundle, cachedData });
if (script.cachedDataRejected === true && process.env.QCOWKIT_DEBUG === "1") {
  process.stderr.write(`qcowkit: code cache for '${subcommand}' rejected by this Node; compiling instead\n`);
}
const out = process.env.QCOWKIT_CODE_CACHE_OUT;
if (out) process.on("exit", () => writeFileSync(out, script.createCachedData()));

const mod = { exports: {} };
script.runInThisContext()(mod.exports, createRequire(bundle), mod, bundle, __dirname, pathToFileURL(bundle).href);
