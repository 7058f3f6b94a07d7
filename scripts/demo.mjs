#!/usr/bin/env node
// npm run demo: make a small backing chain with qcowkit, write to it through the library, and
// look at it with qcowkit's qemu-img-style commands.
import { spawnSync } from "node:child_process";
import { mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const cli = join(root, "dist/src/cli/qcowkit.cjs");
const { openImageFile } = await import(join(root, "dist/src/node.js"));
const dir = join(root, "demo-out");

function qcowkit(...args) {
  console.log(`\n$ qcowkit ${args.join(" ")}`);
  const r = spawnSync("node", [cli, ...args], { cwd: dir, stdio: "inherit" });
  if (r.status !== 0 && args[0] !== "compare") process.exit(r.status ?? 1);
}

async function write(file, what) {
  console.log(`\n# ${what.label}`);
  const img = await openImageFile(join(dir, file), { readOnly: false });
  for (const step of what.steps) await step(img);
  await img.close();
}

rmSync(dir, { recursive: true, force: true });
mkdirSync(dir);
qcowkit("create", "-f", "qcow2", "base.qcow2", "64M");
await write("base.qcow2", {
  label: "library: write 4 MiB of 0x11 at 0 and 1 MiB of 0x22 at 8 MiB into base.qcow2",
  steps: [
    (img) => img.write(new Uint8Array(4 << 20).fill(0x11), 0),
    (img) => img.write(new Uint8Array(1 << 20).fill(0x22), 8 << 20),
  ],
});
qcowkit("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "overlay.qcow2");
await write("overlay.qcow2", {
  label: "library: into overlay.qcow2, 512 KiB of 0x33 at 1 MiB (copy-on-write) and 1 MiB of zeros at 2 MiB",
  steps: [
    (img) => img.write(new Uint8Array(512 << 10).fill(0x33), 1 << 20),
    (img) => img.writeZeroes(2 << 20, 1 << 20),
  ],
});
qcowkit("info", "--backing-chain", "overlay.qcow2");
qcowkit("map", "--output=json", "overlay.qcow2");
qcowkit("convert", "-p", "-O", "qcow2", "-c", "overlay.qcow2", "flat-compressed.qcow2");
qcowkit("compare", "overlay.qcow2", "flat-compressed.qcow2");
console.log(`\nThe files are in ${dir}.`);
