"""Quick A/B of the gateway alone at saturation (wrk, 32 connections), for one code change at a time.

Not part of `make bench`: run it before and after a change on a quiet machine;
it prints the best of three 8 s rounds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .harness import gateway_process, local_stack
from .loadtools import wrk, write_requests
from .throughput import api_key_headers, gateway_body, mix


def main() -> None:
    with local_stack(pool_size=20) as stack, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stack.psql("INSERT INTO events (tenant_id, event_type, data, created_at) "
                   "SELECT ('00000000-0000-4000-8000-' || lpad((100000000000 + g % 100 + 1)::text, 12, '0'))::uuid, "
                   "'type-' || (g % 10), jsonb_build_object('n', g), now() - (g || ' seconds')::interval "
                   "FROM generate_series(1, 50000) g")
        stack.psql("ANALYZE events")
        limits = {"rate_per_s": 100000, "burst": 100000, "max_concurrency": 32}
        with gateway_process(stack, work, defaults=limits) as (port, _):
            requests = write_requests(work / "requests.txt", [(gateway_body(e), api_key_headers(t))
                                                               for t, e in mix(300, 1)])
            url = f"http://127.0.0.1:{port}/v1/query"
            wrk(url, requests, duration_s=3)
            best = max(wrk(url, requests, duration_s=8).ok_per_s for _ in range(3))
    print(f"gateway: {best:.0f} req/s (best of 3 x 8 s)")


if __name__ == "__main__":
    main()
