/*
 * Raw deflate and inflate of qcow2 clusters with the zlib that Node.js itself carries (Node
 * re-exports zlib's symbols for addons). Node's own zlib module allocates a stream, its state
 * and a result Buffer per call; a cluster at a time that is most of the cost and of the memory
 * (~270 KiB of deflate state per call, and garbage V8 collects late). Here each thread keeps
 * one stream and resets it, and results go into the caller's buffers.
 *
 * A separate addon from qcowkit_seek: where Node does not export zlib (some embedders), only
 * this one fails to load, and qcowkit falls back to Node's zlib module.
 */
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "args.h"

/* QEMU's parameters (qcow2_zlib_compress): raw stream, 4 KiB window, memLevel 9, level 6. */
#define WINDOW_BITS (-12)
#define MEM_LEVEL 9

static _Thread_local z_stream *deflater;
static _Thread_local z_stream *inflater;

static z_stream *thread_deflater(void) {
  if (deflater) return deflater;
  z_stream *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  if (deflateInit2(s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, WINDOW_BITS, MEM_LEVEL, Z_DEFAULT_STRATEGY) != Z_OK) {
    free(s);
    return NULL;
  }
  deflater = s;
  return s;
}

/* Deflates src into dst: the compressed length, 0 when it does not fit in dst, -1 on failure. */
static int64_t deflate_into(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  z_stream *s = thread_deflater();
  if (!s) return -1;
  if (deflateReset(s) != Z_OK) return -1;
  s->next_in = (Bytef *)src;
  s->avail_in = (uInt)src_len;
  s->next_out = dst;
  s->avail_out = (uInt)dst_len;
  int r = deflate(s, Z_FINISH);
  if (r == Z_STREAM_END) return (int64_t)s->total_out;
  return r == Z_OK || r == Z_BUF_ERROR ? 0 : -1;
}

/* deflate(src, dst) -> the compressed length in dst, or 0 when it does not fit. */
static napi_value Deflate(napi_env env, napi_callback_info info) {
  void *src, *dst;
  size_t src_len, dst_len;
  napi_value result;
  if (!get_two_buffers(env, info, "deflate(Uint8Array, Uint8Array)", &src, &src_len, &dst, &dst_len)) return NULL;
  int64_t n = deflate_into(src, src_len, dst, dst_len);
  if (n < 0) {
    napi_throw_error(env, NULL, "deflate failed (out of memory?)");
    return NULL;
  }
  napi_create_double(env, (double)n, &result);
  return result;
}

/*
 * inflate(src, dst) -> bytes written into dst: the raw stream in src inflated until dst is full,
 * src is used up or the stream ends (as QEMU's qcow2_zlib_decompress, which also accepts a
 * stream cut short); -1 where src is not deflate data.
 */
static napi_value Inflate(napi_env env, napi_callback_info info) {
  void *src, *dst;
  size_t src_len, dst_len;
  napi_value result;
  if (!get_two_buffers(env, info, "inflate(Uint8Array, Uint8Array)", &src, &src_len, &dst, &dst_len)) return NULL;
  if (!inflater) {
    z_stream *s = calloc(1, sizeof *s);
    if (!s || inflateInit2(s, -15) != Z_OK) {
      free(s);
      napi_throw_error(env, NULL, "inflate failed (out of memory?)");
      return NULL;
    }
    inflater = s;
  } else if (inflateReset(inflater) != Z_OK) {
    napi_throw_error(env, NULL, "inflate failed");
    return NULL;
  }
  z_stream *s = inflater;
  s->next_in = src;
  s->avail_in = (uInt)src_len;
  s->next_out = dst;
  s->avail_out = (uInt)dst_len;
  int r = inflate(s, Z_SYNC_FLUSH);
  bool ok = r == Z_OK || r == Z_STREAM_END || r == Z_BUF_ERROR;
  napi_create_double(env, ok ? (double)(dst_len - s->avail_out) : -1, &result);
  return result;
}

/* A chunk of whole clusters deflated on libuv's thread pool (deflateClusters). */
typedef struct {
  napi_async_work work;
  napi_ref src_ref, out_ref, sizes_ref;
  napi_deferred deferred;
  uint8_t *src, *out;
  size_t src_len, cluster;
  int32_t *sizes;
  bool failed;
} Chunk;

static void chunk_execute(napi_env env, void *data) {
  (void)env;
  Chunk *c = data;
  size_t at = 0;
  for (size_t i = 0, from = 0; from < c->src_len; i++, from += c->cluster) {
    c->sizes[i] = 0;
    if (c->src_len - from < c->cluster) continue;
    /* A result shorter than its cluster is all that is kept, so out (as long as src) holds them. */
    int64_t n = deflate_into(c->src + from, c->cluster, c->out + at, c->cluster - 1);
    if (n < 0) {
      c->failed = true;
      return;
    }
    c->sizes[i] = (int32_t)n;
    at += (size_t)n;
  }
}

static void chunk_complete(napi_env env, napi_status status, void *data) {
  Chunk *c = data;
  napi_value undefined, error, message;
  napi_get_undefined(env, &undefined);
  if (status != napi_ok || c->failed) {
    napi_create_string_utf8(env, "deflate failed (out of memory?)", NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, NULL, message, &error);
    napi_reject_deferred(env, c->deferred, error);
  } else {
    napi_resolve_deferred(env, c->deferred, undefined);
  }
  napi_delete_reference(env, c->src_ref);
  napi_delete_reference(env, c->out_ref);
  napi_delete_reference(env, c->sizes_ref);
  napi_delete_async_work(env, c->work);
  free(c);
}

/*
 * deflateClusters(src, clusterSize, out, sizes) -> Promise<void>, on the thread pool: each whole
 * cluster of src deflated; the results back to back in out (as long as src), sizes[i] the
 * length of cluster i's (an Int32Array), 0 where it does not shrink or is not whole. The
 * buffers must not be touched until the promise settles.
 */
static napi_value DeflateClusters(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], promise, name;
  void *src, *out, *sizes;
  size_t src_len, out_len, sizes_len;
  uint32_t cluster;
  bool is_typedarray = false;
  napi_typedarray_type type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 4 ||
      !get_bytes(env, argv[0], &src, &src_len) || napi_get_value_uint32(env, argv[1], &cluster) != napi_ok ||
      cluster < 2 || !get_bytes(env, argv[2], &out, &out_len) || out_len < src_len ||
      napi_is_typedarray(env, argv[3], &is_typedarray) != napi_ok || !is_typedarray ||
      napi_get_typedarray_info(env, argv[3], &type, &sizes_len, &sizes, NULL, NULL) != napi_ok ||
      type != napi_int32_array || sizes_len < (src_len + cluster - 1) / cluster) {
    napi_throw_type_error(env, NULL, "deflateClusters(Uint8Array, clusterSize, Uint8Array, Int32Array)");
    return NULL;
  }
  Chunk *c = calloc(1, sizeof *c);
  if (!c) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  c->src = src;
  c->src_len = src_len;
  c->out = out;
  c->cluster = cluster;
  c->sizes = sizes;
  napi_create_reference(env, argv[0], 1, &c->src_ref);
  napi_create_reference(env, argv[2], 1, &c->out_ref);
  napi_create_reference(env, argv[3], 1, &c->sizes_ref);
  napi_create_promise(env, &c->deferred, &promise);
  napi_create_string_utf8(env, "qcowkit:deflate", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, chunk_execute, chunk_complete, c, &c->work);
  napi_queue_async_work(env, c->work);
  return promise;
}

NAPI_MODULE_INIT() {
  napi_property_descriptor functions[] = {
    EXPORT_FUNCTION("deflate", Deflate),
    EXPORT_FUNCTION("inflate", Inflate),
    EXPORT_FUNCTION("deflateClusters", DeflateClusters),
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
  return exports;
}
