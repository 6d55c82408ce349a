"""The sidecar: ingest, scoring, metrics, the flagged stream. Nothing here imports torch."""
