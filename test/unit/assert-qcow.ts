import assert from "node:assert/strict";
import { QcowError } from "../../src/errors.js";

/** Asserts that `fn` throws a QcowError with this code and a message matching `message`. */
export function throwsQcow(fn: () => unknown, code: string, message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof QcowError, `expected a QcowError, got ${String(e)}`);
    assert.equal(e.code, code, `error code for "${e.message}"`);
    assert.match(e.message, message);
    return true;
  });
}
