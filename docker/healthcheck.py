"""Container health check of the serve image: exit 0 when GET /ready answers 200, else 1.

/ready (not /health, which only says the process is alive) answers 503 until the model and
every index are loaded (and, with the reason, if loading failed), so "healthy" means ready to
serve. Uses only the standard library: no curl in the image.
"""

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('UVICORN_PORT', '8000')}/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503 not_ready: say why, from the error envelope
        print(f"{url}: {exc.code} {exc.read(500).decode(errors='replace')}", file=sys.stderr)
    except OSError as exc:  # not listening yet, or hung
        print(f"{url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
