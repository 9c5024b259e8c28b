#!/usr/bin/env python3
"""Docker HEALTHCHECK: exit 0 when the server answers GET /healthz with 200 (liveness).

The slim images have no curl; this uses only the standard library. The port is taken from
MTSERVE_PORT (default 8000), the same variable the server reads.
"""

import os
import sys
import urllib.request

port = os.environ.get("MTSERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure (refused, timeout, non-2xx) means unhealthy
    print(f"healthcheck failed: {exc}", file=sys.stderr)
    sys.exit(1)
