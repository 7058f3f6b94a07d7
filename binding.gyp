{
  "targets": [
    {
      "target_name": "qcowkit_seek",
      "sources": ["native/seek.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
