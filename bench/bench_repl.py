"""Keystroke-to-toolbar latency: how long after a key the toolbar shows the new token budget.

Measures the REPL's real path: a prompt_toolkit Buffer change -> BudgetTracker -> the daemon's
``tokens`` request over its socket -> the state updated (the moment ``render_toolbar`` would show the new
count). The prompt is about 300 tokens (4 chunks, commas, two embeddings), the worst ordinary case.
A daemon on the ``tiny`` model is started in a temp folder unless ``--socket`` names a running one.

    python bench/bench_repl.py [--keystrokes 200] [--gap-ms 30] [--socket PATH]

Target: p95 below 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from prompt_toolkit.buffer import Buffer

from sdrepl.daemon.client import DaemonClient, request_sync
from sdrepl.repl.state import ReplState
from sdrepl.repl.toolbar import BudgetTracker, budget_request, render_toolbar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixture_paths import A1111  # noqa: E402 - the vendored fixtures (SDREPL_SHARED overrides)

PHRASE = "masterpiece, best quality, a photo of a small cat sitting on a red chair in a sunny garden, "
TYPED = "and a dog wearing a blue hat, " * 10


@contextmanager
def daemon(socket: Path | None):
    """A running daemon's socket: the given one, or a fresh ``tiny`` daemon in a temp folder."""
    if socket is not None:
        yield socket
        return
    tmp = Path(tempfile.mkdtemp(prefix="sdrepl-bench-"))
    embeddings = tmp / "embeddings"
    embeddings.mkdir()
    for name in ("bad-hands-5.pt", "bad-prompt.pt"):
        source = A1111 / name
        if source.is_file():
            shutil.copy(source, embeddings / name)
    sock = tmp / "d.sock"
    log = open(tmp / "daemon.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "sdrepl", "serve", "--socket", str(sock), "--model", "tiny",
                             "--embeddings", str(embeddings), "--outputs", str(tmp / "outputs")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited ({proc.returncode}); see {tmp / 'daemon.log'}")
            try:
                if request_sync(sock, "status", timeout=2).get("state") == "ready":
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no ready daemon within 180 s; see {tmp / 'daemon.log'}") from None
            time.sleep(0.2)
        yield sock
    finally:
        try:
            request_sync(sock, "shutdown", timeout=5)
            proc.wait(30)
        except Exception:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def build_prompt(client: DaemonClient, target: int) -> tuple[str, int]:
    text = "<bad-hands-5>, "
    while True:
        count = (await client.request("tokens", prompt=text))["count"]
        if count >= target:
            return text, count
        text += PHRASE


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def measure(socket: Path, keystrokes: int, gap: float, tokens: int) -> None:
    client = await DaemonClient.connect(socket, client="bench")
    try:
        base, count = await build_prompt(client, tokens)
        state = ReplState()
        tracker = BudgetTracker(client, state)
        arrived = asyncio.Event()
        expected: list[tuple[str, str] | None] = [None]

        def on_change() -> None:
            budget = state.budget
            if budget is not None and (budget.prompt, budget.negative) == expected[0]:
                arrived.set()

        state.listeners.append(on_change)
        buffer = Buffer()
        buffer.on_text_changed += lambda b: tracker.on_text_changed(b.text)
        tracker.start()
        buffer.text = base + "--neg lowres, <bad-prompt> --steps 30 "
        buffer.cursor_position = len(base)
        expected[0] = budget_request(buffer.text)
        await asyncio.wait_for(arrived.wait(), 10)

        latencies, renders, direct = [], [], []
        for i in range(keystrokes):
            arrived.clear()
            expected[0] = budget_request(buffer.document.text[:buffer.cursor_position] + TYPED[i % len(TYPED)]
                                         + buffer.document.text[buffer.cursor_position:])
            start = time.perf_counter()
            buffer.insert_text(TYPED[i % len(TYPED)])
            await asyncio.wait_for(arrived.wait(), 10)
            latencies.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            render_toolbar(state)
            renders.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(gap)
        final = state.budget.result["count"]
        for _ in range(50):
            start = time.perf_counter()
            await client.request("tokens", prompt=buffer.text)
            direct.append((time.perf_counter() - start) * 1000)
        await tracker.close()
    finally:
        await client.close()

    print(f"prompt: {count} tokens at the start, {final} after {keystrokes} keystrokes "
          f"({gap * 1000:.0f} ms between keys); daemon at {socket}")
    rows = [("keystroke -> toolbar budget", latencies), ("toolbar render", renders),
            ("bare tokens request (reference)", direct)]
    print(f"{'measure':<34}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'mean ms':>9}")
    for name, values in rows:
        print(f"{name:<34}{len(values):>5}{percentile(values, 50):>9.2f}{percentile(values, 95):>9.2f}"
              f"{max(values):>9.2f}{statistics.fmean(values):>9.2f}")
    verdict = "ok" if percentile(latencies, 95) < 10 else "ABOVE TARGET"
    print(f"target: p95 < 10 ms -> {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", type=Path, default=None, help="a running daemon (default: start a tiny one)")
    parser.add_argument("--keystrokes", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=30.0, help="time between keys (a fast typist: 30)")
    parser.add_argument("--tokens", type=int, default=300, help="size of the prompt being edited")
    args = parser.parse_args()
    with daemon(args.socket) as socket:
        asyncio.run(measure(socket, args.keystrokes, args.gap_ms / 1000, args.tokens))


if __name__ == "__main__":
    main()
