"""The commands of ``misalign-monitor``, one module per part: ``sidecar`` (serve, config),
``offline`` (model, extract, calibrate, score, eval), ``gate``, ``review`` (review, labels,
recalibrate). The parts themselves (service/, detectors/, review/) hold no command-line code."""
