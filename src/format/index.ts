export * from "./header.js";
export * from "./tables.js";
export * from "./snapshot.js";
export * from "./bitmap.js";
export * from "./bytes.js";
