// The bench's input images, generated once into a cache directory and reused by later runs.
//
//   disk.raw         2 GiB raw disk: ext4 holding ~0.9 GiB of real files copied from this machine's /usr
//   head.raw         its first 256 MiB (almost all data), for the slow cases: compression
//   disk.qcow2       qemu-img convert -O qcow2 of disk.raw
//   disk-4k.qcow2    the same with 4 KiB clusters: ~265k data clusters, for check
//   disk-zstd.qcow2  the same, compressed (-c, compression_type=zstd)
//   disk-zlib.qcow2  the same, compressed (-c, compression_type=zlib)
//   big.qcow2        4 TiB, nearly empty: a few 1 MiB writes spread across it
//   small.qcow2      64 MiB with 1 MiB written: for start-up-dominated commands
//
// Each file is written under a temporary name and renamed when complete, so an interrupted generation
// is redone rather than trusted.

import { spawnSync } from "node:child_process";
import {
  closeSync,
  copyFileSync,
  existsSync,
  ftruncateSync,
  linkSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readlinkSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";

export type InputName = "raw" | "head" | "qcow2" | "qcow2-4k" | "zstd" | "zlib" | "big" | "small";

const FILES: Record<InputName, string> = {
  raw: "disk.raw",
  head: "head.raw",
  qcow2: "disk.qcow2",
  "qcow2-4k": "disk-4k.qcow2",
  zstd: "disk-zstd.qcow2",
  zlib: "disk-zlib.qcow2",
  big: "big.qcow2",
  small: "small.qcow2",
};

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const TARGET_DATA = 0.9 * GiB;
const HEAD_SIZE = 256 * MiB;
const MAX_FILE = 32 * MiB; // keep the mix varied: no single huge library dominates
// Where the real content comes from, and how much of each, for a mix of text, binaries and libraries.
const SOURCES: [string, number][] = [
  ["/usr/share", 330 * MiB],
  ["/usr/include", 100 * MiB],
  ["/usr/bin", 150 * MiB],
  ["/usr/lib", 342 * MiB],
];
// Where to top up from if the quotas above could not be met on this machine.
const TOP_UP = ["/usr/lib", "/usr/share", "/usr/local", "/opt", "/usr/libexec", "/usr/sbin"];
/** 1 MiB writes across the 4 TiB image: at the start, the end, and across L1 entries and refcount blocks. */
const BIG_WRITES = ["0", "1G", "512G", "1T", "2T", "2306048M", "3T", "4194303M"];

function log(msg: string): void {
  process.stderr.write(`[data] ${msg}\n`);
}

function sh(argv: string[]): void {
  log(`$ ${argv.join(" ")}`);
  const r = spawnSync(argv[0] as string, argv.slice(1), { stdio: ["ignore", "inherit", "inherit"] });
  if (r.error) throw new Error(`${argv[0]}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${argv.join(" ")} exited with ${r.status ?? r.signal}`);
}

/** Build a tree of real files under dst, hard-linked where possible, until `quota` bytes of data. */
class TreeFiller {
  total = 0;
  files = 0;
  private readonly seen = new Set<string>();

  constructor(private readonly dst: string) {}

  fill(root: string, quota: number): void {
    const limit = Math.min(this.total + quota, TARGET_DATA);
    if (existsSync(root)) this.walk(root, limit);
  }

  private walk(dir: string, limit: number): void {
    let entries: string[];
    try {
      entries = readdirSync(dir).sort();
    } catch {
      return;
    }
    const outDir = join(this.dst, dir);
    mkdirSync(outDir, { recursive: true });
    for (const name of entries) {
      if (this.total >= limit) return;
      const src = join(dir, name);
      const out = join(outDir, name);
      let st: ReturnType<typeof lstatSync>;
      try {
        st = lstatSync(src);
      } catch {
        continue;
      }
      if (st.isDirectory()) {
        if (src.startsWith(this.dst) || src === "/usr/lib/debug") continue;
        this.walk(src, limit);
      } else if (st.isSymbolicLink()) {
        if (!this.entryExists(out)) symlinkSync(readlinkSync(src), out);
      } else if (st.isFile() && st.size <= MAX_FILE && !existsSync(out)) {
        const key = `${st.dev}:${st.ino}`;
        if (this.seen.has(key)) continue;
        try {
          try {
            linkSync(src, out);
          } catch {
            copyFileSync(src, out);
          }
        } catch {
          continue; // unreadable: skip
        }
        this.seen.add(key);
        this.total += st.size;
        this.files++;
      }
    }
  }

  private entryExists(p: string): boolean {
    try {
      lstatSync(p);
      return true;
    } catch {
      return false;
    }
  }
}

export class DataSet {
  private readonly ready = new Set<InputName>();

  constructor(readonly dir: string) {}

  path(name: InputName): string {
    return join(this.dir, FILES[name]);
  }

  /** Make sure an input exists, generating it (and what it is made from) if needed. */
  ensure(name: InputName): string {
    const file = this.path(name);
    if (this.ready.has(name) || existsSync(file)) {
      this.ready.add(name);
      return file;
    }
    mkdirSync(this.dir, { recursive: true });
    const tmp = `${file}.tmp`;
    rmSync(tmp, { force: true });
    const t0 = Date.now();
    log(`generating ${FILES[name]}`);
    switch (name) {
      case "raw":
        this.makeRaw(tmp);
        break;
      case "head":
        copyHead(this.ensure("raw"), tmp, HEAD_SIZE);
        break;
      case "qcow2":
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", this.ensure("raw"), tmp]);
        break;
      case "qcow2-4k":
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", this.ensure("raw"), tmp]);
        break;
      case "zstd":
      case "zlib":
        sh([
          "qemu-img",
          "convert",
          "-c",
          "-f",
          "raw",
          "-O",
          "qcow2",
          "-o",
          `compression_type=${name}`,
          this.ensure("raw"),
          tmp,
        ]);
        break;
      case "big":
        sh(["qemu-img", "create", "-q", "-f", "qcow2", tmp, "4T"]);
        sh([
          "qemu-io",
          "-f",
          "qcow2",
          ...BIG_WRITES.flatMap((off, i) => ["-c", `write -q -P ${i + 1} ${off} 1M`]),
          tmp,
        ]);
        break;
      case "small":
        sh(["qemu-img", "create", "-q", "-f", "qcow2", tmp, "64M"]);
        sh(["qemu-io", "-f", "qcow2", "-c", "write -q -P 7 1M 1M", tmp]);
        break;
    }
    renameSync(tmp, file);
    log(`${FILES[name]} ready in ${((Date.now() - t0) / 1000).toFixed(1)} s (${describe(file)})`);
    this.ready.add(name);
    return file;
  }

  private makeRaw(out: string): void {
    const src = join(this.dir, "src.tmp");
    rmSync(src, { recursive: true, force: true });
    mkdirSync(src, { recursive: true });
    const filler = new TreeFiller(src);
    for (const [root, quota] of SOURCES) filler.fill(root, quota);
    for (const root of TOP_UP) filler.fill(root, TARGET_DATA);
    log(`source tree: ${filler.files} files, ${(filler.total / GiB).toFixed(2)} GiB`);
    if (filler.total < 0.5 * TARGET_DATA) log("warning: this machine has less real data to copy than planned");
    sh(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", src, out, "2G"]);
    rmSync(src, { recursive: true, force: true });
  }
}

/** The first `size` bytes of a raw image, kept sparse where the source is zero. */
function copyHead(src: string, dst: string, size: number): void {
  log(`copying the first ${size / MiB} MiB of ${src}`);
  const buf = Buffer.alloc(MiB);
  const zero = Buffer.alloc(MiB);
  const input = openSync(src, "r");
  const output = openSync(dst, "w");
  try {
    ftruncateSync(output, size);
    for (let off = 0; off < size; off += MiB) {
      const n = readSync(input, buf, 0, MiB, off);
      if (n === 0) break;
      if (!buf.subarray(0, n).equals(zero.subarray(0, n))) writeSync(output, buf, 0, n, off);
    }
  } finally {
    closeSync(input);
    closeSync(output);
  }
}

function describe(file: string): string {
  const st = statSync(file);
  return `${(st.size / GiB).toFixed(2)} GiB virtual file size, ${((st.blocks * 512) / GiB).toFixed(2)} GiB on disk`;
}
