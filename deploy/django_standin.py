#!/usr/bin/env python3
"""A stand-in of the Django API for a local fleet (deploy/local-fleet.sh), standard library only.

  django_standin.py serve CONFIGS RUNS [PORT]
      Serves GET /api/etl/job-config/<id>/ from CONFIGS/<id>.json and takes
      PATCH /api/etl/runs/<id>/update/ as Django does: a partial update (the fields a PATCH
      names replace the run's, the others keep their values). The run as it stands is kept in
      RUNS/<id>.json (and served at GET /api/etl/runs/<id>/), every PATCH body in
      RUNS/<id>.patches.jsonl. With ETL_API_TOKEN set, a request without
      "Authorization: Bearer <ETL_API_TOKEN>" gets 401. Listens on 127.0.0.1:PORT (default 8000;
      0 picks a free port) and writes the port to RUNS/port once it listens.
      Every PATCH received, taken or not, is also merged into RUNS/<id>.sent.json: what the
      dispatcher sent.

      DJANGO_STANDIN_PATCH plays a Django that is down for updates while job configs are still
      served: "accept" (the default), "503" (every PATCH is answered 503 Service Unavailable,
      as a Django behind a load balancer with no healthy backend) or "hang" (every PATCH is
      read and never answered, as a Django stuck on its database). Neither takes the update.

  django_standin.py wait RUNS RUN_ID SECONDS [--sent]
      Waits until run RUN_ID's status is completed or failed and prints the run as JSON; exit
      status 0 when completed, 1 when failed, 2 when SECONDS passed first. Status changes go to
      stderr while it waits. With --sent it waits on what the dispatcher sent (RUNS/<id>.sent.json)
      rather than on what the stand-in took: with DJANGO_STANDIN_PATCH=503 or hang, the time the
      final status was first sent is when the run ended.
"""

import http.server
import json
import os
import re
import sys
import threading
import time

CONFIG_PATH = re.compile(r"^/api/etl/job-config/(\d+)/?$")
UPDATE_PATH = re.compile(r"^/api/etl/runs/(\d+)/update/?$")
RUN_PATH = re.compile(r"^/api/etl/runs/(\d+)/?$")


def write_atomically(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


PATCH_MODES = ("accept", "503", "hang")


def serve(configs, runs, port="8000"):
    token = os.environ.get("ETL_API_TOKEN", "")
    patch_mode = os.environ.get("DJANGO_STANDIN_PATCH", "accept")
    if patch_mode not in PATCH_MODES:
        sys.exit(f"DJANGO_STANDIN_PATCH must be one of {', '.join(PATCH_MODES)}, not {patch_mode!r}")
    lock = threading.Lock()
    os.makedirs(runs, exist_ok=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self):
            if not token or self.headers.get("authorization", "") == f"Bearer {token}":
                return True
            self._reply(401, {"detail": "Invalid token."})
            return False

        def do_GET(self):
            if not self._authorized():
                return
            path = self.path.split("?", 1)[0]
            match = CONFIG_PATH.match(path)
            if match:
                file = os.path.join(configs, f"{match.group(1)}.json")
                if os.path.exists(file):
                    with open(file) as f:
                        return self._reply(200, json.load(f))
                return self._reply(404, {"detail": "Not found."})
            match = RUN_PATH.match(path)
            if match:
                file = os.path.join(runs, f"{match.group(1)}.json")
                if os.path.exists(file):
                    with open(file) as f:
                        return self._reply(200, json.load(f))
                return self._reply(404, {"detail": "Not found."})
            self._reply(404, {"detail": "Not found."})

        def do_PATCH(self):
            if not self._authorized():
                return
            match = UPDATE_PATH.match(self.path.split("?", 1)[0])
            if not match:
                return self._reply(404, {"detail": "Not found."})
            length = int(self.headers.get("content-length", "0"))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as e:
                return self._reply(400, {"detail": f"JSON parse error - {e}"})
            if not isinstance(body, dict):
                return self._reply(400, {"detail": "Expected a JSON object."})
            run_id = match.group(1)
            file = os.path.join(runs, f"{run_id}.json")
            sent_file = os.path.join(runs, f"{run_id}.sent.json")
            with lock:
                sent = {"id": int(run_id)}
                if os.path.exists(sent_file):
                    with open(sent_file) as f:
                        sent = json.load(f)
                sent.update(body)
                write_atomically(sent_file, json.dumps(sent, indent=2) + "\n")
            if patch_mode == "503":
                print(f"PATCH run {run_id} refused (503): {json.dumps(body)}", flush=True)
                return self._reply(503, {"detail": "Service Unavailable"})
            if patch_mode == "hang":
                print(f"PATCH run {run_id} left unanswered: {json.dumps(body)}", flush=True)
                time.sleep(3600)
                return
            with lock:
                run = {"id": int(run_id), "status": "pending"}
                if os.path.exists(file):
                    with open(file) as f:
                        run = json.load(f)
                run.update(body)
                with open(os.path.join(runs, f"{run_id}.patches.jsonl"), "a") as f:
                    f.write(json.dumps(body) + "\n")
                write_atomically(file, json.dumps(run, indent=2) + "\n")
            print(f"PATCH run {run_id}: {json.dumps(body)}", flush=True)
            self._reply(200, run)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    write_atomically(os.path.join(runs, "port"), str(server.server_address[1]))
    print(f"Django stand-in on http://127.0.0.1:{server.server_address[1]}, configs in {configs}, "
          f"token {'checked' if token else 'not checked'}, PATCHes: {patch_mode}", flush=True)
    server.serve_forever()


def wait(runs, run_id, seconds, sent=False):
    file = os.path.join(runs, f"{run_id}.sent.json" if sent else f"{run_id}.json")
    deadline = time.time() + float(seconds)
    last = None
    while time.time() < deadline:
        if os.path.exists(file):
            with open(file) as f:
                run = json.load(f)
            status = run.get("status")
            progress = (status, run.get("shards_completed"), run.get("shards_total"))
            if progress != last:
                shards = f" (shards {progress[1] or 0}/{progress[2]})" if progress[2] is not None else ""
                print(f"run {run_id}: {status}{shards}", file=sys.stderr, flush=True)
                last = progress
            if status in ("completed", "failed"):
                print(json.dumps(run, indent=2))
                return 0 if status == "completed" else 1
        time.sleep(0.1)
    print(f"run {run_id}: no final status after {seconds} s", file=sys.stderr)
    return 2


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    try:
        if command == "serve" and len(args) in (2, 3):
            serve(*args)
        elif command == "wait" and len(args) == 3:
            sys.exit(wait(*args))
        elif command == "wait" and len(args) == 4 and args[3] == "--sent":
            sys.exit(wait(*args[:3], sent=True))
        else:
            print(__doc__, file=sys.stderr)
            sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
