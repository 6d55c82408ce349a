"""The sidecar and the command line. Nothing here imports torch."""
