"""A webhook receiver that checks the Ploy-Signature header: run it beside ploy dev.

    python examples/connectors/receiver.py [PORT] [SECRET]

Answers 204 to a correctly signed, recent request and 401 otherwise; prints
each CloudEvent it accepts. Stop it to watch the sink retry with backoff and,
after the last attempt, dead-letter to ``ploy.webhooks.dlq``.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from connectors.webhooks import verify_signature

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
SECRET = sys.argv[2] if len(sys.argv) > 2 else "dev-secret-change-me"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not verify_signature(SECRET, self.headers.get("Ploy-Signature"), body):
            self.send_response(401)
            self.end_headers()
            print("refused: bad or old signature")
            return
        event = json.loads(body)
        attempt = self.headers.get("Ploy-Delivery-Attempt")
        print(f"{event['type']}  {event['subject']}  attempt {attempt}  "
              f"{json.dumps(event['data'].get('output'))}")
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    print(f"listening on http://127.0.0.1:{PORT}/ploy")
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
