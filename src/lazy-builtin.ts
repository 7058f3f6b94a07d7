/**
 * Node's own modules that only some commands need (zlib, worker threads, net, http, v8,
 * fs/promises), loaded on first use: each costs 1.5 to 5 ms of start-up, which `info` and
 * `check` would pay for nothing.
 */
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);

/** A getter that loads the built-in module `name` the first time it is called. */
export function lazyBuiltin<T>(name: string): () => T {
  let loaded: T | undefined;
  return () => {
    loaded ??= require(name) as T;
    return loaded;
  };
}
