"""The review page and its CLI: auditors decide on flagged samples, their labels recalibrate.
It reads what the sidecar writes (service/flagged_sample.py); the sidecar never imports it.

store.py        the Redis side: the reviewers' consumer group, claims, decisions, dead letters
sessions.py     login sessions, held in Redis
throttle.py     failed logins counted per user and address
query.py        the queue's filters and pages
heatmap.py      token texts and shading for the sample view
web.py          the HTTP app (aiohttp): login, queue, sample view, decisions, dead letters
export.py       labels for Label Studio and Argilla
recalibrate.py  per-feature precision from labels and a new bundle with proposed thresholds

Its commands (``misalign-monitor review|labels|recalibrate``) are in
misalign_monitor/commands/review.py, its settings a section of the sidecar's settings file
(service/review_settings.py); the backlog gauges the sidecar exports are in
service/review_gauges.py.
"""
