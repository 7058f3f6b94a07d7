/**
 * The command's standard output (src/cli/output.ts): written synchronously and whole, and a
 * reader that goes away ends the command quietly with qemu-img's status (killed by SIGPIPE: 141),
 * not with a stack trace.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

const OUTPUT = pathToFileURL(path.join(path.dirname(fileURLToPath(import.meta.url)), "../../src/cli/output.js")).href;

function writer(count: number, size: number): string {
  return `import(${JSON.stringify(OUTPUT)}).then((m) => { for (let i = 0; i < ${count}; i++) m.stdout(String(i % 10).repeat(${size}) + "\\n"); process.stderr.write("all written\\n"); });`;
}

test("stdout: everything arrives, in order", () => {
  const r = spawnSync(process.execPath, ["-e", writer(50, 100_000)], { maxBuffer: 64 * 1024 * 1024 });
  assert.equal(r.status, 0, String(r.stderr));
  const lines = r.stdout.toString("latin1").split("\n");
  assert.equal(lines.length, 51);
  for (let i = 0; i < 50; i++) assert.equal(lines[i], String(i % 10).repeat(100_000));
});

test("stdout: a reader that goes away ends the command with status 141 and no trace", () => {
  const script = `${JSON.stringify(process.execPath)} -e ${JSON.stringify(writer(200, 100_000))} | head -c 10 >/dev/null; echo "status \${PIPESTATUS[0]}"`;
  const r = spawnSync("bash", ["-c", script], { encoding: "utf8" });
  assert.equal(r.stdout.trim(), "status 141");
  assert.equal(r.stderr, "");
});
