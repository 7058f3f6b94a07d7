/**
 * V8 settings a command makes for itself, at run time: the bin is reached through npx or a
 * shebang, where node's own flags cannot be given.
 *  - node:v8 (with the stream modules it loads) costs ~2 ms of start-up: the flags go through
 *    the addon, which is loaded already, and through node:v8 only without it.
 *  - V8 rejects a code cache made under other flags. The bin has consumed its cache before a
 *    command runs, so a setting is safe there; but the build's run that writes a cache
 *    (QCOWKIT_CODE_CACHE_OUT) keeps the defaults, or the cache would never be used.
 */
import type * as V8 from "node:v8";
import { setV8FlagNatively } from "../io/file.js";
import { lazyBuiltin } from "../lazy-builtin.js";

const v8 = lazyBuiltin<typeof V8>("node:v8");

export function setV8Flags(...flags: string[]): void {
  if (process.env.QCOWKIT_CODE_CACHE_OUT) return;
  for (const flag of flags) if (!setV8FlagNatively(flag)) v8().setFlagsFromString(flag);
}
