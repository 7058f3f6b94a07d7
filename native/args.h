/* Node-API argument parsing shared by the addons (seek.c, zlib.c). */
#ifndef QCOWKIT_ARGS_H
#define QCOWKIT_ARGS_H
#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>

/* A Uint8Array argument's bytes: false (nothing set) when `value` is not one. */
static inline bool get_bytes(napi_env env, napi_value value, void **data, size_t *length) {
  bool is_typedarray = false;
  napi_typedarray_type type;
  return napi_is_typedarray(env, value, &is_typedarray) == napi_ok && is_typedarray &&
         napi_get_typedarray_info(env, value, &type, length, data, NULL, NULL) == napi_ok &&
         type == napi_uint8_array;
}

/* Exactly two Uint8Array arguments; otherwise a TypeError with `usage` is thrown and false returned. */
static inline bool get_two_buffers(napi_env env, napi_callback_info info, const char *usage, void **a, size_t *a_len,
                                   void **b, size_t *b_len) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 2 ||
      !get_bytes(env, argv[0], a, a_len) || !get_bytes(env, argv[1], b, b_len)) {
    napi_throw_type_error(env, NULL, usage);
    return false;
  }
  return true;
}

/*
 * Exactly `n` (at most 4) number arguments into `out`; otherwise a TypeError with `usage` is
 * thrown and false returned. Descriptors and small codes come through a double exactly.
 */
static inline bool get_numbers(napi_env env, napi_callback_info info, const char *usage, size_t n, double *out) {
  size_t argc = n;
  napi_value argv[4];
  bool ok = n <= 4 && napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc == n;
  for (size_t i = 0; ok && i < n; i++) ok = napi_get_value_double(env, argv[i], &out[i]) == napi_ok;
  if (!ok) napi_throw_type_error(env, NULL, usage);
  return ok;
}

/*
 * An exported function, for napi_define_properties in a module's init: writable, enumerable and
 * configurable, as a property set by assignment is (tests wrap them).
 */
#define EXPORT_FUNCTION(name, fn) \
  {name, NULL, fn, NULL, NULL, NULL, (napi_property_attributes)(napi_writable | napi_enumerable | napi_configurable), NULL}
#endif
