#!/usr/bin/env python3
"""Helpers of deploy/smoke.sh, standard library only.

  smoke_helpers.py django DIR           a stand-in of the Django API on a free port: serves
                                        DIR/config-<id>.json at GET /api/etl/job-config/<id>/,
                                        appends each PATCH /api/etl/runs/<id>/update/ body to
                                        DIR/patches-<id>.jsonl; writes its port to DIR/port
  smoke_helpers.py wait DIR RUN SECS    waits for run RUN's final status; prints its PATCH
  smoke_helpers.py compare PG BQ MODE   compares PostgreSQL's rows (json_agg output in file PG)
                                        with BigQuery's (a jobs.query answer in file BQ)
"""

import http.server
import json
import os
import sys
import time


def django(directory):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            parts = self.path.strip("/").split("/")
            if parts[:3] == ["api", "etl", "job-config"] and len(parts) == 4:
                path = os.path.join(directory, f"config-{parts[3]}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        return self._reply(200, json.load(f))
            self._reply(404, {"detail": "Not found."})

        def do_PATCH(self):
            parts = self.path.strip("/").split("/")
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if parts[:3] == ["api", "etl", "runs"] and len(parts) == 5 and parts[4] == "update":
                with open(os.path.join(directory, f"patches-{parts[3]}.jsonl"), "a") as f:
                    f.write(json.dumps(body) + "\n")
                return self._reply(200, {"ok": True})
            self._reply(404, {"detail": "no route"})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(os.path.join(directory, "port"), "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


def wait(directory, run, seconds):
    path = os.path.join(directory, f"patches-{run}.jsonl")
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    patch = json.loads(line)
                    if patch.get("status") in ("completed", "failed"):
                        print(json.dumps(patch))
                        return 0 if patch["status"] == "completed" else 1
        time.sleep(0.5)
    print(f"run {run}: no final status after {seconds} s", file=sys.stderr)
    return 1


def trim(decimal):
    """Decimal text without trailing zeros: BigQuery prints NUMERIC at its own scale."""
    if decimal is None or "." not in decimal:
        return decimal
    return decimal.rstrip("0").rstrip(".")


def compare(pg_file, bq_file, mode):
    """Rows are [id, Amount, amount, order id, doc, js, big, seen, local_at, day]: decimals (big is
    numeric(50,20), BIGNUMERIC) compared as text without trailing zeros, JSON as parsed values.
    `mode` (bigquery or emulator) only labels the messages."""
    with open(pg_file) as f:
        pg = json.load(f) or []
    with open(bq_file) as f:
        answer = json.load(f)
    if "error" in answer or answer.get("errors"):
        print(f"BigQuery refused the read-back query: {answer}", file=sys.stderr)
        return 1
    bq = [[cell["v"] for cell in row["f"]] for row in answer.get("rows", [])]
    if len(pg) != len(bq):
        print(f"{len(bq)} rows in BigQuery, {len(pg)} in PostgreSQL", file=sys.stderr)
        return 1

    def norm_pg(r):
        doc = json.loads(r[4]) if r[4] is not None else None
        js = json.loads(r[5]) if r[5] is not None else None
        return [str(r[0]), trim(r[1]), trim(r[2]), r[3], doc, js, trim(r[6]), r[7], r[8], r[9]]

    def norm_bq(r):
        doc = json.loads(r[4]) if r[4] is not None else None
        js = json.loads(r[5]) if r[5] is not None else None
        return [r[0], trim(r[1]), trim(r[2]), r[3], doc, js, trim(r[6]), r[7], r[8], r[9]]

    for p, b in zip(pg, bq):
        want, got = norm_pg(p), norm_bq(b)
        if want != got:
            print(f"row {want[0]} differs ({mode}):\n  PostgreSQL {want}\n  BigQuery   {got}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "django":
        django(*args)
    elif command == "wait":
        sys.exit(wait(*args))
    elif command == "compare":
        sys.exit(compare(*args))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
