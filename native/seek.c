/*
 * What Node.js has no binding for, and QEMU's file-posix driver uses:
 *  - lseek(SEEK_DATA / SEEK_HOLE), the only way to tell a file's holes from its data;
 *  - open file description byte-range locks (F_OFD_SETLK / F_OFD_GETLK), on which QEMU's image
 *    locking rests, so that qcowkit and QEMU see each other's locks;
 *  - preadv2(RWF_NOWAIT): a read served from the page cache without a trip through libuv's
 *    thread pool, which costs more than the copy itself for data already in memory;
 *  - fallocate(): space for new clusters reserved before their data is written, as QEMU does;
 *  - where a buffer's bytes lie in memory, so that I/O buffers can start on a page as QEMU's do
 *    (the kernel copies into and out of a buffer 16 bytes off a cache line ~25 % slower);
 *  - two of glibc's malloc settings (see MallocOption).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <node_api.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "args.h"

/* seek(fd, offset, whence) -> offset, or -1 when there is no data/hole at or after offset (ENXIO). */
static napi_value Seek(napi_env env, napi_callback_info info) {
  double a[3];
  napi_value result;
  if (!get_numbers(env, info, "seek(fd, offset, 0 for data | 1 for hole)", 3, a)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], a[2] == 0 ? SEEK_DATA : SEEK_HOLE);
  if (r < 0) {
    if (errno == ENXIO) {
      napi_create_double(env, -1, &result);
      return result;
    }
    napi_throw_error(env, NULL, strerror(errno));
    return NULL;
  }
  napi_create_double(env, (double)r, &result);
  return result;
}

/*
 * lock(fd, start, len, op) -> 0 or errno. op: 0 unlock, 1 shared lock, 2 exclusive lock,
 * 3 test for a shared lock, 4 test for an exclusive lock (EAGAIN when another open file
 * description holds a conflicting lock). Never blocks.
 */
static napi_value Lock(napi_env env, napi_callback_info info) {
  const char *usage = "lock(fd, start, len, 0 unlock | 1 shared | 2 exclusive | 3 test shared | 4 test exclusive)";
  double a[4];
  napi_value result;
  if (!get_numbers(env, info, usage, 4, a)) return NULL;
  int fd = (int)a[0], op = (int)a[3];
  if (a[3] != op || op < 0 || op > 4) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)a[1];
  fl.l_len = (off_t)a[2];
  fl.l_type = op == 0 ? F_UNLCK : (op == 1 || op == 3) ? F_RDLCK : F_WRLCK;
  int err = 0;
  if (fcntl(fd, op >= 3 ? F_OFD_GETLK : F_OFD_SETLK, &fl) == -1) {
    err = errno;
  } else if (op >= 3 && fl.l_type != F_UNLCK) {
    err = EAGAIN;
  }
  napi_create_int32(env, err, &result);
  return result;
}

/*
 * readCached(fd, view, offset) -> bytes read from the page cache into the Uint8Array `view`
 * (fewer than asked when only part is cached; 0 at the end of the file), or -1 when nothing
 * could be read without waiting for the disk, or the read failed, or the kernel has no
 * RWF_NOWAIT: the caller then reads the usual way, which also reports any error.
 */
static napi_value ReadCached(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd;
  double offset;
  size_t length;
  void *data;
  napi_value result;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || !get_bytes(env, argv[1], &data, &length) ||
      napi_get_value_double(env, argv[2], &offset) != napi_ok) {
    napi_throw_type_error(env, NULL, "readCached(fd, Uint8Array, offset)");
    return NULL;
  }
  ssize_t n = -1;
#ifdef RWF_NOWAIT
  struct iovec iov = {data, length};
  do {
    n = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
#endif
  napi_create_double(env, n < 0 ? -1 : (double)n, &result);
  return result;
}

/*
 * allocate(fd, offset, length) -> 0 or errno: fallocate(fd, 0, offset, length), which gives the
 * range blocks (unwritten extents, reading as zeros) and grows the file to cover it. Writing
 * into allocated blocks costs the file system less than allocating them block by block during
 * the write (ext4's delayed allocation). EOPNOTSUPP where the file system cannot.
 */
static int allocate_range(int fd, off_t offset, off_t length) {
  while (fallocate(fd, 0, offset, length) == -1) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

static napi_value Allocate(napi_env env, napi_callback_info info) {
  double a[3];
  napi_value result;
  if (!get_numbers(env, info, "allocate(fd, offset, length)", 3, a)) return NULL;
  napi_create_int32(env, allocate_range((int)a[0], (off_t)a[1], (off_t)a[2]), &result);
  return result;
}

/* pageOffset(Uint8Array) -> where its first byte lies within a 4096-byte page. */
static napi_value PageOffset(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  size_t length;
  void *data;
  napi_value result;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 1 ||
      !get_bytes(env, argv[0], &data, &length)) {
    napi_throw_type_error(env, NULL, "pageOffset(Uint8Array)");
    return NULL;
  }
  napi_create_int32(env, (int32_t)((uintptr_t)data & 4095), &result);
  return result;
}

/*
 * mallocOption(name, value) -> true when glibc took it (mallopt); false without glibc. For a
 * process that runs long or moves much data, on two of glibc's habits:
 *  - "arenaMax": glibc gives each thread that allocates its own malloc arena, up to eight per
 *    core, and keeps what a thread freed in its arena for it. V8's compiler threads allocate
 *    megabytes for a large compile, which then stay in the process's peak. With a limit, threads
 *    that have no arena yet share the existing ones.
 *  - "mmapThreshold": blocks from this size up are mapped on their own and unmapped when freed.
 *    By default glibc raises the threshold to the largest mapped block freed so far (up to
 *    32 MiB), after which blocks of megabytes come from the heap and what is freed there stays
 *    in the process's peak. Setting it stops the rise.
 */
static napi_value MallocOption(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  char name[16];
  int32_t value;
  napi_value result;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 2 ||
      napi_get_value_string_utf8(env, argv[0], name, sizeof name, NULL) != napi_ok ||
      napi_get_value_int32(env, argv[1], &value) != napi_ok || value < 1 ||
      (strcmp(name, "arenaMax") != 0 && strcmp(name, "mmapThreshold") != 0)) {
    napi_throw_type_error(env, NULL, "mallocOption(\"arenaMax\" | \"mmapThreshold\", value >= 1)");
    return NULL;
  }
  bool ok = false;
#if defined(__GLIBC__) && defined(M_ARENA_MAX) && defined(M_MMAP_THRESHOLD)
  ok = mallopt(strcmp(name, "arenaMax") == 0 ? M_ARENA_MAX : M_MMAP_THRESHOLD, value) == 1;
#endif
  napi_get_boolean(env, ok, &result);
  return result;
}

#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct qk_cachestat_range {
  uint64_t off, len;
};
struct qk_cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/*
 * cachedPages(fd, offset, length) -> how many pages of the range are in the page cache
 * (cachestat, Linux 6.5), or -1 where the kernel cannot tell.
 */
static napi_value CachedPages(napi_env env, napi_callback_info info) {
  double a[3];
  napi_value result;
  if (!get_numbers(env, info, "cachedPages(fd, offset, length)", 3, a)) return NULL;
  struct qk_cachestat_range range = {(uint64_t)a[1], (uint64_t)a[2]};
  struct qk_cachestat cs;
  long r = syscall(__NR_cachestat, (int)a[0], &range, &cs, 0);
  napi_create_double(env, r < 0 ? -1 : (double)cs.nr_cache, &result);
  return result;
}

/*
 * sendRange's result where a send failed with errno: a full socket, or an error after some
 * bytes (the caller's next write meets it), gives what went; an error before any, -errno.
 */
static napi_value send_stopped(napi_env env, double sent) {
  napi_value result;
  napi_create_double(env, errno == EAGAIN || errno == EWOULDBLOCK || sent > 0 ? sent : -errno, &result);
  return result;
}

/*
 * sendRange(socket, header, fd, offset, length) -> bytes sent: the header, then `length` bytes
 * of file `fd` from `offset` (sendfile: from the page cache to the socket inside the kernel, with
 * no read into memory of ours; into a Unix socket since Linux 6.5 the pages themselves go, not a
 * copy), up to where the non-blocking socket is full; or -errno when not a byte could be sent.
 */
static napi_value SendRange(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int32_t sock, fd;
  double offset, length;
  void *head;
  size_t headLength;
  napi_value result;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 5 ||
      napi_get_value_int32(env, argv[0], &sock) != napi_ok || !get_bytes(env, argv[1], &head, &headLength) ||
      napi_get_value_int32(env, argv[2], &fd) != napi_ok ||
      napi_get_value_double(env, argv[3], &offset) != napi_ok ||
      napi_get_value_double(env, argv[4], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "sendRange(socket, Uint8Array, fd, offset, length)");
    return NULL;
  }
  double sent = 0;
  while ((size_t)sent < headLength) {
    ssize_t n = send(sock, (char *)head + (size_t)sent, headLength - (size_t)sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return send_stopped(env, sent);
    sent += (double)n;
  }
  off_t at = (off_t)offset;
  size_t left = (size_t)length;
  while (left > 0) {
    ssize_t n = sendfile(sock, fd, &at, left);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return send_stopped(env, sent);
    if (n == 0) break;
    sent += (double)n;
    left -= (size_t)n;
  }
  napi_create_double(env, sent, &result);
  return result;
}

/*
 * sendBuffer(socket, bytes) -> the socket's send buffer size after asking for `bytes` (SO_SNDBUF;
 * the kernel caps it at net.core.wmem_max and doubles it), or -errno.
 */
static napi_value SendBuffer(napi_env env, napi_callback_info info) {
  double a[2];
  napi_value result;
  if (!get_numbers(env, info, "sendBuffer(socket, bytes)", 2, a)) return NULL;
  int sock = (int)a[0], bytes = (int)a[1], got = 0;
  socklen_t len = sizeof got;
  if (setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) != 0 ||
      getsockopt(sock, SOL_SOCKET, SO_SNDBUF, &got, &len) != 0) {
    got = -errno;
  }
  napi_create_int32(env, got, &result);
  return result;
}

/*
 * Writes of one file, one at a time, on the thread pool (writeSerial). A buffered write holds
 * the file's inode lock, and a second writer waiting for it spins on a CPU while the first one
 * copies (the kernel's optimistic spinning); these wait asleep on a mutex instead. The mutexes
 * are shared by descriptor number modulo their count: files whose numbers collide only wait
 * for each other, which their writes' copies into the page cache mostly would anyway.
 */
#define SERIAL_LOCKS 16
static pthread_mutex_t serial_locks[SERIAL_LOCKS] = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
};

typedef struct {
  napi_async_work work;
  napi_ref buf_ref;
  napi_deferred deferred;
  int fd;
  const uint8_t *data;
  size_t length;
  int64_t offset;
  bool allocate;  /* fallocate() the range first (see Allocate) */
  int64_t result; /* bytes written, or -errno */
} SerialWrite;

static void serial_execute(napi_env env, void *data) {
  (void)env;
  SerialWrite *w = data;
  pthread_mutex_t *lock = &serial_locks[(unsigned)w->fd % SERIAL_LOCKS]; /* -1 too: it fails */
  pthread_mutex_lock(lock);
  /* Errors are left to the write: it reports what matters (ENOSPC). */
  if (w->allocate) allocate_range(w->fd, (off_t)w->offset, (off_t)w->length);
  size_t done = 0;
  while (done < w->length) {
    ssize_t n = pwrite(w->fd, w->data + done, w->length - done, w->offset + (int64_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      w->result = n < 0 ? -errno : (int64_t)done;
      pthread_mutex_unlock(lock);
      return;
    }
    done += (size_t)n;
  }
  pthread_mutex_unlock(lock);
  w->result = (int64_t)done;
}

static void serial_complete(napi_env env, napi_status status, void *data) {
  SerialWrite *w = data;
  napi_value result;
  napi_create_double(env, status == napi_ok ? (double)w->result : -EIO, &result);
  napi_resolve_deferred(env, w->deferred, result);
  napi_delete_reference(env, w->buf_ref);
  napi_delete_async_work(env, w->work);
  free(w);
}

/*
 * writeSerial(fd, buffer, offset, allocate) -> Promise<number>: pwrite of all of `buffer` at
 * `offset` on the thread pool, one at a time per file (see serial_locks), after fallocate() of
 * the range with `allocate` (there, not on the calling thread: it waits for the inode lock too,
 * which the write in flight holds): the bytes written (fewer only where the file took no more),
 * or -errno (EBADF for a closed storage's -1). The buffer must not be touched until the promise
 * settles.
 */
static napi_value WriteSerial(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], promise, name;
  void *data;
  size_t length;
  double fd, offset;
  bool allocate;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 4 ||
      napi_get_value_double(env, argv[0], &fd) != napi_ok || !get_bytes(env, argv[1], &data, &length) ||
      napi_get_value_double(env, argv[2], &offset) != napi_ok || offset < 0 ||
      napi_get_value_bool(env, argv[3], &allocate) != napi_ok) {
    napi_throw_type_error(env, NULL, "writeSerial(fd, Uint8Array, offset, allocate)");
    return NULL;
  }
  SerialWrite *w = calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  w->fd = (int)fd;
  w->data = data;
  w->length = length;
  w->offset = (int64_t)offset;
  w->allocate = allocate;
  napi_create_reference(env, argv[1], 1, &w->buf_ref);
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, "qcowkit:write", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, serial_execute, serial_complete, w, &w->work);
  napi_queue_async_work(env, w->work);
  return promise;
}

/* v8Flags(flags): in v8flags.cc (V8's C++ API). */
napi_value V8Flags(napi_env env, napi_callback_info info);

NAPI_MODULE_INIT() {
  napi_property_descriptor functions[] = {
    EXPORT_FUNCTION("seek", Seek),
    EXPORT_FUNCTION("lock", Lock),
    EXPORT_FUNCTION("readCached", ReadCached),
    EXPORT_FUNCTION("allocate", Allocate),
    EXPORT_FUNCTION("pageOffset", PageOffset),
    EXPORT_FUNCTION("cachedPages", CachedPages),
    EXPORT_FUNCTION("sendRange", SendRange),
    EXPORT_FUNCTION("sendBuffer", SendBuffer),
    EXPORT_FUNCTION("mallocOption", MallocOption),
    EXPORT_FUNCTION("v8Flags", V8Flags),
    EXPORT_FUNCTION("writeSerial", WriteSerial),
  };
  napi_define_properties(env, exports, sizeof functions / sizeof functions[0], functions);
  return exports;
}
