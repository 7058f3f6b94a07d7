/**
 * A short, fixed-seed pass of the fuzzer (fuzz/run.ts) in every test run: damaged images through
 * info, read, check, repair and write must end in success or a clean error — no crash, hang,
 * memory blow-up or file growth — and read the same bytes as qemu-img where it reads them too.
 */
import assert from "node:assert/strict";
import { before, test } from "node:test";
import { formatReport, fuzz } from "../../fuzz/run.js";
import { requireTool } from "./util.js";

before(() => {
  requireTool("qemu-img");
  requireTool("qemu-io");
});

test("fuzz: 160 damaged images, seed 20261125", { timeout: 300_000 }, async () => {
  const report = await fuzz({ seed: 20261125, cases: 160, seconds: 240, jobs: 2, quiet: true });
  assert.equal(report.cases, 160, formatReport(report));
  assert.deepEqual(report.failures, [], formatReport(report));
  // The pass is only worth something if the damage reached every path.
  for (const op of ["info", "read", "check", "repair", "write"]) {
    assert.ok((report.outcomes.get(`${op}:ok`) ?? 0) > 0, `${op} never succeeded\n${formatReport(report)}`);
    assert.ok((report.outcomes.get(`${op}:error`) ?? 0) > 0, `${op} never failed cleanly\n${formatReport(report)}`);
  }
  assert.ok(report.comparedWithQemu > 50, formatReport(report));
});
