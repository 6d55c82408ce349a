"""Dependency audit: every package installed in this environment against the PyPI/OSV advisories.

    python scripts/audit_deps.py          # make audit

Runs pip-audit over the installed packages (the project itself, installed editable, is skipped).
Fails (exit 1) on a known vulnerability that is not listed in IGNORED below with its reason, and
(exit 2) when packages could not be checked at all — a vulnerability service that cannot be
reached must not read as "no known vulnerabilities", which is what pip-audit prints then.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Advisory id -> why it is accepted. Each entry names the package, the pin that holds it back
# and what would lift it. Empty: no accepted advisories.
IGNORED: dict[str, str] = {}

# Installed packages that are not on PyPI under their installed version, so no advisory service
# knows them; audited through what they are built from.
NOT_ON_PYPI = {
    "misalign-monitor": "this project",
}


def main() -> int:
    pip_audit = Path(sys.executable).with_name("pip-audit")
    cmd = [str(pip_audit), "--format", "json", "--progress-spinner", "off", "--skip-editable"]
    for vuln in IGNORED:
        cmd += ["--ignore-vuln", vuln]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        print(f"audit: pip-audit failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
        return 2
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d and d["name"] not in NOT_ON_PYPI]
    vulnerable = [d for d in deps if d.get("vulns")]
    for d in vulnerable:
        for v in d["vulns"]:
            fix = ", ".join(v.get("fix_versions", [])) or "no fixed version"
            print(f"audit: {d['name']} {d['version']}: {v['id']} (fixed in: {fix})")
    if skipped:
        print(
            f"audit: {len(skipped)} of {len(deps)} packages could not be checked, e.g. "
            f"{skipped[0]['name']}: {skipped[0]['skip_reason']} -- is the advisory service "
            "(pypi.org/pypi/<name>/json, or api.osv.dev with -s osv) reachable from here?"
        )
        return 2
    if vulnerable:
        print(f"audit: {len(vulnerable)} packages with known vulnerabilities (see above)")
        return 1
    print(f"audit: {len(deps)} packages checked, no known vulnerabilities; ignored: {IGNORED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
