/**
 * qemu-img prints its JSON (and the human "Format specific information") by walking QEMU's
 * QDict, whose iteration order is its hash order, not the order fields were added. To print
 * byte for byte what qemu-img prints, objects here are walked in that same order: buckets of
 * QEMU's tdb hash modulo 512, and within a bucket the most recently added key first.
 */
export type QValue = string | number | boolean | QValue[] | QObject;
export interface QObject {
  [key: string]: QValue | undefined;
}

const QDICT_BUCKETS = 512;

function tdbHash(name: string): number {
  const bytes = new TextEncoder().encode(name);
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    value = (value + ((bytes[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/** The keys of `o` (those with a value) in QDict iteration order. */
export function qdictKeys(o: QObject): string[] {
  const keys = Object.keys(o).filter((k) => o[k] !== undefined);
  const order = new Map(keys.map((k, i) => [k, i]));
  return keys.sort((a, b) => {
    const ba = tdbHash(a) % QDICT_BUCKETS;
    const bb = tdbHash(b) % QDICT_BUCKETS;
    return ba !== bb ? ba - bb : (order.get(b) as number) - (order.get(a) as number);
  });
}

function isContainer(v: QValue): v is QValue[] | QObject {
  return typeof v === "object";
}

/** QEMU's pretty JSON: four-space indent, `[` and `{` always followed by a newline. */
export function toQemuJson(v: QValue, depth = 0): string {
  const pad = " ".repeat(4 * (depth + 1));
  const close = " ".repeat(4 * depth);
  if (Array.isArray(v)) {
    if (v.length === 0) return `[\n${close}]`;
    return `[\n${v.map((x) => pad + toQemuJson(x, depth + 1)).join(",\n")}\n${close}]`;
  }
  if (typeof v === "object") {
    const keys = qdictKeys(v);
    if (keys.length === 0) return `{\n${close}}`;
    return `{\n${keys.map((k) => `${pad}${JSON.stringify(k)}: ${toQemuJson(v[k] as QValue, depth + 1)}`).join(",\n")}\n${close}}`;
  }
  return typeof v === "string" ? quoteString(v) : JSON.stringify(v);
}

const SHORT_ESCAPES: Record<string, string> = {
  '"': '\\"',
  "\\": "\\\\",
  "\b": "\\b",
  "\f": "\\f",
  "\n": "\\n",
  "\r": "\\r",
  "\t": "\\t",
};

/** QEMU's JSON string quoting: short escapes, everything outside printable ASCII as \\uXXXX. */
function quoteString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0) as number;
    if (SHORT_ESCAPES[ch] !== undefined) out += SHORT_ESCAPES[ch];
    else if (cp < 0x20 || cp >= 0x7f) {
      for (let i = 0; i < ch.length; i++) out += `\\u${ch.charCodeAt(i).toString(16).toUpperCase().padStart(4, "0")}`;
    } else out += ch;
  }
  return `${out}"`;
}

/** QEMU's human dump of a QDict (block/qapi.c dump_qdict): keys with spaces, nested indents. */
export function dumpHuman(v: QObject | QValue[], indent: number): string {
  const lines: string[] = [];
  const pad = " ".repeat(indent * 4);
  const entries: [string, QValue][] = Array.isArray(v)
    ? v.map((x, i) => [`[${i}]`, x])
    : qdictKeys(v).map((k) => [k.replaceAll("-", " "), v[k] as QValue]);
  for (const [key, value] of entries) {
    if (isContainer(value)) {
      lines.push(`${pad}${key}:\n`);
      lines.push(dumpHuman(value, indent + 1));
    } else {
      lines.push(`${pad}${key}: ${String(value)}\n`);
    }
  }
  return lines.join("");
}
