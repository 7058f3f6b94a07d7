/**
 * The LUKS1 header that qcow2's LUKS encryption keeps in the image (docs/interop/qcow2.rst,
 * "Full disk encryption header pointer"): decoded only to describe it, as qemu-img info does.
 * qcowkit never decrypts.
 */
import { corrupt } from "../errors.js";
import { textDecoder, view } from "./bytes.js";

export const LUKS_HEADER_BYTES = 592;
const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const SLOT_ACTIVE = 0x00ac71f3;

export interface LuksSlot {
  active: boolean;
  iterations: number;
  keyOffset: number;
  stripes: number;
}

export interface LuksHeader {
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  payloadOffset: number;
  keyBytes: number;
  masterKeyIterations: number;
  uuid: string;
  slots: LuksSlot[];
}

function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return textDecoder.decode(nul < 0 ? b : b.subarray(0, nul));
}

export function decodeLuksHeader(buf: Uint8Array): LuksHeader {
  if (buf.length < LUKS_HEADER_BYTES || LUKS_MAGIC.some((m, i) => buf[i] !== m)) {
    throw corrupt("LUKS header not found where the full disk encryption header extension points");
  }
  const dv = view(buf);
  if (dv.getUint16(6) !== 1) throw corrupt(`Unsupported LUKS version ${dv.getUint16(6)}`);
  const slots: LuksSlot[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 208 + i * 48;
    slots.push({
      active: dv.getUint32(at) === SLOT_ACTIVE,
      iterations: dv.getUint32(at + 4),
      keyOffset: dv.getUint32(at + 40) * 512,
      stripes: dv.getUint32(at + 44),
    });
  }
  return {
    cipherName: cString(buf.subarray(8, 40)),
    cipherMode: cString(buf.subarray(40, 72)),
    hashSpec: cString(buf.subarray(72, 104)),
    payloadOffset: dv.getUint32(104) * 512,
    keyBytes: dv.getUint32(108),
    masterKeyIterations: dv.getUint32(164),
    uuid: cString(buf.subarray(168, 208)),
    slots,
  };
}

/** QEMU's description of the header (QCryptoBlockInfoLUKS), keys in QAPI's field order. */
export function describeLuks(h: LuksHeader): Record<string, unknown> {
  const [mode, ivgenSpec = ""] = h.cipherMode.split("-");
  const [ivgen, ivgenHash] = ivgenSpec.split(":");
  // XTS splits the key in two halves: AES-256-XTS has a 64-byte key.
  const keyBits = ((mode === "xts" ? h.keyBytes / 2 : h.keyBytes) * 8) | 0;
  const info: Record<string, unknown> = {
    "cipher-alg": `${h.cipherName}-${keyBits}`,
    "cipher-mode": mode,
    "ivgen-alg": ivgen,
  };
  if (ivgenHash) info["ivgen-hash-alg"] = ivgenHash;
  info["hash-alg"] = h.hashSpec;
  info["payload-offset"] = h.payloadOffset;
  info["master-key-iters"] = h.masterKeyIterations;
  info.uuid = h.uuid;
  info.slots = h.slots.map((s) =>
    s.active
      ? { active: true, iters: s.iterations, stripes: s.stripes, "key-offset": s.keyOffset }
      : { active: false, "key-offset": s.keyOffset },
  );
  return info;
}
