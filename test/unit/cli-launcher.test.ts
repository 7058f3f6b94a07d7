/**
 * The command's launcher (src/cli/qcowkit.cts): it runs the bundle with the code cache the build
 * made for the subcommand. The caches must be there and fit this Node (a rejected one costs
 * ~15 ms of start-up and nothing else), a cache that does not fit must change nothing but the
 * speed, and QCOWKIT_CODE_CACHE_OUT must write one that the next run takes.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { QCOWKIT_MAIN } from "../interop/util.js";

const CLI_DIR = path.dirname(QCOWKIT_MAIN);
const dir = mkdtempSync(path.join(tmpdir(), "qcowkit-launcher-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function run(main: string, args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [main, ...args], {
    encoding: "utf8",
    env: { ...process.env, QCOWKIT_DEBUG: "1", ...env },
  });
  assert.equal(r.error, undefined);
  return r;
}

const image = path.join(dir, "a.qcow2");
{
  const r = run(QCOWKIT_MAIN, ["create", "-q", "-f", "qcow2", image, "16M"]);
  assert.equal(r.status, 0, r.stderr);
}

test("launcher: every short subcommand has a code cache that this Node takes", () => {
  const short = ["create", "info", "map", "check", "convert", "compare", "measure"];
  const more = ["snapshot", "resize", "amend", "bitmap", "rebase", "commit"];
  for (const cmd of [...short, ...more]) {
    const file = path.join(CLI_DIR, "code-cache", `${cmd}.bin`);
    assert.ok(existsSync(file) && statSync(file).size > 10_000, `${file} is missing or empty`);
  }
  for (const args of [
    ["info", image],
    ["check", image],
    ["map", "--output", "json", image],
    // convert turns V8's optimising compiler off for itself, after the cache is in.
    ["convert", "-O", "qcow2", image, path.join(dir, "converted.qcow2")],
  ]) {
    const r = run(QCOWKIT_MAIN, args);
    assert.equal(r.status, 0, r.stderr);
    assert.doesNotMatch(r.stderr, /code cache/, `${args[0]}: ${r.stderr}`);
  }
});

test("launcher: a cache that does not fit is compiled around, with the same output", () => {
  // A copy of the command's files, with a damaged cache for info.
  const copy = path.join(dir, "cli");
  mkdirSync(path.join(copy, "code-cache"), { recursive: true });
  cpSync(QCOWKIT_MAIN, path.join(copy, "qcowkit.cjs"));
  cpSync(path.join(CLI_DIR, "qcowkit-bundle.cjs"), path.join(copy, "qcowkit-bundle.cjs"));
  writeFileSync(path.join(copy, "code-cache", "info.bin"), Buffer.alloc(50_000, 7));
  const expected = run(QCOWKIT_MAIN, ["info", "--output", "json", image]);
  const got = run(path.join(copy, "qcowkit.cjs"), ["info", "--output", "json", image]);
  assert.equal(got.status, 0, got.stderr);
  assert.equal(got.stdout, expected.stdout);
  assert.match(got.stderr, /code cache for 'info' rejected/);
  // No cache at all: the same again, silently.
  const none = run(path.join(copy, "qcowkit.cjs"), ["map", image]);
  assert.equal(none.status, 0, none.stderr);
  assert.equal(none.stdout, run(QCOWKIT_MAIN, ["map", image]).stdout);
  assert.equal(none.stderr, "");

  // QCOWKIT_CODE_CACHE_OUT writes a cache that the next run takes.
  const made = path.join(copy, "code-cache", "map.bin");
  assert.equal(run(path.join(copy, "qcowkit.cjs"), ["map", image], { QCOWKIT_CODE_CACHE_OUT: made }).status, 0);
  assert.ok(statSync(made).size > 10_000);
  const cached = run(path.join(copy, "qcowkit.cjs"), ["map", image]);
  assert.equal(cached.stderr, "");
  assert.equal(cached.stdout, none.stdout);

  // convert changes V8's flags as it runs; a cache written then would carry them, and V8 would
  // reject it in every later run (which starts with the default flags).
  const convertCache = path.join(copy, "code-cache", "convert.bin");
  const target = path.join(dir, "cached.qcow2");
  const args = ["convert", "-O", "qcow2", image, target];
  assert.equal(run(path.join(copy, "qcowkit.cjs"), args, { QCOWKIT_CODE_CACHE_OUT: convertCache }).status, 0);
  assert.ok(statSync(convertCache).size > 10_000);
  const converted = run(path.join(copy, "qcowkit.cjs"), args);
  assert.equal(converted.status, 0, converted.stderr);
  assert.equal(converted.stderr, "");
});

test("launcher: commands load no stream, network, compression, node:v8 or perf_hooks modules they do not need", () => {
  // Each of Node's modules costs 1.5-5 ms of start-up; a preload lists what the run loaded.
  const preload = path.join(dir, "modules.cjs");
  writeFileSync(
    preload,
    'process.on("exit", () => require("node:fs").writeSync(2, "modules: " + process.moduleLoadList.join(",") + "\\n"));',
  );
  const loaded = (args: string[]): string[] => {
    const r = spawnSync(process.execPath, ["-r", preload, QCOWKIT_MAIN, ...args], { encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    const line = r.stderr.split("\n").find((l) => l.startsWith("modules: "));
    assert.ok(line, r.stderr);
    return line.slice("modules: ".length).split(",");
  };
  const dataRaw = path.join(dir, "data.raw");
  writeFileSync(dataRaw, new Uint8Array(1 << 20).fill(7));
  const heavy = /^NativeModule (stream|v8|perf_hooks|fs\/promises|zlib|worker_threads|net|http)$/;
  // The preload sees modules: a run of the same preload with node:stream loaded shows it.
  const probe = spawnSync(process.execPath, ["-r", preload, "-e", "process.stdout"], { encoding: "utf8" });
  assert.match(probe.stderr, /NativeModule stream[,\n]/);
  for (const args of [
    ["info", image],
    ["check", image],
    ["map", image],
    // Without -p, the progress display must not touch process.stdout.
    ["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", image],
    // convert sets a V8 flag (through the addon) and times each chunk it copies (process.hrtime).
    ["convert", "-f", "raw", "-O", "qcow2", dataRaw, path.join(dir, "modules.qcow2")],
  ]) {
    const found = loaded(args).filter((m) => heavy.test(m));
    assert.deepEqual(found, [], `${args[0]} loaded ${found.join(", ")}`);
  }
});

test("launcher: errors keep qemu-img's exit codes and messages", () => {
  const r = run(QCOWKIT_MAIN, ["info", path.join(dir, "missing.qcow2")], { QCOWKIT_DEBUG: "0" });
  assert.equal(r.status, 1);
  assert.match(r.stderr, /^qcowkit: Could not open/);
  assert.doesNotMatch(r.stderr, /code cache|at Object/);
});
