"""The other relays the benchmarks run beside fastrelay's: aiomoqt's and moq-dev's, launched one
way for `bench moq` (loopback) and `bench moq-datapath` (lab namespaces).

Both speak standard QUIC with TLS only (a self-signed certificate written here; fastrelay's
clients do not verify it), draft-16, raw QUIC. moq-dev's relay is its `moq` package's Server
(PyPI moq-rs) with one origin for publishing and subscribing, as moq-relay does, run by this
module:

    python -m fastrelay.bench.peers moq-dev-relay HOST:PORT --cert C.pem --key K.pem
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import sys
from pathlib import Path

# the other relays: name -> the distribution it needs (the dev extras install both)
PEERS = {"aiomoqt": "aiomoqt", "moq-dev": "moq-rs"}
# what each relay prints (stdout or stderr) once it listens
READY = {"aiomoqt": "Listening on", "moq-dev": '"listening"'}


def installed(name: str) -> bool:
    """Whether peer relay `name`'s distribution is installed."""
    try:
        importlib.metadata.version(PEERS[name])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def relay_command(name: str, host: str, port: int, state: str, names: list[str] | None = None) -> list[str]:
    """The command running peer relay `name` on host:port (draft-16, raw QUIC), its certificate
    (for `names`, default `host`) written under `state`."""
    if name not in PEERS:
        raise ValueError(f"unknown relay {name!r}")
    from ..quic.tls import self_signed

    # a directory of its own: moq-dev watches the certificate's directory and reloads on every change there
    tls = Path(state, f"tls-{name}")
    tls.mkdir(exist_ok=True)
    cert, key = self_signed(names or [host])
    (tls / "c.pem").write_bytes(cert)
    (tls / "k.pem").write_bytes(key)
    if name == "aiomoqt":
        return [sys.executable, "-m", "aiomoqt.tools.moq_interop_relay", "--bind", host, "--port", str(port),
                "--cert", str(tls / "c.pem"), "--key", str(tls / "k.pem"), "--quic", "--draft", "16"]
    # moq-dev's server offers every draft it speaks; fastrelay's publisher and subscribers pick 16
    return [sys.executable, "-m", "fastrelay.bench.peers", "moq-dev-relay", f"{host}:{port}",
            "--cert", str(tls / "c.pem"), "--key", str(tls / "k.pem")]


def relay_env() -> dict[str, str]:
    """The environment for a peer relay: unbuffered output, no draft pinned from outside."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("DRAFT", "MOQT_DRAFT"):  # aiomoqt's relay reads these; --draft pins it instead
        env.pop(name, None)
    return env


async def _moq_dev_relay(bind: str, cert: str, key: str) -> None:
    """moq-dev's relay: every session publishes into and subscribes from one origin."""
    import moq

    origin = moq.OriginProducer()
    async with moq.Server(bind, tls_cert=[cert], tls_key=[key], publish=origin, subscribe=origin) as server:
        print(json.dumps({"listening": str(server.local_addr)}), flush=True)
        await server.serve()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m fastrelay.bench.peers")
    role = p.add_subparsers(dest="role", required=True)
    rp = role.add_parser("moq-dev-relay")
    rp.add_argument("bind", help="HOST:PORT")
    rp.add_argument("--cert", required=True)
    rp.add_argument("--key", required=True)
    a = p.parse_args()
    asyncio.run(_moq_dev_relay(a.bind, a.cert, a.key))
