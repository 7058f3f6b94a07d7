/** `info`: what qemu-img info reports, as data in QAPI's ImageInfo shape. */
import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from "../format/bitmap.js";
import { AUTOCLEAR_DATA_FILE_RAW, COMPRESSION_ZSTD, CRYPT_LUKS } from "../format/header.js";
import { decodeLuksHeader, describeLuks, LUKS_HEADER_BYTES } from "../format/luks.js";
import type { Snapshot } from "../format/snapshot.js";
import type { Image } from "../image/open.js";
import type { Qcow2Image } from "../image/qcow2.js";
import { readFull } from "../io/storage.js";

export interface SnapshotInfo {
  id: string;
  name: string;
  "vm-state-size": number;
  "date-sec": number;
  "date-nsec": number;
  "vm-clock-sec": number;
  "vm-clock-nsec": number;
  icount?: number;
  [key: string]: string | number | undefined;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
  [key: string]: string | number | string[];
}

export interface Qcow2SpecificInfo {
  compat: string;
  "compression-type": string;
  "lazy-refcounts"?: boolean;
  bitmaps?: BitmapInfo[];
  "refcount-bits": number;
  "data-file"?: string;
  "data-file-raw"?: boolean;
  corrupt?: boolean;
  "extended-l2"?: boolean;
  encrypt?: Record<string, unknown>;
  [key: string]: unknown;
}

/** Keys in QAPI's field order; printers decide the order they appear in. */
export interface ImageInfo {
  filename: string;
  format: string;
  "dirty-flag": boolean;
  "actual-size"?: number;
  "virtual-size": number;
  "cluster-size"?: number;
  encrypted?: boolean;
  "backing-filename"?: string;
  "full-backing-filename"?: string;
  "backing-filename-format"?: string;
  snapshots?: SnapshotInfo[];
  "format-specific"?: { type: string; data: Qcow2SpecificInfo };
  [key: string]: unknown;
}

/** A snapshot table entry as QAPI's SnapshotInfo (what `info` and `snapshot -l` show). */
export function snapshotInfo(s: Snapshot): SnapshotInfo {
  const si: SnapshotInfo = {
    id: s.id,
    name: s.name,
    "vm-state-size": s.vmStateSize,
    "date-sec": s.dateSec,
    "date-nsec": s.dateNsec,
    "vm-clock-sec": Math.floor(s.vmClockNsec / 1e9),
    "vm-clock-nsec": s.vmClockNsec % 1e9,
  };
  if (s.icount !== undefined && s.icount !== -1n) si.icount = Number(s.icount);
  return si;
}

export async function imageInfo(img: Image): Promise<ImageInfo> {
  const info: ImageInfo = {
    filename: img.filename,
    format: img.format,
    "dirty-flag": false,
    "actual-size": await allocatedSize(img),
    "virtual-size": img.size,
  };
  if (img.format === "raw") return info;
  const h = img.header;
  info["dirty-flag"] = img.dirty;
  info["cluster-size"] = img.clusterSize;
  if (img.backingName !== undefined) {
    info["backing-filename"] = img.backingName;
    info["full-backing-filename"] = img.backingFilename ?? img.backingName;
    if (img.extensions.backingFormat !== undefined) info["backing-filename-format"] = img.extensions.backingFormat;
  }
  if (img.snapshots.length > 0) {
    info.snapshots = img.snapshots.map(snapshotInfo);
  }
  const compression = h.compressionType === COMPRESSION_ZSTD ? "zstd" : "zlib";
  const data: Qcow2SpecificInfo =
    h.version === 2
      ? { compat: "0.10", "compression-type": compression, "refcount-bits": 2 ** h.refcountOrder }
      : {
          compat: "1.1",
          "compression-type": compression,
          "lazy-refcounts": img.lazyRefcounts,
          "refcount-bits": 2 ** h.refcountOrder,
          corrupt: img.corrupt,
          "extended-l2": img.extendedL2,
        };
  if (h.version === 3 && img.bitmaps.length > 0) {
    data.bitmaps = img.bitmaps.map((b) => ({
      name: b.name,
      granularity: 2 ** b.granularityBits,
      flags: [...(b.flags & BME_FLAG_IN_USE ? ["in-use"] : []), ...(b.flags & BME_FLAG_AUTO ? ["auto"] : [])],
    }));
  }
  if (h.cryptMethod !== 0) {
    info.encrypted = true;
    data.encrypt = await describeEncryption(img);
  }
  if (h.version === 3 && img.extensions.dataFile !== undefined) data["data-file"] = img.extensions.dataFile;
  if (h.version === 3 && img.dataFile) data["data-file-raw"] = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  info["format-specific"] = { type: "qcow2", data };
  return info;
}

/** The format-specific "encrypt" description: the LUKS header's parameters, or just "aes". */
async function describeEncryption(img: Qcow2Image): Promise<Record<string, unknown>> {
  const ext = img.extensions.crypto;
  if (img.header.cryptMethod !== CRYPT_LUKS || !ext) return { format: "aes" };
  const buf = new Uint8Array(LUKS_HEADER_BYTES);
  await readFull(img.storage, buf, ext.offset);
  return { format: "luks", ...describeLuks(decodeLuksHeader(buf)) };
}

/** Bytes the image occupies on its storage (qemu-img's "disk size"). */
async function allocatedSize(img: Image): Promise<number | undefined> {
  const s = img.storage;
  return s.allocatedSize ? s.allocatedSize() : undefined;
}

/** The image and every backing file below it, top first (for an image opened with its chain). */
export function backingChain(img: Image): Image[] {
  const chain: Image[] = [];
  for (let cur: Image | undefined = img; cur; cur = cur.format === "qcow2" ? cur.backing : undefined) chain.push(cur);
  return chain;
}
