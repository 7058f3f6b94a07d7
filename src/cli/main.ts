/** The qcowkit command: qemu-img's subcommands, flags, output and exit codes. */
import { parseArgs } from "node:util";
import { QcowError } from "../errors.js";
import { tuneMalloc } from "../io/file.js";
import { commands, usage } from "./commands.js";
import { ExitError } from "./exit.js";
import { stdout } from "./output.js";

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "-h" || name === "--help" || name === "help") {
    stdout(usage());
    return name === undefined ? 1 : 0;
  }
  if (name === "-V" || name === "--version") {
    stdout("qcowkit version 0.1.0\n");
    return 0;
  }
  const cmd = commands.find((c) => c.name === name);
  if (!cmd) throw new ExitError(`Command not found: ${name}`);
  // Buffers from 128 KiB (glibc's first threshold) up go back to the system when freed, instead
  // of into malloc's heap once a larger one has been freed: 13-19 MiB off the peak of converting
  // a compressed image, 4-8 MiB off a qcow2 -> raw convert, no change in time (see tuneMalloc).
  tuneMalloc({ mmapThreshold: 128 * 1024 });
  if (rest.includes("-h") || rest.includes("--help")) {
    stdout(`usage: ${cmd.synopsis}\n\n${cmd.help}\n`);
    return 0;
  }
  const operands = cmd.takeOperands?.(rest) ?? [];
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({ args: rest, options: cmd.options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new ExitError(
      `${(e as Error).message.split(". To specify")[0]}\nTry 'qcowkit ${name} --help' for more information`,
    );
  }
  return cmd.run(
    parsed.values as Record<string, string | boolean | string[] | undefined>,
    [...parsed.positionals, ...operands],
    rest,
  );
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (process.env.QCOWKIT_DEBUG === "1") console.error(e);
    const message = e instanceof Error ? e.message : String(e);
    process.stderr.write(`qcowkit: ${message}\n`);
    process.exitCode = e instanceof ExitError ? e.status : 1;
    if (!(e instanceof QcowError) && !(e instanceof ExitError) && process.env.QCOWKIT_DEBUG !== "1") {
      process.stderr.write("qcowkit: (internal error; run with QCOWKIT_DEBUG=1 for details)\n");
    }
  },
);
