"""`tweetlm serve RUN`: the app under uvicorn, on 127.0.0.1 unless told otherwise.

Graceful shutdown: on SIGTERM or Ctrl-C uvicorn stops accepting connections, in-flight requests and
streams run to their end (at most `request_timeout`, then they are cancelled), and only then does the
app close the engine. A connection that does not send a whole request within `read_timeout` (20 s) of opening,
or of its previous response, is closed (_ReadDeadline: uvicorn has no such limit).
"""

import functools
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tweetlm.errors import UserError, check
from tweetlm.serve.app import ServeLimits, create_app
from tweetlm.serve.grounding import GroundingConfig, room_warning


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    run: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the line printed at start says which)
    model_name: str | None = None  # default: the run folder's name
    api_key: str | None = None
    device: str = "auto"
    max_batch_size: int = 32
    limits: ServeLimits = field(default_factory=ServeLimits)
    moderate: Path | None = None  # a `tweetlm safety train` folder: moderate requests and replies
    moderate_threshold: float | None = None  # default: the classifier's own
    index: Path | None = None  # a posts index (made if missing): /v1/posts, /v1/search, grounded chat
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    log_level: str = "info"

    def __post_init__(self):
        check(0 <= self.port < 65536, "port", self.port, "must be in 0..65535")
        check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty: give a non-empty key or none")
        if self.grounding.default and self.index is None:
            raise UserError("--ground needs a posts index: add --index INDEX (made by `tweetlm index add`)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so that port 0 and "address in use" are handled here."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, and without it a response's
        # head and body wait ~40 ms for the client's delayed ACK (Nagle's algorithm)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host or --port") from None
    sock.listen(2048)
    return sock


class _ReadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline to send each whole request: `read_timeout` seconds from the
    connection's opening, or from its previous response's end, to the request body's last byte; past it the
    connection is closed (an app waiting on the body sees the client gone). uvicorn bounds only the idle wait
    between keep-alive requests (5 s, reset by any byte), so a client trickling a head or a body, or opening
    connections and sending nothing, would hold them for ever (slowloris)."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout, self.deadline = read_timeout, None

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is whole (or the connection over)
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request's time starts now; a pipelined one already in may disarm it below
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_server(app, limits: ServeLimits, log_level: str = "info") -> uvicorn.Server:
    # graceful shutdown waits for the longest a request may run, plus a little for its last bytes
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(limits.request_timeout) + 5,
                            server_header=False,
                            http=functools.partial(_ReadDeadline, read_timeout=limits.read_timeout))
    return uvicorn.Server(config)


def serve(cfg: ServeConfig) -> None:
    from tweetlm.device import resolve_device
    from tweetlm.infer.engine import Engine
    from tweetlm.model.weights import load_model
    from tweetlm.search.index import Index

    sock = bind(cfg.host, cfg.port)  # first: a taken port fails at once, not after loading the model
    index = None
    try:
        index = Index(cfg.index) if cfg.index is not None else None
        moderator = None
        if cfg.moderate is not None:
            from tweetlm.artifacts.safety import SafetyClassifier  # scikit-learn, only to moderate

            moderator = SafetyClassifier.load(cfg.moderate, cfg.moderate_threshold)
        device = resolve_device(cfg.device)
        model, tokenizer = load_model(cfg.run, device=device)
    except BaseException:
        sock.close()
        if index is not None:
            index.close()
        raise
    name = cfg.model_name or Path(cfg.run).resolve().name
    engine = Engine(model, tokenizer, max_batch_size=cfg.max_batch_size)
    app = create_app(engine, tokenizer, model_name=name, api_key=cfg.api_key, limits=cfg.limits, moderator=moderator,
                     index=index, grounding=cfg.grounding)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {name} ({device}, context {engine.max_seq_len} tokens) at {url}: web chat at {url}/, "
          f"OpenAI API at {url}/v1{', API key required' if cfg.api_key else ''}"
          f"{f', moderated at threshold {moderator.threshold:.3f}' if moderator else ''}", flush=True)
    if index is not None:
        print(f"posts index {cfg.index} ({index.count:,} posts): {url}/v1/posts, {url}/v1/search; chat answers "
              f"grounded {'by default' if cfg.grounding.default else 'on request'} "
              f"({cfg.grounding.k} posts, at most {cfg.grounding.tokens} tokens)", flush=True)
        if (warning := room_warning(tokenizer, engine.max_seq_len, cfg.grounding)) is not None:
            print(warning, flush=True)
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully: SIGTERM then ends
    # the process like Ctrl-C, with exit code 0, instead of killing it by the default action
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn_server(app, cfg.limits, cfg.log_level).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()  # already closed by the app at shutdown; this covers a failed startup
        if index is not None:
            index.close()
    print("server stopped", flush=True)
