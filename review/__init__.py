"""The review page and its CLI: auditors decide on flagged samples, their labels recalibrate.

settings.py     review settings (users, claim timeout, deliveries before dead-letter)
store.py        the Redis side: the reviewers' consumer group, claims, decisions, dead letters
heatmap.py      token texts and shading for the sample view
web.py          the HTTP app (aiohttp): login, queue, sample view, decisions, dead letters
backlog.py      the sidecar's review gauges, refreshed from Redis
recalibrate.py  per-feature precision from labels and a new bundle with proposed thresholds
cli.py          ``misalign-monitor review|labels|recalibrate``
"""
