"""Sends the task events of N finished tasks (received, started, succeeded) from one
synthetic worker, as a Celery 5.7 worker run with -E sends them (batched as task.multi), so
that every monitor listening on the broker builds a history of N tasks.

    BROKER=redis://127.0.0.1:6379/0 RATE=1000 python gen_history.py 100000

RATE is in tasks per second (3 events each); 0 or unset sends as fast as possible.
"""

import os
import sys
import time
import uuid

from celery import Celery

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
RATE = float(os.environ.get("RATE") or 0)
app = Celery("histgen", broker=os.environ["BROKER"])

with app.connection_for_write() as conn:
    d = app.events.Dispatcher(
        conn, hostname="histgen@bench", buffer_group=["task"], buffer_limit=200
    )
    worker = {"freq": 2.0, "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}
    d.send("worker-online", **worker)
    started = time.time()
    for i in range(N):
        u = str(uuid.uuid4())
        now = time.time()
        d.send("task-received", uuid=u, name="tasks.add", args=f"({i}, 1)", kwargs="{}",
               retries=0, eta=None, expires=None, root_id=u, parent_id=None, timestamp=now)
        d.send("task-started", uuid=u, timestamp=now)
        d.send("task-succeeded", uuid=u, result=str(i + 1), runtime=0.0012, timestamp=now)
        if RATE and i % 100 == 0:
            ahead = started + i / RATE - time.time()
            if ahead > 0:
                time.sleep(ahead)
        if i % 2000 == 0:
            d.flush()
            d.send("worker-heartbeat", active=0, processed=i, loadavg=[0, 0, 0], **worker)
    d.flush()
    d.send("worker-heartbeat", active=0, processed=N, loadavg=[0, 0, 0], **worker)
    print(f"sent {3 * N} task events for {N} tasks in {time.time() - started:.1f}s",
          file=sys.stderr)
