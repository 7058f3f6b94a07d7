#!/usr/bin/env node
// npm run demo: make a small backing chain, write to it, and look at it with qcowkit.
// The writes use QEMU's qemu-img and qemu-io until qcowkit's own write path lands.
import { spawnSync } from "node:child_process";
import { mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const cli = join(root, "dist/src/cli/main.js");
const dir = join(root, "demo-out");

function run(cmd, args, { show = true } = {}) {
  if (show) console.log(`\n$ ${[cmd, ...args].join(" ")}`);
  const r = spawnSync(cmd, args, { cwd: dir, stdio: show ? "inherit" : "pipe", encoding: "utf8" });
  if (r.error?.code === "ENOENT") {
    console.error(`${cmd} not found: install it with apt-get install -y qemu-utils`);
    process.exit(1);
  }
  if (r.status !== 0 && !(cmd === "node" && args[1] === "compare")) process.exit(r.status ?? 1);
  return r;
}

rmSync(dir, { recursive: true, force: true });
mkdirSync(dir);
run("qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
run("qemu-io", ["-c", "write -P 0x11 0 4M", "-c", "write -c -P 0x22 8M 1M", "base.qcow2"], { show: false });
run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "overlay.qcow2"]);
run("qemu-io", ["-c", "write -P 0x33 1M 512k", "-c", "write -z 2M 1M", "overlay.qcow2"], { show: false });
console.log("\nA 64 MiB base image with 4 MiB of data and a compressed cluster run, and an overlay over it.");
run("node", [cli, "info", "--backing-chain", "overlay.qcow2"]);
run("node", [cli, "map", "--output=json", "overlay.qcow2"]);
run("node", [cli, "convert", "-p", "-O", "raw", "overlay.qcow2", "overlay.raw"]);
run("node", [cli, "compare", "overlay.qcow2", "overlay.raw"]);
console.log(`\nThe files are in ${dir}.`);
