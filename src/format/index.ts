export * from "./bitmap.js";
export * from "./bytes.js";
export * from "./header.js";
export * from "./snapshot.js";
export * from "./tables.js";
