"""One disk: device I/O off the trio thread, io_uring, the fault-injecting device."""
