"""Reading a /metrics page in a test: one parser (prometheus_client's) and one rule, a sample's
value summed over the series whose labels include the ones asked for."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def metrics_at(port: int) -> str:
    """The /metrics page a server serves on 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, missing_ok: bool = False, **labels: str) -> float:
    """``name``'s value in a /metrics page, summed over the series that carry ``labels``; a
    name with no such series fails the test unless ``missing_ok`` (then 0)."""
    total = 0.0
    found = False
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found or missing_ok, f"no sample {name} {labels}"
    return total


def metric(port: int, name: str, **labels: str) -> float:
    """``sample`` of the page on ``port``; 0 when the series does not exist yet."""
    return sample(metrics_at(port), name, missing_ok=True, **labels)
