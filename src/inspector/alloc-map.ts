/**
 * The inspector's allocation map: the guest address space cut into at most `maxCells` cells of
 * a power-of-two size, and for each cell the bytes that are data, compressed data, zero or
 * unallocated, and the shallowest backing-chain layer that supplies them.
 *
 * Work follows the image's block status (its L1/L2 tables): an absent L2 table is one extent
 * however much it covers, and an extent costs one step per cell it touches. A 4 TiB sparse
 * image is a few thousand steps, never one per cluster.
 */
import type { BlockDevice, Extent } from "../image/block-device.js";

export const UNALLOCATED = 0;
export const ZERO = 1;
export const DATA = 2;
export const COMPRESSED = 3;
export type CellClass = typeof UNALLOCATED | typeof ZERO | typeof DATA | typeof COMPRESSED;
export const CLASS_NAMES = ["unallocated", "zero", "data", "compressed"] as const;
/** No layer supplies anything in this cell. */
export const NO_DEPTH = 255;

export interface MapGeometry {
  /** Guest bytes per cell (a power of two, at least the image's granule). */
  cellBytes: number;
  cells: number;
  /** Cells per row (a power of two, so rows start at round addresses). */
  cols: number;
  rows: number;
}

export function mapGeometry(size: number, granule: number, maxCells = 65536): MapGeometry {
  let cellBytes = 2 ** Math.ceil(Math.log2(Math.max(512, granule)));
  while (Math.ceil(size / cellBytes) > maxCells) cellBytes *= 2;
  const cells = Math.max(1, Math.ceil(size / cellBytes));
  // About twice as wide as high.
  const cols = Math.min(cells, Math.max(1, Math.min(256, 2 ** Math.ceil(Math.log2(Math.sqrt(cells * 2))))));
  return { cellBytes, cells, cols, rows: Math.ceil(cells / cols) };
}

export interface AllocationMap extends MapGeometry {
  size: number;
  /** Bytes of each class per cell: cell * 4 + class. */
  bytes: Float64Array;
  /** Shallowest layer supplying data or zeros in each cell (NO_DEPTH: none). */
  depth: Uint8Array;
  /** Deepest layer seen anywhere. */
  maxDepth: number;
  /** Block-status extents walked. */
  extents: number;
}

export function extentClass(e: Extent): CellClass {
  if (!e.present) return UNALLOCATED;
  if (e.compressed) return COMPRESSED;
  return e.data && !e.zero ? DATA : ZERO;
}

/**
 * Walks the whole device once. `pause` is awaited now and then (a page passes a macrotask
 * wait there, so it stays responsive while a big, fully allocated image is mapped).
 */
export async function allocationMap(
  dev: BlockDevice,
  geometry: MapGeometry,
  pause?: () => Promise<void>,
): Promise<AllocationMap> {
  const { cellBytes, cells } = geometry;
  const map: AllocationMap = {
    ...geometry,
    size: dev.size,
    bytes: new Float64Array(cells * 4),
    depth: new Uint8Array(cells).fill(NO_DEPTH),
    maxDepth: 0,
    extents: 0,
  };
  let lastPause = Date.now();
  for await (const e of dev.blockStatus(0, dev.size)) {
    map.extents++;
    const cls = extentClass(e);
    const depth = Math.min(e.depth, NO_DEPTH - 1);
    if (cls !== UNALLOCATED) map.maxDepth = Math.max(map.maxDepth, depth);
    const end = e.start + e.length;
    for (let c = Math.floor(e.start / cellBytes); c * cellBytes < end && c < cells; c++) {
      const from = Math.max(e.start, c * cellBytes);
      const to = Math.min(end, (c + 1) * cellBytes);
      map.bytes[c * 4 + cls] += to - from;
      if (cls !== UNALLOCATED && depth < map.depth[c]) map.depth[c] = depth;
    }
    if (pause && (map.extents & 1023) === 0 && Date.now() - lastPause > 50) {
      await pause();
      lastPause = Date.now();
    }
  }
  return map;
}

/**
 * What a cell shows: the most telling class in it (compressed, then data, then zero, then
 * unallocated), so that one data cluster in a cell of a huge sparse disk is still seen, and
 * whether that class fills the cell or only part of it.
 */
export function cellSummary(map: AllocationMap, c: number): { cls: CellClass; depth: number; full: boolean } {
  const cellEnd = Math.min(map.size, (c + 1) * map.cellBytes);
  const length = cellEnd - c * map.cellBytes;
  for (const cls of [COMPRESSED, DATA, ZERO] as const) {
    const n = map.bytes[c * 4 + cls];
    if (n > 0) return { cls, depth: map.depth[c], full: n >= length };
  }
  return { cls: UNALLOCATED, depth: NO_DEPTH, full: true };
}

/** Colours by class and layer (top layer first; deeper layers share the last one). */
export const PALETTE: Record<CellClass, [number, number, number][]> = {
  [UNALLOCATED]: [[226, 230, 234]],
  [ZERO]: [
    [45, 164, 78],
    [27, 124, 131],
  ],
  [DATA]: [
    [31, 111, 235],
    [130, 80, 223],
    [191, 57, 137],
    [154, 103, 0],
  ],
  [COMPRESSED]: [
    [225, 111, 36],
    [164, 14, 38],
  ],
};

/** A cell's colour: its class at its layer; paler when the class covers only part of it. */
export function cellColour(cls: CellClass, depth: number, full: boolean): [number, number, number] {
  const shades = PALETTE[cls];
  const rgb = shades[Math.min(cls === UNALLOCATED ? 0 : depth, shades.length - 1)];
  if (full) return rgb;
  return rgb.map((v) => Math.round(v + (255 - v) * 0.4)) as [number, number, number];
}
