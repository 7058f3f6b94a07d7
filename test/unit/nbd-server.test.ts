/**
 * The NBD server (src/nbd) against a small client written from doc/proto.md, over a Unix socket,
 * serving images held in memory: the handshake, option replies, transmission, structured replies
 * with holes, block status, and the refusals the protocol asks for.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { nodeCodecs } from "../../src/codec/node.js";
import { Qcow2Image } from "../../src/image/qcow2.js";
import { pageCacheVisible } from "../../src/io/file.js";
import * as P from "../../src/nbd/protocol.js";
import { NbdServer } from "../../src/nbd/server.js";
import { FileStorage } from "../../src/node.js";
import { buildImage, type ClusterSpec, pattern } from "./build-image.js";

const dir = mkdtempSync(join(tmpdir(), "qcowkit-nbd-"));
after(() => rmSync(dir, { recursive: true, force: true }));
let sockets = 0;

const CS = 4096;
function image(readOnly: boolean): Promise<Qcow2Image> {
  const clusters: ClusterSpec[] = [
    { guestCluster: 0, kind: "data", data: pattern(CS, 1) },
    { guestCluster: 1, kind: "zero" },
    { guestCluster: 4, kind: "data", data: pattern(CS, 4) },
  ];
  const built = buildImage({ size: 1024 * 1024, clusterBits: 12, clusters });
  return Qcow2Image.open(built.storage(), { readOnly, codecs: nodeCodecs });
}

/** A byte-exact client: reads what it is told to, writes raw bytes. */
class Client {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on("data", (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on("close", () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
  }
  static connect(path: string): Promise<Client> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new Client(s)));
      s.once("error", reject);
    });
  }
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed (wanted ${n} bytes, have ${this.buf.length})`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  async closedByServer(): Promise<boolean> {
    while (!this.closed) await new Promise<void>((r) => this.waiters.push(r));
    return true;
  }
  send(b: Buffer): void {
    this.socket.write(b);
  }
  option(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(P.IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.send(Buffer.concat([h, data]));
  }
  async reply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), P.OPTION_REPLY_MAGIC);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(h.readUInt32BE(16)) };
  }
  request(type: number, handle: number, offset: number, length: number, flags = 0, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(P.REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(handle), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.send(payload ? Buffer.concat([h, payload]) : h);
  }
  async simple(): Promise<{ error: number; handle: number }> {
    const h = await this.read(16);
    assert.equal(h.readUInt32BE(0), P.SIMPLE_REPLY_MAGIC);
    return { error: h.readUInt32BE(4), handle: Number(h.readBigUInt64BE(8)) };
  }
  async chunk(): Promise<{ flags: number; type: number; handle: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readUInt32BE(0), P.STRUCTURED_REPLY_MAGIC);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      handle: Number(h.readBigUInt64BE(8)),
      data: await this.read(h.readUInt32BE(16)),
    };
  }
}

async function serve(readOnly = false, shared = 1): Promise<{ path: string; server: NbdServer; img: Qcow2Image }> {
  const img = await image(readOnly);
  const server = new NbdServer({
    export: { name: "disk", description: "test disk", device: img, readOnly, fastZero: true, multiConn: shared > 1 },
    shared,
  });
  const path = join(dir, `s${sockets++}.sock`);
  await server.listen({ path });
  return { path, server, img };
}

/** Handshake, optional structured replies and meta contexts, then GO. Returns the flags. */
async function go(c: Client, structured: boolean, contexts: string[] = []): Promise<{ size: number; flags: number }> {
  const greet = await c.read(18);
  assert.equal(greet.readBigUInt64BE(0), P.NBDMAGIC);
  assert.equal(greet.readBigUInt64BE(8), P.IHAVEOPT);
  c.send(Buffer.from([0, 0, 0, 3]));
  if (structured) {
    c.option(P.OPT_STRUCTURED_REPLY);
    assert.equal((await c.reply()).type, P.REP_ACK);
  }
  if (contexts.length > 0) {
    const q = contexts.map((s) => Buffer.concat([u32(Buffer.byteLength(s)), Buffer.from(s)]));
    c.option(P.OPT_SET_META_CONTEXT, Buffer.concat([u32(4), Buffer.from("disk"), u32(contexts.length), ...q]));
    for (;;) {
      const r = await c.reply();
      if (r.type === P.REP_ACK) break;
      assert.equal(r.type, P.REP_META_CONTEXT);
    }
  }
  c.option(P.OPT_GO, Buffer.concat([u32(4), Buffer.from("disk"), Buffer.from([0, 0])]));
  let size = -1;
  let flags = -1;
  for (;;) {
    const r = await c.reply();
    if (r.type === P.REP_ACK) break;
    assert.equal(r.type, P.REP_INFO);
    if (r.data.readUInt16BE(0) === P.INFO_EXPORT) {
      size = Number(r.data.readBigUInt64BE(2));
      flags = r.data.readUInt16BE(10);
    }
  }
  return { size, flags };
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v, 0);
  return b;
}

test("handshake, LIST, INFO with name and description, unknown options and exports", async () => {
  const { path, server } = await serve(true);
  const c = await Client.connect(path);
  await c.read(18);
  c.send(Buffer.from([0, 0, 0, 3]));
  c.option(P.OPT_LIST);
  let r = await c.reply();
  assert.equal(r.type, P.REP_SERVER);
  assert.equal(r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString(), "disk");
  assert.equal((await c.reply()).type, P.REP_ACK);
  c.option(99);
  assert.equal((await c.reply()).type, P.REP_ERR_UNSUP);
  c.option(P.OPT_INFO, Buffer.concat([u32(4), Buffer.from("nope"), Buffer.from([0, 0])]));
  assert.equal((await c.reply()).type, P.REP_ERR_UNKNOWN);
  c.option(P.OPT_INFO, Buffer.concat([u32(4), Buffer.from("disk"), Buffer.from([0, 2, 0, 1, 0, 2])]));
  const infos = new Map<number, Buffer>();
  for (;;) {
    r = await c.reply();
    if (r.type === P.REP_ACK) break;
    infos.set(r.data.readUInt16BE(0), r.data.subarray(2));
  }
  assert.equal(infos.get(P.INFO_NAME)?.toString(), "disk");
  assert.equal(infos.get(P.INFO_DESCRIPTION)?.toString(), "test disk");
  const exp = infos.get(P.INFO_EXPORT) as Buffer;
  assert.equal(Number(exp.readBigUInt64BE(0)), 1024 * 1024);
  assert.ok(exp.readUInt16BE(8) & P.FLAG_READ_ONLY);
  assert.ok(!(exp.readUInt16BE(8) & P.FLAG_CAN_MULTI_CONN));
  const bs = infos.get(P.INFO_BLOCK_SIZE) as Buffer;
  assert.deepEqual([bs.readUInt32BE(0), bs.readUInt32BE(4), bs.readUInt32BE(8)], [1, 4096, 32 * 1024 * 1024]);
  // SET_META_CONTEXT before structured replies is invalid; malformed INFO too.
  c.option(P.OPT_SET_META_CONTEXT, Buffer.concat([u32(4), Buffer.from("disk"), u32(0)]));
  assert.equal((await c.reply()).type, P.REP_ERR_INVALID);
  c.option(P.OPT_INFO, Buffer.from([0, 0, 0, 9]));
  assert.equal((await c.reply()).type, P.REP_ERR_INVALID);
  c.option(P.OPT_ABORT);
  assert.equal((await c.reply()).type, P.REP_ACK);
  assert.ok(await c.closedByServer());
  await server.close();
});

test("simple replies: read, write, flush, errors for bad requests; the image holds the writes", async () => {
  const { path, server, img } = await serve(false);
  const c = await Client.connect(path);
  const { size, flags } = await go(c, false);
  assert.equal(size, 1024 * 1024);
  assert.ok(flags & P.FLAG_SEND_TRIM && flags & P.FLAG_SEND_WRITE_ZEROES && !(flags & P.FLAG_READ_ONLY));
  c.request(P.CMD_READ, 1, 0, 8192);
  const r = await c.simple();
  assert.deepEqual(r, { error: 0, handle: 1 });
  const data = await c.read(8192);
  assert.deepEqual(data.subarray(0, CS), Buffer.from(pattern(CS, 1)));
  assert.ok(data.subarray(CS).every((x) => x === 0));
  const payload = Buffer.alloc(1000, 0xab);
  c.request(P.CMD_WRITE, 2, 5000, payload.length, P.CMD_FLAG_FUA, payload);
  assert.deepEqual(await c.simple(), { error: 0, handle: 2 });
  c.request(P.CMD_READ, 3, 1024 * 1024 - 10, 11);
  assert.deepEqual(await c.simple(), { error: P.EINVAL, handle: 3 });
  c.request(P.CMD_WRITE, 4, 1024 * 1024 - 1, 2, 0, Buffer.alloc(2));
  assert.deepEqual(await c.simple(), { error: P.ENOSPC, handle: 4 });
  c.request(P.CMD_BLOCK_STATUS, 5, 0, 4096);
  assert.deepEqual(await c.simple(), { error: P.EINVAL, handle: 5 }); // no context negotiated
  c.request(42, 6, 0, 0);
  assert.deepEqual(await c.simple(), { error: P.EINVAL, handle: 6 });
  c.request(P.CMD_FLUSH, 7, 0, 0);
  assert.deepEqual(await c.simple(), { error: 0, handle: 7 });
  c.request(P.CMD_DISC, 8, 0, 0);
  assert.ok(await c.closedByServer());
  const back = new Uint8Array(1000);
  await img.read(back, 5000);
  assert.ok(back.every((x) => x === 0xab));
  await server.close();
});

test("structured replies: holes in reads, block status of both contexts, read-only refusals", async () => {
  const { path, server } = await serve(true);
  const c = await Client.connect(path);
  const { flags } = await go(c, true, ["base:allocation", "qemu:allocation-depth"]);
  assert.ok(flags & P.FLAG_SEND_DF);
  c.request(P.CMD_READ, 1, 0, 3 * CS);
  const a = await c.chunk();
  assert.equal(a.type, P.REPLY_TYPE_OFFSET_DATA);
  assert.equal(Number(a.data.readBigUInt64BE(0)), 0);
  assert.deepEqual(a.data.subarray(8), Buffer.from(pattern(CS, 1)));
  const b = await c.chunk();
  assert.equal(b.type, P.REPLY_TYPE_OFFSET_HOLE);
  assert.deepEqual([Number(b.data.readBigUInt64BE(0)), b.data.readUInt32BE(8)], [CS, 2 * CS]);
  assert.equal(b.flags & P.REPLY_FLAG_DONE, P.REPLY_FLAG_DONE);
  // DF: one data chunk.
  c.request(P.CMD_READ, 2, 0, 3 * CS, P.CMD_FLAG_DF);
  const df = await c.chunk();
  assert.equal(df.type, P.REPLY_TYPE_OFFSET_DATA);
  assert.equal(df.data.length, 8 + 3 * CS);
  assert.equal(df.flags, P.REPLY_FLAG_DONE);
  c.request(P.CMD_BLOCK_STATUS, 3, 0, 8 * CS);
  const statuses = new Map<number, number[][]>();
  for (;;) {
    const ch = await c.chunk();
    assert.equal(ch.type, P.REPLY_TYPE_BLOCK_STATUS);
    const d: number[][] = [];
    for (let i = 4; i < ch.data.length; i += 8) d.push([ch.data.readUInt32BE(i), ch.data.readUInt32BE(i + 4)]);
    statuses.set(ch.data.readUInt32BE(0), d);
    if (ch.flags & P.REPLY_FLAG_DONE) break;
  }
  const [base, depth] = [...statuses.values()];
  assert.deepEqual(base, [
    [CS, 0],
    [3 * CS, P.STATE_HOLE | P.STATE_ZERO],
    [CS, 0],
    [3 * CS, P.STATE_HOLE | P.STATE_ZERO],
  ]);
  assert.deepEqual(depth, [
    [2 * CS, 1], // data, then the zero cluster: both in this image
    [2 * CS, 0],
    [CS, 1],
    [3 * CS, 0],
  ]);
  c.request(P.CMD_BLOCK_STATUS, 4, 0, 8 * CS, P.CMD_FLAG_REQ_ONE);
  for (;;) {
    const ch = await c.chunk();
    assert.equal(ch.data.length, 12);
    if (ch.flags & P.REPLY_FLAG_DONE) break;
  }
  c.request(P.CMD_WRITE, 5, 0, 4, 0, Buffer.alloc(4));
  const w = await c.chunk();
  assert.equal(w.type, P.REPLY_TYPE_ERROR);
  assert.equal(w.data.readUInt32BE(0), P.EPERM);
  c.request(P.CMD_TRIM, 6, 0, 4096);
  assert.equal((await c.chunk()).data.readUInt32BE(0), P.EPERM);
  c.socket.end();
  await server.close();
});

test("pipelined requests all get answered; a bad request magic ends the connection", async () => {
  const { path, server } = await serve(false, 2);
  const c = await Client.connect(path);
  const { flags } = await go(c, false);
  assert.ok(flags & P.FLAG_CAN_MULTI_CONN);
  for (let i = 0; i < 200; i++) c.request(P.CMD_WRITE, i, (i % 64) * 512, 512, 0, Buffer.alloc(512, i));
  const seen = new Set<number>();
  for (let i = 0; i < 200; i++) {
    const r = await c.simple();
    assert.equal(r.error, 0);
    seen.add(r.handle);
  }
  assert.equal(seen.size, 200);
  c.send(Buffer.alloc(28, 0xff));
  assert.ok(await c.closedByServer());
  // The server still takes new clients.
  const d = await Client.connect(path);
  await go(d, false);
  d.request(P.CMD_READ, 1, 0, 512);
  assert.equal((await d.simple()).error, 0);
  await d.read(512);
  d.socket.end();
  await server.close();
});

test("a client beyond --shared waits until a place is free", async () => {
  const { path, server } = await serve(true, 1);
  const first = await Client.connect(path);
  await go(first, false);
  const second = await Client.connect(path);
  const greeted = second.read(18).then(() => true);
  const early = await Promise.race([greeted, new Promise((r) => setTimeout(() => r(false), 200))]);
  assert.equal(early, false);
  first.request(P.CMD_DISC, 1, 0, 0);
  assert.equal(await greeted, true);
  second.socket.end();
  await server.close();
});

test("reads from a local file go from the page cache straight to the socket, intact and whole beside the others", {
  timeout: 60_000,
}, async () => {
  // 4 MiB of data clusters in a file (in the page cache: just written), a zero cluster among
  // them. Requests of data alone are sent with sendfile() where the socket is free; with the
  // client not reading, the socket fills, a reply goes out in part and the rest is queued, and the
  // replies behind it are copied. Every reply must arrive whole, as the image holds it.
  const cs = 64 * 1024;
  const clusters: ClusterSpec[] = [];
  for (let g = 0; g < 64; g++)
    clusters.push(
      g === 40 ? { guestCluster: g, kind: "zero" } : { guestCluster: g, kind: "data", data: pattern(cs, g) },
    );
  const built = buildImage({ size: 8 * 1024 * 1024, clusterBits: 16, clusters });
  const file = join(dir, "file.qcow2");
  writeFileSync(file, built.bytes);
  const img = await Qcow2Image.open(await FileStorage.open(file), { readOnly: true });
  const guest = Buffer.alloc(64 * cs);
  await img.read(guest, 0);
  let fast = 0;
  let partial = 0;
  const send = img.sendCached.bind(img);
  img.sendCached = (socket, header, offset, length) => {
    const rest = send(socket, header, offset, length);
    if (rest !== undefined) fast++;
    if (rest !== undefined && rest.length > 0) partial++;
    return rest;
  };
  const server = new NbdServer({
    export: { name: "disk", description: "", device: img, readOnly: true, fastZero: false, multiConn: false },
    shared: 1,
  });
  const path = join(dir, `s${sockets++}.sock`);
  await server.listen({ path });
  const c = await Client.connect(path);
  await go(c, true);
  c.socket.pause();
  // 256 KiB reads of all the data, eight times over (32 MiB of replies: more than the socket
  // holds), and reads across the zero cluster.
  const reads = new Map<number, [number, number]>();
  let handle = 1;
  for (let round = 0; round < 8; round++) {
    for (let at = 0; at < 64 * cs; at += 4 * cs) reads.set(handle++, [at, 4 * cs]);
    reads.set(handle++, [39 * cs + 100, 2 * cs]);
  }
  for (const [h, [offset, length]] of reads) c.request(P.CMD_READ, h, offset, length);
  await new Promise((r) => setTimeout(r, 100));
  c.socket.resume();
  const got = new Map<number, Buffer>();
  const started = new Map<number, Buffer>();
  while (got.size < reads.size) {
    const ch = await c.chunk();
    const [offset, length] = reads.get(ch.handle) ?? assert.fail(`unknown handle ${ch.handle}`);
    assert.ok(!got.has(ch.handle), `a chunk after the last of reply ${ch.handle}`);
    const into = started.get(ch.handle) ?? Buffer.alloc(length, 0xee);
    started.set(ch.handle, into);
    const at = Number(ch.data.readBigUInt64BE(0)) - offset;
    if (ch.type === P.REPLY_TYPE_OFFSET_DATA) ch.data.copy(into, at, 8);
    else if (ch.type === P.REPLY_TYPE_OFFSET_HOLE) into.fill(0, at, at + ch.data.readUInt32BE(8));
    else assert.fail(`reply type ${ch.type}`);
    if (ch.flags & P.REPLY_FLAG_DONE) got.set(ch.handle, into);
  }
  for (const [h, [offset, length]] of reads) {
    assert.ok(got.get(h)?.equals(guest.subarray(offset, offset + length)), `reply ${h} (${offset}+${length})`);
  }
  if (pageCacheVisible()) {
    assert.ok(fast > 0, "no reply went from the page cache");
    assert.ok(partial > 0, "the socket never filled");
  } else {
    // A kernel that cannot tell what is cached (before Linux 6.5): every reply is copied.
    assert.equal(fast, 0);
  }
  c.socket.end();
  await server.close();
  await img.close();
});
