"""Settings: described once as a dataclass, filled from the command line and ``SDREPL_<NAME>`` variables.

Every option the daemon and its clients share flows CLI/env -> Settings -> objects (server, client, REPL),
as in uvicorn; no part reads those options from the environment on its own. Three process-level
variables are read where they are used instead, because they are not options of a daemon and a client
must not forward them: ``SDREPL_CACHE_DIR`` (``core/tiny.py``: where the built-in tiny models are cached),
``SDREPL_HISTORY`` (``repl/interactive.py``: this terminal's history file) and ``SDREPL_LOG_FILE``
(``daemon/runtime.py``: set by ``serve --detach`` for the daemon it starts, so its errors can name its log).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrepl.core.errors import UsageError


def default_socket() -> Path:
    """One socket per user: in ``$XDG_RUNTIME_DIR/sdrepl/`` when there is one, else a private /tmp folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "sdrepl" if runtime else Path(tempfile.gettempdir()) / f"sdrepl-{os.getuid()}"
    return base / "sdrepl.sock"


def parse_duration(text: str) -> float | None:
    """``30s``, ``5m``, ``1h30m``, ``90`` (seconds), ``0`` (unload at once) or ``forever``/``-1`` (None)."""
    text = (text or "").strip().lower()
    if text in ("", "forever", "inf", "never", "-1"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)", text)  # ms before m, or "500ms" never matches
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
        raise UsageError(f"--keep-alive {text!r} is not a duration; use e.g. 500ms, 30s, 5m, 1h30m, 0 or forever")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass
class Settings:
    """Options shared by ``sdrepl``, ``sdrepl serve``, ``status`` and ``stop`` (see interface.md)."""

    socket: Path = field(default_factory=default_socket)
    model: str = "tiny"
    embeddings: list[Path] = field(default_factory=lambda: [Path("embeddings")])
    loras: list[Path] = field(default_factory=lambda: [Path("loras")])
    hypernetworks: list[Path] = field(default_factory=lambda: [Path("hypernetworks")])
    outputs: Path = Path("outputs")
    device: str = "auto"
    dtype: str = "auto"
    keep_alive: float | None = None  # seconds after the last request; None = forever
    #: ``epsilon`` / ``v_prediction`` for the model's scheduler; None = guessed (single files) or the model's own.
    prediction_type: str | None = None
    #: The prompt settings a request gets when it names none (A1111's ``emphasis``, ``comma_padding_backtrack``).
    emphasis: str = "Original"
    comma_padding_backtrack: int = 20
    #: ``--compile``: torch.compile the UNet and the VAE decoder (``core.speed``).
    compile: bool = False
    #: ``serve --listen HOST:PORT`` (repeatable): TLS listeners with a secret, besides the Unix socket.
    listen: list[str] = field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: ``serve --connection-file``: where the remote connection file (host, port, fingerprint, key) goes.
    remote_file: Path | None = None
    #: ``serve --max-queue N``: generations that may wait behind the running one; more get QueueFull at once.
    max_queue: int = 512
    #: ``serve --ray ADDRESS|auto``: generations run on a Ray Serve deployment (``daemon/fleet.py``); None: here.
    ray: str | None = None
    #: ``serve --ray-replicas N`` or ``MIN-MAX`` (Serve's autoscaling).
    ray_replicas: str = "1"
    #: A client's remote daemon (``--connect FILE`` or ``SDREPL_HOST``), a ``daemon.auth.RemoteEndpoint``.
    connect: Any = None

    @property
    def remote_connection_file(self) -> Path:
        """What remote clients need (0600): ``--connection-file``, else beside the socket."""
        return self.remote_file or self.socket.with_name(self.socket.name + ".remote.json")

    @property
    def target(self) -> Any:
        """Where a client connects: the remote endpoint when one was given, else the Unix socket."""
        return self.connect if self.connect is not None else self.socket

    @property
    def connection_file(self) -> Path:
        """Written by the daemon beside its socket: pid, protocol version, model (owner-only)."""
        return self.socket.with_name(self.socket.name + ".json")

    @property
    def log_file(self) -> Path:
        """Where a detached daemon writes its log."""
        return self.socket.with_name(self.socket.name + ".log")

    def resolved(self) -> Settings:
        """The same settings with absolute paths, so a daemon started elsewhere agrees with its client."""
        return Settings(
            socket=self.socket.expanduser().absolute(),
            model=self.model,
            embeddings=[p.expanduser().absolute() for p in self.embeddings],
            loras=[p.expanduser().absolute() for p in self.loras],
            hypernetworks=[p.expanduser().absolute() for p in self.hypernetworks],
            outputs=self.outputs.expanduser().absolute(),
            device=self.device,
            dtype=self.dtype,
            keep_alive=self.keep_alive,
            prediction_type=self.prediction_type,
            emphasis=self.emphasis,
            comma_padding_backtrack=self.comma_padding_backtrack,
            compile=self.compile,
            listen=list(self.listen),
            tls_cert=self.tls_cert.expanduser().absolute() if self.tls_cert else None,
            tls_key=self.tls_key.expanduser().absolute() if self.tls_key else None,
            remote_file=self.remote_file.expanduser().absolute() if self.remote_file else None,
            connect=self.connect,
            max_queue=self.max_queue,
            ray=self.ray,
            ray_replicas=self.ray_replicas,
        )

    def daemon_args(self) -> list[str]:
        """Command-line options that recreate these settings in a daemon process (for auto-start)."""
        args = ["--socket", str(self.socket), "--model", self.model, "--outputs", str(self.outputs),
                "--device", self.device, "--dtype", self.dtype,
                "--keep-alive", "forever" if self.keep_alive is None else str(self.keep_alive),
                "--emphasis", self.emphasis, "--comma-padding-backtrack", str(self.comma_padding_backtrack)]
        for folder in self.embeddings:
            args += ["--embeddings", str(folder)]
        for folder in self.loras:
            args += ["--loras", str(folder)]
        for folder in self.hypernetworks:
            args += ["--hypernetworks", str(folder)]
        if self.prediction_type:
            args += ["--prediction-type", self.prediction_type]
        if self.compile:
            args.append("--compile")
        if self.max_queue != 512:
            args += ["--max-queue", str(self.max_queue)]
        if self.ray:
            args += ["--ray", self.ray, "--ray-replicas", self.ray_replicas]
        for address in self.listen:  # serve --detach re-runs serve with these
            args += ["--listen", address]
        for option, value in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                              ("--connection-file", self.remote_file)):
            if value is not None:
                args += [option, str(value)]
        return args


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options every command takes; defaults come from ``SDREPL_<NAME>`` then the dataclass."""
    env = os.environ.get
    parser.add_argument("--socket", type=Path, default=Path(env("SDREPL_SOCKET")) if env("SDREPL_SOCKET") else None,
                        help="where the daemon and clients meet (default: one per user in the runtime dir)")
    parser.add_argument("--model", default=env("SDREPL_MODEL", "tiny"),
                        help="tiny, tiny-sd2, tiny-sdxl, a diffusers folder, a .safetensors/.ckpt file, or a hub id")
    parser.add_argument("--embeddings", type=Path, action="append", default=None,
                        help="an embeddings folder (repeatable; default ./embeddings)")
    parser.add_argument("--loras", type=Path, action="append", default=None,
                        help="a LoRA / LyCORIS folder (repeatable; default ./loras)")
    parser.add_argument("--hypernetworks", type=Path, action="append", default=None,
                        help="a hypernetwork folder (repeatable; default ./hypernetworks)")
    parser.add_argument("--outputs", type=Path, default=Path(env("SDREPL_OUTPUTS", "outputs")),
                        help="where pictures are written (default ./outputs)")
    parser.add_argument("--device", default=env("SDREPL_DEVICE", "auto"), help="auto, cuda, cuda:N, mps or cpu; serve: a list (cuda:0,cuda:1) or all for one worker per device")
    parser.add_argument("--dtype", default=env("SDREPL_DTYPE", "auto"), help="auto, fp16, bf16 or fp32")
    parser.add_argument("--prediction-type", default=env("SDREPL_PREDICTION_TYPE") or None,
                        help="epsilon or v_prediction: what the model predicts (default: guessed for single-file "
                             "SD 2.x checkpoints, the model's own config otherwise)")
    parser.add_argument("--keep-alive", default=env("SDREPL_KEEP_ALIVE", "forever"),
                        help="how long the model stays loaded after the last request (30s, 5m, forever)")
    parser.add_argument("--emphasis", default=env("SDREPL_EMPHASIS", "Original"),
                        help="A1111's emphasis mode for (text:1.2): Original, 'No norm', Ignore or None")
    parser.add_argument("--compile", action="store_true", default=env("SDREPL_COMPILE", "") not in ("", "0"),
                        help="torch.compile the UNet and VAE decoder (each picture size compiles once, on first use)")
    parser.add_argument("--comma-padding-backtrack", default=env("SDREPL_COMMA_PADDING_BACKTRACK", "20"),
                        help="A1111's comma backtrack window in tokens, 0 to 74 (0 turns it off; default 20)")


def _folders(given: list[Path] | None, variable: str, default: str) -> list[Path]:
    """Repeated ``--option DIR``, else ``SDREPL_<NAME>`` (``os.pathsep``-separated), else ``./default``."""
    if given:
        return list(given)
    env = os.environ.get(variable)
    return [Path(p) for p in env.split(os.pathsep) if p] if env else [Path(default)]


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """``serve``'s remote listeners (docs/deployment.md)."""
    parser.add_argument("--listen", action="append", default=None, metavar="HOST:PORT",
                        help="also listen on TCP, always TLS with a secret (repeatable; PORT 0 picks a free one)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate for --listen (default: a "
                        "self-signed one made on first start)")
    parser.add_argument("--tls-key", type=Path, default=None, help="the private key of --tls-cert")
    parser.add_argument("--connection-file", type=Path, default=None, metavar="PATH",
                        help="where remote clients' connection file goes (default beside the socket)")
    parser.add_argument("--max-queue", default=os.environ.get("SDREPL_MAX_QUEUE", "512"), metavar="N",
                        help="generations that may wait behind the running one; more get 'queue full' at once "
                             "(default 512)")
    parser.add_argument("--ray", default=os.environ.get("SDREPL_RAY") or None, metavar="ADDRESS|auto",
                        help="run generations on a Ray Serve deployment: a cluster's address, or auto for a local "
                             "Ray this daemon starts and stops (needs pip install 'sdrepl[ray]')")
    parser.add_argument("--ray-replicas", default=os.environ.get("SDREPL_RAY_REPLICAS", "1"), metavar="N|MIN-MAX",
                        help="--ray: replicas of the generation worker, one GPU each where the cluster has GPUs "
                             "(a range MIN-MAX autoscales; default 1)")


def add_connect_option(parser: argparse.ArgumentParser) -> None:
    """Client commands: talk to a remote daemon (``--connect FILE``, or ``SDREPL_HOST`` + token + fingerprint)."""
    env = os.environ.get
    parser.add_argument("--connect", type=Path, default=Path(env("SDREPL_CONNECT")) if env("SDREPL_CONNECT")
                        else None, metavar="FILE", help="a remote daemon's connection file (from `sdrepl serve "
                        "--listen`); or set SDREPL_HOST, SDREPL_TOKEN and SDREPL_FINGERPRINT")


def _remote_endpoint(ns: argparse.Namespace) -> Any:
    from sdrepl.daemon.auth import endpoint_from_env, endpoint_from_file

    given = getattr(ns, "connect", None)
    if given is not None:
        return endpoint_from_file(given)
    if hasattr(ns, "connect"):
        return endpoint_from_env(dict(os.environ))
    return None


def settings_from_args(ns: argparse.Namespace) -> Settings:
    embeddings = _folders(ns.embeddings, "SDREPL_EMBEDDINGS", "embeddings")
    return Settings(
        socket=ns.socket or default_socket(),
        model=ns.model,
        embeddings=list(embeddings),
        loras=_folders(getattr(ns, "loras", None), "SDREPL_LORAS", "loras"),
        hypernetworks=_folders(getattr(ns, "hypernetworks", None), "SDREPL_HYPERNETWORKS", "hypernetworks"),
        outputs=ns.outputs,
        device=ns.device,
        dtype=ns.dtype,
        keep_alive=parse_duration(ns.keep_alive),
        prediction_type=parse_prediction_type(getattr(ns, "prediction_type", None)),
        emphasis=_emphasis(ns.emphasis),
        comma_padding_backtrack=_comma_window(ns.comma_padding_backtrack),
        compile=bool(getattr(ns, "compile", False)),
        listen=list(getattr(ns, "listen", None) or []),
        tls_cert=getattr(ns, "tls_cert", None),
        tls_key=getattr(ns, "tls_key", None),
        remote_file=getattr(ns, "connection_file", None),
        connect=_remote_endpoint(ns),
        max_queue=_max_queue(getattr(ns, "max_queue", None)),
        ray=getattr(ns, "ray", None) or None,
        ray_replicas=str(getattr(ns, "ray_replicas", None) or "1"),
    ).resolved()


def _max_queue(text: str | None) -> int:
    if text is None:
        return 512
    value = str(text).strip()
    if not value.isdigit() or not 0 <= int(value) <= 1_000_000:
        raise UsageError(f"--max-queue {text!r}: give a whole number of waiting generations, 0 to 1000000 (0: only "
                         "the running one; default 512)")
    return int(value)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def parse_prediction_type(text: str | None) -> str | None:
    """``epsilon`` / ``v_prediction`` (``v`` too), or None (empty: guess); anything else is a usage error."""
    value = (text or "").strip().lower()
    if not value:
        return None
    value = {"v": "v_prediction", "eps": "epsilon"}.get(value, value)
    if value not in PREDICTION_TYPES:
        raise UsageError(f"--prediction-type {text!r}: expected epsilon or v_prediction (SD 2.x 768 models "
                         "predict v, the 512 base and SD 1.x predict epsilon)")
    return value


def _emphasis(text: str) -> str:
    from sdrepl.core.errors import PromptError
    from sdrepl.core.prompt import emphasis_mode

    try:
        return emphasis_mode(text)
    except PromptError as exc:
        raise UsageError(f"--emphasis: {exc}") from None


def _comma_window(text: str) -> int:
    from sdrepl.core.prompt import MAX_COMMA_WINDOW

    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_COMMA_WINDOW:
        raise UsageError(f"--comma-padding-backtrack {text!r}: give a whole number of tokens from 0 to "
                         f"{MAX_COMMA_WINDOW} (0 turns the backtrack off; A1111's default is 20)")
    return value
