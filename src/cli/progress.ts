/** qemu-img's progress display: "    (12.34/100%)" redrawn in place on stdout, a newline at the end. */
export class Progress {
  private last = -1;
  constructor(
    private readonly enabled: boolean,
    private readonly out: NodeJS.WritableStream = process.stdout,
  ) {
    this.print(0);
  }

  /** Prints when the shown value moves by at least 1% (as qemu_progress_print does). */
  update(fraction: number): void {
    this.print(Math.min(100, Math.max(0, fraction * 100)));
  }

  private print(percent: number): void {
    if (!this.enabled) return;
    if (this.last >= 0 && percent - this.last < 1 && percent < 100) return;
    if (percent === this.last) return;
    this.last = percent;
    this.out.write(`    (${printf2(percent)}/100%)\r`);
  }

  end(): void {
    if (!this.enabled) return;
    this.print(100);
    this.out.write("\n");
  }
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
