"""Times a dashboard page in headless Chromium over the DevTools protocol: from the navigation
until a JavaScript condition holds (e.g. the task table shows rows), with the HTTP cache off,
RUNS times; prints the times in milliseconds as JSON.

    python page_load.py URL CONDITION [RUNS]
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from tornado.websocket import websocket_connect


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(url, condition, runs):
    port = free_port()
    profile = tempfile.mkdtemp(prefix="cdp-")
    chrome = subprocess.Popen(
        [shutil.which("chromium") or "chromium", "--headless=new", "--no-sandbox",
         "--disable-gpu", "--no-first-run", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("chromium never opened its DevTools port")
            await asyncio.sleep(0.1)
        ws = await websocket_connect(pages[0]["webSocketDebuggerUrl"],
                                     max_message_size=1 << 30)
        next_id = 0

        async def call(method, params=None):
            nonlocal next_id
            next_id += 1
            me = next_id
            await ws.write_message(json.dumps({"id": me, "method": method,
                                               "params": params or {}}))
            while True:
                msg = json.loads(await ws.read_message())
                if msg.get("id") == me:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})

        await call("Network.enable")
        await call("Network.setCacheDisabled", {"cacheDisabled": True})
        times = []
        for _ in range(runs):
            await call("Page.navigate", {"url": "about:blank"})
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            await call("Page.navigate", {"url": url})
            while True:
                r = await call("Runtime.evaluate",
                               {"expression": f"!!({condition})", "returnByValue": True})
                if r.get("result", {}).get("value"):
                    break
                if time.perf_counter() - t0 > 120:
                    raise SystemExit(f"{url}: the condition never held")
                await asyncio.sleep(0.005)
            times.append(round((time.perf_counter() - t0) * 1000, 1))
        return times
    finally:
        chrome.kill()
        chrome.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    url, condition = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    print(json.dumps(asyncio.run(measure(url, condition, runs))))
