"""python -m microproxy: parse the environment, build the proxy, run it on uvloop."""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys

import uvloop

from .config import Config
from .upstream import Pipelining
from .logfmt import setup_logging
from .proxy import Proxy


async def main(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    proxy = Proxy(cfg, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(proxy.start())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 0
    stopper.cancel()
    starting.result()
    # Everything alive now (modules, config, contexts) lives as long as the process: move it
    # out of the collector's sight, so a full collection never walks it (measured: a 4 ms
    # loop stall per full collection otherwise, which lands in tail latency).
    gc.freeze()
    await stop.wait()
    await proxy.shutdown()
    return 0


def run() -> None:
    if sys.argv[1:2] == ["init"]:  # `python -m microproxy init ...`: the init container (init.py)
        from .init import main as init_main
        sys.exit(init_main(sys.argv[2:]))
    try:
        cfg = Config.from_env()
        Pipelining.from_env(os.environ)   # fail here, with one line, on a bad MESH_PIPELINE_*
    except (ValueError, OSError) as e:
        print(f"microproxy: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(cfg.log_level)
    sys.exit(uvloop.run(main(cfg)))


if __name__ == "__main__":
    run()
