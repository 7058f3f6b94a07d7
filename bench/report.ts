// Summaries of samples, the printed table, and the JSON record.

import type { Sample } from "./measure.js";

export interface SideSummary {
  samples: Sample[];
  medianMs: number;
  minMs: number;
  maxMs: number;
  /** Highest peak RSS over the timed runs, KiB. */
  maxRssKiB: number | null;
  /** Median user + system CPU time, ms. */
  medianCpuMs: number | null;
}

export interface CaseResult {
  name: string;
  kind: "compare" | "reference";
  status: "ok" | "qcowkit-failed" | "qemu-failed" | "error";
  error?: string;
  /** Outcome of the case's output check: undefined when it has none or it did not run. */
  verify?: { ok: boolean; detail?: string };
  runs: number;
  qcowkit?: SideSummary;
  qemu?: SideSummary;
  /** reference cases */
  reference?: SideSummary;
  /** qcowkit median / qemu-img median: above 1 means qcowkit is slower. */
  ratio?: number;
  seconds: number;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

export function summarize(samples: Sample[]): SideSummary {
  const wall = samples.map((s) => s.wallMs);
  const rss = samples.map((s) => s.maxRssKiB).filter((x): x is number => x !== null);
  const cpu = samples
    .filter((s) => s.userMs !== null && s.sysMs !== null)
    .map((s) => (s.userMs as number) + (s.sysMs as number));
  return {
    samples,
    medianMs: median(wall),
    minMs: Math.min(...wall),
    maxMs: Math.max(...wall),
    maxRssKiB: rss.length > 0 ? Math.max(...rss) : null,
    medianCpuMs: cpu.length > 0 ? median(cpu) : null,
  };
}

export function fmtTime(ms: number): string {
  if (ms < 1000) return `${ms.toPrecision(3)} ms`;
  return `${(ms / 1000).toPrecision(3)} s`;
}

export function fmtRss(kib: number | null): string {
  if (kib === null) return "?";
  return kib < 10240 ? `${(kib / 1024).toFixed(1)} MiB` : `${Math.round(kib / 1024)} MiB`;
}

function fmtRatio(r: number): string {
  return `${r.toFixed(2)}x`;
}

function cell(s: string): string {
  const oneLine = s.replace(/\|/g, "\\|").replace(/\s+/g, " ");
  return oneLine.length > 90 ? `${oneLine.slice(0, 87)}...` : oneLine;
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (r: string[]) => `| ${r.map((c, i) => c.padEnd(widths[i] as number)).join(" | ")} |`;
  return [line(header), `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`, ...rows.map(line)].join("\n");
}

export function renderTables(results: CaseResult[], selfTest: boolean): string {
  const qk = selfTest ? "qcowkit (self-test: qemu-img)" : "qcowkit";
  const compareRows = results
    .filter((r) => r.kind === "compare")
    .map((r): string[] => {
      if (r.status === "qcowkit-failed") return [r.name, cell(`qcowkit failed: ${r.error}`), "", "", "", "", "", ""];
      if (r.status !== "ok" || !r.qcowkit || !r.qemu) {
        const who = r.status === "qemu-failed" ? "qemu-img failed" : "error";
        return [r.name, "", cell(`${who}: ${r.error}`), "", "", "", "", ""];
      }
      const check = r.verify === undefined ? "-" : r.verify.ok ? "ok" : "DIFFERS";
      return [
        r.name,
        fmtTime(r.qcowkit.medianMs),
        fmtTime(r.qemu.medianMs),
        fmtRatio(r.ratio as number),
        fmtRatio(r.qcowkit.minMs / r.qemu.minMs),
        fmtRss(r.qcowkit.maxRssKiB),
        fmtRss(r.qemu.maxRssKiB),
        check,
      ];
    });
  const out = [table(["case", qk, "qemu-img", "ratio", "best", "qcowkit RSS", "qemu-img RSS", "output"], compareRows)];
  const refs = results.filter((r) => r.kind === "reference");
  if (refs.length > 0) {
    out.push(
      "",
      table(
        ["reference", "median", "peak RSS"],
        refs.map((r) =>
          r.reference && r.status === "ok"
            ? [r.name, fmtTime(r.reference.medianMs), fmtRss(r.reference.maxRssKiB)]
            : [r.name, cell(`failed: ${r.error}`), ""],
        ),
      ),
    );
  }
  const notes = results.filter((r) => r.verify?.detail !== undefined);
  if (notes.length > 0) {
    out.push("", "Output checks:");
    for (const r of notes) out.push(`- ${r.name}: ${r.verify?.ok ? "" : "FAILED: "}${r.verify?.detail}`);
  }
  out.push(
    "",
    "Times are medians of the timed runs (wall clock); ratio = qcowkit / qemu-img, above 1 means qcowkit is slower;",
    "best = the fastest qcowkit run / the fastest qemu-img run (on a shared VM a run is sometimes several times",
    "slower for reasons outside both tools: writing 1 GiB with dd varies 0.25-1.4 s here).",
    "RSS is the highest peak resident memory over the timed runs; for nbd cases time is the client's, RSS the server's.",
  );
  return out.join("\n");
}
