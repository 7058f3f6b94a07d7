import { printf2 } from "./human.js";
import { stdout } from "./output.js";

/**
 * qemu-img's progress display: "    (12.34/100%)" redrawn in place on stdout, a newline at the end.
 * It writes as the command's other output does (synchronously, as qemu-img's fflush): a disabled
 * display never touches process.stdout, whose stream machinery costs a command ~5 ms to load.
 */
export class Progress {
  private last = -1;
  constructor(
    private readonly enabled: boolean,
    private readonly out: (text: string) => void = stdout,
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
    this.out(`    (${printf2(percent)}/100%)\r`);
  }

  end(): void {
    if (!this.enabled) return;
    this.print(100);
    this.out("\n");
  }
}
