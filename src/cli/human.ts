/** qemu-img's human-readable formats: sizes, info blocks, snapshot tables, map listings. */
import { QcowError } from "../errors.js";
import { textEncoder } from "../format/bytes.js";
import type { Extent } from "../image/block-device.js";
import type { CheckResult } from "../image/check.js";
import type { ImageInfo, SnapshotInfo } from "../ops/info.js";
import { dumpHuman, type QObject } from "./qobject.js";

/** C's printf("%0.3g", v) for the values size_to_str produces (0 <= v < 1000). */
function formatG3(v: number): string {
  if (v === 0) return "0";
  const exp = Math.floor(Math.log10(Math.abs(v)));
  if (exp >= 3 || exp < -4) {
    const [m, e] = v.toExponential(2).split("e");
    const mant = m.includes(".") ? m.replace(/\.?0+$/, "") : m;
    const n = Number(e);
    return `${mant}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
  }
  const s = v.toPrecision(3);
  if (s.includes("e")) return formatG3(Number(s));
  return s.includes(".") ? s.replace(/\.?0+$/, "") : s;
}

/** QEMU's size_to_str: three significant digits and a binary suffix ("1.27 MiB"). */
export function sizeToStr(val: number): string {
  const suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
  // frexp(val / (1000/1024)) gives the exponent i with 2^(i-1) <= x < 2^i.
  const x = val / (1000 / 1024);
  const e = x === 0 ? 0 : Math.floor(Math.log2(x)) + 1;
  const i = Math.max(0, Math.floor((e - 1) / 10));
  return `${formatG3(val / 2 ** (i * 10))} ${suffixes[i]}B`;
}

/** printf's "%-Ns": pads to N bytes of UTF-8, not N characters. */
function padBytes(s: string, width: number): string {
  return s + " ".repeat(Math.max(0, width - textEncoder.encode(s).length));
}

function pad2(n: number): string {
  return String(n).padStart(2, "0");
}

/** One row of bdrv_snapshot_dump (no trailing newline); the header row without an argument. */
export function snapshotRow(sn?: SnapshotInfo): string {
  if (!sn) {
    return `${"ID".padEnd(10)}${"TAG".padEnd(17)}${"VM SIZE".padStart(8)}${"DATE".padStart(20)}${"VM CLOCK".padStart(13)}${"ICOUNT".padStart(11)}`;
  }
  const d = new Date(sn["date-sec"] * 1000);
  const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const nsec = sn["vm-clock-sec"] * 1e9 + sn["vm-clock-nsec"];
  const secs = Math.floor(nsec / 1e9);
  const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(nsec / 1e6) % 1000).padStart(3, "0")}`;
  const icount = sn.icount === undefined ? "" : String(sn.icount);
  return `${padBytes(sn.id, 9)} ${padBytes(sn.name, 16)} ${sizeToStr(sn["vm-state-size"]).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** bdrv_image_info_dump. */
export function humanInfo(info: ImageInfo): string {
  const out: string[] = [];
  const disk = info["actual-size"] === undefined ? "unavailable" : sizeToStr(info["actual-size"]);
  out.push(`image: ${info.filename}\n`);
  out.push(`file format: ${info.format}\n`);
  out.push(`virtual size: ${sizeToStr(info["virtual-size"])} (${info["virtual-size"]} bytes)\n`);
  out.push(`disk size: ${disk}\n`);
  if (info.encrypted) out.push("encrypted: yes\n");
  if (info["cluster-size"] !== undefined) out.push(`cluster_size: ${info["cluster-size"]}\n`);
  if (info["dirty-flag"]) out.push("cleanly shut down: no\n");
  const backing = info["backing-filename"];
  if (backing !== undefined) {
    const full = info["full-backing-filename"];
    let line = `backing file: ${backing}`;
    if (full === undefined) line += " (cannot determine actual path)";
    else if (full !== backing) line += ` (actual path: ${full})`;
    out.push(`${line}\n`);
    if (info["backing-filename-format"] !== undefined)
      out.push(`backing file format: ${info["backing-filename-format"]}\n`);
  }
  if (info.snapshots) {
    out.push("Snapshot list:\n");
    out.push(`${snapshotRow()}\n`);
    for (const sn of info.snapshots) out.push(`${snapshotRow(sn)}\n`);
  }
  const spec = info["format-specific"];
  if (spec) {
    out.push("Format specific information:\n");
    out.push(dumpHuman(spec.data as QObject, 1));
  }
  return out.join("");
}

const hex0 = (n: number): string => (n === 0 ? "0" : `0x${n.toString(16)}`);

/** qemu-img map's human listing: only data with a host offset, `%#-16x` columns. */
export function humanMapHeader(): string {
  return `${"Offset".padEnd(16)}${"Length".padEnd(16)}${"Mapped to".padEnd(16)}File\n`;
}

export function humanMapEntry(e: Extent): string {
  if (e.data && e.offset === undefined)
    throw new QcowError("unsupported", "File contains external, encrypted or compressed clusters.");
  if (!e.data || e.zero || e.offset === undefined) return "";
  return `${hex0(e.start).padEnd(16)}${hex0(e.length).padEnd(16)}${hex0(e.offset).padEnd(16)}${e.file ?? ""}\n`;
}

export function jsonMapEntry(e: Extent): string {
  let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
  return `${s}}`;
}

/** qemu-img check's human summary (the findings themselves go to stderr, one line each). */
export function humanCheck(c: CheckResult): string {
  let out = "";
  if (!(c.corruptions || c.leaks || c.checkErrors)) {
    out += "No errors were found on the image.\n";
  } else {
    if (c.corruptions) {
      out += `\n${c.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    }
    if (c.leaks) {
      out += `\n${c.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    }
    if (c.checkErrors) out += `\n${c.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (c.totalClusters !== 0 && c.allocatedClusters !== 0) {
    out +=
      `${c.allocatedClusters}/${c.totalClusters} = ${printf2((c.allocatedClusters * 100) / c.totalClusters)}% allocated, ` +
      `${printf2((c.fragmentedClusters * 100) / c.allocatedClusters)}% fragmented, ` +
      `${printf2((c.compressedClusters * 100) / c.allocatedClusters)}% compressed clusters\n`;
  }
  if (c.imageEndOffset) out += `Image end offset: ${c.imageEndOffset}\n`;
  return out;
}

/** printf("%.2f"): like toFixed(2), but an exact half goes to the even digit as C rounds it. */
export function printf2(v: number): string {
  const scaled = v * 100;
  const floor = Math.floor(scaled);
  if (scaled - floor === 0.5 && (v * 1000) % 10 === 5) {
    const n = floor % 2 === 0 ? floor : floor + 1;
    return (n / 100).toFixed(2);
  }
  return v.toFixed(2);
}
