"""The Python twin of celeriac's example task app (examples/src/lib.rs).

Same task names, same arguments, same results, so a Python Celery worker and a celeriac worker
can serve one queue, and either side's client can call either side's worker. Used by celeriac's
interop tests (crates/celeriac-e2e/tests/interop), which run it from the venv made by
scripts/python-env:

    cd examples/python
    CELERY_BROKER_URL=redis://127.0.0.1:6379/0 ../../target/py-venv/bin/celery -A tasks worker

Configuration comes from the environment: CELERY_BROKER_URL and CELERY_RESULT_BACKEND (default:
the broker URL). JSON only, as celeriac never accepts pickle.
"""

import os
import time

from celery import Celery

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("tasks")
app.conf.update(
    broker_url=broker_url,
    result_backend=os.environ.get("CELERY_RESULT_BACKEND", broker_url),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    # The worker's node name and the routing key land in each result, so a test can tell
    # which worker ran a task.
    result_extended=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)

# Signed messages (Celery's auth serializer), for celeriac's signing interop tests: set when
# CELERY_SECURITY_KEY, CELERY_SECURITY_CERTIFICATE and CELERY_SECURITY_CERT_STORE name the files.
if os.environ.get("CELERY_SECURITY_KEY"):
    app.conf.update(
        security_key=os.environ["CELERY_SECURITY_KEY"],
        security_certificate=os.environ["CELERY_SECURITY_CERTIFICATE"],
        security_cert_store=os.environ["CELERY_SECURITY_CERT_STORE"],
        security_digest=os.environ.get("CELERY_SECURITY_DIGEST", "sha256"),
        task_serializer="auth",
        accept_content=["auth"],
    )
    app.setup_security()


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="tasks.mul")
def mul(x, y):
    return x * y


@app.task(name="tasks.xsum")
def xsum(numbers):
    # celeriac's tasks.xsum sums f64s; return a float here too.
    return float(sum(numbers))


@app.task(name="tasks.echo")
def echo(value):
    return value


@app.task(name="tasks.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="tasks.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="tasks.tsum")
def tsum(numbers):
    # celeriac's tasks.tsum: the sum of a list of integers (a chord body).
    return sum(numbers)
