"""Tools around the daemon: `inspectd demo` and `inspectd bench` (bench/). They may use every other part."""
