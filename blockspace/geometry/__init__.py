"""Pure geometry: resiliency layouts, erasure coding, extent allocation. No I/O."""
