"""The bottom layer every stage may import: config, errors, atomic files, runtime (device, precision),
tensor conventions."""
