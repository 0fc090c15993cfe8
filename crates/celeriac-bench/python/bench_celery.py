"""Python Celery's side of celeriac-bench: the app its workers run, and a client driver.

The worker is started by celeriac-bench as

    celery -A bench_celery worker -P prefork|threads -c N --prefetch-multiplier M -O fair \
        --without-gossip --without-mingle --without-heartbeat -Q bench -l warning

and the client as `python bench_celery.py <command> ...`, which prints one JSON object.
Configuration comes from the environment: BENCH_BROKER_URL, BENCH_BACKEND_URL, BENCH_QUEUE.
Brokers: Redis (results in Redis) and RabbitMQ (results through rpc://, the pairing Celery's
docs suggest for RabbitMQ).
Tuned for speed as far as Celery allows: JSON, no result_extended, no events, acks early,
results without expiry bookkeeping per call.
"""

import json
import os
import sys
import threading
import time

from celery import Celery
from celery.result import ResultSet

broker_url = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/6")
queue = os.environ.get("BENCH_QUEUE", "bench")

app = Celery("bench_celery")
app.conf.update(
    broker_url=broker_url,
    result_backend=os.environ.get("BENCH_BACKEND_URL", broker_url),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_default_queue=queue,
    task_acks_late=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    result_expires=None,
    worker_hijack_root_logger=False,
)


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="bench.add_io")
def add_io(x, y, pad):
    """The realistic workload: 1 KiB of argument, 5 ms of I/O (a sleep, which releases the GIL
    as a socket read would)."""
    time.sleep(0.005)
    return x + y + (1 if not pad else 0)


def _now():
    return time.perf_counter()


def enqueue(n, senders):
    """Sequential, concurrent (threads) and batched (one producer) enqueue rates."""
    out = {}
    t = _now()
    for _ in range(n):
        add.apply_async((1, 2), ignore_result=True)
    out["sequential"] = n / (_now() - t)

    def send(count):
        for _ in range(count):
            add.apply_async((1, 2), ignore_result=True)

    threads = [threading.Thread(target=send, args=(n // senders,)) for _ in range(senders)]
    t = _now()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out["concurrent"] = (n // senders) * senders / (_now() - t)

    t = _now()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            add.apply_async((1, 2), ignore_result=True, producer=producer)
    out["batch"] = n / (_now() - t)
    return out


def _is_redis(conn):
    return conn.transport.driver_type == "redis"


def queue_left(conn):
    """Messages not yet taken by a worker: on Redis the list plus the unacked hash; on
    RabbitMQ the queue's ready count (a passive declare; delivered but unacked messages, at most
    a prefetch window, are not counted)."""
    channel = conn.default_channel
    if _is_redis(conn):
        return channel.client.llen(queue) + channel.client.hlen("unacked")
    return channel.queue_declare(queue=queue, passive=True).message_count


def wait_drained(deadline):
    with app.connection_for_read() as conn:
        while queue_left(conn) > 0:
            if _now() > deadline:
                raise SystemExit("timed out waiting for the queue to drain")
            time.sleep(0.002)


def ready():
    """Messages waiting in the queue, not yet delivered to any worker (ETA tasks a worker holds
    are delivered: on Redis they sit in the unacked hash, on RabbitMQ they are unacked)."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        if _is_redis(conn):
            return {"ready": channel.client.llen(queue)}
        return {"ready": channel.queue_declare(queue=queue, passive=True).message_count}


def purge():
    """Empties the benchmark queue (declared first, so it exists)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if not _is_redis(conn):
            channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        return {"purged": channel.queue_purge(queue) or 0}


def e2e(n, ignore, timeout):
    t = _now()
    deadline = t + timeout
    with app.producer_or_acquire() as producer:
        results = [
            add.apply_async((1, 2), ignore_result=ignore, producer=producer) for _ in range(n)
        ]
    sent = _now() - t
    if ignore:
        wait_drained(deadline)
    else:
        rs = ResultSet(results)
        # The database backend (db+) has no native join: it polls each result.
        join = rs.join_native if app.backend.supports_native_join else rs.join
        values = join(timeout=timeout, propagate=True)
        assert len(values) == n and all(v == 3 for v in values), "wrong results"
    total = _now() - t
    return {"n": n, "send_s": sent, "total_s": total, "rate": n / total}


def latency(n, load_rate, timeout):
    """Round trips delay().get(); with load_rate > 0 a thread sends ignore_result tasks at that
    rate meanwhile (bounded by n and the timeout)."""
    stop = threading.Event()

    def load():
        interval = 1.0 / load_rate
        nxt = _now()
        end = _now() + timeout
        while not stop.is_set() and _now() < end:
            add.apply_async((1, 2), ignore_result=True)
            nxt += interval
            pause = nxt - _now()
            if pause > 0:
                time.sleep(pause)

    th = None
    if load_rate > 0:
        th = threading.Thread(target=load)
        th.start()
        time.sleep(0.5)
    samples = []
    try:
        for _ in range(n):
            t = _now()
            assert add.delay(1, 2).get(timeout=timeout) == 3
            samples.append(_now() - t)
    finally:
        stop.set()
        if th:
            th.join()
    return {"samples_ms": [s * 1000 for s in samples]}


def closed(n, callers, timeout):
    """A closed loop: `callers` threads, each calling add_io(1, 2, 1 KiB).get() until n calls
    are done. Returns the rate and each call's milliseconds."""
    pad = "x" * 1024
    lock = threading.Lock()
    left = [n]
    samples = []
    errors = []

    def call():
        mine = []
        try:
            while True:
                with lock:
                    if left[0] <= 0:
                        break
                    left[0] -= 1
                t = _now()
                assert add_io.delay(1, 2, pad).get(timeout=timeout) == 3
                mine.append((_now() - t) * 1000)
        except Exception as e:  # reported, not hidden
            errors.append(repr(e))
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    t = _now()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = _now() - t
    if errors:
        raise SystemExit(f"{len(errors)} callers failed, first: {errors[0]}")
    return {"rate": n / total, "samples_ms": samples}


def delayed(n):
    """Sends n tasks due in an hour (Celery puts the eta in the header; workers hold them)."""
    t = _now()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            add.apply_async((1, 2), countdown=3600, ignore_result=True, producer=producer)
    return {"n": n, "send_s": _now() - t}


def main():
    cmd = sys.argv[1]
    args = [float(a) for a in sys.argv[2:]]
    if cmd == "enqueue":
        res = enqueue(int(args[0]), int(args[1]))
    elif cmd == "e2e":
        res = e2e(int(args[0]), bool(int(args[1])), args[2])
    elif cmd == "latency":
        res = latency(int(args[0]), args[1], args[2])
    elif cmd == "closed":
        res = closed(int(args[0]), int(args[1]), args[2])
    elif cmd == "delayed":
        res = delayed(int(args[0]))
    elif cmd == "ready":
        res = ready()
    elif cmd == "purge":
        res = purge()
    elif cmd == "ping":
        res = {"ok": add.delay(1, 2).get(timeout=args[0]) == 3}
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
