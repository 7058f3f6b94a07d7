/*
 * lseek(SEEK_DATA / SEEK_HOLE) for Node.js, which has no binding for them: the only way to
 * tell a file's holes from its data the way QEMU's file-posix driver does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <string.h>
#include <unistd.h>

/* seek(fd, offset, whence) -> offset, or -1 when there is no data/hole at or after offset (ENXIO). */
static napi_value Seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd, which;
  double offset;
  napi_value result;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_double(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &which) != napi_ok) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, 0 for data | 1 for hole)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, which == 0 ? SEEK_DATA : SEEK_HOLE);
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

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "seek", NAPI_AUTO_LENGTH, Seek, NULL, &fn);
  napi_set_named_property(env, exports, "seek", fn);
  return exports;
}
