{
  "targets": [
    {
      "target_name": "qcowkit_seek",
      "sources": ["native/seek.c", "native/v8flags.cc"],
      "cflags": ["-O2", "-Wall"]
    },
    {
      "target_name": "qcowkit_zlib",
      "sources": ["native/zlib.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
