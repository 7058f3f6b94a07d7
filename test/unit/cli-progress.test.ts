/**
 * Progress: qemu-img's "-p" display (util/qemu-progress.c): "    (%3.2f/100%)\r" redrawn on
 * stdout when the value moves by more than 1%, 0 and 100 always shown, a newline at the end.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { Progress } from "../../src/cli/progress.js";

function sink(): { out: (text: string) => void; text: () => string } {
  const chunks: string[] = [];
  return { out: (text) => void chunks.push(text), text: () => chunks.join("") };
}

test("progress: starts at 0.00, ends at 100.00 and a newline", () => {
  const s = sink();
  const p = new Progress(true, s.out);
  p.end();
  assert.equal(s.text(), "    (0.00/100%)\r    (100.00/100%)\r\n");
});

test("progress: small moves are not redrawn, larger ones are, with two decimals", () => {
  const s = sink();
  const p = new Progress(true, s.out);
  p.update(0.004);
  p.update(0.009);
  p.update(0.03125);
  p.update(0.035);
  p.update(0.5);
  p.end();
  assert.equal(s.text(), "    (0.00/100%)\r    (3.12/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n");
});

test("progress: values outside 0..1 are clamped", () => {
  const s = sink();
  const p = new Progress(true, s.out);
  p.update(-1);
  p.update(7);
  assert.equal(s.text(), "    (0.00/100%)\r    (100.00/100%)\r");
});

test("progress: disabled prints nothing", () => {
  const s = sink();
  const p = new Progress(false, s.out);
  p.update(0.5);
  p.end();
  assert.equal(s.text(), "");
});
