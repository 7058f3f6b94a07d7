/**
 * The image inspector page (inspector/index.html): opens a picked file or a URL and shows what
 * `qcowkit info`, `check` and `map` would say, plus a picture of the allocation map. All in the
 * browser; the same code as the command line (ops/info.ts, image/check.ts, cli/human.ts).
 */
import { humanCheck, humanInfo, sizeToStr, snapshotRow } from "../cli/human.js";
import { browserCodecs } from "../codec/browser.js";
import { QcowError } from "../errors.js";
import { CheckFailed, checkQcow2 } from "../image/check.js";
import { type Image, openImage } from "../image/open.js";
import { Qcow2Image } from "../image/qcow2.js";
import { BlobStorage, blobOpener } from "../io/blob.js";
import { httpOpener } from "../io/http.js";
import type { StorageOpener } from "../io/storage.js";
import { backingChain, imageInfo, snapshotInfo } from "../ops/info.js";
import {
  type AllocationMap,
  allocationMap,
  type CellClass,
  CLASS_NAMES,
  COMPRESSED,
  cellColour,
  cellSummary,
  DATA,
  type MapGeometry,
  mapGeometry,
  NO_DEPTH,
  PALETTE,
  UNALLOCATED,
  ZERO,
} from "./alloc-map.js";

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => document.getElementById(id) as T;
const codecs = browserCodecs();

/** URLs: backing names resolve as a browser resolves links (an absolute path stays on the server). */
const urlOpener: StorageOpener = {
  ...httpOpener,
  resolve: (base, relative) => new URL(relative, base).href,
};

interface Source {
  label: string;
  open(noBacking: boolean): Promise<Image>;
  /** What to say when the backing chain cannot be opened. */
  backingHint: string;
}

let busy: Promise<void> = Promise.resolve();

/** For tests and the curious: where a guest offset is drawn. */
const exposed: {
  geometry?: MapGeometry & { cellPx: number };
  renderMs?: number;
  cellRect?(offset: number): { x: number; y: number; w: number };
} = {};
(globalThis as { qcowkitInspector?: typeof exposed }).qcowkitInspector = exposed;

function setState(state: "idle" | "busy" | "done" | "error"): void {
  document.body.dataset.state = state;
}

function status(text: string): void {
  $("status").textContent = text;
}

function showSection(id: string, show = true): void {
  $(`${id}-section`).hidden = !show;
}

function message(e: unknown): string {
  return (e instanceof Error && e.message) || String(e);
}

/** Runs one inspection after the one before it, whatever became of that one. */
function queue(job: () => Promise<void>): void {
  busy = busy.then(job).catch((e: unknown) => {
    $("error").textContent = message(e);
    setState("error");
  });
}

function reset(): void {
  for (const id of ["info", "chain", "snapshots", "bitmaps", "map", "check"]) showSection(id, false);
  for (const id of ["error", "chain-note", "map-cell", "map-stats", "check"]) $(id).textContent = "";
  delete exposed.geometry;
  delete exposed.renderMs;
}

async function inspect(source: Source): Promise<void> {
  reset();
  setState("busy");
  status(`Opening ${source.label}…`);
  let img: Image | undefined;
  try {
    let note = "";
    try {
      img = await source.open(false);
    } catch (e) {
      // Without its backing chain the image itself can still be shown.
      img = await source.open(true).catch(() => {
        throw e;
      });
      note = `${message(e)}. ${source.backingHint}`;
    }
    await showInfo(img, note);
    status(`Mapping ${source.label}…`);
    // An image qcowkit describes but cannot map (an encrypted one) still gets its check.
    await showMap(img).catch((e: unknown) => {
      $<HTMLCanvasElement>("map").width = 0;
      $("legend").replaceChildren();
      $("map-about").textContent = "";
      $("map-stats").textContent = `No map: ${message(e)}`;
      showSection("map");
    });
    status(`Checking ${source.label}…`);
    await showCheck(img);
    status(`${source.label}: done`);
    setState("done");
  } catch (e) {
    $("error").textContent = message(e);
    status("");
    setState("error");
  } finally {
    await img?.close().catch(() => {});
  }
}

async function showInfo(img: Image, note: string): Promise<void> {
  $("info").textContent = humanInfo(await imageInfo(img));
  showSection("info");

  const list = $("chain");
  list.replaceChildren();
  for (const layer of backingChain(img)) {
    const li = document.createElement("li");
    const cluster = layer.format === "qcow2" ? `, cluster size ${layer.clusterSize}` : "";
    li.textContent = `${layer.filename} — ${layer.format}, ${sizeToStr(layer.size)} (${layer.size} bytes)${cluster}`;
    list.append(li);
  }
  const top = img.format === "qcow2" ? img : undefined;
  if (top?.backingName !== undefined && !top.backing) {
    $("chain-note").textContent =
      note || `Backing file '${top.backingName}' not opened; the map shows this image's own clusters only.`;
  }
  showSection("chain");

  const snapshots = top?.snapshots ?? [];
  $("snapshots").textContent =
    snapshots.length === 0
      ? "No snapshots"
      : [snapshotRow(), ...snapshots.map((s) => snapshotRow(snapshotInfo(s)))].join("\n");
  showSection("snapshots");

  const bitmaps = top?.bitmaps ?? [];
  const holder = $("bitmaps");
  if (bitmaps.length === 0) holder.textContent = "No bitmaps";
  else {
    const table = document.createElement("table");
    table.innerHTML = "<tr><th>name</th><th>granularity</th><th>flags</th></tr>";
    for (const b of bitmaps) {
      const tr = table.insertRow();
      const flags = [b.flags & 1 ? "in-use" : "", b.flags & 2 ? "auto" : ""].filter(Boolean).join(", ");
      for (const text of [b.name, String(2 ** b.granularityBits), flags || "-"]) tr.insertCell().textContent = text;
    }
    holder.replaceChildren(table);
  }
  showSection("bitmaps");
}

const pauseForUi = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 0));

async function showMap(img: Image): Promise<void> {
  const t0 = performance.now();
  const granule = img.format === "qcow2" ? img.clusterSize : 512;
  const g = mapGeometry(img.size, granule);
  const map = await allocationMap(img, g, pauseForUi);
  const cellPx = Math.max(1, Math.min(16, Math.floor(1024 / g.cols), Math.floor(512 / g.rows)));
  const canvas = $<HTMLCanvasElement>("map");
  canvas.width = g.cols * cellPx;
  canvas.height = g.rows * cellPx;
  const ctx = canvas.getContext("2d") as CanvasRenderingContext2D;
  const pixels = ctx.createImageData(canvas.width, canvas.height);
  const data = pixels.data;
  for (let c = 0; c < g.cells; c++) {
    const s = cellSummary(map, c);
    const [r, gr, b] = cellColour(s.cls, s.depth, s.full);
    const x0 = (c % g.cols) * cellPx;
    const y0 = Math.floor(c / g.cols) * cellPx;
    for (let y = y0; y < y0 + cellPx; y++) {
      for (let x = x0, i = (y * canvas.width + x0) * 4; x < x0 + cellPx; x++, i += 4) {
        data[i] = r;
        data[i + 1] = gr;
        data[i + 2] = b;
        data[i + 3] = 255;
      }
    }
  }
  ctx.putImageData(pixels, 0, 0);
  const ms = performance.now() - t0;

  exposed.geometry = { ...g, cellPx };
  exposed.renderMs = ms;
  exposed.cellRect = (offset) => {
    const c = Math.floor(offset / g.cellBytes);
    return { x: (c % g.cols) * cellPx, y: Math.floor(c / g.cols) * cellPx, w: cellPx };
  };
  canvas.dataset.cellBytes = String(g.cellBytes);
  canvas.dataset.cols = String(g.cols);
  canvas.dataset.cellPx = String(cellPx);
  canvas.dataset.renderMs = ms.toFixed(1);
  canvas.onmousemove = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const x = Math.floor(((ev.clientX - rect.left) * canvas.width) / rect.width / cellPx);
    const y = Math.floor(((ev.clientY - rect.top) * canvas.height) / rect.height / cellPx);
    $("map-cell").textContent = describeCell(map, y * g.cols + x);
  };

  $("map-about").textContent =
    `Guest address space, left to right and top to bottom: ${g.cells} cells of ${sizeToStr(g.cellBytes)}, ` +
    `${sizeToStr(g.cellBytes * g.cols)} a row. A cell shows the most telling thing in it (compressed, then data, ` +
    "then zero, then unallocated), pale when that covers only part of the cell; layer 0 is the image itself, " +
    "higher layers its backing files.";
  renderLegend(map);
  $("map-stats").textContent = `${map.extents} extents, ${g.cells} cells, rendered in ${ms.toFixed(0)} ms`;
  showSection("map");
}

function renderLegend(map: AllocationMap): void {
  const legend = $("legend");
  legend.replaceChildren();
  const entries: [CellClass, number][] = [[UNALLOCATED, 0]];
  for (const cls of [DATA, COMPRESSED, ZERO] as const) {
    const layers = Math.min(map.maxDepth, PALETTE[cls].length - 1);
    for (let d = 0; d <= layers; d++) entries.push([cls, d]);
  }
  for (const [cls, depth] of entries) {
    const [r, g, b] = cellColour(cls, depth, true);
    const item = document.createElement("span");
    item.className = "legend-item";
    item.dataset.class = CLASS_NAMES[cls];
    item.dataset.depth = String(depth);
    item.dataset.rgb = `${r},${g},${b}`;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${r},${g},${b})`;
    const deeper = depth === PALETTE[cls].length - 1 && depth < map.maxDepth ? "+" : "";
    const layer = cls === UNALLOCATED ? "" : map.maxDepth > 0 ? ` (layer ${depth}${deeper})` : "";
    item.append(sw, `${CLASS_NAMES[cls]}${layer}`);
    legend.append(item);
  }
}

function describeCell(map: AllocationMap, c: number): string {
  if (c < 0 || c >= map.cells) return "";
  const start = c * map.cellBytes;
  const end = Math.min(map.size, start + map.cellBytes);
  const parts: string[] = [];
  for (const cls of [DATA, COMPRESSED, ZERO, UNALLOCATED] as const) {
    const n = map.bytes[c * 4 + cls];
    if (n > 0) parts.push(`${CLASS_NAMES[cls]} ${sizeToStr(n)}`);
  }
  const layer = map.depth[c] === NO_DEPTH ? "" : `, top layer ${map.depth[c]}`;
  return `0x${start.toString(16)}–0x${end.toString(16)}: ${parts.join(", ")}${layer}`;
}

async function showCheck(img: Image): Promise<void> {
  const out = $("check");
  showSection("check");
  if (!(img instanceof Qcow2Image)) {
    out.textContent = "This image format does not support checks";
    return;
  }
  const lines: string[] = [];
  try {
    const result = await checkQcow2(img.storage, { log: (line) => lines.push(line) });
    out.textContent = [...lines, humanCheck(result).trimEnd()].join("\n");
  } catch (e) {
    const prefix = e instanceof CheckFailed || e instanceof QcowError ? "Check failed: " : "";
    out.textContent = [...lines, `${prefix}${message(e)}`].join("\n");
  }
}

/** The picked file that no other picked file names as its backing file: the top of the chain. */
async function topOfPicked(files: File[]): Promise<File> {
  if (files.length === 1) return files[0];
  const named = new Set<string>();
  for (const f of files) {
    const { backingName } = await Qcow2Image.readHeader(new BlobStorage(f), true).catch(() => ({
      backingName: undefined,
    }));
    if (backingName !== undefined) named.add(backingName.slice(backingName.lastIndexOf("/") + 1));
  }
  return files.find((f) => !named.has(f.name)) ?? files[0];
}

function openFiles(files: File[]): void {
  queue(async () => {
    const top = await topOfPicked(files);
    await inspect({
      label: top.name,
      open: (noBacking) => openImage(top.name, { opener: blobOpener(files), codecs, noBacking, metadataOnly: true }),
      backingHint: "Pick the backing files together with the image (several files at once) to see the whole chain.",
    });
  });
}

function openUrl(text: string): void {
  queue(async () => {
    let url: string;
    try {
      url = new URL(text, location.href).href;
    } catch {
      reset();
      $("error").textContent = `'${text}' is not a URL`;
      setState("error");
      return;
    }
    await inspect({
      label: url,
      open: (noBacking) => openImage(url, { opener: urlOpener, codecs, noBacking, metadataOnly: true }),
      backingHint: "The backing file must be reachable at that URL.",
    });
  });
}

$<HTMLInputElement>("file").addEventListener("change", (ev) => {
  const files = [...((ev.target as HTMLInputElement).files ?? [])];
  if (files.length > 0) openFiles(files);
});
$("open-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $<HTMLInputElement>("url").value.trim();
  if (text) openUrl(text);
});

const initial = new URLSearchParams(location.search).get("url");
if (initial) {
  $<HTMLInputElement>("url").value = initial;
  openUrl(initial);
}
