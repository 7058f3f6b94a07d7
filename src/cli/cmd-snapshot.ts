/** `qcowkit snapshot`: qemu-img snapshot's actions, messages and exit codes. */
import { QcowError } from "../errors.js";
import { textEncoder } from "../format/bytes.js";
import type { Image } from "../image/open.js";
import { applySnapshot, createSnapshot, deleteSnapshot, SnapshotError } from "../image/snapshots.js";
import { openImageFile } from "../node.js";
import { snapshotInfo } from "../ops/info.js";
import type { Command } from "./commands.js";
import { ExitError, formatOption } from "./exit.js";
import { snapshotRow } from "./human.js";
import { stdout } from "./output.js";

/** qemu-img keeps a snapshot name in a 256-byte buffer (QEMUSnapshotInfo.name): 255 bytes. */
const MAX_NAME_BYTES = 255;

const STRERROR: Record<number, string> = {
  2: "No such file or directory",
  5: "Input/output error",
  11: "Resource temporarily unavailable",
  16: "Device or resource busy",
  17: "File exists",
  22: "Invalid argument",
  27: "File too large",
  30: "Read-only file system",
  95: "Operation not supported",
};

/** The errno QEMU would return for an error (qemu-img prints it for a failed create). */
function errnoOf(e: unknown): number {
  if (e instanceof SnapshotError) return e.errno;
  if (e instanceof QcowError) {
    return { "not-found": 2, unsupported: 95, "invalid-argument": 22, "read-only": 30 }[e.code as string] ?? 5;
  }
  return 5;
}

/** Cuts a name to qemu-img's 255 bytes, at a character boundary. */
function truncateName(name: string): string {
  let out = name;
  while (textEncoder.encode(out).length > MAX_NAME_BYTES) out = out.slice(0, -1);
  return out;
}

type Action = { kind: "list" } | { kind: "create" | "apply" | "delete"; name: string };

function action(v: Record<string, unknown>): Action | undefined {
  const found: Action[] = [];
  for (const _ of (v.l as boolean[] | undefined) ?? []) found.push({ kind: "list" });
  for (const name of (v.c as string[] | undefined) ?? []) found.push({ kind: "create", name });
  for (const name of (v.a as string[] | undefined) ?? []) found.push({ kind: "apply", name });
  for (const name of (v.d as string[] | undefined) ?? []) found.push({ kind: "delete", name });
  if (found.length > 1) {
    throw new ExitError("Cannot mix '-l', '-a', '-c', '-d'\nTry 'qcowkit snapshot --help' for more information");
  }
  return found[0];
}

export const snapshotCommand: Command = {
  name: "snapshot",
  synopsis: "qcowkit snapshot [-l | -c NAME | -a SNAPSHOT | -d NAME] [-f FMT] [-q] [-U] FILE",
  help: [
    "Lists, creates, applies or deletes internal snapshots of a qcow2 image (as qemu-img snapshot).",
    "  -l           list the snapshots (the table qemu-img snapshot -l prints)",
    "  -c NAME      create a snapshot of the current contents (id: the next free number)",
    "  -a SNAPSHOT  apply a snapshot (by id, else by name): the image reverts to it, size included",
    "  -d NAME      delete the snapshot with this name",
    "  -f FMT       image format (qcow2 or raw; qemu-img 7.2 has no -f here)",
    "  -q           quiet (nothing is printed on success anyway)",
    "  -U           force share (only with -l)",
  ].join("\n"),
  options: {
    l: { type: "boolean", short: "l", multiple: true },
    c: { type: "string", short: "c", multiple: true },
    a: { type: "string", short: "a", multiple: true },
    d: { type: "string", short: "d", multiple: true },
    f: { type: "string", short: "f" },
    q: { type: "boolean", short: "q" },
    U: { type: "boolean", short: "U" },
    "force-share": { type: "boolean" },
  },
  async run(v, p) {
    const act = action(v);
    if (p.length !== 1)
      throw new ExitError("Expecting one image file name\nTry 'qcowkit snapshot --help' for more information");
    const file = p[0];
    const format = formatOption(v.f as string | undefined);
    const writes = act !== undefined && act.kind !== "list";
    if (writes && (v.U || v["force-share"])) {
      throw new ExitError(`Could not open '${file}': force-share=on can only be used with read-only images`);
    }
    const img: Image = await openImageFile(file, {
      format,
      readOnly: !writes,
      forceShare: v.U === true || v["force-share"] === true,
    });
    let closed = false;
    try {
      if (act === undefined) return 0;
      if (act.kind === "list") {
        if (img.format === "qcow2" && img.snapshots.length > 0) {
          const rows = img.snapshots.map((s) => `${snapshotRow(snapshotInfo(s))}\n`);
          stdout(`Snapshot list:\n${snapshotRow()}\n${rows.join("")}`);
        }
        return 0;
      }
      if (act.kind === "create") {
        try {
          if (img.format !== "qcow2") throw new SnapshotError("unsupported", "raw images have no snapshots", 95);
          await createSnapshot(img, truncateName(act.name));
        } catch (e) {
          const errno = errnoOf(e);
          throw new ExitError(
            `Could not create snapshot '${act.name}': -${errno} (${STRERROR[errno] ?? "Unknown error"})`,
          );
        }
      } else if (act.kind === "apply") {
        if (img.format !== "qcow2") {
          throw new ExitError(`Could not apply snapshot '${act.name}': Block driver does not support snapshots`);
        }
        try {
          await applySnapshot(img, act.name);
        } catch (e) {
          const reason =
            e instanceof QcowError && e.code === "not-found"
              ? "Failed to load snapshot: No such file or directory"
              : (e as Error).message;
          throw new ExitError(`Could not apply snapshot '${act.name}': ${reason}`);
        }
      } else {
        // qemu-img finds the snapshot to delete by name only (bdrv_snapshot_find).
        if (img.format !== "qcow2" || !img.snapshots.some((s) => s.name === act.name)) {
          throw new ExitError(`Could not delete snapshot '${act.name}': snapshot not found`);
        }
        try {
          await deleteSnapshot(img, { name: act.name });
        } catch (e) {
          throw new ExitError(`Could not delete snapshot '${act.name}': ${(e as Error).message}`);
        }
      }
      await img.close();
      closed = true;
      return 0;
    } finally {
      if (!closed) await img.close().catch(() => {});
    }
  },
};
