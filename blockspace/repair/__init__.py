"""Background repair: extent moves (rebuild), scrub, readmission of a returning disk, watchdog."""
