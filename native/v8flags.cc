// v8Flags(flags): V8's flags for the rest of the process, as node:v8's setFlagsFromString sets
// them. Loading node:v8 loads Node's stream modules too (~2 ms of a command's start-up); the
// addon is loaded already. The one piece of the addon that uses V8's own API (built against the
// running Node's headers, as every addon is).
#include <node_api.h>
#include <v8.h>

#include <string>

extern "C" napi_value V8Flags(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  size_t length = 0;
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok || argc != 1 ||
      napi_get_value_string_utf8(env, argv[0], nullptr, 0, &length) != napi_ok) {
    napi_throw_type_error(env, nullptr, "v8Flags(flags)");
    return nullptr;
  }
  std::string flags(length, '\0');
  napi_get_value_string_utf8(env, argv[0], flags.data(), length + 1, &length);
  v8::V8::SetFlagsFromString(flags.c_str(), length);
  return nullptr;
}
