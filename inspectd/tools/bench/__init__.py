"""`inspectd bench`: command (the command line and the combined report), engine, naive, daemon (the three
measurements), measure (clocks, memory, statistics) and profiling (cProfile in every thread of a command)."""
